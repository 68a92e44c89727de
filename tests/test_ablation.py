"""The LoRA rank ablation: alpha rule, reuse of Phase 2 runs, resume after a kill, analysis."""

import argparse
import json

import pytest


def configs(out, *overrides):
    from loradrift.cli import Configs

    return Configs(argparse.Namespace(preset="tiny", config=[], out=out, data_dir=None, seed=None,
                                      overrides=["study.search=false", "ablation.rank.seeds=[42]", *overrides]))


def test_alpha_rule():
    from loradrift.ablation import lora_scale_of, scaled_alpha

    assert scaled_alpha(28, 8, 4, "ratio") == 14 and isinstance(scaled_alpha(28, 8, 4, "ratio"), int)
    assert scaled_alpha(27, 8, 4, "ratio") == 13.5
    assert scaled_alpha(27, 8, 256, "fixed") == 27
    # ratio keeps standard LoRA's scale; with rsLoRA it grows like sqrt(r)
    assert lora_scale_of(scaled_alpha(16, 8, 64, "ratio"), 64, False) == lora_scale_of(16, 8, False)
    assert lora_scale_of(scaled_alpha(16, 8, 64, "ratio"), 64, True) == pytest.approx(16 / 8 * 64 ** 0.5)


def test_ablation_settings_are_checked():
    from loradrift.config import ConfigError, resolve_config

    for bad, word in (("ablation.rank.ranks=[8,0]", "ranks"), ("ablation.rank.ranks=[8,8]", "ranks"),
                      ("ablation.rank.tasks=[nope]", "ablation.rank.tasks"), ("ablation.rank.alpha_rule=half", "alpha_rule")):
        with pytest.raises(ConfigError, match=word):
            resolve_config(preset="tiny", overrides=[bad])
    assert resolve_config(preset="tiny", overrides=["ablation.rank.ranks=[64,4]"]).ablation.rank.ranks == [4, 64]


def test_rank_config_reuses_phase2_only_for_the_same_config(tmp_path):
    from loradrift.ablation import rank_config

    cfg_for = configs(tmp_path)
    acfg = cfg_for().ablation.rank
    same, reused = rank_config(cfg_for, "sst2", 8, 42, acfg)
    assert reused and same.out_dir == tmp_path and same.method.lora.r == 8
    other, reused = rank_config(cfg_for, "sst2", 32, 42, acfg)
    assert not reused and other.method.lora.r == 32 and other.method.lora.alpha == 64
    assert other.out_dir == tmp_path / "ablation" / "rank" / "lora-ratio" / "r32"
    rs, reused = rank_config(configs(tmp_path, "ablation.rank.rslora=true"), "sst2", 8, 42,
                             configs(tmp_path, "ablation.rank.rslora=true")().ablation.rank)
    assert not reused and rs.method.lora.use_rslora and "rslora-ratio" in str(rs.out_dir)


def test_ablation_resumes_after_a_kill_without_retraining_finished_ranks(tmp_path, monkeypatch):
    from loradrift import train
    from loradrift.ablation import run_rank_ablation
    from loradrift.drift import analyse_drift

    cfg_for = configs(tmp_path, "ablation.rank.ranks=[4,8]")

    class Killed(BaseException):
        pass

    real_train_run = train.train_run

    def dying_train_run(cfg, **kw):
        if cfg.method.name == "lora" and cfg.method.lora.r == 8:  # the last run of the grid
            def on_step(step, total):
                if step == 4:  # after the checkpoint at step 3 (tiny: checkpoint_every 3)
                    raise Killed
            return real_train_run(cfg, on_step=on_step, **kw)
        return real_train_run(cfg, **kw)

    monkeypatch.setattr(train, "train_run", dying_train_run)
    with pytest.raises(Killed):
        run_rank_ablation(cfg_for, ["sst2"])
    finished = sorted(tmp_path.glob("**/result.json"))
    assert len(finished) == 2  # full FT and rank 4
    assert len(list(tmp_path.glob("runs/*/sst2/lora/seed42/checkpoints/last.pt"))) == 1  # killed mid-run
    before = {p: p.stat().st_mtime_ns for p in finished}

    monkeypatch.setattr(train, "train_run", real_train_run)
    # a baseline bar no 6-step run beats: the learning gate must say so (issue 25 point 1)
    from loradrift.io import ResultsStore
    from loradrift.layout import model_key

    ResultsStore(tmp_path / "results.sqlite").put("baseline", model_key(cfg_for().model), "sst2", "majority", 42, "h",
                                                  {"accuracy": 0.99, "dev_majority_accuracy": 0.99})
    trained = []
    real_setup = train.setup
    monkeypatch.setattr(train, "setup", lambda cfg, *a, **k: trained.append((cfg.method.name, cfg.method.lora.r)) or real_setup(cfg, *a, **k))
    summary = run_rank_ablation(cfg_for, ["sst2"])
    assert trained == [("lora", 8)], "a finished run was retrained"
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    res = summary["tasks"]["sst2"]
    assert set(res["by_label"]) == {"full", "r4", "r8"} and res["phase2_reused"] == ["r8"]
    assert not any(g["learned"] for g in res["by_label"].values())
    assert "did not learn" in res["by_label"]["r4"]["not_learned"] and "0.99" in res["by_label"]["r4"]["not_learned"]
    assert any(n.startswith("did not learn sst2") and "full, r4, r8" in n for n in res["notes"])
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["r4"]["run_dir"].startswith("ablation/rank/lora-ratio/r4/")
    assert all(r["delta_loss"] is not None and r["total_intruders"] is not None for r in rows.values())
    # drift is H2's aggregate: the rank-8 and full runs are the Phase 2 runs analyse_drift compares
    model = next((tmp_path / "runs").iterdir()).name
    comp = analyse_drift(tmp_path, model, ["sst2"], jackknife=False, figures=False)["comparison"]["sst2"]
    assert rows["full"]["drift"] == pytest.approx(comp["drift_full_by_seed"]["42"], rel=1e-9)
    assert rows["r8"]["drift"] == pytest.approx(comp["drift_lora_by_seed"]["42"], rel=1e-9)
    adir = tmp_path / "ablation" / "rank" / "lora-ratio"
    assert json.loads((adir / "summary.json").read_text())["settings"]["ranks"] == [4, 8]
    assert (adir / "figures" / "rank_sst2.png").exists() and (adir / "figures" / "drift_by_layer_sst2.png").exists()
