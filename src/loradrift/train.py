"""One training run, full fine-tuning or LoRA, top to bottom:
setup → resume (if a checkpoint exists) → train with snapshots, evaluation and checkpoints →
final evaluation → export → result row.

    loradrift train --task sst2 --method lora --seed 42 [--preset smollm2] [--config f.yaml] [key=value ...]

Both methods share the head, the data order for a seed, and the evaluation code: the only
difference is which parameters train. A lean loop rather than the HF Trainer, because exact
kill -9 resume (data position and every RNG), representation snapshots at fixed optimizer steps
and identical code paths for both methods are simpler to guarantee by hand (docs/training.md).
This module is the recipe; the parts are in context.py (setup), engine.py (the step and the
checkpoint files), evaluate.py and export.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loradrift import tracking
from loradrift.config import RunConfig, load_run_config, save_config
from loradrift.context import Context, setup
from loradrift.data import probe_examples
from loradrift.engine import (
    CheckpointWriter,
    Clock,
    UnreadableCheckpoint,
    batch_order,
    load_checkpoint,
    make_optimizer,
    peak_memory_mb,
    save_checkpoint,
    total_steps_for,
    train_step,
    trainable_parameters,
)
from loradrift.evaluate import evaluate, primary
from loradrift.export import export, write_model_card
from loradrift.io import LockBusy, ResultsStore, StoreError, atomic_path, atomic_write_json, exclusive_lock, make_dir
from loradrift.layout import base_file, model_key, results_db, run_dir_for, run_path
from loradrift.models import public_base
from loradrift.representations import encode_probe, extract, probe_key, read_snapshot_meta, save_snapshot, snapshot_path, write_index


class RunConflict(RuntimeError):
    """A run with a different config is in the way (finished or not), another process is
    running in the folder, or the folder holds a checkpoint or result.json that cannot be read
    (a truncated copy, a full disk); nothing is overwritten."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops without a result."""


@dataclass
class RunState:
    """Where the loop stands. With the trainable weights, the optimizer, the scheduler and the RNG
    states it is all that `checkpoints/last.pt` holds: the data order is a function of the step."""

    step: int = 0
    log: list[dict] = field(default_factory=list)  # log.jsonl's entries so far
    curve: list[dict] = field(default_factory=list)  # the intermediate validation scores
    # Losses since the last log entry: device tensors while training (reading one makes the host
    # wait for the GPU), floats once resumed.
    pending: list = field(default_factory=list)
    best_score: float = -math.inf
    bad_evals: int = 0  # validations since the best one, for early stopping
    stopped_early: bool = False
    tokens: int = 0
    padded_tokens: int = 0
    train_time: float = 0.0

    def to_extra(self) -> dict:
        """The checkpoint's keys besides those `save_checkpoint` writes itself (step, weights,
        optimizer, scheduler, RNGs), named and ordered as they always were: the file stays the
        same, and checkpoints of earlier versions resume."""
        return {"log": self.log, "curve": self.curve, "pending": [float(x) for x in self.pending], "best_score": self.best_score,
                "bad_evals": self.bad_evals, "stopped_early": self.stopped_early, "tokens": self.tokens,
                "padded_tokens": self.padded_tokens, "train_time": self.train_time}

    @classmethod
    def from_extra(cls, checkpoint: dict) -> RunState:
        return cls(step=checkpoint["step"], log=checkpoint["log"], curve=checkpoint["curve"], pending=checkpoint["pending"],
                   best_score=checkpoint["best_score"], bad_evals=checkpoint["bad_evals"],
                   stopped_early=checkpoint["stopped_early"], tokens=checkpoint["tokens"],
                   padded_tokens=checkpoint.get("padded_tokens", 0),  # not in checkpoints from before it was counted
                   train_time=checkpoint["train_time"])


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
    store = ResultsStore(results_db(cfg.out_dir))
    # What this call creates, deepest first: removed again if the run fails before writing anything.
    created = [p for p in (run_path(rd, "lock"), rd, *rd.parents) if not p.exists()]
    make_dir(rd, "run folder")
    try:
        with exclusive_lock(run_path(rd, "lock")), tracker:
            try:
                return _train_locked(cfg, rd, chash, store, force, on_step, on_eval, tracker)
            except BaseException:
                _remove_unused(rd, created)
                raise
    except LockBusy as e:
        raise RunConflict(str(e)) from None


def _train_locked(cfg: RunConfig, rd: Path, chash: str, store: ResultsStore, force: bool,
                  on_step: Callable[[int, int], None] | None, on_eval: Callable[[int, float], None] | None,
                  tracker: tracking.Tracking) -> dict:
    if run_path(rd, "result").exists() and not force:
        return _finished_result(cfg, rd, chash, store)
    if not force:
        recorded = _recorded_hash(rd)
        if recorded is not None and recorded != chash:
            raise RunConflict(f"{rd}: an unfinished run with another config (hash {recorded}) is there; "
                              f"use --force to restart it or another --out folder")
    # Everything is built before anything in the folder is touched: a config that fails here
    # (a LoRA target the model lacks, bad data) leaves a finished run as it was, even with --force.
    run = _Recipe(cfg, rd, tracker)
    if force:
        _clear_run_dir(rd)
    # Written before any other artefact: it records which config the folder's artefacts belong to.
    save_config(cfg, run_path(rd, "config"))
    run.resume()
    run.train(on_step, on_eval)
    result = run.evaluate_and_export(chash)
    run.record(result, store)
    return result


class _Recipe:
    """One run's parts, and its steps in the order `_train_locked` calls them."""

    def __init__(self, cfg: RunConfig, rd: Path, tracker: tracking.Tracking):
        self.cfg, self.rd, self.tracker = cfg, rd, tracker
        self.ctx = ctx = setup(cfg)
        self.t0 = time.time()
        self.total = total_steps_for(cfg, len(ctx.feats["train"]))
        self.lr = cfg.train.lr_for(cfg.method.name)
        # The trackers get what the run uses, not the config's nulls (train.lr null = the method's default).
        tracker.params({"train.lr": self.lr, "resolved.lr": self.lr, "resolved.batch_size": cfg.train.batch_size * cfg.train.grad_accum,
                        "resolved.steps": self.total, "resolved.seed": cfg.seed, "resolved.model": model_key(cfg.model),
                        "resolved.base_model": public_base(cfg.model, ctx.model_dir)[0]})
        self.opt, self.sched = make_optimizer(ctx, self.lr, self.total)
        self.order = batch_order(ctx, cfg.train.batch_size, cfg.seed)
        self.snapshot = _Snapshots(cfg, rd, ctx)
        self.ckpt_dir = run_path(rd, "checkpoints")
        self.last_ckpt, self.best_ckpt = self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt"
        self.log_path = run_path(rd, "log")
        self.writer = CheckpointWriter(background=ctx.device.type == "cuda")
        self.state = RunState()

    def resume(self) -> None:
        """Picks up a killed run at its last checkpoint; a new run starts with the step-0 snapshot."""
        if self.last_ckpt.exists():
            self.state = RunState.from_extra(self._load(self.last_ckpt, self.opt, self.sched))
        else:
            self.snapshot(0)
        # log.jsonl grows as training goes; after a resume it restarts from the checkpoint's log, so
        # entries a killed run wrote past its last checkpoint are not doubled.
        with atomic_path(self.log_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.state.log))

    def train(self, on_step: Callable[[int, int], None] | None, on_eval: Callable[[int, float], None] | None) -> None:
        cfg, ctx, s, total = self.cfg, self.ctx, self.state, self.total
        clock = Clock(ctx.device)
        ctx.model.train()
        while s.step < total and not s.stopped_early:
            evaluated = None
            st = train_step(ctx, self.order, s.step, self.opt, self.sched)
            s.tokens += st.tokens
            s.padded_tokens += st.padded_tokens
            s.step += 1
            s.pending.append(st.loss)
            step = s.step
            is_log = step % cfg.train.log_every == 0 or step == total
            is_snap = cfg.probe.enabled and step % cfg.probe.snapshot_every == 0
            is_eval = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0 and step < total
            is_ckpt = step % cfg.train.checkpoint_every == 0
            if not (is_log or is_snap or is_eval or is_ckpt):
                if on_step:
                    on_step(step, total)
                continue
            # Only here does the host wait for the device: at logging, snapshot, evaluation and
            # checkpoint steps, never in between.
            s.train_time += clock.lap()
            if is_log:
                self._log(st.grad_norm)
            if is_snap:
                self.snapshot(step)
            if is_eval:
                evaluated = self._validate()
            # No checkpoint at the last step: the final export follows at once (a kill during it
            # resumes from the previous checkpoint).
            if (is_ckpt or s.stopped_early) and step < total:
                self.ckpt_dir.mkdir(exist_ok=True)
                save_checkpoint(self.last_ckpt, ctx, step, self.opt, self.sched, s.to_extra(), self.writer)
            clock.restart()
            if on_step:
                on_step(step, total)
            if on_eval and evaluated is not None:
                self.writer.wait()  # a pruned trial must leave the checkpoint it just wrote
                on_eval(step, evaluated)
        self.writer.wait()

    def _log(self, grad_norm: torch.Tensor) -> None:
        s = self.state
        mean_loss, gnorm = _mean_loss(s.pending), float(grad_norm)
        _check_finite(mean_loss, s.step, self.rd, self.lr, gnorm)
        entry = {"step": s.step, "loss": mean_loss, "lr": self.sched.get_last_lr()[0],
                 "grad_norm": gnorm, "tokens_per_s": s.tokens / max(s.train_time, 1e-9),
                 "padded_tokens_per_s": s.padded_tokens / max(s.train_time, 1e-9)}
        s.log.append(entry)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.tracker.log({"train": {k: v for k, v in entry.items() if k != "step"}}, s.step)
        s.pending = []

    def _validate(self) -> float:
        """An intermediate validation score (primary metric); it keeps the best weights
        (restore_best) and stops the run early after `early_stopping_patience` worse ones."""
        cfg, ctx, s = self.cfg, self.ctx, self.state
        score = primary(ctx, evaluate(ctx, "val", limit=cfg.train.eval_max_examples))
        s.curve.append({"step": s.step, ctx.spec.primary: score})
        self.tracker.log({"val": {ctx.spec.primary: score}}, s.step)
        if score > s.best_score:
            s.best_score, s.bad_evals = score, 0
            if cfg.train.restore_best:  # nothing else reads it, and for full FT it is the whole model
                self.ckpt_dir.mkdir(exist_ok=True)
                self.writer.submit(self.best_ckpt, {"step": s.step, "params": {n: p.detach() for n, p in trainable_parameters(ctx.model)},
                                                    "score": score})
        else:
            s.bad_evals += 1
            if cfg.train.early_stopping_patience and s.bad_evals >= cfg.train.early_stopping_patience:
                s.stopped_early = True
        return score

    def _load(self, path: Path, opt=None, sched=None) -> dict:
        try:
            return load_checkpoint(path, self.ctx, opt, sched)
        except UnreadableCheckpoint as e:
            raise RunConflict(f"{e}; {_restart_hint(self.rd)}") from None

    def evaluate_and_export(self, chash: str) -> dict:
        """The final weights (the best ones with restore_best): their snapshot, scores and exported
        folders, and the run's result row."""
        cfg, ctx, s, rd = self.cfg, self.ctx, self.state, self.rd
        if s.pending:  # stopped early between two logging steps
            _check_finite(_mean_loss(s.pending), s.step, rd, self.lr)
        restored_step = None
        if cfg.train.restore_best and self.best_ckpt.exists():
            restored_step = int(self._load(self.best_ckpt)["step"])
            # The final snapshot must describe the weights that are evaluated and exported (H1 and H2
            # on the same model): the restored best ones, even if the loop already wrote this step.
            if restored_step != s.step:
                snapshot_path(rd, s.step).unlink(missing_ok=True)
        self.snapshot(s.step)
        val = evaluate(ctx, "val")
        dev = evaluate(ctx, "dev", na_thresh=val.get("na_prob_thresh")) if cfg.train.eval_dev else None
        export(ctx, rd)
        if dev is not None:
            atomic_write_json(run_path(rd, "dev_predictions"), dev.pop("_predictions"))
            if ctx.spec.task_kind.na_probs:
                atomic_write_json(run_path(rd, "dev_na_probs"), dev.pop("_na_probs"))
        val.pop("_predictions"), val.pop("_na_probs", None)
        s.curve.append({"step": s.step, ctx.spec.primary: primary(ctx, val)})
        index = write_index(rd, ctx.model.pooling) if cfg.probe.enabled else {"n_examples": 0, "steps": []}
        train_time, tokens, padded_tokens = s.train_time, s.tokens, s.padded_tokens
        result = {
            "task": cfg.task, "method": cfg.method.name, "seed": cfg.seed, "model": model_key(cfg.model),
            "config_hash": chash, "run_dir": str(rd), "steps": s.step, "stopped_early": s.stopped_early,
            "restored_best_step": restored_step,
            "lr": self.lr, "primary_metric": ctx.spec.primary,
            "val": val, "dev": dev, "val_curve": s.curve,
            "train_examples": len(ctx.data.train), "train_features": len(ctx.feats["train"]), "val_examples": len(ctx.data.val),
            "dev_examples": len(ctx.data.dev) if dev is not None else 0, "probe_examples": index["n_examples"], "snapshot_steps": index["steps"],
            "trainable_params": sum(p.numel() for _, p in trainable_parameters(ctx.model)),
            "total_params": sum(p.numel() for p in ctx.model.parameters()),
            "train_time_s": train_time, "wall_time_s": time.time() - self.t0, "tokens": tokens,
            "tokens_per_s": tokens / max(train_time, 1e-9), "padded_tokens": padded_tokens,
            "padded_tokens_per_s": padded_tokens / max(train_time, 1e-9), "peak_memory_mb": peak_memory_mb(ctx.device),
            "device": str(ctx.device), "dtype": str(ctx.dtype).replace("torch.", ""), "data_source": ctx.data.source,
            "torch_threads": ctx.threads,
        }
        write_model_card(ctx, rd, result)
        return result

    def record(self, result: dict, store: ResultsStore) -> None:
        """result.json, the trackers' summary and the store's row; then the checkpoints go."""
        cfg, rd, tracker = self.cfg, self.rd, self.tracker
        result_file = run_path(rd, "result")
        tracker.summary({"val": result["val"], "dev": result["dev"] or {},
                         "cost": {k: result[k] for k in ("steps", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb",
                                                         "trainable_params")}}, result["steps"])
        atomic_write_json(result_file, result)
        tracker.artifacts([run_path(rd, "config"), result_file, run_path(rd, self.ctx.method.card_dir) / "README.md"])
        try:
            store.put_run(result)
        except StoreError as e:
            raise StoreError(f"{e}\nthe run itself finished and is recorded in {result_file}; a rerun of this command "
                             f"or `loradrift store repair --out {cfg.out_dir}` adds it to the store") from None
        # Final weights are exported; checkpoints (optimizer state included) are no longer needed.
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)


class _Snapshots:
    """The run's representations of the probe set at a step (nothing when the probe is off); a
    step that has its snapshot keeps it, so a resumed run does not redo them."""

    def __init__(self, cfg: RunConfig, rd: Path, ctx: Context):
        self.cfg, self.rd, self.ctx = cfg, rd, ctx
        self.feats = encode_probe(ctx.spec, ctx.tokenizer, probe_examples(cfg, ctx.data), cfg.model.max_length) if cfg.probe.enabled else []
        self.dtype = getattr(torch, cfg.probe.dtype)
        self.key = probe_key(cfg)
        self.base = base_file(cfg.out_dir, model_key(cfg.model), cfg.task)

    def __call__(self, step: int) -> None:
        cfg, ctx = self.cfg, self.ctx
        path = snapshot_path(self.rd, step)
        if not cfg.probe.enabled or path.exists():
            return
        if step == 0 and self.base.exists() and read_snapshot_meta(self.base).get("probe_key") == self.key:
            # Before the first update the backbone is the base model (LoRA's B starts at zero), so
            # its snapshot is the base representations of the same probe set: copy, do not recompute.
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                shutil.copyfile(self.base, tmp)
            return
        tensors = extract(ctx.model, self.feats, cfg.train.eval_batch_size, ctx.pad_id, ctx.device, self.dtype)
        save_snapshot(path, tensors, step=step, task=cfg.task, model=model_key(cfg.model), pooling=ctx.model.pooling, probe_key=self.key)


def _finished_result(cfg: RunConfig, rd: Path, chash: str, store: ResultsStore) -> dict:
    result = _read_result(run_path(rd, "result"))
    if result["config_hash"] != chash:
        raise RunConflict(f"{rd}: a finished run with another config (hash {result['config_hash']}) is there; "
                          f"use --force to redo it or another --out folder")
    # A kill between result.json and the store (or a failed store write) left the run
    # unindexed: the folder is the record, so index it now; leftover resume state goes too.
    if not store.rows("run", model=result["model"], task=cfg.task, method=cfg.method.name, seed=cfg.seed, config_hash=chash):
        store.put_run(result)
    shutil.rmtree(run_path(rd, "checkpoints"), ignore_errors=True)
    return result


def _recorded_hash(rd: Path) -> str | None:
    """The science hash of the config the folder was created with (its config.yaml)."""
    from loradrift.config import ConfigError

    path = run_path(rd, "config")
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


def _restart_hint(rd: Path) -> str:
    return (f"nothing was deleted; to redo the run from step 0, delete the run folder {rd} and rerun, "
            f"or rerun `loradrift train` with --force")


def _clear_run_dir(rd: Path) -> None:
    lock = run_path(rd, "lock")
    for child in rd.iterdir():
        if child != lock:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _remove_unused(rd: Path, created: list[Path]) -> None:
    """After a failure before the run wrote anything (a config rejected at setup), remove the
    lock file and folders this call created: a run folder holding only `.lock` would look like
    a run that was started. Called with the lock held; a process that opened the lock file
    meanwhile sees it replaced and takes a new one (exclusive_lock)."""
    lock = run_path(rd, "lock")
    if lock not in created or list(rd.iterdir()) != [lock]:
        return
    lock.unlink()
    for d in created[1:]:
        try:
            d.rmdir()
        except OSError:  # another process has started using it (or a parent): theirs now
            return


def _mean_loss(pending: list) -> float:
    return float(np.mean([float(x) for x in pending]))


def _check_finite(loss: float, step: int, rd: Path, lr: float, grad_norm: float = 0.0) -> None:
    # A non-finite gradient norm means the update just applied has already broken the weights,
    # even while the loss of that step was still finite.
    what = "training loss" if not math.isfinite(loss) else "gradient norm" if not math.isfinite(grad_norm) else None
    if what:
        value = loss if what == "training loss" else grad_norm
        raise NonFiniteLoss(f"{rd}: the {what} is {value} by step {step} (learning rate {lr:g}); the run is "
                            f"stopped without a result. Lower train.lr (or check the data), then rerun with --force")
