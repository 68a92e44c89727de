"""Training speed when several torch processes share one machine, per torch thread count
(`runtime.threads`, issue 28 item 9).

    python bench/bench_threads.py [--scenarios 1x2,1x1,2x2,2x1] [--preset smollm2] [--task sst2] \
        [--method lora] [--steps 6] [--out F.json] [key=value ...]

A scenario PxT starts P worker processes at once, each with T torch threads. Every worker loads
the model and takes one warm-up step, then waits until all P are ready, so the timed steps of the
workers overlap exactly (loading is not part of the comparison). Each worker reports its tokens/s
over `--steps` optimizer steps through loradrift's own `train_step`; the table gives each worker's
rate, the slowest, and the sum over the workers (the machine's throughput). P×T above the cores
is oversubscription: what two Ray tasks, search workers, or a study beside another torch process
did before each process took only the cores it owns. Prints a table and writes
bench/results/threads_<task>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import base_parser, print_table, write_rows

COLUMNS = [("scenario", "scenario", ""), ("processes", "procs", "d"), ("threads", "threads", "d"),
           ("tokens_per_s", "tok/s each", ""), ("slowest", "slowest", ",.1f"), ("total", "total tok/s", ",.1f"),
           ("step_time_s", "step s", ".2f"), ("load", "load 1m", "")]


def worker(args) -> None:
    """One process: set its threads, load, warm up, signal ready, wait for go, time the steps."""
    from loradrift.config import resolve_config
    from loradrift.context import setup
    from loradrift.engine import batch_order, make_optimizer, train_step
    from loradrift.runtime import set_threads

    cfg = resolve_config(preset=args.preset, task=args.task,
                         overrides=[f"method.name={args.method}", f"runtime.threads={args.worker_threads}", *args.overrides])
    threads = set_threads(cfg.runtime.threads)
    ctx = setup(cfg)
    order = batch_order(ctx, cfg.train.batch_size, cfg.seed)
    opt, sched = make_optimizer(ctx, cfg.train.lr_for(args.method), args.steps + 1)
    ctx.model.train()
    train_step(ctx, order, 0, opt, sched)
    ready, go = Path(args.sync) / f"ready.{os.getpid()}", Path(args.sync) / "go"
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
    tokens, t0 = 0, time.perf_counter()
    for s in range(1, args.steps + 1):
        tokens += train_step(ctx, order, s, opt, sched).tokens
    dt = time.perf_counter() - t0
    print(json.dumps({"threads": threads, "tokens": tokens, "seconds": dt}))


def scenario(procs: int, threads: int, args, sync: Path) -> dict:
    for f in sync.glob("*"):
        f.unlink()
    cmd = [sys.executable, __file__, "--worker-threads", str(threads), "--sync", str(sync), "--preset", args.preset,
           "--task", args.task, "--method", args.method, "--steps", str(args.steps), *args.overrides]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    while len(list(sync.glob("ready.*"))) < procs:
        if any(w.poll() is not None for w in workers):
            raise SystemExit("a worker exited before it was ready")
        time.sleep(0.1)
    before = os.getloadavg()[0]
    (sync / "go").touch()
    results = []
    for w in workers:
        out, _ = w.communicate()
        if w.returncode:
            raise SystemExit(f"a worker failed (exit {w.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    rates = [r["tokens"] / r["seconds"] for r in results]
    return {"scenario": f"{procs}x{threads}", "processes": procs, "threads": threads,
            "tokens_per_s": "/".join(f"{r:.1f}" for r in rates), "rates": rates, "slowest": min(rates), "total": sum(rates),
            "step_time_s": max(r["seconds"] for r in results) / args.steps, "load": f"{before:.2f}→{os.getloadavg()[0]:.2f}"}


def main() -> None:
    ap = base_parser(__doc__)
    ap.set_defaults(steps=6)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--scenarios", default="1x2,1x1,2x2,2x1", help="comma list of PxT: P processes with T threads each")
    ap.add_argument("--worker-threads", type=int, default=None, help=argparse_hidden())
    ap.add_argument("--sync", default=None, help=argparse_hidden())
    args = ap.parse_intermixed_args()
    if args.worker_threads is not None:
        worker(args)
        return
    import tempfile

    out = args.out or Path(__file__).parent / "results" / f"threads_{args.task}.json"
    rows = []
    with tempfile.TemporaryDirectory() as sync:
        for sc in args.scenarios.split(","):
            procs, threads = (int(x) for x in sc.split("x"))
            rows.append(scenario(procs, threads, args, Path(sync)))
            print_table(rows[-1:], COLUMNS)
            write_rows(out, rows, "python " + " ".join(sys.argv))
    print()
    print_table(rows, COLUMNS)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
