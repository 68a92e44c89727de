import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from loradrift import drift as D
from loradrift.similarity import debiased_cka, linear_cka

MODEL, TASK = "tiny", "sst2"
N, DIM, N_LAYERS = 40, 16, 4


def _base(seed=0):
    rng = np.random.default_rng(seed)
    # Layers with some shared low-rank structure so CKA is not trivially ~0 for noise.
    z = rng.normal(size=(N, 6))
    return [(z @ rng.normal(size=(6, DIM)) + 0.3 * rng.normal(size=(N, DIM))).astype(np.float32)
            for _ in range(N_LAYERS)]


def _save(path: Path, layers, step=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{i}": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
               for i, x in enumerate(layers)}
    save_file(tensors, str(path), metadata={"step": str(step), "task": TASK, "model": MODEL,
                                            "pooling": "last"})


def _write_base(out: Path, layers, task=TASK):
    _save(out / "base" / MODEL / f"{task}.safetensors", layers)


def _write_run(out: Path, method, seed, snaps: dict, task=TASK, finished=True):
    run = out / "runs" / MODEL / task / method / f"seed{seed}"
    for step, layers in snaps.items():
        _save(run / "snapshots" / f"step_{step:06d}.safetensors", layers, step)
    n_layers = len(next(iter(snaps.values())))
    (run / "snapshots" / "index.json").write_text(json.dumps(
        {"steps": sorted(snaps), "n_layers": n_layers, "n_examples": N, "pooling": "last"}))
    if finished:
        (run / "result.json").write_text("{}")
    return run


def _noisy(base, sd, rng):
    return [x + sd * rng.normal(size=x.shape).astype(np.float32) for x in base]


def _rows(out: Path):
    with open(out / "drift" / "drift_layers.csv") as f:
        return list(csv.DictReader(f))


def _planted(out: Path, ft_sd=1.0, lora_sd=0.2):
    base = _base()
    _write_base(out, base)
    rng = np.random.default_rng(1)
    for seed in range(3):
        _write_run(out, "full", seed, {0: base, 100: _noisy(base, ft_sd, rng)})
        _write_run(out, "lora", seed, {0: base, 100: _noisy(base, lora_sd, rng)})
    return base


def test_identical_representations_have_zero_drift(tmp_path):
    base = _base()
    _write_base(tmp_path, base)
    for m in ("full", "lora"):
        for s in range(2):
            _write_run(tmp_path, m, s, {0: base, 50: base})
    res = D.analyse_drift(tmp_path, MODEL, [TASK], figures=False)
    rows = _rows(tmp_path)
    assert len(rows) == 2 * 2 * 2 * N_LAYERS
    for r in rows:
        assert abs(float(r["drift_cka"])) < 1e-9
        assert abs(float(r["drift_cos"])) < 1e-9
    c = res["comparison"][TASK]
    assert abs(c["drift_full"]) < 1e-9 and abs(c["drift_lora"]) < 1e-9


def test_rotation_is_invisible_to_cka_but_not_to_cosine(tmp_path):
    base = _base()
    _write_base(tmp_path, base)
    rng = np.random.default_rng(3)
    rotated = []
    for x in base:
        q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
        rotated.append((x.astype(np.float64) @ q).astype(np.float32))
    _write_run(tmp_path, "full", 0, {10: rotated})
    D.analyse_drift(tmp_path, MODEL, [TASK], figures=False)
    for r in _rows(tmp_path):
        assert abs(float(r["drift_cka"])) < 1e-6  # float32 storage of the rotated data
        assert float(r["drift_cos"]) > 0.5


def test_planted_reduction_permutation_and_probe_jackknife(tmp_path):
    _planted(tmp_path)
    res = D.analyse_drift(tmp_path, MODEL, [TASK], figures=False)
    c = res["comparison"][TASK]
    assert c["reduction_pct"] > 0
    assert min(c["drift_full_by_seed"].values()) > max(c["drift_lora_by_seed"].values())
    assert c["perm_p"] == pytest.approx(1 / 20)
    assert c["perm_n_relabellings"] == 20 and c["perm_kind"] == "exact"
    assert c["primary_metric"] == "debiased" and c["probe_metric"] == "debiased"
    lo, hi = c["probe_ci"]
    assert 0 < lo <= c["reduction_pct"] <= hi and c["probe_var_log_ratio"] > 0
    ft = np.mean(list(c["drift_full_by_seed"].values()))
    lora = np.mean(list(c["drift_lora_by_seed"].values()))
    assert c["reduction_pct"] == pytest.approx((ft - lora) / ft * 100)

    on_disk = json.loads((tmp_path / "drift" / "comparison.json").read_text())
    assert set(on_disk) == {TASK}
    assert on_disk[TASK]["drift_full_by_seed"].keys() == {"0", "1", "2"}
    with open(tmp_path / "drift" / "comparison.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["task"] == TASK and float(row["perm_p"]) == pytest.approx(0.05)
    assert row["n_seeds_full"] == "3" and float(row["probe_ci_lo"]) == pytest.approx(lo)


@pytest.mark.parametrize("metric", ["linear", "rbf"])
def test_other_primary_metrics(tmp_path, metric):
    _planted(tmp_path)
    c = D.analyse_drift(tmp_path, MODEL, [TASK], metric=metric, jackknife=False, figures=False)["comparison"][TASK]
    assert c["primary_metric"] == metric and c["probe_ci"] == [None, None]
    assert c["reduction_pct"] > 0
    finals = [r for r in _rows(tmp_path) if r["is_final"] == "1"]
    assert finals and all(r["drift_primary"] != "" for r in finals)
    assert all(r["drift_primary"] == "" for r in _rows(tmp_path) if r["is_final"] == "0")


def test_drift_grows_with_step(tmp_path):
    base = _base()
    _write_base(tmp_path, base)
    rng = np.random.default_rng(7)
    steps = {0: 0.0, 10: 0.2, 20: 0.5, 30: 1.0, 40: 2.0}
    for seed in range(2):
        _write_run(tmp_path, "full", seed, {s: _noisy(base, sd, rng) for s, sd in steps.items()})
    D.analyse_drift(tmp_path, MODEL, [TASK], figures=False)
    rows = _rows(tmp_path)
    for seed in ("0", "1"):
        for layer in range(N_LAYERS):
            sel = sorted((int(r["step"]), float(r["drift_cka"]), float(r["drift_cos"]), r["is_final"])
                         for r in rows if r["seed"] == seed and r["layer"] == str(layer))
            assert [s for s, *_ in sel] == sorted(steps)
            assert sel[0][1] == pytest.approx(0, abs=1e-9)
            assert all(a[1] < b[1] for a, b in zip(sel, sel[1:]))
            assert all(a[2] < b[2] for a, b in zip(sel, sel[1:]))
            assert [f for *_, f in sel] == ["0"] * 4 + ["1"]


def test_missing_base_is_an_error(tmp_path):
    _write_run(tmp_path, "full", 0, {0: _base()})
    with pytest.raises(ValueError, match=f"{TASK}.safetensors"):
        D.analyse_drift(tmp_path, MODEL, [TASK], figures=False)


@pytest.mark.parametrize("bad", ["n", "d", "layers"])
def test_shape_mismatch_names_the_file(tmp_path, bad):
    base = _base()
    _write_base(tmp_path, base)
    wrong = {"n": [x[:-1] for x in base], "d": [x[:, :-1] for x in base], "layers": base[:-1]}[bad]
    run = _write_run(tmp_path, "full", 0, {0: base, 5: wrong})
    with pytest.raises(ValueError, match="step_000005.safetensors"):
        D.analyse_drift(tmp_path, MODEL, [TASK], figures=False)
    assert run.exists()


def test_missing_runs_and_snapshots_are_skipped_with_a_warning(tmp_path, caplog):
    base = _planted(tmp_path)
    run = tmp_path / "runs" / MODEL / TASK / "lora" / "seed2"
    (run / "snapshots" / "step_000100.safetensors").unlink()  # listed in index.json, gone
    # a seed that only FT has
    _write_run(tmp_path, "full", 3, {0: base, 100: _noisy(base, 1.0, np.random.default_rng(9))},
               finished=False)
    with caplog.at_level(logging.WARNING, logger="loradrift.drift"):
        res = D.analyse_drift(tmp_path, MODEL, "all", figures=False)
    text = caplog.text
    assert "[100]" in text and "lora/seed3" in text and "no result.json" in text
    c = res["comparison"][TASK]
    assert c["drift_full_by_seed"].keys() == {"0", "1", "2", "3"}
    # lora seed 2 only has step 0 left, which becomes its "final" step
    assert c["final_step_lora_by_seed"]["2"] == 0
    assert c["perm_n_relabellings"] == 35  # C(7, 4)


def test_unknown_task_without_runs_is_skipped(tmp_path, caplog):
    _planted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loradrift.drift"):
        res = D.analyse_drift(tmp_path, MODEL, [TASK, "nope"], figures=False)
    assert set(res["comparison"]) == {TASK} and "nope" in caplog.text


def test_figures_are_written(tmp_path):
    _planted(tmp_path)
    res = D.analyse_drift(tmp_path, MODEL, [TASK])
    figs = sorted((tmp_path / "drift" / "figures").iterdir())
    assert [p.name for p in figs] == [f"final_by_layer_{TASK}.png", f"heatmap_{TASK}.png", f"over_training_{TASK}.png"]
    for p in figs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
        assert p in res["files"]
    # atomic writes leave no temporary files behind
    assert not [p for p in (tmp_path / "drift").rglob("*") if p.name.startswith(".")]


def test_a_constant_base_layer_is_left_out_not_fatal(tmp_path, caplog):
    """Last-token pooling at the embedding layer is constant when every probe input ends with the
    same token: CKA is undefined there, so that layer is NaN and left out of the drift means."""
    base = _base()
    base[0] = np.tile(base[0][:1], (N, 1))
    _write_base(tmp_path, base)
    rng = np.random.default_rng(1)
    finals = {}
    for seed in range(2):
        for m, sd in (("full", 1.0), ("lora", 0.2)):
            finals[m, seed] = _noisy(base, sd, rng)
            finals[m, seed][0] = base[0]  # the same token's embedding stays constant
            _write_run(tmp_path, m, seed, {0: base, 10: finals[m, seed]})
    with caplog.at_level(logging.WARNING):
        res = D.analyse_drift(tmp_path, MODEL, [TASK], metric="linear", figures=False)
    assert "layer(s) [0]" in caplog.text
    c = res["comparison"][TASK]
    assert c["cka_undefined_layers"] == [0]
    for (m, seed), layers in finals.items():
        expect = np.mean([1.0 - linear_cka(base[i], layers[i]) for i in range(1, N_LAYERS - 1)])
        assert c[f"drift_{m}_by_seed"][str(seed)] == pytest.approx(expect, abs=1e-9)
    assert all(np.isfinite(c["probe_ci"]))
    layer0 = [r for r in _rows(tmp_path) if r["layer"] == "0"]
    assert layer0 and all(r["cka"] in ("", "nan") for r in layer0)


def test_aggregate_is_over_block_outputs_not_embedding_or_final_norm(tmp_path):
    """Full FT moves the embedding layer and the final-norm output, which LoRA cannot; the blocks
    in between move equally. The old mean over all layers reported a large reduction; the
    aggregate over block outputs 1..L-1 reports none, and the two ends are shown separately."""
    base = _base()
    _write_base(tmp_path, base)
    rng = np.random.default_rng(11)
    for seed in range(3):
        for m in ("full", "lora"):
            layers = _noisy(base, 0.4, rng)
            if m == "full":
                layers[0] = _noisy([base[0]], 3.0, rng)[0]
                layers[-1] = _noisy([base[-1]], 3.0, rng)[0]
            else:
                layers[0], layers[-1] = base[0], base[-1]
            _write_run(tmp_path, m, seed, {0: base, 10: layers})
    c = D.analyse_drift(tmp_path, MODEL, [TASK], metric="linear", figures=False)["comparison"][TASK]
    assert c["aggregate_layers"] == f"1..{N_LAYERS - 2}"
    assert abs(c["reduction_pct"]) < 20
    all_layers = [r for r in _rows(tmp_path) if r["is_final"] == "1"]
    mean_all = {m: np.mean([float(r["drift_primary"]) for r in all_layers if r["method"] == m]) for m in ("full", "lora")}
    assert (mean_all["full"] - mean_all["lora"]) / mean_all["full"] * 100 > 40  # what the old aggregate said
    assert c["drift_layer0_full"] > 0.1 and c["drift_layer0_lora"] == pytest.approx(0, abs=1e-9)
    assert c["drift_last_full"] > 0.1 and c["drift_last_lora"] == pytest.approx(0, abs=1e-9)


def test_default_estimator_is_debiased_and_sees_unrelated_features():
    """n = 32 probe examples, d = 576: independent Gaussian features look alike to biased linear
    CKA (~0.95: 'no drift'), not to the debiased estimator that is now the default."""
    import inspect

    from loradrift.config import DriftConfig

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 576)), rng.normal(size=(32, 576))
    assert linear_cka(x, y) > 0.9
    assert abs(debiased_cka(x, y)) < 0.15
    assert DriftConfig().metric == "debiased"
    assert inspect.signature(D.analyse_drift).parameters["metric"].default == "debiased"


def test_noise_floor_is_read_from_the_second_base_extraction(tmp_path, caplog):
    base = _planted(tmp_path)
    with caplog.at_level(logging.WARNING):
        c = D.analyse_drift(tmp_path, MODEL, [TASK], jackknife=False, figures=False)["comparison"][TASK]
    assert c["noise_floor"] is None and "noise-floor" in caplog.text
    again = _noisy(base, 1e-3, np.random.default_rng(4))
    _save(tmp_path / "base" / MODEL / f"{TASK}.floor.safetensors", again)
    c = D.analyse_drift(tmp_path, MODEL, "all", jackknife=False, figures=False)["comparison"]
    assert list(c) == [TASK]  # the floor file is not a task
    c = c[TASK]
    want = np.mean([abs(1 - debiased_cka(base[i].astype(np.float64), again[i].astype(np.float64)))
                    for i in range(1, N_LAYERS - 1)])
    assert c["noise_floor"] == pytest.approx(want, rel=1e-9)


def test_primary_drift_of_a_layer_without_spread_is_undefined_not_an_error():
    import numpy as np

    from loradrift.drift import _primary_drift

    rng = np.random.default_rng(0)
    base = [rng.normal(size=(16, 8)), rng.normal(size=(16, 8))]
    # the same vector for every probe example: the centred Gram matrix is zero
    flat = np.repeat(rng.normal(size=(1, 8)), 16, axis=0)
    out = _primary_drift("debiased", base, [base[0], flat], np.zeros(2), 0.5)
    assert out[0] == 0.0 and np.isnan(out[1])


def test_training_curves_average_h2_layers_per_seed_then_over_seeds():
    """Hand-made rows for 4 entries (layer 0, blocks 1 and 2, layer 3 after the final norm): the
    curve averages layers 1-2 per seed, then takes mean, min and max over the seeds at each step;
    NaN (undefined CKA) is left out, and a step only one seed reached counts that seed alone."""
    nan = float("nan")

    def row(seed, step, layer, cka, cos):
        return {"task": "t", "method": "lora", "seed": seed, "step": step, "layer": layer, "drift_cka": cka, "drift_cos": cos}

    rows = []
    for seed, (a, b) in {1: (0.1, 0.3), 2: (0.5, nan)}.items():
        rows += [row(seed, 0, layer, 0.0, 0.0) for layer in range(4)]
        rows += [row(seed, 10, 0, 9.0, 9.0), row(seed, 10, 1, a, a / 10), row(seed, 10, 2, b, b / 10), row(seed, 10, 3, 9.0, 9.0)]
    rows += [row(1, 20, 1, 0.2, 0.0), row(1, 20, 2, 0.4, 0.0)]  # seed 2 stopped early
    got = {(c["drift"], c["step"]): c for c in D.training_curves(rows)}
    assert set(got) == {(d, s) for d in ("drift_cka", "drift_cos") for s in (0, 10, 20)}
    c = got[("drift_cka", 10)]  # seed 1: (0.1 + 0.3) / 2 = 0.2; seed 2: 0.5 (its NaN layer left out)
    assert (c["mean"], c["min"], c["max"], c["n_seeds"]) == (pytest.approx(0.35), pytest.approx(0.2), 0.5, 2)
    assert got[("drift_cos", 10)]["mean"] == pytest.approx((0.02 + 0.05) / 2)
    assert got[("drift_cka", 20)]["n_seeds"] == 1 and got[("drift_cka", 20)]["mean"] == pytest.approx(0.3)
    assert got[("drift_cka", 0)]["max"] == 0.0


def test_progress_after_each_task(tmp_path):
    base = _base()
    for task in ("sst2", "rte"):
        _write_base(tmp_path, base, task)
        _write_run(tmp_path, "full", 0, {0: base, 10: base}, task)
    calls = []
    D.analyse_drift(tmp_path, MODEL, ["sst2", "rte"], jackknife=False, figures=False, progress=lambda *a: calls.append(a))
    assert calls == [(1, 2), (2, 2)]
