import pytest

from loradrift.config import ConfigError, RunConfig, parse_override, preset_names, resolve_config


def test_presets_all_validate():
    assert {"tiny", "smollm2", "tinyllama"} <= set(preset_names())
    for name in preset_names():
        cfg = resolve_config(preset=name)
        assert cfg.preset == name
        for task in ("mrpc", "sst2", "rte", "squad_v2"):
            assert resolve_config(preset=name, task=task).task == task


def test_default_preset_is_smollm2():
    assert resolve_config().model.name == "smollm2-135m"


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
