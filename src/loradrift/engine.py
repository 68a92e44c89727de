"""The training engine: what one optimizer step needs and how a run's state reaches the disk.
The device and the engine switches (`Engine`: compilation, padding, length grouping, fused AdamW,
TF32, pinned memory), the optimizer and schedule, the data order, the step itself, and the
checkpoint writer, and the run's `Context` every function here takes (`loradrift.context.setup`
builds it);
`loradrift.train` runs the loop (docs/training.md, "The engine").
"""

from __future__ import annotations

import math
import pickle
import resource
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loradrift.config import EngineConfig, RunConfig
from loradrift.data import TaskData, collate
from loradrift.io import atomic_path
from loradrift.methods import Method, get_method
from loradrift.tasks import TaskSpec


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")



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
    peft: object | None = None  # the PeftModel wrapper (methods with an adapter)
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

    @property
    def method(self) -> Method:
        """The run's method, from the methods table."""
        return get_method(self.cfg.method.name)



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


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def autocast(ctx: Context):
    # Autocast wherever a lower compute dtype is asked for: on CUDA by `auto`, on a CPU only by an
    # explicit model.dtype (which is how tests reproduce the bf16 path without a GPU).
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)


# ---------------------------------------------------------------------------------------------
# the step


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
            with autocast(ctx):
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


class Clock:
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
        except BaseException as e:  # noqa: BLE001  (re-raised in the training thread by wait())
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



class UnreadableCheckpoint(RuntimeError):
    """A checkpoint file torch cannot load (a truncated copy, a full disk); the message names the file."""


def load_checkpoint(path: Path, ctx: Context, opt=None, sched=None) -> dict:
    """Loads the trainable weights into `ctx.model`; with `opt`, also the optimizer, scheduler and
    RNG states. Returns the whole checkpoint, for the caller's own keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's own words name no file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadableCheckpoint(f"{path}: not a readable checkpoint (truncated or corrupt: {why})") from None
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
