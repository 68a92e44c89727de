"""The method table: one declaration that the config, the CLI and the analyses read."""

import pytest

from loradrift.methods import FULL, LORA, METHOD_NAMES, METHODS, get_method, parse_methods


def test_the_table():
    assert METHOD_NAMES == ("full", "lora") == (FULL, LORA)
    assert not METHODS[FULL].adapter and METHODS[LORA].adapter
    assert get_method("lora").label == "LoRA"
    with pytest.raises(ValueError, match=r"unknown method 'dora' \(full, lora\)"):
        get_method("dora")


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
