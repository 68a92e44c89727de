"""The fine-tuning methods the study compares, declared once (as PEFT registers its tuners).

    METHODS["lora"].label        # "LoRA"
    METHOD_NAMES                 # ("full", "lora"), in the order tables and figures list them

Everything that names, validates, orders, labels or colours a method reads this table; the
config's `method.name`, the CLI's `--method` and the study's `study.methods` take their values
from `METHOD_NAMES`. What a method does to the model (`apply`) and which weight folders it
exports (`export`) are "module:function" handlers resolved on first use, so this module stays
import-light (no torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from loradrift.tasks import resolve

#: The roles a method's handlers play ("module:function", imported only when used), with the
#: signature each handler has.
METHOD_ROLES: dict[str, str] = {
    "apply": "(ctx) -> the PEFT wrapper or None: which parameters of ctx.model train (loradrift.context)",
    "export": "(ctx, rd) -> None: the run folder's weight folders besides the head (loradrift.export)",
}


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
    apply: str  # METHOD_ROLES["apply"]: sets up which parameters train, at setup
    export: str  # METHOD_ROLES["export"]: writes the trained weights' folders, at the end of a run

    def handler(self, role: str) -> Callable:
        """The method's handler for `role` (METHOD_ROLES), imported on first use."""
        if role not in METHOD_ROLES:
            raise ValueError(f"unknown method handler role {role!r} (known: {', '.join(METHOD_ROLES)})")
        return resolve(getattr(self, role))


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(name="full", label="full FT", short="FT", default_lr=2e-5, sanity_lr="lr_full", adapter=False,
               card_dir="model", color="#4C72B0", apply="loradrift.context:apply_full", export="loradrift.export:export_full"),
        Method(name="lora", label="LoRA", short="LoRA", default_lr=2e-4, sanity_lr="lr_lora", adapter=True,
               card_dir="adapter", color="#DD8452", apply="loradrift.context:apply_lora",
               export="loradrift.export:export_lora"),
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
