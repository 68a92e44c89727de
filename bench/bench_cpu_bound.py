"""The fp32 matmul bound on SmolLM2's training and evaluation speed on this CPU, and the share of it
loradrift's engine reaches.

    python bench/bench_cpu_bound.py [--threads 1,2] [--task sst2] [--batch-sizes 16] [--steps 8] \
        [--dev-examples 256] [--out F.json] [key=value ...]

Per torch thread count:

1. the fp32 matmul rate (GFLOP/s, `torch.nn.functional.linear`) of one 2048-cube (the machine's
   practical peak) and of SmolLM2's seven projections at M = the tokens of one training step
   (batch × mean padded length), weighted by their FLOPs: the rate the model's matmuls can run at;
2. the tokens/s that rate allows: rate / FLOPs per token, counted as in bench/common.py (6 N_linear
   for full fine-tuning, 4 N_linear for LoRA, 2 N_linear for a forward pass, plus attention);
3. what the engine reaches: optimizer steps through `setup` and `train_step` (the preset's engine,
   length grouping included) and a forward pass over the first dev examples (`evaluate`), in padded
   tokens/s (padding is work the CPU does), and the achieved fraction of the bound. The timed
   steps are spread evenly over a run of the preset's `train.max_steps` (grouped batches range
   from the shortest examples to the longest), so their mix of lengths is a whole run's.

Every row records the 1-minute load average before and after it and the process's CPU seconds
beside the wall seconds: on a shared machine the fraction is a lower bound, and with one thread
the CPU seconds are what the work costs a core of its own (less the slow-down shared caches
still cause). Prints a table and writes bench/results/cpu_bound_<task>.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import base_parser, flops_per_step, linear_params, print_table, write_rows

from loradrift.config import resolve_config
from loradrift.context import setup
from loradrift.engine import batch_order, make_optimizer, train_step
from loradrift.evaluate import evaluate

COLUMNS = [("threads", "threads", "d"), ("what", "what", ""), ("method", "method", ""), ("batch_size", "batch", ""),
           ("padded_len", "pad len", ".1f"), ("gflops", "GFLOP/s", ".1f"), ("bound_tokens_per_s", "bound tok/s", ",.0f"),
           ("padded_tokens_per_s", "pad tok/s", ",.1f"), ("tokens_per_s", "tok/s", ",.1f"), ("fraction", "fraction", ".2f"),
           ("step_time_s", "step s", ".3f"), ("cpu_per_wall", "cpu/wall", ".2f"), ("load", "load 1m", "")]


def matmul_gflops(m: int, k: int, n: int, min_time: float = 1.0) -> float:
    """fp32 rate of x (m × k) @ W^T (W: n × k), as an nn.Linear computes it, after one warm-up call."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    torch.nn.functional.linear(x, w)
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_time:
        torch.nn.functional.linear(x, w)
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def projection_shapes(mc) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's projections: q, k, v, o, gate, up, down."""
    h, i = mc.hidden_size, mc.intermediate_size
    kv = mc.num_key_value_heads * (h // mc.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


_RATES: dict[tuple[int, int], float] = {}


def model_gflops(mc, m: int) -> float:
    """The projections' rate at M = m tokens, weighted by FLOPs (time-weighted harmonic mean);
    measured once per thread count and M, so both methods' rows share it."""
    key = (torch.get_num_threads(), m)
    if key not in _RATES:
        shapes = projection_shapes(mc)
        flops = [2 * m * k * n for k, n in shapes]
        seconds = [f / (matmul_gflops(m, k, n, min_time=0.5) * 1e9) for f, (k, n) in zip(flops, shapes)]
        _RATES[key] = sum(flops) / sum(seconds) / 1e9
    return _RATES[key]


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def bench_threads(threads: int, args) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    before = load()
    c0, t0 = time.process_time(), time.perf_counter()
    rows.append({"threads": threads, "what": "matmul 2048^3", "gflops": matmul_gflops(2048, 2048, 2048)})
    rows[-1].update(cpu_per_wall=(time.process_time() - c0) / (time.perf_counter() - t0), load=f"{before}→{load()}")
    print_table(rows[-1:], COLUMNS)
    for method in args.methods.split(","):
        over = [f"method.name={method}", f"data.max_dev_examples={args.dev_examples}", *args.overrides]
        cfg = resolve_config(preset=args.preset, task=args.task, overrides=over)
        ctx = setup(cfg)
        mc, n_lin = ctx.model.backbone.config, linear_params(ctx.model.body)
        layers, hidden = mc.num_hidden_layers, mc.hidden_size
        run_steps = cfg.train.max_steps or args.steps
        for batch in [int(b) for b in (args.batch_sizes or str(cfg.train.batch_size)).split(",")]:
            before = load()
            order = batch_order(ctx, batch, cfg.seed)
            opt, sched = make_optimizer(ctx, cfg.train.lr_for(method), run_steps)
            ctx.model.train()
            for s in range(args.warmup):
                train_step(ctx, order, s, opt, sched)
            steps = sorted({round((i + 0.5) * run_steps / args.steps) for i in range(args.steps)})
            tokens = padded = 0
            c0, t0 = time.process_time(), time.perf_counter()
            for s in steps:
                st = train_step(ctx, order, s, opt, sched)
                tokens, padded = tokens + st.tokens, padded + st.padded_tokens
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            length = padded / (len(steps) * batch)
            rate = model_gflops(mc, round(padded / len(steps)))
            per_token = flops_per_step(n_lin, layers, hidden, round(length), 1, method)
            bound = rate * 1e9 / per_token
            rows.append({"threads": threads, "what": "train step", "method": method, "batch_size": batch, "padded_len": length,
                         "gflops": rate, "bound_tokens_per_s": bound, "padded_tokens_per_s": padded / dt, "tokens_per_s": tokens / dt,
                         "fraction": padded / dt / bound, "step_time_s": dt / len(steps), "achieved_gflops": per_token * padded / dt / 1e9,
                         "cpu_s": cpu, "wall_s": dt, "cpu_per_wall": cpu / dt, "padded_tokens": padded, "load": f"{before}→{load()}"})
            print_table(rows[-1:], COLUMNS)
        before = load()
        feats = ctx.feats["dev"]
        c0, t0 = time.process_time(), time.perf_counter()
        evaluate(ctx, "dev")
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        n_tok = sum(len(f["input_ids"]) for f in feats)  # evaluation batches are length-sorted: little padding
        m = round(n_tok / len(feats) * cfg.train.eval_batch_size)
        rate = model_gflops(mc, m)
        per_token = 2 * n_lin + 4 * layers * hidden * round(n_tok / len(feats))
        bound = rate * 1e9 / per_token
        rows.append({"threads": threads, "what": f"forward, dev ×{len(feats)}", "method": method, "batch_size": cfg.train.eval_batch_size,
                     "padded_len": n_tok / len(feats), "gflops": rate, "bound_tokens_per_s": bound, "tokens_per_s": n_tok / dt,
                     "padded_tokens_per_s": n_tok / dt, "fraction": n_tok / dt / bound, "cpu_s": cpu, "wall_s": dt,
                     "cpu_per_wall": cpu / dt, "padded_tokens": n_tok, "load": f"{before}→{load()}"})
        print_table(rows[-1:], COLUMNS)
        del ctx, opt, sched
    return rows


def main() -> None:
    ap = base_parser(__doc__)
    ap.set_defaults(batch_sizes=None, steps=8, warmup=1)
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--dev-examples", type=int, default=256, help="dev examples of the timed forward pass")
    args = ap.parse_intermixed_args()
    out = args.out or Path(__file__).parent / "results" / f"cpu_bound_{args.task}.json"
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        rows += bench_threads(threads, args)
        write_rows(out, rows, "python " + " ".join(sys.argv))
    print()
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
