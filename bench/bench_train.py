"""Training speed: N optimizer steps of full fine-tuning and LoRA on the same model and data.

    python bench/bench_train.py --preset smollm2 --task sst2 --steps 8 [--out bench/results/train_smollm2.json]

Prints tokens/s, step time and peak memory for both methods (and MFU on a CUDA device, from the
GPU's peak bf16 throughput given with --peak-tflops) and writes the table as JSON. It uses the
training engine's own setup and step function, so it measures what `loradrift train` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loradrift.config import resolve_config
from loradrift.io import atomic_write_json
from loradrift.train import BatchOrder, make_optimizer, setup, train_step


def bench(preset: str, task: str, method: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    cfg = resolve_config(preset=preset, task=task, overrides=[f"method.name={method}", *overrides])
    ctx = setup(cfg)
    opt, sched = make_optimizer(ctx, cfg.train.lr_for(method), steps + warmup)
    order = BatchOrder(len(ctx.feats["train"]), cfg.train.batch_size, cfg.seed)
    ctx.model.train()
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for s in range(steps + warmup):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, _, n = train_step(ctx, order, s, opt, sched)
        if cuda:
            torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += n
    from loradrift.train import peak_memory_mb

    total_params = sum(p.numel() for p in ctx.model.parameters())
    trainable = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    row = {
        "preset": preset, "task": task, "method": method, "device": str(ctx.device), "dtype": str(ctx.dtype).replace("torch.", ""),
        "batch_size": cfg.train.batch_size, "max_length": cfg.model.max_length, "steps": steps,
        "step_time_s": statistics.mean(times), "step_time_sd_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "tokens_per_s": tokens / sum(times), "peak_memory_mb": peak_memory_mb(ctx.device),
        "trainable_params": trainable, "total_params": total_params,
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak (e.g. 989 for H100 bf16 dense) for MFU")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for method in ("full", "lora"):
        r = bench(args.preset, args.task, method, args.steps, args.warmup, args.overrides)
        if args.peak_tflops and r["device"].startswith("cuda"):
            # 6·N FLOPs per trained token for full FT; LoRA skips weight gradients (~4·N).
            flops_per_token = (6 if method == "full" else 4) * r["total_params"]
            r["mfu"] = r["tokens_per_s"] * flops_per_token / (args.peak_tflops * 1e12)
        rows.append(r)
    print(f"{'method':6} {'device':6} {'batch':>5} {'len':>4} {'step s':>8} {'tokens/s':>9} {'peak MB':>8} {'trainable':>11}" + ("  MFU" if args.peak_tflops else ""))
    for r in rows:
        print(f"{r['method']:6} {r['device']:6} {r['batch_size']:5d} {r['max_length']:4d} {r['step_time_s']:8.3f} {r['tokens_per_s']:9.1f} "
              f"{r['peak_memory_mb']:8.0f} {r['trainable_params']:11,d}" + (f"  {r.get('mfu', float('nan')):.3f}" if args.peak_tflops else ""))
    out = args.out or Path(__file__).parent / "results" / f"train_{args.preset}_{args.task}.json"
    atomic_write_json(out, {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
                            "command": "python bench/bench_train.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, []) and k != "overrides"),
                            "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
