import pytest

from loradrift.config import ConfigError, RunConfig, SearchConfig, parse_override, preset_names, resolve_config


def test_presets_all_validate():
    assert {"tiny", "smollm2", "smollm2-gpu", "tinyllama"} <= set(preset_names())
    for name in preset_names():
        cfg = resolve_config(preset=name)
        assert cfg.preset == name
        for task in ("mrpc", "sst2", "rte", "squad_v2"):
            assert resolve_config(preset=name, task=task).task == task


def test_default_preset_is_smollm2_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_config().preset == "smollm2" and resolve_config().model.name == "smollm2-135m"


def _with_gpu(monkeypatch, available: bool):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("gpu, preset, why", [(True, "smollm2-gpu", "a CUDA GPU is present (NVIDIA H100 80GB HBM3)"),
                                              (False, "smollm2", "no CUDA GPU is available")])
def test_study_picks_its_preset_by_device_and_says_why_first(monkeypatch, tmp_path, capsys, gpu, preset, why):
    import loradrift.study
    from loradrift.cli import main

    _with_gpu(monkeypatch, gpu)
    seen = []

    def fake_study(configs, phases, tasks, **kw):
        seen.append((configs().preset, configs(task="sst2").out_dir))
        return {"phases": [], "total_seconds": 0.0}

    monkeypatch.setattr(loradrift.study, "run_study", fake_study)
    assert main(["study", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"loradrift study: preset {preset}, because {why} (--preset names another)"
    assert seen == [(preset, tmp_path)]
    # A named preset wins over the device, and the first line says so.
    assert main(["study", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "loradrift study: preset tiny (from --preset)"
    assert seen[-1][0] == "tiny"


def test_commands_without_a_preset_agree_on_the_output_folder(monkeypatch):
    # `report` or `stats` after `study` on the same machine must find the study's folder.
    _with_gpu(monkeypatch, True)
    assert str(resolve_config().out_dir) == "runs/smollm2-gpu"
    _with_gpu(monkeypatch, False)
    assert str(resolve_config().out_dir) == "runs/smollm2"


SMOLLM2_HIDDEN = 576  # SmolLM2-135M's hidden size (models.describe on the GGUF)
DEV_SIZES = {"mrpc": 408, "sst2": 872, "rte": 277, "squad_v2": 11873}  # src/loradrift/taskdata/README.md


def test_gpu_preset_is_the_study_the_findings_need():
    """The smollm2-gpu preset (docs/results.md, "SmolLM2 on a GPU"): full train sets (SST-2
    capped), full dev sets, >= 6 search trials, 3 seeds, snapshots every 100 steps, a probe the
    estimator can use, and serving at the plan's batch sizes on vLLM wherever it is installed
    (issue 25 point 8: `hf` decided H3 on PEFT even next to vLLM)."""
    base = resolve_config(preset="smollm2-gpu")
    assert base.model.name == "smollm2-135m" and len(base.study.seeds) == 3 and base.search.trials >= 6
    assert base.search.trial_max_steps is not None  # short trials
    assert base.serve.backend == "auto" and base.serve.batch_sizes == [1, 2, 4, 8, 16] and base.serve.rounds >= 10
    for task in ("mrpc", "sst2", "rte", "squad_v2"):
        cfg = resolve_config(preset="smollm2-gpu", task=task)
        assert cfg.data.max_dev_examples is None, task  # full dev sets
        assert cfg.data.max_train_examples is None or task in ("sst2", "squad_v2"), task
        assert cfg.probe.enabled and cfg.probe.snapshot_every == 100
        assert cfg.search.spaces == SearchConfig().spaces  # the research plan's spaces, unchanged
        # The probe and the final-step estimator agree: debiased CKA is unbiased at any n >= 4, and
        # the probe is >= 512 and >= 2 x hidden size (so that even biased linear CKA, n >> d, would
        # do) wherever the dev set has that many examples; otherwise it is the whole dev set.
        assert cfg.drift.metric == "debiased"
        assert cfg.probe.size >= max(512, 2 * SMOLLM2_HIDDEN)
        n_probe = min(cfg.probe.size, DEV_SIZES[task])
        assert n_probe == DEV_SIZES[task] or n_probe >= 2 * SMOLLM2_HIDDEN
    # The offline SQuAD v2 subset is 4,719 questions: the cap keeps a Hub download the same size.
    assert resolve_config(preset="smollm2-gpu", task="squad_v2").data.max_train_examples == 4719
    assert resolve_config(preset="smollm2-gpu", task="sst2").data.max_train_examples < 67349


# Learning rates at which 80 SST-2 steps of 16 reached >= 0.80 on all 872 dev sentences on the
# 2-core CPU (docs/training.md, "The default CPU study"); full FT at 3e-5 did not (0.78).
SST2_VERIFIED_LR = {"full": (5e-5, 1.2e-4), "lora": (5e-4, 2e-3)}


def test_cpu_preset_spends_its_tokens_on_sst2():
    """The smollm2 preset (docs/training.md, "The default CPU study"): SST-2 learns and is scored
    on its whole dev set, its search cannot pick a learning rate outside the verified window nor
    change a final run's cost, and the other tasks stay cheap."""
    for method, (low, high) in SST2_VERIFIED_LR.items():
        cfg = resolve_config(preset="smollm2", task="sst2", overrides=[f"method.name={method}"])
        assert cfg.data.max_dev_examples is None  # all 872
        assert cfg.train.max_steps * cfg.train.batch_size <= cfg.data.max_train_examples  # each example once
        assert cfg.train.engine.group_by_length == "on" and cfg.train.engine.fused_optimizer == "on"
        assert cfg.search.trials >= 2 and cfg.search.trial_max_steps < cfg.train.max_steps
        (lr,) = cfg.search.spaces[method]  # only the learning rate: batch size would change the cost
        assert lr.name == "train.lr" and low <= lr.low < lr.high <= high
    for task in ("mrpc", "rte", "squad_v2"):
        cfg = resolve_config(preset="smollm2", task=task)
        assert cfg.train.max_steps * cfg.train.batch_size <= 32 and cfg.data.max_dev_examples <= 64
        # No checkpoint (a full-FT one is 1.6 GB) and only the final snapshot in a run this short.
        assert cfg.train.checkpoint_every >= cfg.train.max_steps and cfg.probe.snapshot_every >= cfg.train.max_steps


def test_override_types_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  batch_size: 4\n")
    cfg = resolve_config(preset="tiny", files=[f], overrides=["train.lr=1e-4", "method.lora.r=16"])
    assert cfg.train.lr == pytest.approx(1e-4)  # CLI beats file
    assert cfg.train.batch_size == 4  # file beats preset
    assert cfg.method.lora.r == 16 and cfg.model.name == "tiny"


def test_per_task_block_applies_only_to_its_task_and_cli_still_wins():
    assert resolve_config(preset="smollm2", task="squad_v2").model.max_length == 128
    assert resolve_config(preset="smollm2", task="sst2").model.max_length == 64
    assert resolve_config(preset="smollm2", task="squad_v2", overrides=["model.max_length=100"]).model.max_length == 100


@pytest.mark.parametrize(
    "override, key",
    [("train.lrr=1", "train.lrr"), ("train.lr=abc", "train.lr"), ("method.name=qlora", "method.name"),
     ("model.max_length=-3", "model.max_length"), ("nonsense=1", "nonsense"),
     ("train.lr=.inf", "train.lr: Input should be a finite number"),
     ("train.epochs=.inf", "train.epochs: Input should be a finite number"),
     ("train.max_grad_norm=.nan", "train.max_grad_norm: Input should be a finite number")],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(preset="tiny", overrides=[override])


def test_unknown_key_in_yaml_file_names_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("probe:\n  sizee: 3\n")
    with pytest.raises(ConfigError, match=r"probe\.sizee: unknown config key"):
        resolve_config(preset="tiny", files=[f])


def test_unknown_preset_and_task():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve_config(preset="huge")
    with pytest.raises(ConfigError, match="unknown task 'cola'"):
        resolve_config(preset="tiny", task="cola")


def test_parse_override_values():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=1e-4") == {"a": 1e-4}
    assert parse_override("a=[q_proj, v_proj]") == {"a": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_roundtrip_yaml(tmp_path):
    cfg = resolve_config(preset="tiny", task="rte", overrides=["train.lr=3e-4"])
    f = tmp_path / "r.yaml"
    f.write_text(cfg.to_yaml())
    import yaml

    again = RunConfig.model_validate(yaml.safe_load(f.read_text()))
    assert again == cfg and again.science_hash() == cfg.science_hash()


def test_science_hash_ignores_output_folder():
    a = resolve_config(preset="tiny", out_dir="x")
    b = resolve_config(preset="tiny", out_dir="y")
    c = resolve_config(preset="tiny", overrides=["train.lr=1e-3"])
    assert a.science_hash() == b.science_hash() != c.science_hash()


def test_science_hash_ignores_later_phase_settings():
    a = resolve_config(preset="tiny")
    b = resolve_config(preset="tiny", overrides=["serve.rounds=9", "drift.metric=linear", "stats.floor_factor=3", "study.seeds=[1]"])
    assert a.science_hash() == b.science_hash()


def test_a_config_file_beats_the_presets_per_task_block(tmp_path):
    """A best-config YAML must be able to set what a preset sets per task (e.g. batch size)."""
    f = tmp_path / "best.yaml"
    f.write_text("train:\n  batch_size: 8\nmodel:\n  max_length: 100\n")
    cfg = resolve_config(preset="smollm2", task="squad_v2", files=[f])
    assert cfg.train.batch_size == 8 and cfg.model.max_length == 100
    assert resolve_config(preset="smollm2", task="squad_v2").train.batch_size == 4


def test_bad_key_in_an_unused_per_task_block_is_reported(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("per_task:\n  rte:\n    train:\n      lrr: 1\n")
    with pytest.raises(ConfigError, match=r"(?s)per_task\.rte.*train\.lrr: unknown config key"):
        resolve_config(preset="tiny", task="sst2", files=[f])
