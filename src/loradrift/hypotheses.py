"""The pre-registered decisions, computed from the study's artefacts.

    loradrift stats [--out DIR]

Reads the results store (Phase 2 runs, reconciled first with the run folders, which are the
record, and Phase 0 baselines), `drift/comparison.json` and `serve/overhead.json`, runs
`loradrift.stats` (H1, H2, H3; Bonferroni and Holm over the family of the three primary tests; the
overall verdict H1 AND (H2 OR H3)) and writes `stats/hypotheses.json`. Every result there carries
its estimate, interval (level and method), decision and the reason for it; `docs/study.md` defines
the quantities.
"""

from __future__ import annotations

import json
from pathlib import Path

from loradrift import stats
from loradrift.config import RunConfig
from loradrift.io import ResultsStore, atomic_write_json, reconcile_store
from loradrift.models import model_key
from loradrift.tasks import TASKS

# The baseline each task's runs must beat for H1 to mean anything (Phase 0 computes them).
_BASELINE = {"classification": "majority", "extractive_qa": "no_answer"}


def h1_metric(task: str) -> str:
    """H1's metric: accuracy for the GLUE tasks (MRPC's F1 is reported beside it), F1 for SQuAD v2."""
    return "f1" if TASKS[task].kind == "extractive_qa" else "accuracy"


def performance_by_seed(cfg: RunConfig, metric=h1_metric) -> dict[str, dict[str, dict[int, float]]]:
    """{method: {task: {seed: dev score}}} for the Phase 2 seeds of this model; `metric(task)` names
    the dev metric (None leaves the task out)."""
    out: dict[str, dict[str, dict[int, float]]] = {"full": {}, "lora": {}}
    reconcile_store(Path(cfg.out_dir))
    rows = ResultsStore(Path(cfg.out_dir) / "results.sqlite").rows("run", model=model_key(cfg.model))
    for r in rows:
        name = metric(r["task"])
        if r["seed"] not in cfg.study.seeds or r["task"] not in cfg.study.tasks or name is None:
            continue
        out[r["method"]].setdefault(r["task"], {})[r["seed"]] = float(r["metrics"]["dev"][name])
    return out


def baseline_scores(cfg: RunConfig) -> dict[str, float]:
    """{task: the task's baseline score on H1's metric} from the latest Phase 0 baseline rows."""
    rows = ResultsStore(Path(cfg.out_dir) / "results.sqlite").rows("baseline", model=model_key(cfg.model))
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["task"] in TASKS and r["method"] == _BASELINE[TASKS[r["task"]].kind]:
            if r["task"] not in out or r["created"] > out[r["task"]][1]:
                out[r["task"]] = (float(r["metrics"][h1_metric(r["task"])]), r["created"])
    return {t: v for t, (v, _) in out.items()}


H3_NOT_VLLM = "PEFT backend, not vLLM"


def _h3_inputs(cfg: RunConfig, overhead_rows: list[dict]) -> tuple[str, dict[int, dict]] | None:
    """Per-round latencies by batch size of the primary configuration, from vLLM when the
    benchmark ran it (H3 is about serving engines; PEFT's mixed-batch forward is the naive
    baseline), else from the first backend; an hf label says "PEFT backend, not vLLM"."""
    rows = [r for r in overhead_rows if r["config"].startswith("adapters-") and r.get("adapter_latency_by_round")]
    if not rows:
        return None
    have = [r["backend"] for r in rows]
    backend = "vllm" if "vllm" in have else have[0]
    rows = [r for r in rows if r["backend"] == backend]
    names = {r["config"] for r in rows}
    name = cfg.stats.h3_config if cfg.stats.h3_config in names else max(names, key=lambda n: int(n.split("-")[1]))
    return f"{backend}/{name}", {int(r["batch_size"]): {"adapters": r["adapter_latency_by_round"],
                                          "merged": r["merged_latency_by_round"],
                                          "paired": bool(r.get("paired"))}
                   for r in rows if r["config"] == name}


def run_stats(cfg: RunConfig) -> dict:
    out = Path(cfg.out_dir)
    s = cfg.stats
    notes: list[str] = []

    perf = performance_by_seed(cfg)
    tasks = sorted(set(perf["full"]) & set(perf["lora"]))
    h1 = []
    if tasks:
        base = baseline_scores(cfg)
        h1 = stats.h1_performance({t: perf["full"][t] for t in tasks}, {t: perf["lora"][t] for t in tasks},
                                  s.h1_threshold, baselines=base, confidence=s.confidence)
        f1 = performance_by_seed(cfg, metric=lambda t: "f1" if TASKS[t].metric == "accuracy_f1" else None)
        for r in h1:
            if r.scope in tasks and TASKS[r.scope].metric == "accuracy_f1":
                mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
                r.notes.append(f"F1 beside accuracy (reported, not tested): FT {mean(f1['full'][r.scope]):.4g}, "
                               f"LoRA {mean(f1['lora'][r.scope]):.4g}")
    else:
        notes.append("H1: no task has finished runs of both methods")

    h2 = []
    comp_file = out / "drift" / "comparison.json"
    if comp_file.exists():
        comp = json.loads(comp_file.read_text())
        ok = {t: c for t, c in comp.items() if c.get("drift_full_by_seed") and c.get("drift_lora_by_seed")}
        if ok:
            h2 = stats.h2_drift({t: c["drift_full_by_seed"] for t, c in ok.items()},
                                {t: c["drift_lora_by_seed"] for t, c in ok.items()}, s.h2_threshold,
                                probe_var_by_task={t: c.get("probe_var_log_ratio") for t, c in ok.items()},
                                floor_by_task={t: c["noise_floor"] for t, c in ok.items()
                                               if c.get("noise_floor") is not None},
                                floor_factor=s.floor_factor, confidence=s.confidence)
    if not h2:
        notes.append(f"H2: no drift comparison ({comp_file} missing or without both methods)")

    h3 = []
    over_file = out / "serve" / "overhead.json"
    if over_file.exists():
        picked = _h3_inputs(cfg, json.loads(over_file.read_text()))
        if picked and s.h3_batch in picked[1]:
            label, by_batch = picked
            h3 = stats.h3_serving(by_batch, primary_batch=s.h3_batch, threshold=s.h3_threshold, label=label,
                                  confidence=s.confidence)
            if label.startswith("hf/"):
                for r in h3:
                    r.notes.append(f"{H3_NOT_VLLM}: measured on transformers + PEFT's mixed-batch forward, which "
                                   "loops over adapters in Python; install the serve extra to decide H3 on vLLM")
        else:
            notes.append(f"H3: no multi-adapter configuration with per-round latencies at batch {s.h3_batch} "
                         f"in {over_file}")
    else:
        notes.append(f"H3: no serving benchmark ({over_file} missing)")

    # The family is the three pre-registered primary tests; a missing one still counts in its size.
    family = [r for r in [*h1, *h2, *h3] if r.primary]
    stats.correct(family, family_size=stats.FAMILY_SIZE)
    verdict = stats.overall_verdict(h1, h2, h3)
    result = {"H1": [r.to_dict() for r in h1], "H2": [r.to_dict() for r in h2], "H3": [r.to_dict() for r in h3],
              "verdict": verdict, "notes": notes,
              "family": {"tests": [f"{r.name} {r.scope}" for r in family], "size": stats.FAMILY_SIZE,
                         "primary_level": stats.primary_level(s.confidence), "secondary_level": s.confidence,
                         "corrections": "Bonferroni (decides, via the interval level) and Holm (reported)"},
              "settings": {**cfg.stats.model_dump(), "seeds": cfg.study.seeds, "tasks": tasks,
                           "h1_metrics": {t: h1_metric(t) for t in tasks}}}
    from loradrift.forgetting import secondary_result

    # Not part of the family or the verdict: analyses the plan did not pre-register.
    result["secondary_analyses"] = {"forgetting": secondary_result(out)}
    atomic_write_json(out / "stats" / "hypotheses.json", result)
    return result
