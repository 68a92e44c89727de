"""LoRA rank ablation: how do drift, intruder dimensions and forgetting grow with the rank?

    loradrift ablate-rank --task sst2 --ranks 4,8,16,64,256 [--rslora] [--seeds 42,1337,2024]
    loradrift study ... ablation.rank.enabled=true        (Phase 3, after forgetting)

Per task, LoRA is trained at every rank in ``ablation.rank.ranks`` for every seed (default: the
study's seeds) with the task's best LoRA config from Phase 1 (``configs/best/<model>/<task>_lora.yaml``;
the config as it is when there is none, and the summary says so). Only the rank, alpha and
rsLoRA change. Alpha follows ``ablation.rank.alpha_rule``:

* ``ratio`` (default): ``alpha = alpha_best * r / r_best``, so ``alpha / r`` stays at the best
  config's value (the usual alpha = c * r convention). Standard LoRA's scale ``alpha / r`` is then
  the same at every rank; with rsLoRA the scale ``alpha / sqrt(r)`` grows like ``sqrt(r)``.
* ``fixed``: ``alpha = alpha_best`` at every rank, so the scale falls like ``1 / r`` (standard)
  or ``1 / sqrt(r)`` (rsLoRA), the comparison rsLoRA was proposed for.

Each (rank, seed) is an ordinary training run in ``<out>/ablation/rank/<variant>/r<R>/runs/...``
(``variant`` = ``lora-ratio``, ``rslora-fixed``, ...), so a killed ablation resumes like Phase 2:
a finished run (its ``result.json``) is never retrained and an unfinished one resumes from its
checkpoint. A (rank, seed) whose config is exactly a Phase 2 LoRA run's (the best config's rank)
is that run, read from ``<out>/runs``; the full fine-tuning reference is the Phase 2 full runs of
the same seeds (trained here if missing).

Per run: dev score (the task's primary metric), final drift (:func:`loradrift.drift.run_final_drift`:
per layer and H2's aggregate), intruder dimensions and relative update norm
(:func:`loradrift.weights.run_weight_summary`, the drift.* weight settings), and Δloss
(:mod:`loradrift.forgetting`). Means over seeds with Student t-intervals
(:func:`loradrift.stats.t_interval`) per rank. Outputs under ``<out>/ablation/rank/<variant>/``:
``runs.csv``, ``summary.json`` and ``figures/rank_<task>.png`` (the four quantities against rank,
full FT as a horizontal line with its interval as a band), ``figures/drift_by_layer_<task>.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loradrift import layout
from loradrift.config import RankAblationConfig, RunConfig
from loradrift.io import atomic_path, atomic_write_json, json_safe, write_csv
from loradrift.methods import FULL, LORA, METHODS

log = logging.getLogger(__name__)

RUN_COLUMNS = ["task", "label", "rank", "alpha", "scale", "seed", "dev_score", "drift", "total_intruders",
               "mean_rel_norm", "mean_effective_rank", "delta_loss", "run_dir"]
QUANTITIES = [("dev_score", "dev score"), ("drift", "final drift (H2 aggregate)"),
              ("total_intruders", "intruder dimensions (sum over modules)"), ("delta_loss", "Δloss (nats / token)")]


def variant(acfg: RankAblationConfig) -> str:
    return f"{'rslora' if acfg.rslora else 'lora'}-{acfg.alpha_rule}"


def ablation_dir(out: Path, acfg: RankAblationConfig) -> Path:
    return layout.path(out, "ablation", variant=variant(acfg))


def scaled_alpha(alpha_best: float, r_best: int, r: int, rule: str) -> int | float:
    """Alpha at rank r under `rule` (module docstring); a whole number stays an int, so the rank of
    the best config gets exactly the best config (and its science hash)."""
    a = alpha_best * r / r_best if rule == "ratio" else alpha_best
    return int(a) if float(a).is_integer() else float(a)


def lora_scale_of(alpha: float, r: int, rslora: bool) -> float:
    """PEFT's scale for these settings: the one rule in :func:`loradrift.weights.lora_scale`."""
    from loradrift.weights import lora_scale

    return lora_scale({"lora_alpha": alpha, "use_rslora": rslora}, "", r)


def _best_files(cfg_for: Callable[..., RunConfig], task: str, method: str) -> list[Path]:
    cfg = cfg_for(task, method)
    best = layout.best_config_for(cfg.out_dir, layout.model_key(cfg.model), task, method)
    return [best] if best.exists() else []


def rank_config(cfg_for: Callable[..., RunConfig], task: str, rank: int, seed: int,
                acfg: RankAblationConfig) -> tuple[RunConfig, bool]:
    """(the run's config, whether it is a Phase 2 run). `cfg_for(task, method, seed, files, extra)`
    builds configs from one command line (loradrift.cli.Configs)."""
    files = _best_files(cfg_for, task, LORA)
    ref = cfg_for(task, LORA, seed, files)
    lo = ref.method.lora
    alpha = scaled_alpha(lo.alpha, lo.r, rank, acfg.alpha_rule)
    cfg = cfg_for(task, LORA, seed, files, extra=[f"method.lora.r={rank}", f"method.lora.alpha={alpha}",
                                                     f"method.lora.use_rslora={str(acfg.rslora).lower()}"])
    if cfg.science_hash() == ref.science_hash():
        return ref, True
    return cfg.model_copy(update={"out_dir": layout.path(ref.out_dir, "ablation_rank", variant=variant(acfg), rank=rank)}), False


def train_grid(cfg_for: Callable[..., RunConfig], task: str, acfg: RankAblationConfig, seeds: Sequence[int],
               say: Callable[[str], None] = log.info, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Train (or find finished) every run of one task's ablation, full FT reference first, then
    rank by rank; returns [{label, rank, seed, cfg, result}]. ``progress(runs_done, runs)`` before
    each run."""
    from loradrift.train import train_run

    full_files = _best_files(cfg_for, task, FULL)
    todo: list[tuple[str, int | None, RunConfig]] = [(FULL, None, cfg_for(task, FULL, s, full_files)) for s in seeds]
    for rank in acfg.ranks:
        for s in seeds:
            todo.append((f"r{rank}", rank, rank_config(cfg_for, task, rank, s, acfg)[0]))
    runs = []
    for label, rank, cfg in todo:
        if progress:
            progress(len(runs), len(todo))
        finished = layout.run_path(layout.run_dir_for(cfg), "result").exists()
        result = train_run(cfg)
        if not finished:
            say(f"ablation {task} {label} seed {cfg.seed}: dev {result['primary_metric']} "
                f"{result['dev'][result['primary_metric']]:.4g} ({result['wall_time_s']:.0f}s)")
        runs.append({"label": label, "rank": rank, "seed": cfg.seed, "cfg": cfg, "result": result})
    return runs


def analyse_task(cfg_for: Callable[..., RunConfig], task: str, runs: list[dict], acfg: RankAblationConfig) -> dict:
    """Per-run quantities and per-rank means for one task (see the module docstring)."""
    from loradrift import stats
    from loradrift.drift import run_final_drift
    from loradrift.layout import model_key
    from loradrift.learning import baseline_bars, h1_metric
    from loradrift.models import is_decoder, resolve_model_dir
    from loradrift.weights import run_weight_summary

    tcfg = cfg_for(task)
    out = Path(tcfg.out_dir)
    d = tcfg.drift
    model_dir = resolve_model_dir(tcfg.model)
    bpath = layout.base_file(tcfg.out_dir, model_key(tcfg.model), task)
    dirs = {(r["label"], r["seed"]): layout.run_dir_for(r["cfg"]) for r in runs}
    _, wsum = run_weight_summary(model_dir, [(task, label, seed, rd) for (label, seed), rd in dirs.items()],
                                 modules=d.weight_modules, rank_threshold=d.rank_threshold,
                                 intruder_k=d.intruder_k, intruder_eps=d.intruder_eps)
    weights = {(w["method"], w["seed"]): w for w in wsum}
    forget = None
    notes = []
    if tcfg.forgetting.enabled and is_decoder(model_dir):
        from loradrift.forgetting import Forgetting

        forget = Forgetting(tcfg)
    else:
        notes.append("Δloss not measured (forgetting.enabled is false or the model has no LM head)")
    rows, per_layer = [], {}
    h1_scores: dict[str, list[float]] = {}
    for r in runs:
        rd = dirs[(r["label"], r["seed"])]
        res, lc = r["result"], r["cfg"].method.lora
        fd = run_final_drift(bpath, rd, metric=d.metric, task=task)
        w = weights.get((r["label"], r["seed"]), {})
        lora = r["label"] != FULL
        rows.append({
            "task": task, "label": r["label"], "rank": r["rank"], "seed": r["seed"],
            "alpha": lc.alpha if lora else None, "scale": lora_scale_of(lc.alpha, lc.r, lc.use_rslora) if lora else None,
            "dev_score": float(res["dev"][res["primary_metric"]]), "metric": res["primary_metric"],
            "drift": fd["aggregate"], "total_intruders": w.get("total_intruders"),
            "mean_rel_norm": w.get("mean_rel_norm"), "mean_effective_rank": w.get("mean_effective_rank"),
            "delta_loss": forget.run(rd)["delta_loss"] if forget else None,
            "run_dir": str(rd.relative_to(out)) if rd.is_relative_to(out) else str(rd),
        })
        per_layer.setdefault(r["label"], []).append(fd["per_layer"])
        h1_scores.setdefault(r["label"], []).append(float(res["dev"][h1_metric(task)]))
    level = tcfg.stats.confidence
    labels = [FULL] + [f"r{k}" for k in acfg.ranks]
    bar = baseline_bars(tcfg).get(task, {})
    by_label = {}
    for label in labels:
        sel = [x for x in rows if x["label"] == label]
        # the study's learning gate: a rank whose runs did not learn the task says nothing about LoRA there
        why = (f"no baseline bar ({bar.get('reason') or 'no Phase 0 baseline rows'})" if bar.get("bar") is None
               else stats.did_not_learn(METHODS[FULL].label if label == FULL else f"{METHODS[LORA].label} {label}", h1_scores[label], bar["bar"])
               if label in h1_scores else "no runs")
        by_label[label] = {"rank": sel[0]["rank"] if sel else None, "learned": why is None, "not_learned": why,
                           **{q: stats.finite_interval([x[q] for x in sel], level) for q, _ in QUANTITIES},
                           "drift_per_layer": np.nanmean(np.array(per_layer[label]), axis=0).tolist() if label in per_layer else None}
    bad = [label for label in labels if by_label[label]["not_learned"]]
    if bad:
        notes.append(f"did not learn {task} (the study's learning gate, H1's rule): {', '.join(bad)}; their drift, "
                     "intruder dimensions and Δloss describe runs that learned nothing, so no conclusion about rank "
                     "(or against full FT) is drawn from them")
    best = _best_files(cfg_for, task, LORA)
    if not best:
        notes.append("no Phase 1 best LoRA config was found: the ablation uses the LoRA config as it is")
    return {"task": task, "rows": rows, "by_label": by_label, "ci_level": level, "notes": notes,
            "best_config": str(best[0]) if best else None,
            "phase2_reused": sorted({x["label"] for x in rows if x["label"] != FULL and not x["run_dir"].startswith("ablation")})}


def _band(ax, xs, g: dict, color: str) -> None:
    if g["mean"] is None:
        return
    ax.axhline(g["mean"], color=color, ls="--", lw=1.2, label="full FT")
    if g["ci_low"] is not None:
        ax.axhspan(g["ci_low"], g["ci_high"], color=color, alpha=0.15, lw=0)


def _plot(task: str, res: dict, ranks: list[int], fig_dir: Path, title: str) -> list[Path]:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    paths = []
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, len(QUANTITIES))
    for ax, (q, name) in zip(axes, QUANTITIES):
        pts = [(k, res["by_label"][f"r{k}"][q]) for k in ranks]
        xs = [k for k, g in pts if g["mean"] is not None]
        if xs:
            ms = [g["mean"] for _, g in pts if g["mean"] is not None]
            lo = [g["mean"] - g["ci_low"] if g["ci_low"] is not None else 0 for _, g in pts if g["mean"] is not None]
            hi = [g["ci_high"] - g["mean"] if g["ci_high"] is not None else 0 for _, g in pts if g["mean"] is not None]
            ax.errorbar(xs, ms, yerr=[lo, hi], marker="o", capsize=3, color=METHODS[LORA].color, label=METHODS[LORA].label)
            for row in res["rows"]:
                if row["label"] != FULL and row[q] is not None:
                    ax.scatter(row["rank"], row[q], s=8, color="black", zorder=3)
        _band(ax, xs, res["by_label"][FULL][q], METHODS[FULL].color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.set(xlabel="LoRA rank r", title=name)
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: {title} (mean over seeds, t-interval; seeds as dots; full FT: line and band)", fontsize=9)
    paths.append(fig_dir / f"rank_{task}.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", dpi=100)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    for i, k in enumerate(ranks):
        layer = res["by_label"][f"r{k}"]["drift_per_layer"]
        if layer is not None:
            ax.plot(range(len(layer)), layer, marker="o", ms=2, color=cmap(i / max(1, len(ranks) - 1)), label=f"r={k}")
    full = res["by_label"][FULL]["drift_per_layer"]
    if full is not None:
        ax.plot(range(len(full)), full, color="black", ls="--", label="full FT")
    ax.set(xlabel="layer (0 = embeddings)", ylabel="final drift (1 - CKA), mean over seeds")
    ax.set_title(f"{task}: final drift by layer and rank ({title})", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(fig_dir / f"drift_by_layer_{task}.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return paths


def run_rank_ablation(cfg_for: Callable[..., RunConfig], tasks: Sequence[str],
                      say: Callable[[str], None] = log.info, progress: Callable[[float, int], None] | None = None) -> dict[str, Any]:
    """Train and analyse the rank ablation of `tasks` with `cfg_for()`'s ablation.rank settings;
    writes ``<out>/ablation/rank/<variant>/``. Returns the summary. ``progress(tasks_done, tasks)``,
    a fraction of one for the runs of the task in hand."""
    from loradrift.phase0 import extract_base

    base = cfg_for()
    acfg = base.ablation.rank
    seeds = list(acfg.seeds or base.study.seeds)
    adir = ablation_dir(base.out_dir, acfg)
    title = f"{'rsLoRA' if acfg.rslora else 'LoRA'}, alpha rule {acfg.alpha_rule}"
    tasks_out, rows, files = {}, [], []
    for i, task in enumerate(tasks):
        extract_base(cfg_for(task))  # the probe's base representations (kept when they exist)
        runs = train_grid(cfg_for, task, acfg, seeds, say,
                          progress=(lambda done, n, i=i: progress(i + done / n, len(tasks))) if progress else None)
        res = analyse_task(cfg_for, task, runs, acfg)
        tasks_out[task] = res
        rows.extend(res["rows"])
        files += _plot(task, res, list(acfg.ranks), adir / "figures", title)
        say(f"ablation {task}: {len(runs)} runs analysed")
    summary = {"variant": variant(acfg), "settings": {**acfg.model_dump(), "seeds": seeds, "title": title},
               "tasks": tasks_out}
    write_csv(adir / "runs.csv", RUN_COLUMNS, rows)
    atomic_write_json(layout.path(base.out_dir, "ablation_summary", variant=variant(acfg)), json_safe(summary))
    return summary
