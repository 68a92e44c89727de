"""Benchmark Phase 3's weight-space analysis (loradrift.weights) with 1 BLAS thread vs the default.

Setting: the study's analysis of every run's update (``analyse_weights``) is a loop of small
decompositions (Gram eigenproblems of at most ``min(out, in)`` on a side, one base SVD per
matrix). The analysis limits BLAS/LAPACK to one thread for matrices up to 1,024 on a side; this
script times the same analysis of an existing study folder both ways, alternating, and checks
that the tables agree.

    python bench/bench_weights.py --out runs/smollm2 --tasks sst2 --repeats 2

Prints a table and writes JSON (``--json``, default bench/results/weights_<host>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from loradrift import weights as W
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from loradrift import weights as W
from loradrift.models import cache_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a study output folder with finished runs")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--base-dir", default=None, help="base model folder (default: the model cache)")
    p.add_argument("--tasks", default="sst2", help="comma-separated")
    p.add_argument("--modules", default="q_proj,v_proj")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    base_dir = Path(a.base_dir or cache_dir() / "models" / a.model)
    runs = W._discover_runs(Path(a.out), a.model, a.tasks.split(","), [W.FULL, W.LORA])
    if not runs:
        raise SystemExit(f"--out {a.out}: no runs of {a.model} for tasks {a.tasks}")
    base = W._SafetensorsFolder(base_dir)
    wanted = set(a.modules.split(","))
    keys = W._sorted_keys({k for *_, r in runs for k in r.updates if W._BLOCK_KEY.search(k).group(2) in wanted})
    times: dict[str, list[float]] = {"1 thread": [], "default threads": []}
    rows: dict[str, list[dict]] = {}
    for _ in range(a.repeats):
        for label, n in (("1 thread", 1), ("default threads", None)):
            t0 = time.perf_counter()
            with W._blas_threads(n):
                rows[label] = W._analyse_keys(keys, base, runs)
            times[label].append(time.perf_counter() - t0)
    diff = max(abs(x["rel_norm"] - y["rel_norm"]) / max(abs(x["rel_norm"]), 1e-30)
               for x, y in zip(rows["1 thread"], rows["default threads"]))
    same_counts = all(x["intruders"] == y["intruders"] and x["effective_rank"] == y["effective_rank"]
                      for x, y in zip(rows["1 thread"], rows["default threads"]))
    print(f"{len(runs)} runs x {len(keys)} matrices ({a.tasks}; {a.modules}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'setting':<16} {'median s':>9} {'runs (s)':>24}")
    for label, ts in times.items():
        print(f"{label:<16} {statistics.median(ts):>9.2f} {', '.join(f'{t:.1f}' for t in ts):>24}")
    print(f"max relative rel_norm difference {diff:.1e}; intruder counts and effective ranks equal: {same_counts}")
    out = Path(a.json or Path(__file__).parent / "results" / f"weights_{platform.node() or 'host'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                               "load_average_1min": os.getloadavg()[0], "runs": len(runs),
                               "matrices": len(keys), "tasks": a.tasks, "modules": a.modules,
                               "seconds": times, "max_rel_diff": float(np.float64(diff)),
                               "same_counts": same_counts, "command": " ".join(sys.argv)}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
