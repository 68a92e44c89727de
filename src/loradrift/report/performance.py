"""The performance section: the dev score of the final runs (Phase 2) per task and method, mean
over seeds with its t-interval (loradrift.stats.t_interval), against the baselines, and what the
training cost.

    results.sqlite (kind=run, reconciled with runs/*/*/*/seed*/result.json; kind=baseline)
"""

from __future__ import annotations

import io
from typing import Any

from loradrift.layout import PATHS
from loradrift.methods import METHODS
from loradrift.report.artefacts import Artefacts, latest, method_order, primary_metric, task_order
from loradrift.report.render import Section, fmt, num, pick_columns
from loradrift.stats import t_interval


def performance_table(art: Artefacts) -> tuple[list[dict], list[dict], list[str]]:
    """(rows per task × method with mean, CI and per-seed values; baseline rows; notes)."""
    runs = art.rows("run") or []
    notes = []
    runs, dropped = latest(runs, lambda r: (r["model"], r["task"], r["method"], r["seed"]))
    if dropped:
        notes.append(f"{dropped} older run row(s) of the same model, task, method and seed (another config "
                     f"hash) were left out; the newest row of each is used.")
    groups: dict[tuple, dict[int, float]] = {}
    for r in runs:
        metric = primary_metric(r["task"])
        dev = (r["metrics"] or {}).get("dev") or {}
        v = num(dev.get(metric)) if metric else None
        if v is None:
            notes.append(f"run {r['task']}/{r['method']}/seed{r['seed']}: no dev {metric!r} value")
            continue
        groups.setdefault((r["model"], r["task"], r["method"]), {})[r["seed"]] = v
    multi = len({k[0] for k in groups}) > 1
    rows = []
    for (model, task, method), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0], task_order(kv[0][1]), method_order(kv[0][2]))):
        vals = [by_seed[s] for s in sorted(by_seed)]
        m, lo, hi, _, _ = t_interval(vals, 0.95)
        rows.append({**({"model": model} if multi else {}), "task": task, "metric": primary_metric(task), "method": method,
                     "n": len(vals), "mean": m, "ci": [lo, hi] if len(vals) > 1 else None,
                     "half": (hi - lo) / 2 if len(vals) > 1 else None, "per_seed": {str(s): by_seed[s] for s in sorted(by_seed)}})
    base = []
    brows, _ = latest(art.rows("baseline") or [], lambda r: (r["model"], r["task"], r["method"]))
    for r in sorted(brows, key=lambda r: (task_order(r["task"]), r["method"])):
        metric = primary_metric(r["task"])
        v = num((r["metrics"] or {}).get(metric)) if metric else None
        if v is not None:
            base.append({**({"model": r["model"]} if multi else {}), "task": r["task"], "metric": metric,
                         "method": f"baseline: {r['method']}", "n": None, "mean": v, "ci": None, "half": None, "per_seed": None})
    return rows, base, notes


def mean_ci(r: dict) -> str:
    return fmt(r["mean"]) + ("" if r["half"] is None else f" ± {fmt(r['half'])}")


def _bar_chart(rows: list[dict], base: list[dict]) -> bytes:
    import numpy as np
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in rows}, key=task_order)
    n = len(tasks)
    fig = Figure(figsize=(min(3.4 * n, 13), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        x = np.arange(len(rs))
        err = [r["half"] if r["half"] is not None else 0.0 for r in rs]
        colors = [METHODS[r["method"]].color if r["method"] in METHODS else "#8c8c8c" for r in rs]
        ax.bar(x, [r["mean"] for r in rs], yerr=err, capsize=4, color=colors)
        for i, r in enumerate(rs):
            seeds = list(r["per_seed"].values())
            ax.scatter([i] * len(seeds), seeds, s=12, color="black", zorder=3)
        for j, b in enumerate(r for r in base if r["task"] == task):
            ax.axhline(b["mean"], ls="--", lw=1, color=f"C{j + 2}", label=b["method"].split(": ", 1)[-1])
        ax.set_xticks(x, [r["method"] for r in rs])
        ax.set_title(f"{task} (dev {primary_metric(task)})", fontsize=9)
        if any(b["task"] == task for b in base):
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Dev score: mean over seeds, 95% t-interval, seeds as dots, baselines dashed", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def sec_performance(art: Artefacts) -> Section:
    sec = Section("performance", "Performance")
    if not art.store_path.is_file():
        sec.not_run("Final runs", PATHS["results"])
        return sec
    rows, base, notes = performance_table(art)
    if not rows:
        sec.not_run("Final runs (Phase 2)", PATHS["results"], 'has no kind="run" rows')
    else:
        sec.p("Primary dev metric per task (mrpc: mean of accuracy and F1, sst2/rte: accuracy, squad_v2: F1). "
              "Mean over seeds with a two-sided 95% t-interval (scipy.stats.t, n − 1 degrees of freedom; "
              "n is the number of seeds); baselines are single dev scores, for reference.")
        table = []
        for r in [*rows, *base]:
            table.append({**r, "_ci": ("—" if r["ci"] is None else f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]"),
                          "_pm": mean_ci(r)})
        table.sort(key=lambda r: (r.get("model", ""), task_order(r["task"]), r["method"].startswith("baseline"), method_order(r["method"])))
        cols = (["model"] if "model" in rows[0] else []) + ["task", "metric", "method", "n", "_pm", "_ci", "per_seed"]
        sec.table(table, cols, labels={"_pm": "mean ± 95% CI half-width", "_ci": "95% CI", "per_seed": "per seed"})
        if any(r["n"] < 2 for r in rows):
            sec.note("A group with a single seed has no confidence interval.")
        sec.figure(_bar_chart(rows, base), "Dev score by task and method")
        eff = []
        runs, _ = latest(art.rows("run") or [], lambda r: (r["model"], r["task"], r["method"], r["seed"]))
        groups: dict[tuple, list[dict]] = {}
        for r in runs:
            groups.setdefault((r["task"], r["method"]), []).append(r["metrics"] or {})
        for (task, method), ms in sorted(groups.items(), key=lambda kv: (task_order(kv[0][0]), method_order(kv[0][1]))):
            row: dict[str, Any] = {"task": task, "method": method, "n": len(ms)}
            for k in ("steps", "trainable_params", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb"):
                vals = [num(m.get(k)) for m in ms if num(m.get(k)) is not None]
                if vals:
                    mean = sum(vals) / len(vals)
                    row[k] = int(round(mean)) if k in ("steps", "trainable_params") else mean
            eff.append(row)
        sec.table(eff, pick_columns(eff, ["task", "method", "n", "steps", "trainable_params", "train_time_s",
                                          "wall_time_s", "tokens_per_s", "peak_memory_mb"]),
                  caption="Training cost (means over seeds)")
    sec.bullets(notes)
    return sec
