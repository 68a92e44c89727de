"""Tables and figures of the serving benchmarks, written atomically with loradrift.io's writers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path, atomic_write_json, json_safe, write_csv

RESULT_COLUMNS = [
    "backend", "config", "adapters", "batch_size", "round", "start", "n_requests", "max_tokens",
    "latency_mean_s", "latency_p50_s", "latency_p95_s", "throughput_rps", "throughput_tok_s",
    "ttft_mean_s", "ttft_method", "peak_rss_mb", "peak_child_rss_mb", "peak_gpu_mb", "device",
]
OVERHEAD_COLUMNS = [
    "backend", "config", "reference", "batch_size", "overhead_pct", "ci_low", "ci_high",
    "n_rounds", "engine_starts", "ci_method",
]
CORRECTNESS_COLUMNS = [
    "check", "backend", "config", "task", "reference", "passed", "match_rate", "min_match_rate", "rows_differing",
    "max_abs_logprob_diff", "logprob_tolerance", "dtype", "n_prompts", "n_tokens",
]
ONLINE_COLUMNS = [
    "config", "adapters", "engines", "request_rate", "offered_rate", "n_requests", "completed", "duration_s",
    "request_throughput",
    "output_throughput", "goodput",
    *[f"{m}_{s}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "p50", "p95", "p99")],
    "server_peak_rss_mb",
]


def write_serve_results(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.csv/json, overhead.csv/json, correctness.csv/json, meta.json (with the findings),
    figures/latency.png."""
    out_dir = Path(out_dir)
    paths = {
        "results_csv": out_dir / "results.csv", "results_json": out_dir / "results.json",
        "overhead_csv": out_dir / "overhead.csv", "overhead_json": out_dir / "overhead.json",
        "correctness_csv": out_dir / "correctness.csv", "correctness_json": out_dir / "correctness.json",
        "meta_json": out_dir / "meta.json", "figure": out_dir / "figures" / "latency.png",
    }
    write_csv(paths["results_csv"], RESULT_COLUMNS, results["results"])
    atomic_write_json(paths["results_json"], json_safe(results["results"]))
    write_csv(paths["overhead_csv"], OVERHEAD_COLUMNS, results["overhead"])
    atomic_write_json(paths["overhead_json"], json_safe(results["overhead"]))
    write_csv(paths["correctness_csv"], CORRECTNESS_COLUMNS, results.get("correctness", []))
    atomic_write_json(paths["correctness_json"], json_safe(results.get("correctness", [])))
    atomic_write_json(paths["meta_json"], json_safe(results.get("meta", {})))
    plot_latency(results["results"], paths["figure"])
    return paths


def write_online_results(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """online/summary.csv/json (one row per configuration and request rate), online/requests.json
    (every request's timings), online/meta.json, online/k_tasks.json (k merged engines vs one
    engine + k adapters, when computed), figures/online_latency.png."""
    out_dir = Path(out_dir)
    paths = {"summary_csv": out_dir / "summary.csv", "summary_json": out_dir / "summary.json",
             "requests_json": out_dir / "requests.json", "meta_json": out_dir / "meta.json",
             "figure": out_dir.parent / "figures" / "online_latency.png"}
    write_csv(paths["summary_csv"], ONLINE_COLUMNS, results["summary"])
    atomic_write_json(paths["summary_json"], json_safe(results["summary"]))
    atomic_write_json(paths["requests_json"], json_safe(results["requests"]))
    atomic_write_json(paths["meta_json"], json_safe(results["meta"]))
    if results.get("k_tasks") is not None:
        paths["k_tasks_json"] = out_dir / "k_tasks.json"
        atomic_write_json(paths["k_tasks_json"], json_safe(results["k_tasks"]))
    plot_online(results["summary"], paths["figure"])
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _plt().close(fig)
    return Path(path)


def plot_latency(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Mean request latency vs batch size, one line per configuration (mean over rounds, with the
    min-max over rounds as a band), one panel per backend."""
    plt = _plt()
    backends = sorted({r["backend"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(backends)), figsize=(6 * max(1, len(backends)), 4.2), squeeze=False)
    for ax, bname in zip(axes[0], backends):
        sub = [r for r in rows if r["backend"] == bname]
        for cname in dict.fromkeys(r["config"] for r in sub):
            pts: dict[int, list[float]] = {}
            for r in sub:
                if r["config"] == cname:
                    pts.setdefault(r["batch_size"], []).append(r["latency_mean_s"])
            bs = sorted(pts)
            style = "-" if cname.startswith("adapters") else (":" if cname == "base" else "--")
            ax.plot(bs, [float(np.mean(pts[b])) for b in bs], style, marker="o", label=cname)
            ax.fill_between(bs, [min(pts[b]) for b in bs], [max(pts[b]) for b in bs], alpha=0.15)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["batch_size"] for r in sub})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("request latency (s)")
        ax.set_title(f"{bname}: latency vs batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_online(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """p99 TTFT and p99 TPOT vs achieved request throughput, one line per configuration (a rate
    whose sample is too small for a p99 has none, and no point)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, metric, label in zip(axes[0], ("ttft_p99_ms", "tpot_p99_ms"), ("p99 TTFT (ms)", "p99 TPOT (ms)")):
        for cname in dict.fromkeys(r["config"] for r in summary):
            pts = sorted((r["request_throughput"], r[metric]) for r in summary
                         if r["config"] == cname and r.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), "-" if cname.startswith("adapters") else "--", marker="o", label=cname)
        ax.set_xlabel("achieved request throughput (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("online: latency under load (Poisson arrivals)")
    fig.tight_layout()
    return _save(fig, path)
