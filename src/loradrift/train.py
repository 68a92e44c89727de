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
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from loradrift.config import RunConfig, load_run_config, save_config
from loradrift.data import TaskData, collate, encode, length_sorted_batches, load_task, probe_examples, rows_as_squad_json
from loradrift.io import LockBusy, ResultsStore, StoreError, atomic_path, atomic_write_json, exclusive_lock, make_dir, respect_umask
from loradrift.metrics import compute_metrics, squad_v2_evaluate
from loradrift.models import build_task_model, compute_dtype, is_decoder, load_backbone, load_tokenizer, model_key, resolve_model_dir
from loradrift.representations import base_path, encode_probe, extract, probe_key, read_snapshot_meta, save_snapshot, snapshot_path, write_index
from loradrift.tasks import TaskSpec, get_task


class RunConflict(RuntimeError):
    """A run with a different config is in the way (finished or not), or another process is
    running in the folder; nothing is overwritten."""


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

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def setup(cfg: RunConfig, data: TaskData | None = None) -> Context:
    spec = get_task(cfg.task)
    data = data or load_task(cfg, spec)
    model_dir = resolve_model_dir(cfg.model)
    device = pick_device()
    dtype = compute_dtype(cfg.model, device)
    tokenizer = load_tokenizer(model_dir, is_decoder(model_dir))
    # Full FT keeps fp32 master weights (autocast does the bf16 compute); a frozen LoRA base can
    # live in the compute dtype directly.
    weight_dtype = dtype if cfg.method.name == "lora" else torch.float32
    model = build_task_model(model_dir, spec, cfg.model, head_seed=cfg.seed, dtype=weight_dtype)
    ctx = Context(cfg, spec, data, model_dir, tokenizer, model, device, dtype)
    ctx.peft = apply_method(ctx)
    model.to(device)
    for split in ("train", "val", "dev"):
        ctx.feats[split] = encode(spec, tokenizer, getattr(data, split), cfg)
    return ctx


def apply_method(ctx: Context):
    """Full FT: everything trains. LoRA: PEFT adapters on the block projections; the head trains
    in both methods."""
    model, cfg = ctx.model, ctx.cfg
    if cfg.method.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    from peft import LoraConfig, get_peft_model

    lc = cfg.method.lora
    present = {n.split(".")[-1] for n, _ in model.backbone.named_modules()}
    missing = [t for t in lc.target_modules if t not in present]
    if missing:
        raise ValueError(f"method.lora.target_modules: {missing} not found in model {cfg.model.name}")
    torch.manual_seed(cfg.seed)  # LoRA A init
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                          use_rslora=lc.use_rslora, bias="none")
    peft_model = get_peft_model(model.backbone, peft_cfg)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return peft_model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# evaluation


def _autocast(ctx: Context):
    enabled = ctx.device.type == "cuda" and ctx.dtype != torch.float32
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.dtype, enabled=enabled)


@torch.no_grad()
def predict(ctx: Context, feats: list[dict]) -> dict[str, np.ndarray | list]:
    model = ctx.model
    was = model.training
    model.eval()
    outs: dict[str, list] = {}
    for idx in length_sorted_batches(feats, ctx.cfg.train.eval_batch_size):
        batch = {k: v.to(ctx.device) for k, v in collate([feats[i] for i in idx], ctx.pad_id).items() if k in ("input_ids", "attention_mask")}
        with _autocast(ctx):
            out = model(batch)
        for k, v in out.items():
            v = v.float().cpu()
            slot = outs.setdefault(k, [None] * len(feats))
            for i, row in zip(idx, list(v) if v.dim() > 1 else v.tolist()):
                slot[i] = row
    model.train(was)
    return outs


def squad_predictions(ctx: Context, rows: list[dict], feats: list[dict]) -> tuple[dict, dict]:
    """Windows → one answer per question: best start/end pair over all windows (n-best per window,
    length ≤ max_answer_length, inside the context), and a no-answer probability
    1 − max_window sigmoid(answerability logit)."""
    out = predict(ctx, feats)
    n_best, max_len = ctx.cfg.data.n_best, ctx.cfg.data.max_answer_length
    best: dict[int, tuple[float, str]] = {}
    has_prob: dict[int, float] = {}
    for f, start, end, has in zip(feats, out["start_logits"], out["end_logits"], out["has_logit"]):
        ex = f["example"]
        has_prob[ex] = max(has_prob.get(ex, 0.0), float(torch.sigmoid(torch.tensor(has))))
        offsets = f["offsets"]
        n = len(f["input_ids"])
        start, end = start[:n], end[:n]
        s_idx = torch.topk(start, min(n_best, n)).indices.tolist()
        e_idx = torch.topk(end, min(n_best, n)).indices.tolist()
        for s in s_idx:
            for e in e_idx:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_len:
                    continue
                score = float(start[s] + end[e])
                if ex not in best or score > best[ex][0]:
                    ctx_text = rows[ex]["context"]
                    best[ex] = (score, ctx_text[offsets[s][0] : offsets[e][1]])
    preds = {r["id"]: best.get(i, (0.0, ""))[1] for i, r in enumerate(rows)}
    na_probs = {r["id"]: 1.0 - has_prob.get(i, 0.0) for i, r in enumerate(rows)}
    return preds, na_probs


def evaluate(ctx: Context, split: str, na_thresh: float | None = None) -> dict:
    """Scores on 'val' or 'dev'. SQuAD: the no-answer threshold is tuned on val (best F1 there)
    and then applied unchanged to dev; dev also reports the official best_f1 fields."""
    rows, feats = getattr(ctx.data, split), ctx.feats[split]
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
    return compute_metrics(ctx.spec.metric, preds, [f["label"] for f in feats])


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
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = int(round(ctx.cfg.train.warmup_ratio * total_steps))
    return opt, get_linear_schedule_with_warmup(opt, warmup, total_steps)


class BatchOrder:
    """Micro-batch k of a run is a pure function of (seed, k): an epoch's permutation comes from
    a generator seeded with (seed, epoch). Resuming needs only the step count."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = max(1, math.ceil(n / batch_size))
        self._perm: tuple[int, list[int]] | None = None

    def __call__(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1][pos * self.bs : (pos + 1) * self.bs]


def total_steps_for(cfg: RunConfig, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_train / (cfg.train.batch_size * cfg.train.grad_accum))
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def train_step(ctx: Context, order: BatchOrder, step: int, opt, sched) -> tuple[float, float, int]:
    """One optimizer step over grad_accum micro-batches; returns (loss, grad norm, tokens)."""
    accum = ctx.cfg.train.grad_accum
    feats = ctx.feats["train"]
    total_loss, tokens = 0.0, 0
    for a in range(accum):
        idx = order(step * accum + a)
        batch = {k: v.to(ctx.device) for k, v in collate([feats[i] for i in idx], ctx.pad_id).items()}
        with _autocast(ctx):
            loss = ctx.model(batch)["loss"] / accum
        loss.backward()
        total_loss += loss.item()
        tokens += int(batch["attention_mask"].sum())
    params = [p for _, p in trainable_parameters(ctx.model)]
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, ctx.cfg.train.max_grad_norm))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total_loss, gnorm, tokens


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB; it is the process's high-water mark, not this run's alone.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# checkpoints


def _trainable_state(ctx: Context) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainable_parameters(ctx.model)}


def save_checkpoint(path: Path, ctx: Context, step: int, opt, sched, extra: dict) -> None:
    state = {
        "step": step,
        "params": _trainable_state(ctx),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng_cpu": torch.random.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, ctx: Context, opt=None, sched=None) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
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
              on_eval: Callable[[int, float], None] | None = None) -> dict:
    """Train one (task, method, seed) run; returns its result dict. A finished run is returned
    as it is unless `force`; a killed run resumes from `checkpoints/last.pt`.

    `on_eval(step, score)` gets each intermediate validation score (primary metric) at the end
    of that step, after any checkpoint the step writes, so an exception it raises (a search
    pruning the trial) leaves the run folder as consistent as a kill would.

    One process at a time trains in a folder (an OS lock on `.lock`, RunConflict "run in
    progress by pid N" for the others), and a folder holds the artefacts of one config only."""
    rd = run_dir_for(cfg)
    chash = cfg.science_hash()
    # Open the store first: a store that cannot be written fails now, not after the training.
    store = ResultsStore(Path(cfg.out_dir) / "results.sqlite")
    make_dir(rd, "run folder")
    try:
        with exclusive_lock(rd / LOCK_NAME):
            return _train_locked(cfg, rd, chash, store, force, on_step, on_eval)
    except LockBusy as e:
        raise RunConflict(str(e)) from None


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


def _clear_run_dir(rd: Path) -> None:
    for child in rd.iterdir():
        if child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _train_locked(cfg: RunConfig, rd: Path, chash: str, store: ResultsStore, force: bool,
                  on_step: Callable[[int, int], None] | None, on_eval: Callable[[int, float], None] | None) -> dict:
    result_file = rd / "result.json"
    if result_file.exists() and not force:
        result = json.loads(result_file.read_text())
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
    opt, sched = make_optimizer(ctx, lr, total)
    order = BatchOrder(n_train, cfg.train.batch_size, cfg.seed)
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
    best_score, bad_evals, tokens, train_time = -math.inf, 0, 0, 0.0
    if last_ckpt.exists():
        st = load_checkpoint(last_ckpt, ctx, opt, sched)
        step, log, curve, pending = st["step"], st["log"], st["curve"], st["pending"]
        best_score, bad_evals, tokens, train_time = st["best_score"], st["bad_evals"], st["tokens"], st["train_time"]
        stopped_early = st["stopped_early"]
    else:
        snapshot(0)
        stopped_early = False

    ctx.model.train()
    while step < total and not stopped_early:
        evaluated = None
        ts = time.time()
        loss, gnorm, ntok = train_step(ctx, order, step, opt, sched)
        train_time += time.time() - ts
        tokens += ntok
        step += 1
        pending.append(loss)
        if step % cfg.train.log_every == 0 or step == total:
            mean_loss = float(np.mean(pending))
            _check_finite(mean_loss, step, rd, lr)
            log.append({"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                        "tokens_per_s": tokens / max(train_time, 1e-9)})
            pending = []
        if step % cfg.probe.snapshot_every == 0:
            snapshot(step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
            score = evaluated = primary(ctx, evaluate(ctx, "val"))
            curve.append({"step": step, ctx.spec.primary: score})
            if score > best_score:
                best_score, bad_evals = score, 0
                if cfg.train.restore_best:  # nothing else reads it, and for full FT it is the whole model
                    ckpt_dir.mkdir(exist_ok=True)
                    with atomic_path(best_ckpt) as tmp:
                        torch.save({"step": step, "params": _trainable_state(ctx), "score": score}, tmp)
            else:
                bad_evals += 1
                if cfg.train.early_stopping_patience and bad_evals >= cfg.train.early_stopping_patience:
                    stopped_early = True
        # No checkpoint at the last step: the final export follows at once (a kill during it
        # resumes from the previous checkpoint).
        if (step % cfg.train.checkpoint_every == 0 or stopped_early) and step < total:
            ckpt_dir.mkdir(exist_ok=True)
            save_checkpoint(last_ckpt, ctx, step, opt, sched,
                            {"log": log, "curve": curve, "pending": pending, "best_score": best_score, "bad_evals": bad_evals,
                             "stopped_early": stopped_early,
                             "tokens": tokens, "train_time": train_time})
        if on_step:
            on_step(step, total)
        if on_eval and evaluated is not None:
            on_eval(step, evaluated)

    if pending:  # stopped early between two logging steps
        _check_finite(float(np.mean(pending)), step, rd, lr)
    snapshot(step)
    final_step = step
    if cfg.train.restore_best and best_ckpt.exists():
        load_checkpoint(best_ckpt, ctx)
    val = evaluate(ctx, "val")
    dev = evaluate(ctx, "dev", na_thresh=val.get("na_prob_thresh")) if cfg.train.eval_dev else None
    export(ctx, rd)
    if ctx.spec.kind == "extractive_qa":
        if dev is not None:
            atomic_write_json(rd / "dev_predictions.json", dev.pop("_predictions"))
            atomic_write_json(rd / "dev_na_probs.json", dev.pop("_na_probs"))
        val.pop("_predictions"), val.pop("_na_probs")
    curve.append({"step": final_step, ctx.spec.primary: primary(ctx, val)})
    index = write_index(rd, ctx.model.pooling) if cfg.probe.enabled else {"n_examples": 0, "steps": []}
    result = {
        "task": cfg.task, "method": cfg.method.name, "seed": cfg.seed, "model": model_key(cfg.model),
        "config_hash": chash, "run_dir": str(rd), "steps": final_step, "stopped_early": stopped_early,
        "lr": lr, "primary_metric": ctx.spec.primary,
        "val": val, "dev": dev, "val_curve": curve,
        "train_examples": len(ctx.data.train), "train_features": n_train, "val_examples": len(ctx.data.val),
        "dev_examples": len(ctx.data.dev) if dev is not None else 0, "probe_examples": index["n_examples"], "snapshot_steps": index["steps"],
        "trainable_params": sum(p.numel() for _, p in trainable_parameters(ctx.model)),
        "total_params": sum(p.numel() for p in ctx.model.parameters()),
        "train_time_s": train_time, "wall_time_s": time.time() - t0, "tokens": tokens,
        "tokens_per_s": tokens / max(train_time, 1e-9), "peak_memory_mb": peak_memory_mb(ctx.device),
        "device": str(ctx.device), "dtype": str(ctx.dtype).replace("torch.", ""), "data_source": ctx.data.source,
    }
    with open(log_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    atomic_write_json(result_file, result)
    try:
        store.put_run(result)
    except StoreError as e:
        raise StoreError(f"{e}\nthe run itself finished and is recorded in {result_file}; a rerun of this command "
                         f"or `loradrift store repair --out {cfg.out_dir}` adds it to the store") from None
    # Final weights are exported; checkpoints (optimizer state included) are no longer needed.
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


def _check_finite(loss: float, step: int, rd: Path, lr: float) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"{rd}: the training loss is {loss} by step {step} (learning rate {lr:g}); the run is "
                            f"stopped without a result. Lower train.lr (or check the data), then rerun with --force")


def export(ctx: Context, rd: Path) -> None:
    """LoRA: the PEFT adapter folder (CausalLM key names, servable by vLLM) + head.
    Full FT: the fine-tuned backbone as a model folder + head."""
    from safetensors.torch import save_file

    with atomic_path(rd / "head.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in ctx.model.head.state_dict().items()}, str(tmp))
    target = rd / ("adapter" if ctx.peft is not None else "model")
    tmp_dir = rd / (target.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if ctx.peft is not None:
        ctx.peft.save_pretrained(tmp_dir)
    else:
        ctx.model.backbone.save_pretrained(tmp_dir)
        ctx.tokenizer.save_pretrained(tmp_dir)
    respect_umask(tmp_dir)
    shutil.rmtree(target, ignore_errors=True)
    tmp_dir.rename(target)


def export_merged(run_dir: Path, out: Path | None = None) -> Path:
    """Fold a LoRA run's adapter into the base weights: a plain CausalLM folder for serving."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    out = Path(out or run_dir / "merged")
    if (out / "config.json").exists():
        return out
    cfg = load_run_config(run_dir / "config.yaml")
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no adapter/ folder (only LoRA runs can be merged)")
    model_dir = resolve_model_dir(cfg.model)
    base = load_backbone(model_dir, True, torch.float32)
    merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(model_dir, True).save_pretrained(tmp)
    respect_umask(tmp)
    tmp.rename(out)
    return out
