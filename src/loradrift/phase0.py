"""Phase 0: sanity checks (can each task and method overfit a small sample?), majority and random
baselines, base representations, and a memory profile.

    loradrift sanity --task all
    loradrift baselines --task all
    loradrift extract-base --task all
    loradrift memory --task all
"""

from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from loradrift import layout
from loradrift.config import RunConfig
from loradrift.data import load_task, probe_examples, rows_as_squad_json
from loradrift.io import ResultsStore
from loradrift.layout import model_key
from loradrift.methods import METHOD_NAMES, METHODS
from loradrift.metrics import compute_metrics, squad_v2_evaluate
from loradrift.models import build_task_model, is_decoder, load_tokenizer, resolve_model_dir
from loradrift.representations import encode_probe, extract, floor_batch_size, floor_path, probe_key, save_snapshot
from loradrift.tasks import get_task


def _store(cfg: RunConfig) -> ResultsStore:
    return ResultsStore(layout.results_db(cfg.out_dir))


# ---------------------------------------------------------------------------------------------
# sanity: overfit a small sample


def sanity_check(cfg: RunConfig, on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train on `sanity.n_examples` training examples and score on those same examples: a model
    and loss that are wired correctly drive training accuracy to ≥ 95% (SQuAD v2: F1 ≥ 90).
    `on_step(step, max_steps)` after each step, as `train_run`'s."""
    from loradrift.context import setup
    from loradrift.engine import batch_order, make_optimizer, train_step
    from loradrift.evaluate import evaluate

    s = cfg.sanity
    lr = getattr(s, METHODS[cfg.method.name].sanity_lr)
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.method.lora.dropout = 0.0
    run_cfg.train.grad_accum = 1
    run_cfg.train.batch_size = s.batch_size
    run_cfg.train.warmup_ratio = 0.0
    run_cfg.train.weight_decay = 0.0
    data = load_task(run_cfg)
    rng = np.random.default_rng(cfg.seed)
    sample = [data.train[i] for i in sorted(rng.permutation(len(data.train))[: s.n_examples])]
    # The overfit set doubles as the evaluation set: val (for the SQuAD threshold) and dev.
    data.train, data.val, data.dev = sample, sample, sample
    ctx = setup(run_cfg, data)
    opt, sched = make_optimizer(ctx, lr, s.max_steps)
    order = batch_order(ctx, s.batch_size, cfg.seed)
    t0 = time.time()
    ctx.model.train()
    threshold = getattr(s, ctx.spec.task_kind.sanity_threshold)
    metric = ctx.spec.h1_metric
    score, steps, loss = float("nan"), 0, float("nan")
    for step in range(s.max_steps):
        loss = train_step(ctx, order, step, opt, sched).loss
        steps = step + 1
        if on_step:
            on_step(steps, s.max_steps)
        if steps % 5 == 0 or steps == s.max_steps:
            score = float(evaluate(ctx, "val")[metric])
            if score >= threshold:
                break
    return {"task": cfg.task, "method": cfg.method.name, "examples": len(sample), "steps": steps, "lr": lr,
            "metric": metric, "score": score, "threshold": threshold, "final_loss": float(loss),
            "passed": bool(score >= threshold), "seconds": time.time() - t0}


def run_sanity(cfg_for, tasks: list[str], methods=METHOD_NAMES) -> list[dict]:
    rows = []
    for task in tasks:
        for method in methods:
            cfg = cfg_for(task, method)
            r = sanity_check(cfg)
            _store(cfg).put("sanity", model_key(cfg.model), task, method, cfg.seed, cfg.science_hash(), r)
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------
# baselines


def baselines(cfg: RunConfig) -> list[dict]:
    """Majority class and a seeded uniform-random guess (classification; the majority row also
    records the dev-majority rate and chance); always-no-answer and a seeded random-span guess
    (SQuAD v2), scored on the dev set the runs report on."""
    data = load_task(cfg)
    spec = data.spec
    rng = random.Random(cfg.seed)
    rows = spec.handler("baselines")(spec, data, rng)
    store = _store(cfg)
    for r in rows:
        r.update(task=spec.name, dev_examples=len(data.dev))
        store.put("baseline", model_key(cfg.model), spec.name, r["baseline"], cfg.seed, cfg.science_hash(), r)
    return rows


def squad_baselines(spec, data, rng: random.Random) -> list[dict]:
    """Always-no-answer and a seeded random-span guess (the extractive-QA kind's `baselines`)."""
    rows = []
    dataset = rows_as_squad_json(data.dev)
    empty = {r["id"]: "" for r in data.dev}
    rows.append({"baseline": "no_answer", **squad_v2_evaluate(dataset, empty)})
    spans = {}
    for r in data.dev:
        words = r["context"].split()
        i = rng.randrange(len(words))
        spans[r["id"]] = " ".join(words[i : i + rng.randint(1, 5)])
    rows.append({"baseline": "random_span", **squad_v2_evaluate(dataset, spans)})
    return rows


def classification_baselines(spec, data, rng: random.Random) -> list[dict]:
    """Majority class and a seeded uniform-random guess (the classification kind's `baselines`)."""
    rows = []
    labels = [r["label"] for r in data.dev]
    train_labels = [r["label"] for r in data.train]
    # Majority is taken from train (the dev labels are the test set).
    majority = int(np.bincount(train_labels, minlength=spec.num_labels).argmax())
    rows.append({"baseline": "majority", "predicts": spec.labels[majority], **compute_metrics(spec.metric, [majority] * len(labels), labels),
                 # not predictors but bars: a constant model scores the dev-majority rate, and the
                 # train-majority class can be the dev minority (learning.baseline_bars)
                 "dev_majority_accuracy": float(np.bincount(labels, minlength=spec.num_labels).max() / len(labels)),
                 "chance_accuracy": 1.0 / spec.num_labels})
    guesses = [rng.randrange(spec.num_labels) for _ in labels]
    rows.append({"baseline": "random", **compute_metrics(spec.metric, guesses, labels)})
    return rows


# ---------------------------------------------------------------------------------------------
# base representations


@torch.no_grad()
def extract_base(cfg: RunConfig, force: bool = False) -> Path:
    """The base model's probe representations for one task, computed with exactly the code path a
    run uses for its step-0 snapshot (so the two are equal)."""
    from loradrift.engine import pick_device

    key = model_key(cfg.model)
    path = layout.base_file(cfg.out_dir, key, cfg.task)
    if path.exists() and not force:
        return path
    spec = get_task(cfg.task)
    data = load_task(cfg, spec)
    model_dir = resolve_model_dir(cfg.model)
    tok = load_tokenizer(model_dir, is_decoder(model_dir))
    device = pick_device()
    model = build_task_model(model_dir, spec, cfg.model, head_seed=0).to(device)
    feats = encode_probe(spec, tok, probe_examples(cfg, data), cfg.model.max_length)
    store = getattr(torch, cfg.probe.dtype)
    meta = dict(step=0, task=cfg.task, model=key, pooling=model.pooling, probe_key=probe_key(cfg))
    floor_bs = floor_batch_size(cfg.train.eval_batch_size)
    save_snapshot(floor_path(path), extract(model, feats, floor_bs, tok.pad_token_id, device, store),
                  batch_size=floor_bs, **meta)
    # The base file last: it marks the step done (study.py skips it when it exists).
    save_snapshot(path, extract(model, feats, cfg.train.eval_batch_size, tok.pad_token_id, device, store), **meta)
    return path


# ---------------------------------------------------------------------------------------------
# memory profile


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its peak RSS (VmHWM) by writing 5 to clear_refs, so the peak of
    the training steps is not hidden under the (larger) peak of loading the weights."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_profile(cfg: RunConfig, steps: int = 1) -> dict:
    """Peak memory of the first training step(s) at the preset's batch size, longest examples
    first (one step is enough: it already holds activations, gradients and the optimizer state).
    CUDA: the allocator's peak. CPU: the process's peak RSS during the steps (reset before them
    where Linux allows; otherwise the whole process's high-water mark, flagged in the row).
    `memory_profile_isolated` runs it in a fresh process."""
    from loradrift.context import setup
    from loradrift.engine import make_optimizer, train_step

    ctx = setup(cfg)
    opt, sched = make_optimizer(ctx, cfg.train.lr_for(cfg.method.name), steps)
    # Longest examples first: the profile should reflect the worst batch, not a lucky one.
    ctx.feats["train"] = sorted(ctx.feats["train"], key=lambda f: -len(f["input_ids"]))
    bs = cfg.train.batch_size
    n = len(ctx.feats["train"])
    order = lambda k: list(range(k * bs, min((k + 1) * bs, n)))  # noqa: E731
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss() if not cuda else None
    rss_start = _peak_rss_mb()
    t0 = time.time()
    for s in range(steps):
        train_step(ctx, order, s, opt, sched)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return {"task": cfg.task, "method": cfg.method.name, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "max_length": cfg.model.max_length, "device": str(ctx.device), "peak_memory_mb": peak,
            "rss_before_steps_mb": None if cuda else rss_start, "peak_is_whole_process": (not reset) if not cuda else False,
            "seconds_per_step": (time.time() - t0) / steps}


def _memory_worker(cfg_json: str, queue) -> None:
    queue.put(memory_profile(RunConfig.model_validate_json(cfg_json)))


# What a profiling child would import anyway: the fork server imports it once for all profiles.
_PROFILE_PRELOAD = ["loradrift.phase0", "loradrift.context", "transformers", "peft"]


def memory_profile_isolated(cfg: RunConfig) -> dict:
    """`memory_profile` in a fresh process, because a CPU's peak RSS is a process high-water
    mark: profiling several (task, method) pairs in one process would report the largest for
    all. The row is stored in the results store.

    The process is forked from multiprocessing's fork server, which has imported torch,
    transformers and PEFT once, instead of spawned (each spawn imported them again, about 5 s
    a profile). The server has run no torch op, so no thread pool or CUDA context is forked.
    A forked child's RSS counts the library pages it touches, not every page the import loaded,
    so its peak is 50-60 MB lower than a spawned one's; the step's own memory is the same."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PROFILE_PRELOAD)
    else:  # Windows
        ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_worker, args=(cfg.model_dump_json(), q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"memory profile of {cfg.task}/{cfg.method.name} failed (exit {p.exitcode})")
    r = q.get()
    _store(cfg).put("memory", model_key(cfg.model), cfg.task, cfg.method.name, cfg.seed, cfg.science_hash(), r)
    return r

