"""The fine-tuning methods the study compares, declared once (as PEFT registers its tuners).

    METHODS["lora"].label        # "LoRA"
    METHOD_NAMES                 # ("full", "lora"), in the order tables and figures list them

Everything that names, validates, orders, labels or colours a method reads this table; the
config's `method.name`, the CLI's `--method` and the study's `study.methods` take their values
from `METHOD_NAMES`. Import-light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str  # as in paths (runs/<model>/<task>/<method>/), configs (method.name) and the store
    label: str  # in tables and figures: "full FT", "LoRA"
    short: str  # in one-line reasons ("FT did not learn ...")
    default_lr: float  # train.lr when the config leaves it null
    sanity_lr: str  # the `sanity` setting with the overfit check's learning rate
    adapter: bool  # trains a PEFT adapter (with a rank) on a frozen backbone, not every weight
    card_dir: str  # the run folder's exported weights that carry the model card (layout name)
    color: str  # in figures


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(name="full", label="full FT", short="FT", default_lr=2e-5, sanity_lr="lr_full", adapter=False,
               card_dir="model", color="#4C72B0"),
        Method(name="lora", label="LoRA", short="LoRA", default_lr=2e-4, sanity_lr="lr_lora", adapter=True,
               card_dir="adapter", color="#DD8452"),
    ]
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
FULL, LORA = "full", "lora"
assert (FULL, LORA) == METHOD_NAMES, "METHOD_NAMES and the FULL / LORA constants disagree"

#: The config's type for a method name (pydantic validates against it).
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]  (Literal of the tuple's members)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} ({', '.join(METHOD_NAMES)})") from None


def parse_methods(value: str) -> list[str]:
    """'full,lora' → validated method names, in the order given."""
    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--method: unknown method {m!r} ({', '.join(METHOD_NAMES)})")
    return methods
