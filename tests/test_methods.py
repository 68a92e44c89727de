"""The method table: one declaration that the config, the CLI and the analyses read."""

import pytest

from loradrift.methods import FULL, LORA, METHOD_NAMES, METHOD_ROLES, METHODS, get_method, parse_methods


def test_the_table():
    assert METHOD_NAMES == ("full", "lora") == (FULL, LORA)
    assert not METHODS[FULL].adapter and METHODS[LORA].adapter
    assert get_method("lora").label == "LoRA"
    with pytest.raises(ValueError, match=r"unknown method 'dora' \(full, lora\)"):
        get_method("dora")


def test_every_method_resolves_its_handlers():
    from loradrift import context, export

    for m in METHODS.values():
        for role in METHOD_ROLES:
            assert callable(m.handler(role)), f"{m.name}: {role}"
    assert METHODS[FULL].handler("apply") is context.apply_full and METHODS[LORA].handler("apply") is context.apply_lora
    assert METHODS[FULL].handler("export") is export.export_full and METHODS[LORA].handler("export") is export.export_lora
    with pytest.raises(ValueError, match="unknown method handler role 'nope'"):
        METHODS[FULL].handler("nope")


def test_parse_methods():
    assert parse_methods("lora, full") == ["lora", "full"]
    with pytest.raises(ValueError, match=r"--method: unknown method 'x' \(full, lora\)"):
        parse_methods("full,x")


def test_the_config_takes_its_methods_from_the_table():
    from pydantic import ValidationError

    from loradrift.config import MethodConfig, SanityConfig, StudyConfig, TrainConfig

    assert StudyConfig().methods == list(METHOD_NAMES)
    with pytest.raises(ValidationError):
        MethodConfig(name="dora")
    assert TrainConfig().lr_for(FULL) == 2e-5 and TrainConfig().lr_for(LORA) == 2e-4
    for m in METHODS.values():
        assert m.sanity_lr in SanityConfig.model_fields
