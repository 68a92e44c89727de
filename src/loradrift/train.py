"""One training run, full fine-tuning or LoRA, top to bottom:
setup → resume (if a checkpoint exists) → train with snapshots, evaluation and checkpoints →
final evaluation → export → result row.

    loradrift train --task sst2 --method lora --seed 42 [--preset smollm2] [--config f.yaml] [key=value ...]

Both methods share the head, the data order for a seed, and the evaluation code: the only
difference is which parameters train. A lean loop rather than the HF Trainer, because exact
kill -9 resume (data position and every RNG), representation snapshots at fixed optimizer steps
and identical code paths for both methods are simpler to guarantee by hand (docs/training.md).
"""

from __future__ import annotations

import json
import math
import pickle
import resource
import shutil
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from loradrift import tracking
from loradrift.config import EngineConfig, RunConfig, load_run_config, save_config
from loradrift.data import TaskData, collate, encode, length_sorted_batches, load_task, probe_examples, rows_as_squad_json
from loradrift.io import (LockBusy, ResultsStore, StoreError, atomic_path, atomic_write_json, atomic_write_text, exclusive_lock,
                          make_dir, respect_umask, serve_adapter_dir)
from loradrift.metrics import compute_metrics, squad_v2_evaluate
from loradrift.models import (build_task_model, compute_dtype, hf_task_type, is_decoder, load_backbone, load_tokenizer,
                              model_key, public_base, resolve_model_dir)
from loradrift.representations import base_path, encode_probe, extract, probe_key, read_snapshot_meta, save_snapshot, snapshot_path, write_index
from loradrift.runtime import set_threads
from loradrift.tasks import TaskSpec, get_task


class RunConflict(RuntimeError):
    """A run with a different config is in the way (finished or not), another process is
    running in the folder, or the folder holds a checkpoint or result.json that cannot be read
    (a truncated copy, a full disk); nothing is overwritten."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops without a result."""


# The run folder's lock file (flock): held by the process that trains in the folder.
LOCK_NAME = ".lock"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / "runs" / model_key(cfg.model) / cfg.task / cfg.method.name / f"seed{cfg.seed}"


# ---------------------------------------------------------------------------------------------
# setup


@dataclass(frozen=True)
class Engine:
    """The engine switches of one run with `auto` resolved for its device and length."""

    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    pad_to_multiple_of: int | None = None
    group_by_length: bool = False
    fused_optimizer: bool = False
    tf32: bool = False
    pin_memory: bool = False
    gradient_checkpointing: bool = False


def resolve_engine(ecfg: EngineConfig, device: torch.device, total_steps: int) -> Engine:
    cuda = device.type == "cuda"

    def on(switch: str, auto: bool) -> bool:
        return auto if switch == "auto" else switch == "on"

    compile_ = on(ecfg.compile, cuda and total_steps >= ecfg.compile_min_steps)
    pad = ecfg.pad_to_multiple_of or (32 if compile_ else None)
    return Engine(compile=compile_, compile_mode=ecfg.compile_mode, compile_scope=ecfg.compile_scope, pad_to_multiple_of=pad,
                  group_by_length=on(ecfg.group_by_length, cuda), fused_optimizer=on(ecfg.fused_optimizer, cuda),
                  tf32=on(ecfg.tf32, cuda), pin_memory=on(ecfg.pin_memory, cuda) and cuda,
                  gradient_checkpointing=ecfg.gradient_checkpointing)


class SplitFeatures(dict):
    """Tokenised splits, each encoded on first use: a search trial or a sanity run never scores
    dev, and SQuAD's dev set alone is 12k windows (seconds of tokenising per run)."""

    def __init__(self, encode_split: Callable[[str], list[dict]]):
        super().__init__()
        self._encode = encode_split

    def __missing__(self, split: str) -> list[dict]:
        self[split] = feats = self._encode(split)
        return feats


@dataclass
class Context:
    cfg: RunConfig
    spec: TaskSpec
    data: TaskData
    model_dir: Path
    tokenizer: object
    model: torch.nn.Module  # TaskModel
    device: torch.device
    dtype: torch.dtype
    peft: object | None = None  # the PeftModel wrapper (LoRA only)
    feats: dict[str, list[dict]] = field(default_factory=dict)
    engine: Engine = Engine()
    forward: Callable | None = None  # the training forward: the model, or its compiled form
    # Wraps a training micro-batch's forward and backward: turns the compiled blocks on (a
    # no-op unless compile_scope is blocks).
    compiled: Callable[[], AbstractContextManager] = nullcontext
    threads: int = 0  # torch's intra-op threads (runtime.threads, else the cores this process owns)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def setup(cfg: RunConfig, data: TaskData | None = None) -> Context:
    # Every training process comes through here (runs, search trials, Ray tasks, sanity checks,
    # memory profiles), and loading and tokenising use the threads too: set them first.
    threads = set_threads(cfg.runtime.threads)
    spec = get_task(cfg.task)
    data = data or load_task(cfg, spec)
    model_dir = resolve_model_dir(cfg.model)
    device = pick_device()
    dtype = compute_dtype(cfg.model, device)
    tokenizer = load_tokenizer(model_dir, is_decoder(model_dir))
    # Both methods keep fp32 weights and compute in `dtype` under autocast: a LoRA backbone stored
    # in bf16 would be a rounded copy of the base model, and that rounding alone shows up as drift.
    model = build_task_model(model_dir, spec, cfg.model, head_seed=cfg.seed, dtype=torch.float32)
    ctx = Context(cfg, spec, data, model_dir, tokenizer, model, device, dtype)
    ctx.threads = threads
    ctx.feats = SplitFeatures(lambda split: encode(spec, tokenizer, getattr(data, split), cfg))
    ctx.engine = eng = resolve_engine(cfg.train.engine, device, total_steps_for(cfg, len(ctx.feats["train"])))
    if eng.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works under LoRA too.
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Both methods seed torch's global RNG the same way: it drives LoRA's A init and, for both,
    # dropout (encoders; LoRA dropout), which full FT used to leave unseeded.
    torch.manual_seed(cfg.seed)
    ctx.peft = apply_method(ctx)
    model.to(device)
    if eng.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx.forward = model
    # dynamic=None: the first new shape recompiles once with symbolic sizes, which then serve
    # every other length bucket and batch size (a static graph per bucket would cost one
    # compilation, tens of seconds, each). CUDA graphs are still recorded per shape.
    if eng.compile and eng.compile_scope == "blocks":
        ctx.compiled = BlockCompile(repeated_blocks(model.backbone), eng.compile_mode)
    elif eng.compile:
        ctx.forward = torch.compile(model, mode=eng.compile_mode)
    return ctx


def repeated_blocks(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone's repeated blocks: the module classes transformers keeps whole when it splits
    a model over devices (`_no_split_modules`: LlamaDecoderLayer, BertLayer, ...)."""
    names = set(getattr(backbone, "_no_split_modules", None) or [])
    blocks = [m for m in backbone.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"train.engine.compile_scope=blocks: {type(backbone).__name__} names no repeated blocks "
                         "(_no_split_modules); use train.engine.compile_scope=model")
    return blocks


class BlockCompile:
    """Regional compilation: each repeated block gets its own `torch.compile`, and as the blocks
    share their code, Dynamo and Inductor compile it once for all of them. Cold, on the 2-core
    CPU, SmolLM2 LoRA warmed up in 179 s compiled whole and in 28 s compiled by block
    (docs/benchmarks.md).

    The compiled blocks are live only inside `with ctx.compiled():`, around a training
    micro-batch's forward and backward (the backward too, so that activation checkpointing
    recomputes with the same code); evaluation and representation snapshots stay eager, so what
    Phase 3 measures does not depend on the training engine. `Module.compile()` would do the same
    but permanently; this sets the same attribute (`_compiled_call_impl`) and clears it again."""

    def __init__(self, blocks: list[torch.nn.Module], mode: str):
        self.blocks = blocks
        self.fns = [torch.compile(b._call_impl, mode=mode) for b in blocks]

    @contextmanager
    def __call__(self):
        for b, fn in zip(self.blocks, self.fns):
            b._compiled_call_impl = fn
        try:
            yield
        finally:
            for b in self.blocks:
                b._compiled_call_impl = None


def apply_method(ctx: Context):
    """Full FT: everything trains. LoRA: PEFT adapters on the block projections; the head trains
    in both methods."""
    model, cfg = ctx.model, ctx.cfg
    if cfg.method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        # An untied LM head (TinyLlama) is not on the classification path: it would get no
        # gradient, yet sit in every checkpoint. A tied one is the input embedding and trains.
        backbone = model.backbone
        out_emb = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
        if out_emb is not None and out_emb.weight is not backbone.get_input_embeddings().weight:
            out_emb.weight.requires_grad_(False)
        return None
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    lc = cfg.method.lora
    present = {n.split(".")[-1] for n, _ in model.backbone.named_modules()}
    missing = [t for t in lc.target_modules if t not in present]
    if missing:
        raise ValueError(f"method.lora.target_modules: {missing} not found in model {cfg.model.name}")
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                          use_rslora=lc.use_rslora, bias="none")
    peft_model = get_peft_model(model.backbone, peft_cfg)
    # PEFT casts each adapted projection's input to the fp32 adapter dtype, and under bf16
    # autocast the adapter matmul casts it straight back: two copies of the activation (and two
    # more in the backward pass) wherever that input is bf16, i.e. o_proj and down_proj (the
    # others read the fp32 residual stream), 60 projections in SmolLM2. The matmul casts its own
    # inputs, so with dropout 0 the arithmetic is identical; with dropout the mask is drawn on the
    # bf16 tensor (same distribution). In fp32 (CPU) there is no cast at all.
    for m in peft_model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = False
    for p in model.head.parameters():
        p.requires_grad_(True)
    return peft_model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# evaluation


def _autocast(ctx: Context):
    # Autocast wherever a lower compute dtype is asked for: on CUDA by `auto`, on a CPU only by an
    # explicit model.dtype (which is how tests reproduce the bf16 path without a GPU).
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)


@torch.no_grad()
def predict(ctx: Context, feats: list[dict], reduce: Callable[[dict], dict] | None = None) -> dict[str, np.ndarray | list]:
    """Model outputs for `feats`, one row per feature in their order. `reduce` maps a batch's
    outputs to smaller tensors on the device before they are copied to the host."""
    model = ctx.model
    was = model.training
    model.eval()
    outs: dict[str, list] = {}
    for idx in length_sorted_batches(feats, ctx.cfg.train.eval_batch_size):
        batch = {k: v.to(ctx.device) for k, v in collate([feats[i] for i in idx], ctx.pad_id).items() if k in ("input_ids", "attention_mask")}
        with _autocast(ctx):
            out = model(batch)
        if reduce is not None:
            out = reduce(out)
        for k, v in out.items():
            v = v.float().cpu() if v.is_floating_point() else v.cpu()
            slot = outs.setdefault(k, [None] * len(feats))
            for i, row in zip(idx, list(v) if v.dim() > 1 else v.tolist()):
                slot[i] = row
    model.train(was)
    return outs


def _span_topk(n_best: int) -> Callable[[dict], dict]:
    """Top-n_best start and end positions per window, taken on the device (a window's logits
    never leave it); short batches pad with index -1."""

    def reduce(out: dict) -> dict:
        red = {"has_logit": out["has_logit"]}
        for name in ("start", "end"):
            logits = out[f"{name}_logits"]
            k = min(n_best, logits.size(1))
            val, idx = logits.topk(k, dim=-1)
            if k < n_best:
                val = torch.nn.functional.pad(val, (0, n_best - k), value=-math.inf)
                idx = torch.nn.functional.pad(idx, (0, n_best - k), value=-1)
            red[f"{name}_val"], red[f"{name}_idx"] = val, idx
        return red

    return reduce


def best_spans(start_val, start_idx, end_val, end_idx, in_context, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best valid (start, end) per window from its n-best candidates, all windows at once.

    A pair is valid when both tokens are context tokens (`in_context`, windows × tokens), end ≥
    start and the span is at most `max_len` tokens. Ties go to the first pair in (start rank, end
    rank) order. Returns (score, start, end) per window; score −inf where no pair is valid."""
    s_val, e_val = np.asarray(start_val, np.float32), np.asarray(end_val, np.float32)
    s_idx, e_idx = np.asarray(start_idx), np.asarray(end_idx)
    w = np.arange(len(s_idx))[:, None]
    ok_s = (s_idx >= 0) & in_context[w, np.clip(s_idx, 0, None)]
    ok_e = (e_idx >= 0) & in_context[w, np.clip(e_idx, 0, None)]
    span = e_idx[:, None, :] - s_idx[:, :, None]
    valid = ok_s[:, :, None] & ok_e[:, None, :] & (span >= 0) & (span < max_len)
    with np.errstate(over="ignore"):  # masked (padding) logits sum to -inf; they are invalid anyway
        score = np.where(valid, s_val[:, :, None] + e_val[:, None, :], -np.inf).reshape(len(s_idx), -1)
    flat = score.argmax(axis=1)  # the first maximum, as a loop with a strict ">" keeps it
    k = s_idx.shape[1]
    rows = np.arange(len(s_idx))
    return score[rows, flat], s_idx[rows, flat // k], e_idx[rows, flat % k]


def squad_predictions(ctx: Context, rows: list[dict], feats: list[dict]) -> tuple[dict, dict]:
    """Windows → one answer per question: best start/end pair over all windows (n-best per window,
    length ≤ max_answer_length, inside the context), and a no-answer probability
    1 − max_window sigmoid(answerability logit)."""
    out = predict(ctx, feats, reduce=_span_topk(ctx.cfg.data.n_best))
    width = max(len(f["input_ids"]) for f in feats)
    in_context = np.zeros((len(feats), width), dtype=bool)
    for i, f in enumerate(feats):
        in_context[i, : len(f["offsets"])] = [o is not None for o in f["offsets"]]
    score, s_best, e_best = best_spans(torch.stack(out["start_val"]), torch.stack(out["start_idx"]), torch.stack(out["end_val"]),
                                       torch.stack(out["end_idx"]), in_context, ctx.cfg.data.max_answer_length)
    best: dict[int, tuple[float, str]] = {}
    has_prob: dict[int, float] = {}
    for i, (f, has) in enumerate(zip(feats, out["has_logit"])):
        ex = f["example"]
        has_prob[ex] = max(has_prob.get(ex, 0.0), float(torch.sigmoid(torch.tensor(has))))
        # Windows in order, strict ">": the first window with the best score wins.
        if score[i] > -np.inf and (ex not in best or score[i] > best[ex][0]):
            offsets = f["offsets"]
            best[ex] = (float(score[i]), rows[ex]["context"][offsets[s_best[i]][0] : offsets[e_best[i]][1]])
    preds = {r["id"]: best.get(i, (0.0, ""))[1] for i, r in enumerate(rows)}
    na_probs = {r["id"]: 1.0 - has_prob.get(i, 0.0) for i, r in enumerate(rows)}
    return preds, na_probs


def evaluate(ctx: Context, split: str, na_thresh: float | None = None, limit: int | None = None) -> dict:
    """Scores on 'val' or 'dev'. SQuAD: the no-answer threshold is tuned on val (best F1 there)
    and then applied unchanged to dev; dev also reports the official best_f1 fields. `limit`:
    only the first N examples (SQuAD: questions, with all their windows)."""
    rows, feats = getattr(ctx.data, split), ctx.feats[split]
    if limit is not None and limit < len(rows):
        rows = rows[:limit]
        feats = [f for f in feats if f["example"] < limit] if ctx.spec.kind == "extractive_qa" else feats[:limit]
    if ctx.spec.kind == "extractive_qa":
        preds, na_probs = squad_predictions(ctx, rows, feats)
        dataset = rows_as_squad_json(rows)
        if na_thresh is None:
            tuned = squad_v2_evaluate(dataset, preds, na_probs)
            na_thresh = float(tuned["best_f1_thresh"])
        scores = dict(squad_v2_evaluate(dataset, preds, na_probs, na_prob_thresh=na_thresh))
        scores["na_prob_thresh"] = na_thresh
        scores["_predictions"] = {q: ("" if na_probs[q] > na_thresh else a) for q, a in preds.items()}
        scores["_na_probs"] = na_probs
        return scores
    out = predict(ctx, feats)
    logits = torch.stack(out["logits"])
    preds = logits.argmax(-1).tolist()
    return {**compute_metrics(ctx.spec.metric, preds, [f["label"] for f in feats]), "_predictions": preds}


def primary(ctx: Context, scores: dict) -> float:
    return float(scores[ctx.spec.primary])


# ---------------------------------------------------------------------------------------------
# the loop


def make_optimizer(ctx: Context, lr: float, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for n, p in trainable_parameters(ctx.model):
        # Standard practice: no weight decay on biases and norm gains.
        (no_decay if p.dim() < 2 or "norm" in n.lower() else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ctx.cfg.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            **({"fused": True} if ctx.engine.fused_optimizer else {}))
    warmup = int(round(ctx.cfg.train.warmup_ratio * total_steps))
    return opt, get_linear_schedule_with_warmup(opt, warmup, total_steps)


class BatchOrder:
    """Micro-batch k of a run is a pure function of (seed, k): an epoch's permutation comes from
    a generator seeded with (seed, epoch). Resuming needs only the step count.

    With `lengths` (length grouping), each run of `group` consecutive batches of that permutation
    is sorted by length and cut into batches, and the epoch's batches are shuffled by the same
    generator: batches of similar lengths (little padding) in a random order, still a pure
    function of (seed, k). Only the last batch of an epoch can be short, as without grouping."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None, group: int = 50):
        self.n, self.bs, self.seed, self.lengths, self.group = n, batch_size, seed, lengths, group
        self.per_epoch = max(1, math.ceil(n / batch_size))
        self._batches: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return [perm[i : i + self.bs] for i in range(0, self.n, self.bs)]
        span = self.bs * self.group
        batches = []
        for i in range(0, self.n, span):
            chunk = sorted(perm[i : i + span], key=lambda j: -self.lengths[j])
            batches += [chunk[j : j + self.bs] for j in range(0, len(chunk), self.bs)]
        # The short batch (if any) stays last so that every other batch is full.
        full = [b for b in batches if len(b) == self.bs]
        short = [b for b in batches if len(b) < self.bs]
        return [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + short

    def __call__(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        if self._batches is None or self._batches[0] != epoch:
            self._batches = (epoch, self._epoch(epoch))
        return self._batches[1][pos]


def batch_order(ctx: Context, batch_size: int, seed: int) -> BatchOrder:
    feats = ctx.feats["train"]
    lengths = [len(f["input_ids"]) for f in feats] if ctx.engine.group_by_length else None
    return BatchOrder(len(feats), batch_size, seed, lengths)


def total_steps_for(cfg: RunConfig, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_train / (cfg.train.batch_size * cfg.train.grad_accum))
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def _to_device(ctx: Context, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if ctx.engine.pin_memory:
        return {k: v.pin_memory().to(ctx.device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(ctx.device) for k, v in batch.items()}


def _pad_batch(batch: dict[str, torch.Tensor], multiple: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to a multiple of `multiple` tokens: few distinct shapes for compiled graphs. The
    extra positions are masked padding, so the outputs at real tokens are the same."""
    width = batch["input_ids"].size(1)
    extra = -width % multiple if multiple else 0
    if not extra:
        return batch
    pad = torch.nn.functional.pad
    return {**batch, "input_ids": pad(batch["input_ids"], (0, extra), value=pad_id), "attention_mask": pad(batch["attention_mask"], (0, extra))}


@dataclass
class StepStats:
    """One optimizer step's numbers. `loss` and `grad_norm` stay on the device (reading them would
    make the host wait for the GPU every step); the token counts come from the host-side batch."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    tokens: int
    padded_tokens: int


def train_step(ctx: Context, order: BatchOrder, step: int, opt, sched) -> StepStats:
    """One optimizer step over grad_accum micro-batches."""
    accum = ctx.cfg.train.grad_accum
    feats = ctx.feats["train"]
    total_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    tokens = padded = 0
    for a in range(accum):
        idx = order(step * accum + a)
        host = _pad_batch(collate([feats[i] for i in idx], ctx.pad_id), ctx.engine.pad_to_multiple_of, ctx.pad_id)
        tokens += int(host["attention_mask"].sum())
        padded += host["attention_mask"].numel()
        batch = _to_device(ctx, host)
        if ctx.engine.compile and ctx.engine.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with ctx.compiled():
            with _autocast(ctx):
                loss = ctx.forward(batch)["loss"] / accum
            loss.backward()
        # Summed in float64, as the Python floats of loss.item() were: logged losses are unchanged.
        total_loss += loss.detach().double()
    params = [p for _, p in trainable_parameters(ctx.model)]
    gnorm = torch.nn.utils.clip_grad_norm_(params, ctx.cfg.train.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return StepStats(total_loss, gnorm.detach(), tokens, padded)


class _Clock:
    """Training time between the points where the host waits for the device anyway."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt

    def restart(self) -> None:
        self.t = time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB; it is the process's high-water mark, not this run's alone.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# checkpoints


def _host_copy(obj):
    """A copy of a (nested) state on the host that training can no longer change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone() if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, so a GPU goes on training while a
    large checkpoint reaches the disk. The state is copied to the host first (the only part the
    GPU waits for); the file appears by atomic rename, so a kill leaves the previous one.

    `background=False` (a CPU run) writes at once from the live tensors: there the copy and a
    writer thread would only compete with training for the same cores and memory."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, state: dict) -> None:
        self.wait()
        if not self.background:
            self._write(path, state)
            self.wait()
            return
        state = _host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(path, state), daemon=True)
        self._thread.start()

    def _write(self, path: Path, state: dict) -> None:
        try:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def save_checkpoint(path: Path, ctx: Context, step: int, opt, sched, extra: dict, writer: CheckpointWriter) -> None:
    state = {
        "step": step,
        "params": {n: p.detach() for n, p in trainable_parameters(ctx.model)},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng_cpu": torch.random.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **extra,
    }
    writer.submit(path, state)


def _restart_hint(rd: Path) -> str:
    return (f"nothing was deleted; to redo the run from step 0, delete the run folder {rd} and rerun, "
            f"or rerun `loradrift train` with --force")


def load_checkpoint(path: Path, ctx: Context, opt=None, sched=None) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's own words name no file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunConflict(f"{path}: not a readable checkpoint (truncated or corrupt: {why}); "
                          f"{_restart_hint(path.parent.parent)}") from None
    params = dict(trainable_parameters(ctx.model))
    for n, t in state["params"].items():
        params[n].data.copy_(t)
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.random.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state


# ---------------------------------------------------------------------------------------------
# a whole run


def train_run(cfg: RunConfig, force: bool = False, on_step: Callable[[int, int], None] | None = None,
              on_eval: Callable[[int, float], None] | None = None, tracker: tracking.Tracking | None = None) -> dict:
    """Train one (task, method, seed) run; returns its result dict. A finished run is returned
    as it is unless `force`; a killed run resumes from `checkpoints/last.pt`.

    `on_eval(step, score)` gets each intermediate validation score (primary metric) at the end
    of that step, after any checkpoint the step writes, so an exception it raises (a search
    pruning the trial) leaves the run folder as consistent as a kill would.

    One process at a time trains in a folder (an OS lock on `.lock`, RunConflict "run in
    progress by pid N" for the others), and a folder holds the artefacts of one config only.

    `tracker`: where the run reports besides its folder (default: the trackers of
    `cfg.report_to`, group `runs`; a search passes its trial's)."""
    rd = run_dir_for(cfg)
    chash = cfg.science_hash()
    tracker = tracker or tracking.start(cfg.report_to, cfg.out_dir, "runs", f"{cfg.task}-{cfg.method.name}-seed{cfg.seed}",
                                        cfg.model_dump(mode="json"), {"task": cfg.task, "method": cfg.method.name,
                                                                      "seed": cfg.seed, "run_dir": rd})
    # Open the store first: a store that cannot be written fails now, not after the training.
    store = ResultsStore(Path(cfg.out_dir) / "results.sqlite")
    # What this call creates, deepest first: removed again if the run fails before writing anything.
    created = [p for p in (rd / LOCK_NAME, rd, *rd.parents) if not p.exists()]
    make_dir(rd, "run folder")
    try:
        with exclusive_lock(rd / LOCK_NAME), tracker:
            try:
                return _train_locked(cfg, rd, chash, store, force, on_step, on_eval, tracker)
            except BaseException:
                _remove_unused(rd, created)
                raise
    except LockBusy as e:
        raise RunConflict(str(e)) from None


def _remove_unused(rd: Path, created: list[Path]) -> None:
    """After a failure before the run wrote anything (a config rejected at setup), remove the
    lock file and folders this call created: a run folder holding only `.lock` would look like
    a run that was started. Called with the lock held; a process that opened the lock file
    meanwhile sees it replaced and takes a new one (exclusive_lock)."""
    if rd / LOCK_NAME not in created or [p.name for p in rd.iterdir()] != [LOCK_NAME]:
        return
    (rd / LOCK_NAME).unlink()
    for d in created[1:]:
        try:
            d.rmdir()
        except OSError:  # another process has started using it (or a parent): theirs now
            return


def _recorded_hash(rd: Path) -> str | None:
    """The science hash of the config the folder was created with (its config.yaml)."""
    from loradrift.config import ConfigError

    path = rd / "config.yaml"
    if not path.exists():
        return None
    try:
        return load_run_config(path).science_hash()
    except ConfigError as e:
        raise RunConflict(f"{rd}: holds a run whose config.yaml cannot be read ({str(e).splitlines()[0]}); "
                          f"use --force to restart it or another --out folder") from None


def _read_result(path: Path) -> dict:
    """A finished run's result.json; one that is truncated or not a run result is named, and kept."""
    try:
        result = json.loads(path.read_text())
    except ValueError as e:  # invalid JSON or UTF-8
        why = f"truncated or corrupt: {e}"
    else:
        if isinstance(result, dict) and isinstance(result.get("config_hash"), str):
            return result
        why = "not a run result: no config_hash"
    raise RunConflict(f"{path}: not a readable run result ({why}); {_restart_hint(path.parent)}")


def _clear_run_dir(rd: Path) -> None:
    for child in rd.iterdir():
        if child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _train_locked(cfg: RunConfig, rd: Path, chash: str, store: ResultsStore, force: bool,
                  on_step: Callable[[int, int], None] | None, on_eval: Callable[[int, float], None] | None,
                  tracker: tracking.Tracking) -> dict:
    result_file = rd / "result.json"
    if result_file.exists() and not force:
        result = _read_result(result_file)
        if result["config_hash"] != chash:
            raise RunConflict(f"{rd}: a finished run with another config (hash {result['config_hash']}) is there; "
                              f"use --force to redo it or another --out folder")
        # A kill between result.json and the store (or a failed store write) left the run
        # unindexed: the folder is the record, so index it now; leftover resume state goes too.
        if not store.rows("run", model=result["model"], task=cfg.task, method=cfg.method.name, seed=cfg.seed, config_hash=chash):
            store.put_run(result)
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)
        return result
    if not force:
        recorded = _recorded_hash(rd)
        if recorded is not None and recorded != chash:
            raise RunConflict(f"{rd}: an unfinished run with another config (hash {recorded}) is there; "
                              f"use --force to restart it or another --out folder")

    # Everything is built before anything in the folder is touched: a config that fails here
    # (a LoRA target the model lacks, bad data) leaves a finished run as it was, even with --force.
    ctx = setup(cfg)
    t0 = time.time()
    n_train = len(ctx.feats["train"])
    total = total_steps_for(cfg, n_train)
    lr = cfg.train.lr_for(cfg.method.name)
    # The trackers get what the run uses, not the config's nulls (train.lr null = the method's default).
    tracker.params({"train.lr": lr, "resolved.lr": lr, "resolved.batch_size": cfg.train.batch_size * cfg.train.grad_accum,
                    "resolved.steps": total, "resolved.seed": cfg.seed, "resolved.model": model_key(cfg.model),
                    "resolved.base_model": public_base(cfg.model, ctx.model_dir)[0]})
    opt, sched = make_optimizer(ctx, lr, total)
    order = batch_order(ctx, cfg.train.batch_size, cfg.seed)

    probe_feats = encode_probe(ctx.spec, ctx.tokenizer, probe_examples(cfg, ctx.data), cfg.model.max_length) if cfg.probe.enabled else []
    if force:
        _clear_run_dir(rd)
    # Written before any other artefact: it records which config the folder's artefacts belong to.
    save_config(cfg, rd / "config.yaml")

    snap_dtype = getattr(torch, cfg.probe.dtype)
    pkey = probe_key(cfg)
    base_snap = base_path(cfg, model_key(cfg.model), cfg.task)

    def snapshot(step: int) -> None:
        path = snapshot_path(rd, step)
        if not cfg.probe.enabled or path.exists():
            return
        if step == 0 and base_snap.exists() and read_snapshot_meta(base_snap).get("probe_key") == pkey:
            # Before the first update the backbone is the base model (LoRA's B starts at zero), so
            # its snapshot is the base representations of the same probe set: copy, do not recompute.
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                shutil.copyfile(base_snap, tmp)
            return
        tensors = extract(ctx.model, probe_feats, cfg.train.eval_batch_size, ctx.pad_id, ctx.device, snap_dtype)
        save_snapshot(path, tensors, step=step, task=cfg.task, model=model_key(cfg.model), pooling=ctx.model.pooling, probe_key=pkey)

    ckpt_dir = rd / "checkpoints"
    last_ckpt, best_ckpt = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    log_path = rd / "log.jsonl"
    step, log, curve, pending = 0, [], [], []
    best_score, bad_evals, tokens, padded_tokens, train_time = -math.inf, 0, 0, 0, 0.0
    if last_ckpt.exists():
        st = load_checkpoint(last_ckpt, ctx, opt, sched)
        step, log, curve, pending = st["step"], st["log"], st["curve"], st["pending"]
        best_score, bad_evals, tokens, train_time = st["best_score"], st["bad_evals"], st["tokens"], st["train_time"]
        padded_tokens = st.get("padded_tokens", 0)
        stopped_early = st["stopped_early"]
    else:
        snapshot(0)
        stopped_early = False
    # log.jsonl grows as training goes; after a resume it restarts from the checkpoint's log, so
    # entries a killed run wrote past its last checkpoint are not doubled.
    with atomic_path(log_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    writer = CheckpointWriter(background=ctx.device.type == "cuda")
    clock = _Clock(ctx.device)

    ctx.model.train()
    while step < total and not stopped_early:
        evaluated = None
        st = train_step(ctx, order, step, opt, sched)
        tokens += st.tokens
        padded_tokens += st.padded_tokens
        step += 1
        pending.append(st.loss)
        is_log = step % cfg.train.log_every == 0 or step == total
        is_snap = cfg.probe.enabled and step % cfg.probe.snapshot_every == 0
        is_eval = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and step < total
        if not (is_log or is_snap or is_eval or step % cfg.train.checkpoint_every == 0):
            if on_step:
                on_step(step, total)
            continue
        # Only here does the host wait for the device: at logging, snapshot, evaluation and
        # checkpoint steps, never in between.
        train_time += clock.lap()
        if is_log:
            mean_loss, gnorm = float(np.mean([float(x) for x in pending])), float(st.grad_norm)
            _check_finite(mean_loss, step, rd, lr, gnorm)
            entry = {"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0],
                     "grad_norm": gnorm, "tokens_per_s": tokens / max(train_time, 1e-9),
                     "padded_tokens_per_s": padded_tokens / max(train_time, 1e-9)}
            log.append(entry)
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            tracker.log({"train": {k: v for k, v in entry.items() if k != "step"}}, step)
            pending = []
        if is_snap:
            snapshot(step)
        if is_eval:
            score = evaluated = primary(ctx, evaluate(ctx, "val", limit=cfg.train.eval_max_examples))
            curve.append({"step": step, ctx.spec.primary: score})
            tracker.log({"val": {ctx.spec.primary: score}}, step)
            if score > best_score:
                best_score, bad_evals = score, 0
                if cfg.train.restore_best:  # nothing else reads it, and for full FT it is the whole model
                    ckpt_dir.mkdir(exist_ok=True)
                    writer.submit(best_ckpt, {"step": step, "params": {n: p.detach() for n, p in trainable_parameters(ctx.model)},
                                              "score": score})
            else:
                bad_evals += 1
                if cfg.train.early_stopping_patience and bad_evals >= cfg.train.early_stopping_patience:
                    stopped_early = True
        # No checkpoint at the last step: the final export follows at once (a kill during it
        # resumes from the previous checkpoint).
        if (step % cfg.train.checkpoint_every == 0 or stopped_early) and step < total:
            ckpt_dir.mkdir(exist_ok=True)
            save_checkpoint(last_ckpt, ctx, step, opt, sched,
                            {"log": log, "curve": curve, "pending": [float(x) for x in pending], "best_score": best_score,
                             "bad_evals": bad_evals, "stopped_early": stopped_early,
                             "tokens": tokens, "padded_tokens": padded_tokens, "train_time": train_time}, writer)
        clock.restart()
        if on_step:
            on_step(step, total)
        if on_eval and evaluated is not None:
            writer.wait()  # a pruned trial must leave the checkpoint it just wrote
            on_eval(step, evaluated)
    writer.wait()

    if pending:  # stopped early between two logging steps
        _check_finite(float(np.mean([float(x) for x in pending])), step, rd, lr)
    final_step = step
    restored_step = None
    if cfg.train.restore_best and best_ckpt.exists():
        restored_step = int(load_checkpoint(best_ckpt, ctx)["step"])
        # The final snapshot must describe the weights that are evaluated and exported (H1 and H2
        # on the same model): the restored best ones, even if the loop already wrote this step.
        if restored_step != final_step:
            snapshot_path(rd, final_step).unlink(missing_ok=True)
    snapshot(final_step)
    val = evaluate(ctx, "val")
    dev = evaluate(ctx, "dev", na_thresh=val.get("na_prob_thresh")) if cfg.train.eval_dev else None
    export(ctx, rd)
    if dev is not None:
        atomic_write_json(rd / "dev_predictions.json", dev.pop("_predictions"))
        if ctx.spec.kind == "extractive_qa":
            atomic_write_json(rd / "dev_na_probs.json", dev.pop("_na_probs"))
    val.pop("_predictions"), val.pop("_na_probs", None)
    curve.append({"step": final_step, ctx.spec.primary: primary(ctx, val)})
    index = write_index(rd, ctx.model.pooling) if cfg.probe.enabled else {"n_examples": 0, "steps": []}
    result = {
        "task": cfg.task, "method": cfg.method.name, "seed": cfg.seed, "model": model_key(cfg.model),
        "config_hash": chash, "run_dir": str(rd), "steps": final_step, "stopped_early": stopped_early,
        "restored_best_step": restored_step,
        "lr": lr, "primary_metric": ctx.spec.primary,
        "val": val, "dev": dev, "val_curve": curve,
        "train_examples": len(ctx.data.train), "train_features": n_train, "val_examples": len(ctx.data.val),
        "dev_examples": len(ctx.data.dev) if dev is not None else 0, "probe_examples": index["n_examples"], "snapshot_steps": index["steps"],
        "trainable_params": sum(p.numel() for _, p in trainable_parameters(ctx.model)),
        "total_params": sum(p.numel() for p in ctx.model.parameters()),
        "train_time_s": train_time, "wall_time_s": time.time() - t0, "tokens": tokens,
        "tokens_per_s": tokens / max(train_time, 1e-9), "padded_tokens": padded_tokens,
        "padded_tokens_per_s": padded_tokens / max(train_time, 1e-9), "peak_memory_mb": peak_memory_mb(ctx.device),
        "device": str(ctx.device), "dtype": str(ctx.dtype).replace("torch.", ""), "data_source": ctx.data.source,
        "torch_threads": ctx.threads,
    }
    write_model_card(ctx, rd, result)
    tracker.summary({"val": result["val"], "dev": result["dev"] or {},
                     "cost": {k: result[k] for k in ("steps", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb",
                                                     "trainable_params")}}, final_step)
    atomic_write_json(result_file, result)
    tracker.artifacts([rd / "config.yaml", result_file, rd / ("adapter" if ctx.peft is not None else "model") / "README.md"])
    try:
        store.put_run(result)
    except StoreError as e:
        raise StoreError(f"{e}\nthe run itself finished and is recorded in {result_file}; a rerun of this command "
                         f"or `loradrift store repair --out {cfg.out_dir}` adds it to the store") from None
    # Final weights are exported; checkpoints (optimizer state included) are no longer needed.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


def _check_finite(loss: float, step: int, rd: Path, lr: float, grad_norm: float = 0.0) -> None:
    # A non-finite gradient norm means the update just applied has already broken the weights,
    # even while the loss of that step was still finite.
    what = "training loss" if not math.isfinite(loss) else "gradient norm" if not math.isfinite(grad_norm) else None
    if what:
        value = loss if what == "training loss" else grad_norm
        raise NonFiniteLoss(f"{rd}: the {what} is {value} by step {step} (learning rate {lr:g}); the run is "
                            f"stopped without a result. Lower train.lr (or check the data), then rerun with --force")


def export(ctx: Context, rd: Path) -> None:
    """Both methods: head.safetensors. Full FT: `model/`, the fine-tuned backbone as a model folder.
    LoRA: `adapter/`, the PEFT folder users load (see `_save_peft_adapter`), and `serve_adapter/`,
    the same LoRA weights with the keys PEFT gives a *CausalLM* and no head, which vLLM serves and
    merging and the weight analysis read."""
    from safetensors.torch import save_file

    with atomic_path(rd / "head.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in ctx.model.head.state_dict().items()}, str(tmp))
    if ctx.peft is None:
        _write_folder(rd / "model", lambda d: (ctx.model.backbone.save_pretrained(d), ctx.tokenizer.save_pretrained(d)))
        return
    _write_folder(rd / "serve_adapter", ctx.peft.save_pretrained)
    _write_folder(rd / "adapter", lambda d: _save_peft_adapter(ctx, d))


def _write_folder(target: Path, fill: Callable[[Path], object]) -> None:
    tmp_dir = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    fill(tmp_dir)
    respect_umask(tmp_dir)
    shutil.rmtree(target, ignore_errors=True)
    tmp_dir.rename(target)


def _save_peft_adapter(ctx: Context, folder: Path) -> None:
    """The adapter as PEFT users expect it: the public base model id, the task type, and, where a
    Hugging Face auto class computes exactly this task model (models.hf_task_type), the trained
    head as that class's `score` in `modules_to_save`, so that
    `AutoPeftModelForSequenceClassification.from_pretrained(folder)` gives the run's predictions.
    Otherwise the task type is the backbone's (CAUSAL_LM / FEATURE_EXTRACTION) and the head stays
    in head.safetensors, for `load_run_model`."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    decoder = is_decoder(ctx.model_dir)
    task_type = hf_task_type(ctx.spec, decoder, ctx.model.pooling)
    config = copy.deepcopy(ctx.peft.peft_config["default"])
    config.base_model_name_or_path = public_base(ctx.cfg.model, ctx.model_dir)[0]
    config.task_type = task_type or ("CAUSAL_LM" if decoder else "FEATURE_EXTRACTION")
    config.inference_mode = True
    state = dict(get_peft_model_state_dict(ctx.peft))
    if task_type == "SEQ_CLS":
        config.modules_to_save = ["score"]
        state["base_model.model.score.weight"] = ctx.model.head.proj.weight
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def write_model_card(ctx: Context, rd: Path, result: dict) -> None:
    """README.md in `adapter/` (LoRA) or `model/` (full FT): what the folder is, how to load it,
    the base model and where its weights came from, the run's scores, data and config."""
    import yaml

    cfg, spec = ctx.cfg, ctx.spec
    lora = ctx.peft is not None
    folder = rd / ("adapter" if lora else "model")
    decoder = is_decoder(ctx.model_dir)
    base, origin = public_base(cfg.model, ctx.model_dir)
    task_type = hf_task_type(spec, decoder, ctx.model.pooling)
    classify = spec.kind == "classification"
    front = {"library_name": "peft" if lora else "transformers", "base_model": base,
             "pipeline_tag": "text-classification" if classify else "question-answering",
             "tags": ["loradrift", "lora" if lora else "full-fine-tuning", spec.name]}
    what = "a LoRA adapter (PEFT)" if lora else "the fully fine-tuned backbone"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {model_key(cfg.model)} · {spec.name} · {cfg.method.name} · seed {cfg.seed}", "",
             f"This folder holds {what}, trained by loradrift for the task "
             f"`{spec.name}` ({spec.description or spec.kind}). It is one run of a study comparing LoRA with full "
             "fine-tuning.", "", "## Base model", "", f"`{base}`."]
    if cfg.model.name == "tiny":
        lines += ["", f"This is {origin}. On another machine, copy that folder (or rebuild it from the config below "
                  "with `loradrift.models.resolve_model_dir`) and load it by its path, as below."]
    elif origin:
        lines += ["", f"The run was trained on {origin}. The Hub id gives the original weights, which differ slightly "
                  "from these, so scores can differ a little; to reproduce the run exactly, load the base from "
                  "`loradrift.models.resolve_model_dir` (the same weights, in the loradrift model cache)."]
    labels = ", ".join(f"{i} = {name}" for i, name in enumerate(spec.labels))
    inputs = (f"`tokenizer(text_a{', text_b' if len(spec.text_fields) > 1 else ''}, truncation=True, "
              f"max_length={cfg.model.max_length})` with the base model's tokenizer, right padding")
    lines += ["", "## How to load", ""]
    if task_type == "SEQ_CLS" and not lora:
        lines += ["The task head is Hugging Face's `score` layer, saved apart in `../head.safetensors`:", "",
                  "```python", "from safetensors.torch import load_file",
                  "from transformers import AutoModelForSequenceClassification", "",
                  f"model = AutoModelForSequenceClassification.from_pretrained('path/to/this/folder', num_labels={spec.num_labels})",
                  "model.score.load_state_dict({'weight': load_file('path/to/run/head.safetensors')['proj.weight']})",
                  "```", "", "or, with loradrift installed, `loradrift.train.load_run_model('path/to/run')`.", "",
                  f"Inputs: {inputs}. Labels: {labels}."]
    elif task_type == "SEQ_CLS":
        lines += ["The task head is the model's `score` layer (saved in `modules_to_save`), so PEFT's auto class "
                  "gives the run's predictions:", "", "```python",
                  "from peft import AutoPeftModelForSequenceClassification",
                  "from transformers import AutoTokenizer", "",
                  f"tokenizer = AutoTokenizer.from_pretrained('{base}')",
                  f"model = AutoPeftModelForSequenceClassification.from_pretrained('path/to/this/folder', "
                  f"num_labels={spec.num_labels}, pad_token_id=tokenizer.pad_token_id)",
                  "```", "", f"Inputs: {inputs}. Labels: {labels}.", "",
                  "On another machine, the base model is looked up by the id above; if it is a local folder (or "
                  "you keep the base elsewhere), load it yourself and add the adapter:", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForSequenceClassification", "",
                  f"base = AutoModelForSequenceClassification.from_pretrained('path/to/base', num_labels={spec.num_labels}, "
                  "pad_token_id=tokenizer.pad_token_id)",
                  "model = PeftModel.from_pretrained(base, 'path/to/this/folder')", "```"]
    else:
        why = ("SQuAD v2's head (start/end logits plus an answerability logit per window) has no Hugging Face "
               "auto class" if not classify else
               "this classification head (on an encoder, or not on the last token) is not what a Hugging Face "
               "auto class computes")
        lines += [f"The task head is not part of this folder: {why}. It is in `../head.safetensors`. With "
                  "loradrift installed, the whole task model loads from the run folder:", "", "```python",
                  "from loradrift.train import load_run_model", "",
                  "model = load_run_model('path/to/run')  # backbone + trained head, in eval mode",
                  "out = model({'input_ids': ids, 'attention_mask': mask})", "```", ""]
        if lora:
            lines += [f"The LoRA weights alone (task type {'CAUSAL_LM' if decoder else 'FEATURE_EXTRACTION'}) "
                      f"load with `AutoPeftModelFor{'CausalLM' if decoder else 'FeatureExtraction'}`."]
        lines += ["", f"Inputs: {inputs if classify else 'question first, then a window of the context (loradrift.data.encode_squad)'}."
                  + (f" Labels: {labels}." if classify else "")]
    scores = []
    for split in ("val", "dev"):
        vals = result.get(split) or {}
        scores.append({"split": split, **{k: v for k, v in vals.items() if isinstance(v, (int, float))}})
    keys = list(dict.fromkeys(k for r in scores for k in r if k != "split"))
    lines += ["", "## Scores", "", f"Primary metric: `{spec.primary}`. Validation is carved from the training file; "
              "dev is the task's held-out set.", "", "| split | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + r["split"] + " | " + " | ".join("" if r.get(k) is None else f"{r[k]:.4g}" for k in keys) + " |"
              for r in scores if len(r) > 1]
    lines += ["", "## Data", "", f"Task files from `{result.get('data_source')}`: {result.get('train_examples')} training "
              f"examples, {result.get('val_examples')} validation, {result.get('dev_examples')} dev.", "",
              "## Training", "", f"{result.get('steps')} optimizer steps, {result.get('trainable_params'):,} trainable "
              f"parameters of {result.get('total_params'):,}, {result.get('train_time_s', 0):.0f} s on "
              f"{result.get('device')} ({result.get('dtype')}).", "", "## Config", "",
              "The run's resolved config (`loradrift train --config config.yaml` reruns it):", "", "```yaml",
              (rd / "config.yaml").read_text().rstrip(), "```", ""]
    atomic_write_text(folder / "README.md", "\n".join(lines))


def load_run_model(run_dir: Path, model_dir: Path | None = None) -> torch.nn.Module:
    """A finished run's task model (backbone with its fine-tuned weights or LoRA adapter, and the
    trained head) in eval mode, for any head, including those no Hugging Face class has.

        from loradrift.train import load_run_model
        model = load_run_model("runs/tiny/runs/<model>/sst2/lora/seed42")

    `model_dir`: the base model folder; by default the one the run's config names, resolved (and
    built if needed) in the loradrift model cache."""
    from peft import PeftModel
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    model_dir = Path(model_dir) if model_dir else resolve_model_dir(cfg.model)
    model = build_task_model(model_dir, get_task(cfg.task), cfg.model, head_seed=cfg.seed)
    if (run_dir / "model" / "config.json").exists():
        model.backbone = load_backbone(run_dir / "model", is_decoder(model_dir), torch.float32, cfg.model.trust_remote_code)
    else:
        # Injects the LoRA layers into model.backbone in place; the wrapper itself is not needed.
        PeftModel.from_pretrained(model.backbone, serve_adapter_dir(run_dir))
    model.head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    return model.eval()


def export_merged(run_dir: Path, out: Path | None = None) -> Path:
    """Fold a LoRA run's adapter into the base weights: a plain CausalLM folder for serving."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    out = Path(out or run_dir / "merged")
    if (out / "config.json").exists():
        return out
    cfg = load_run_config(run_dir / "config.yaml")
    if not (serve_adapter_dir(run_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no serve_adapter/ folder (only LoRA runs can be merged)")
    model_dir = resolve_model_dir(cfg.model)
    base = load_backbone(model_dir, True, torch.float32)
    merged = PeftModel.from_pretrained(base, serve_adapter_dir(run_dir)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(model_dir, True).save_pretrained(tmp)
    respect_umask(tmp)
    tmp.rename(out)
    return out
