"""Benchmark the multi-layer linear CKA path (loradrift.similarity).

Setting: the drift analysis compares one base model against fine-tuned models
on the same probe set, layer by layer. The base side is precomputed once
(:class:`BaseSide`); what is timed is one comparison of the other model's
layers against it (``cka_against_base``), for each method (feature form
d x d, Gram form n x n) and compute dtype (float64 exact, float32 fast).
The base-side precomputation is timed separately.

    python bench/bench_cka.py                      # n=4096 d=2048 23 layers
    python bench/bench_cka.py --n 512 --d 256 --layers 4 --repeats 3 --baseline

Also reports the max |CKA(float32) - CKA(float64)| on this data, and runs on
CUDA too when torch.cuda.is_available().
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
import torch

try:
    from loradrift.similarity import BaseSide, cka_against_base, linear_cka
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from loradrift.similarity import BaseSide, cka_against_base, linear_cka


def make_data(n: int, d: int, layers: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """float32 activations with per-layer offsets and increasing drift with depth."""
    rng = np.random.default_rng(seed)
    base, other = [], []
    for i in range(layers):
        x = rng.standard_normal((n, d), dtype=np.float32)
        x += rng.standard_normal(d, dtype=np.float32) * 3  # non-zero feature means
        noise = rng.standard_normal((n, d), dtype=np.float32)
        base.append(x)
        other.append(x + noise * np.float32(0.1 + i / max(1, layers)))
    return base, other


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--layers", type=int, default=23)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--methods", default="feature,gram")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--baseline", action="store_true",
                   help="also time a loop of one-shot numpy linear_cka per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/cka.json")
    a = p.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    base, other = make_data(a.n, a.d, a.layers, a.seed)
    rows = []
    ref64: dict[tuple[str, str], np.ndarray] = {}

    for device in devices:
        for method in a.methods.split(","):
            for dt in a.dtypes.split(","):
                sync(device)
                t0 = time.perf_counter()
                bs = BaseSide(base, method=method, dtype=dt, device=device)
                sync(device)
                t_base = time.perf_counter() - t0
                times, vals = [], None
                for _ in range(a.repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    vals = cka_against_base(bs, other)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                del bs
                if dt == "float64":
                    ref64[(device, method)] = vals
                ref = ref64.get((device, method)) if (device, method) in ref64 else next(iter(ref64.values()), None)
                err = float(np.max(np.abs(vals - ref))) if ref is not None else None
                t = min(times)
                rows.append(dict(
                    method=f"{method}/{dt}", device=device, layers=a.layers, n=a.n, d=a.d,
                    seconds_total=t, ms_per_layer=1e3 * t / a.layers,
                    seconds_median=statistics.median(times), base_precompute_s=t_base,
                    max_abs_err_vs_float64=err, cka_min=float(vals.min()), cka_max=float(vals.max()),
                ))
                print(f"  done {method}/{dt} on {device}: {t:.2f}s", file=sys.stderr, flush=True)
    # feature vs gram in float64 must agree: both are exact
    for device in devices:
        if (device, "feature") in ref64 and (device, "gram") in ref64:
            diff = float(np.max(np.abs(ref64[(device, "feature")] - ref64[(device, "gram")])))
            print(f"  {device}: max |feature - gram| (float64) = {diff:.2e}", file=sys.stderr)

    if a.baseline:
        t0 = time.perf_counter()
        vals = np.array([linear_cka(x, y) for x, y in zip(base, other)])
        t = time.perf_counter() - t0
        ref = next(iter(ref64.values()), None)
        rows.append(dict(
            method="linear_cka loop (numpy, no precompute)", device="cpu", layers=a.layers, n=a.n, d=a.d,
            seconds_total=t, ms_per_layer=1e3 * t / a.layers, seconds_median=t, base_precompute_s=0.0,
            max_abs_err_vs_float64=float(np.max(np.abs(vals - ref))) if ref is not None else None,
            cka_min=float(vals.min()), cka_max=float(vals.max()),
        ))

    hdr = f"{'method':<40} {'device':<6} {'layers':>6} {'n':>6} {'d':>6} {'seconds':>9} {'ms/layer':>9} {'base s':>8} {'err vs f64':>11}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        err = "-" if r["max_abs_err_vs_float64"] is None else f"{r['max_abs_err_vs_float64']:.1e}"
        print(f"{r['method']:<40} {r['device']:<6} {r['layers']:>6} {r['n']:>6} {r['d']:>6} "
              f"{r['seconds_total']:>9.2f} {r['ms_per_layer']:>9.1f} {r['base_precompute_s']:>8.2f} {err:>11}")

    meta = dict(
        torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
        cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), machine=platform.machine(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        repeats=a.repeats, seed=a.seed,
        # timings on a shared box are only comparable at similar load
        loadavg_at_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
        note="seconds_total = best of repeats for one cka_against_base call over all layers; "
             "base side precomputed beforehand (base_precompute_s).",
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
