"""Probe set → per-layer pooled vectors → safetensors snapshot files.

    loradrift extract-base --task all

A snapshot holds, for every layer (`layer.0` = embedding output, `layer.i` = output of block i, as
`output_hidden_states` returns them), one vector per probe example, pooled like the classifier
(last non-padding token for decoders by default; `model.pooling=mean` for mean pooling). Probe
batches are streamed: only one snapshot's vectors are in memory at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loradrift import layout
from loradrift.config import RunConfig
from loradrift.data import collate, length_sorted_batches
from loradrift.io import atomic_path, atomic_write_json
from loradrift.models import pool


def encode_probe(spec, tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """One sequence per probe example (SQuAD: question + the first window of its context)."""
    return spec.handler("probe_encode")(tokenizer, rows, max_length)


def probe_text_features(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    b = [r["text_b"] for r in rows] if rows[0]["text_b"] is not None else None
    enc = tokenizer([r["text_a"] for r in rows], b, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": 0} for ids in enc["input_ids"]]


def probe_squad_features(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    enc = tokenizer([r["question"].lstrip() for r in rows], [r["context"] for r in rows],
                    truncation="only_second", max_length=max_length)
    return [{"input_ids": ids, "label": 0} for ids in enc["input_ids"]]


#: Every snapshot (base file, step 0 and all run snapshots) is computed in this dtype, with
#: autocast off, whatever dtype the model trains in: bf16 vs fp32 of the same model alone gives
#: 1 - CKA of ~1e-5 per layer, as large as a short fine-tuning run's drift.
EXTRACT_DTYPE = torch.float32


def _in_extract_dtype(task_model):
    """The model itself when all its floating-point weights are already in EXTRACT_DTYPE, else an
    upcast copy (the training model is left as it is)."""
    if all(t.dtype == EXTRACT_DTYPE for t in [*task_model.parameters(), *task_model.buffers()] if t.is_floating_point()):
        return task_model
    import copy

    return copy.deepcopy(task_model).to(EXTRACT_DTYPE)


@contextlib.contextmanager
def _full_fp32_matmuls():
    """TF32 off while extracting: the training engine turns it on for a GPU's fp32 matmuls, and its
    10-bit mantissa would put a rounding floor under the drift that snapshots measure."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def extract(task_model, probe_feats: list[dict], batch_size: int, pad_id: int, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Pooled per-layer vectors of the probe set, computed in float32 with autocast disabled
    (`dtype` is only the storage dtype of the returned tensors)."""
    was_training = task_model.training
    model = _in_extract_dtype(task_model)
    model.eval()
    per_layer: list[list[torch.Tensor]] | None = None
    order: list[int] = []
    with torch.autocast(device_type=torch.device(device).type, enabled=False), _full_fp32_matmuls():
        for idx in length_sorted_batches(probe_feats, batch_size):
            batch = collate([probe_feats[i] for i in idx], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            states = model.layer_states(ids, mask)
            pooled = [pool(h, mask, model.pooling).to("cpu", dtype) for h in states]
            if per_layer is None:
                per_layer = [[] for _ in pooled]
            for acc, p in zip(per_layer, pooled):
                acc.append(p)
            order += idx
    task_model.train(was_training)
    back = torch.argsort(torch.tensor(order))  # rows in probe order again
    return {f"layer.{i}": torch.cat(chunks)[back].contiguous() for i, chunks in enumerate(per_layer)}


def floor_batch_size(batch_size: int) -> int:
    """A different batch composition for the noise-floor re-extraction of the base model."""
    return batch_size // 2 if batch_size > 1 else 2


def save_snapshot(path: Path, tensors: dict[str, torch.Tensor], **meta) -> None:
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def probe_key(cfg: RunConfig) -> str:
    """What a snapshot's probe inputs depend on: equal keys mean the same probe sequences."""
    fields = {"model": cfg.model.model_dump(mode="json"), "task": cfg.task, "probe": cfg.probe.model_dump(mode="json", exclude={"enabled"}),
              "data": cfg.data.model_dump(mode="json"), "eval_batch_size": cfg.train.eval_batch_size}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def read_snapshot_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_snapshot(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def snapshot_path(run_dir: Path, step: int) -> Path:
    return layout.run_path(run_dir, "snapshot", step=step)


def write_index(run_dir: Path, pooling: str) -> dict:
    snap_dir = layout.run_path(run_dir, "snapshots")
    steps = sorted(int(p.stem.split("_")[1]) for p in snap_dir.glob("step_*.safetensors"))
    first = load_file(str(snapshot_path(run_dir, steps[0])))
    index = {"steps": steps, "final_step": steps[-1], "n_layers": len(first), "n_examples": int(first["layer.0"].shape[0]), "pooling": pooling}
    atomic_write_json(layout.run_path(run_dir, "snapshot_index"), index)
    return index


def floor_path(base: Path) -> Path:
    """The base model's probe representations extracted a second time with another batch
    composition: drift between the two is the numerical noise floor of the drift measure."""
    return Path(base).with_suffix(layout.FLOOR_SUFFIX)


def read_index(run_dir: Path) -> dict:
    return json.loads(layout.run_path(run_dir, "snapshot_index").read_text())
