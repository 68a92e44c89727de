"""The learning gate: did a method learn a task at all? Every conclusion about a task passes it
first (H1 and H2 in `loradrift.hypotheses`, the forgetting correlations, the rank ablation), so a
comparison of two models that learned nothing decides nothing (docs/study.md, "Hypothesis tests",
"Learning gate").
Each task's bar comes from its kind's `bar` handler (`loradrift.tasks`).
"""

from __future__ import annotations

from pathlib import Path

from loradrift import layout, stats
from loradrift.config import RunConfig
from loradrift.io import ResultsStore, reconcile_store
from loradrift.layout import model_key
from loradrift.methods import FULL, LORA, METHOD_NAMES, METHODS
from loradrift.tasks import TASKS

LEARNING_RULE = ("a method learned a task when its mean dev score on H1's metric beats the task's baseline bar by more "
                 "than the spread between its seeds (max - min); the bar is the largest of chance, the dev-majority "
                 "rate and Phase 0's majority and random rows (classification), or the always-no-answer F1 (SQuAD v2)")


def h1_metric(task: str) -> str:
    """H1's metric: accuracy for the GLUE tasks (MRPC's F1 is reported beside it), F1 for SQuAD v2."""
    return TASKS[task].h1_metric


def performance_by_seed(cfg: RunConfig, metric=h1_metric) -> dict[str, dict[str, dict[int, float]]]:
    """{method: {task: {seed: dev score}}} for the Phase 2 seeds of this model; `metric(task)` names
    the dev metric (None leaves the task out)."""
    out: dict[str, dict[str, dict[int, float]]] = {m: {} for m in METHOD_NAMES}
    reconcile_store(Path(cfg.out_dir))
    rows = ResultsStore(layout.results_db(cfg.out_dir)).rows("run", model=model_key(cfg.model))
    for r in rows:
        name = metric(r["task"])
        if r["seed"] not in cfg.study.seeds or r["task"] not in cfg.study.tasks or name is None:
            continue
        out[r["method"]].setdefault(r["task"], {})[r["seed"]] = float(r["metrics"]["dev"][name])
    return out


def baseline_bars(cfg: RunConfig) -> dict[str, dict]:
    """{task: {"bar", "from", "reason"}}: the score a method must beat to have learned the task, on
    H1's metric, from the latest Phase 0 baseline rows, with the values it is the largest of.

    Classification (accuracy): chance (1 / labels), the dev-majority rate (what a constant model
    scores; the train-majority class of the majority row can be the dev minority), and the
    majority and random rows. A store from before Phase 0 recorded the dev-majority rate still
    gives it for two labels (the train-majority class's rate or its complement); with more labels
    the bar is None, with the reason. SQuAD v2 (F1): the always-no-answer row."""
    rows = ResultsStore(layout.results_db(cfg.out_dir)).rows("baseline", model=model_key(cfg.model))
    latest: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["task"], r["method"])
        if r["task"] in TASKS and (key not in latest or r["created"] > latest[key]["created"]):
            latest[key] = r
    out: dict[str, dict] = {}
    for task in sorted({t for t, _ in latest}):
        spec = TASKS[task]
        parts, reason = spec.handler("bar")(spec, latest)
        out[task] = {"bar": max(parts.values()) if reason is None else None, "from": parts, "reason": reason}
    return out


def no_answer_bar(spec, latest: dict[tuple[str, str], dict]) -> tuple[dict[str, float], str | None]:
    """The extractive-QA kind's `bar`: the always-no-answer row's F1."""
    row = latest.get((spec.name, "no_answer"))
    parts = {"no_answer": float(row["metrics"]["f1"])} if row else {}
    return parts, None if row else "no always-no-answer row in the Phase 0 store"


def classification_bar(spec, latest: dict[tuple[str, str], dict]) -> tuple[dict[str, float], str | None]:
    """The classification kind's `bar`: chance, the dev-majority rate, the majority and random rows."""
    task = spec.name
    parts = {"chance": 1.0 / spec.num_labels}
    parts.update({name: float(latest[(task, name)]["metrics"]["accuracy"])
                  for name in ("majority", "random") if (task, name) in latest})
    maj = latest.get((task, "majority"))
    reason = None
    if maj and "dev_majority_accuracy" in maj["metrics"]:
        parts["dev_majority"] = float(maj["metrics"]["dev_majority_accuracy"])
    elif maj and spec.num_labels == 2:
        parts["dev_majority"] = max(parts["majority"], 1.0 - parts["majority"])
    else:
        reason = (f"the Phase 0 store has no dev-majority rate for {task} ({spec.num_labels} labels); "
                  "rerun `loradrift baselines`")
    return parts, reason


def not_learned(perf: dict, bars: dict[str, dict], tasks) -> dict[str, str]:
    """{task: why} for each of `tasks` that full FT or LoRA did not learn (`stats.did_not_learn`),
    or whose learning cannot be checked (no runs of both methods, no baseline bar)."""
    out = {}
    for task in tasks:
        bar = (bars.get(task) or {}).get("bar")
        if task not in perf[FULL] or task not in perf[LORA]:
            out[task] = "no finished Phase 2 runs of both methods"
        elif bar is None:
            out[task] = f"no baseline bar: {(bars.get(task) or {}).get('reason') or 'no Phase 0 baseline rows'}"
        else:
            why = [w for w in (stats.did_not_learn(METHODS[FULL].short, list(perf[FULL][task].values()), bar),
                               stats.did_not_learn(METHODS[LORA].short, list(perf[LORA][task].values()), bar)) if w]
            if why:
                out[task] = "; ".join(why)
    return out


def learning_gate(cfg: RunConfig, tasks=None) -> dict[str, str]:
    """`not_learned` from the store: the gate every conclusion about a task passes first (H2, the
    forgetting correlations, the rank ablation)."""
    return not_learned(performance_by_seed(cfg), baseline_bars(cfg), tasks or cfg.study.tasks)
