"""Training speed of loradrift's engine: optimizer steps of full fine-tuning and LoRA.

    python bench/bench_train.py --preset smollm2 --task sst2 --batch-sizes 8,16,32 \
        --variants eager,compile,cudagraphs --steps 20 --warmup 5 [--fixed-length] [--out F.json] [key=value ...]

One row per (variant, method, batch size): step time, tokens/s (real and padded), peak memory,
MFU on a CUDA device (bench/common.py says how FLOPs are counted), and the warm-up time (which
holds torch.compile's compilation). Variants set the engine switches (docs/training.md):
`eager` = no compile, `compile` = torch.compile, `cudagraphs` = torch.compile with CUDA graphs;
everything else is the engine's `auto` for the device. It calls the engine's own setup and step
function, so it measures what `loradrift train` runs. The peer, HF Trainer + PEFT on the same
model, data, batch, length and learning rate, is `bench/bench_peer.py`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Window, add_mfu, base_parser, linear_params, print_table, write_rows

from loradrift.config import resolve_config
from loradrift.context import setup
from loradrift.engine import batch_order, make_optimizer, peak_memory_mb, train_step

VARIANTS = {
    "eager": ["train.engine.compile=off"],
    "compile": ["train.engine.compile=on", "train.engine.compile_mode=default"],
    "cudagraphs": ["train.engine.compile=on", "train.engine.compile_mode=reduce-overhead"],
}
COLUMNS = [("system", "system", ""), ("variant", "variant", ""), ("task", "task", ""), ("method", "method", ""),
           ("batch_size", "batch", "d"), ("max_length", "len", "d"), ("step_time_s", "step s", ".4f"),
           ("tokens_per_s", "tok/s", ",.0f"), ("padded_tokens_per_s", "pad tok/s", ",.0f"),
           ("peak_memory_mb", "peak MB", ",.0f"), ("mfu", "MFU", ".3f"), ("warmup_s", "warmup s", ".1f")]


def warmup_steps(ctx, order, warmup: int, timed: range) -> list[int]:
    """The first `warmup` steps, plus steps from after the timed window for any padded width the
    window has that they miss: each width compiles (and records a CUDA graph) on first sight,
    and that must not happen inside the timed window."""
    from loradrift.data import collate
    from loradrift.engine import _pad_batch

    def width(k: int) -> int:
        host = collate([ctx.feats["train"][i] for i in order(k)], ctx.pad_id)
        return _pad_batch(host, ctx.engine.pad_to_multiple_of, ctx.pad_id)["input_ids"].shape

    steps = list(range(warmup))
    seen = {width(k) for k in steps}
    missing = {width(k) for k in timed} - seen
    k = timed.stop
    while missing and k < timed.stop + 5000:
        w = width(k)
        if w in missing:
            steps.append(k)
            missing.discard(w)
        k += 1
    return steps


def profile_steps(ctx, order, opt, sched, steps: list[int]) -> dict:
    """torch.profiler over a few steps: GPU busy time vs wall time and kernel launches per step,
    which tell an overhead-bound step (GPU idle between small kernels) from a compute-bound one."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    win = Window(ctx.device)
    with profile(activities=acts) as p:
        t0 = win.sync()
        for s in steps:
            train_step(ctx, order, s, opt, sched)
        t1 = win.sync()
    events = p.key_averages()
    out = {"profile_wall_s_per_step": (t1 - t0) / len(steps)}
    if ctx.device.type == "cuda":
        kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["profile_kernels_per_step"] = len(kernels) / len(steps)
        # Kernels of one stream do not overlap: their summed time is the time the GPU was busy.
        out["profile_gpu_busy_s_per_step"] = sum(e.self_device_time_total for e in events) / 1e6 / len(steps)
        print(events.table(sort_by="self_device_time_total", row_limit=12))
    return out


def bench(preset: str, task: str, method: str, batch: int, variant: str, steps: int, warmup: int, fixed_length: bool,
          overrides: list[str], profile: bool = False) -> dict:
    over = [f"method.name={method}", f"train.batch_size={batch}", "train.grad_accum=1", *VARIANTS[variant], *overrides]
    cfg = resolve_config(preset=preset, task=task, overrides=over)
    if fixed_length:
        cfg = resolve_config(preset=preset, task=task, overrides=[*over, f"train.engine.pad_to_multiple_of={cfg.model.max_length}"])
    ctx = setup(cfg)
    order = batch_order(ctx, batch, cfg.seed)
    timed = range(warmup, warmup + steps)
    warm = warmup_steps(ctx, order, warmup, timed)
    opt, sched = make_optimizer(ctx, cfg.train.lr_for(method), max(warm + list(timed)) + 1)
    ctx.model.train()
    win = Window(ctx.device)
    if win.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = win.sync()
    for s in warm:
        train_step(ctx, order, s, opt, sched)
    t1 = win.sync()
    tokens = padded = 0
    for s in timed:
        st = train_step(ctx, order, s, opt, sched)
        tokens, padded = tokens + st.tokens, padded + st.padded_tokens
    t2 = win.sync()
    step_time = (t2 - t1) / steps
    prof = profile_steps(ctx, order, opt, sched, list(timed)[:3]) if profile else {}
    mc = ctx.model.backbone.config
    n_lin = linear_params(ctx.model.body)
    row = {
        "system": "loradrift", "variant": variant, "preset": preset, "task": task, "method": method, "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name() if win.cuda else "cpu", "dtype": str(ctx.dtype).replace("torch.", ""),
        "batch_size": batch, "max_length": cfg.model.max_length, "steps": steps, "warmup_steps": warmup, "fixed_length": fixed_length,
        "step_time_s": step_time, "tokens_per_s": tokens / (t2 - t1), "padded_tokens_per_s": padded / (t2 - t1),
        "mean_padded_length": padded / (steps * batch), "peak_memory_mb": peak_memory_mb(ctx.device), "warmup_s": t1 - t0,
        "trainable_params": sum(p.numel() for p in ctx.model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in ctx.model.parameters()), "linear_params": n_lin,
        "engine": dataclasses.asdict(ctx.engine), "warmup_step_count": len(warm), **prof,
    }
    add_mfu(row, ctx.device, mc, n_lin, padded / steps, step_time, method)
    return row


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--variants", default="eager", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--fixed-length", action="store_true", help="pad every batch to model.max_length")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; configurations not started by then are skipped")
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps (GPU busy time, kernel launches per step)")
    args = ap.parse_intermixed_args()
    out = args.out or Path(__file__).parent / "results" / f"train_{args.preset}_{args.task}.json"
    rows, start = [], time.time()
    for variant in args.variants.split(","):
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for method in args.methods.split(","):
                if args.time_budget and time.time() - start > args.time_budget:
                    rows.append({"system": "loradrift", "variant": variant, "task": args.task, "method": method, "batch_size": batch,
                                 "skipped": "time budget"})
                    continue
                try:
                    rows.append(bench(args.preset, args.task, method, batch, variant, args.steps, args.warmup, args.fixed_length, args.overrides,
                                      args.profile))
                except Exception as e:  # noqa: BLE001 - recorded in its row; one failing variant must not lose the others' rows
                    traceback.print_exc()
                    rows.append({"system": "loradrift", "variant": variant, "task": args.task, "method": method, "batch_size": batch,
                                 "error": f"{type(e).__name__}: {e}"[:500]})
                write_rows(out, rows, "python " + " ".join(sys.argv))
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print_table([r for r in rows if "step_time_s" in r], COLUMNS)


if __name__ == "__main__":
    main()
