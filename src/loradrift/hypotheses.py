"""The pre-registered decisions, computed from the study's artefacts.

    loradrift stats [--out DIR]

Reads the results store (Phase 2 runs, reconciled first with the run folders, which are the
record), `drift/comparison.json` and `serve/overhead.json`, runs
`loradrift.stats` (H1, H2, H3, Bonferroni and Holm over the whole family of p-values, the
overall verdict H1 AND (H2 OR H3)) and writes `stats/hypotheses.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from loradrift import stats
from loradrift.config import RunConfig
from loradrift.io import ResultsStore, atomic_write_json, reconcile_store
from loradrift.models import model_key
from loradrift.tasks import TASKS


def performance_by_seed(cfg: RunConfig) -> dict[str, dict[str, dict[int, float]]]:
    """{method: {task: {seed: primary dev score}}} for the Phase 2 seeds of this model."""
    out: dict[str, dict[str, dict[int, float]]] = {"full": {}, "lora": {}}
    reconcile_store(Path(cfg.out_dir))
    rows = ResultsStore(Path(cfg.out_dir) / "results.sqlite").rows("run", model=model_key(cfg.model))
    for r in rows:
        if r["seed"] not in cfg.study.seeds or r["task"] not in cfg.study.tasks:
            continue
        score = r["metrics"]["dev"][TASKS[r["task"]].primary]
        out[r["method"]].setdefault(r["task"], {})[r["seed"]] = float(score)
    return out


def _h3_inputs(cfg: RunConfig, overhead_rows: list[dict]) -> tuple[str, dict[int, list[float]]] | None:
    """Per-round overheads by batch size of the primary configuration on the first backend."""
    rows = [r for r in overhead_rows if r["config"].startswith("adapters-") and r.get("per_round")]
    if not rows:
        return None
    backend = rows[0]["backend"]
    rows = [r for r in rows if r["backend"] == backend]
    names = {r["config"] for r in rows}
    name = cfg.stats.h3_config if cfg.stats.h3_config in names else max(names, key=lambda n: int(n.split("-")[1]))
    return f"{backend}/{name}", {int(r["batch_size"]): list(r["per_round"]) for r in rows if r["config"] == name}


def run_stats(cfg: RunConfig) -> dict:
    out = Path(cfg.out_dir)
    s = cfg.stats
    kw = {"confidence": s.confidence, "n_resamples": s.n_resamples, "seed": s.seed}
    notes: list[str] = []

    perf = performance_by_seed(cfg)
    tasks = sorted(set(perf["full"]) & set(perf["lora"]))
    h1 = []
    if tasks:
        h1 = stats.h1_performance({t: perf["full"][t] for t in tasks}, {t: perf["lora"][t] for t in tasks}, s.h1_threshold, **kw)
    else:
        notes.append("H1: no task has finished runs of both methods")

    h2 = []
    comp_file = out / "drift" / "comparison.json"
    if comp_file.exists():
        comp = json.loads(comp_file.read_text())
        ok = {t: c for t, c in comp.items() if c.get("drift_full_by_seed") and c.get("drift_lora_by_seed")}
        if ok:
            h2 = stats.h2_drift({t: c["drift_full_by_seed"] for t, c in ok.items()},
                                {t: c["drift_lora_by_seed"] for t, c in ok.items()}, s.h2_threshold, **kw)
    if not h2:
        notes.append(f"H2: no drift comparison ({comp_file} missing or without both methods)")

    h3 = []
    over_file = out / "serve" / "overhead.json"
    if over_file.exists():
        picked = _h3_inputs(cfg, json.loads(over_file.read_text()))
        if picked and s.h3_batch in picked[1]:
            label, by_batch = picked
            h3 = stats.h3_serving(by_batch, primary_batch=s.h3_batch, threshold=s.h3_threshold, label=label, **kw)
        else:
            notes.append(f"H3: no multi-adapter configuration measured at batch {s.h3_batch} in {over_file}")
    else:
        notes.append(f"H3: no serving benchmark ({over_file} missing)")

    family = [*h1, *h2, *h3]
    stats.correct(family)
    verdict = stats.overall_verdict(h1, h2, h3) if h1 and h2 and h3 else _partial_verdict(h1, h2, h3)
    result = {"H1": [r.to_dict() for r in h1], "H2": [r.to_dict() for r in h2], "H3": [r.to_dict() for r in h3],
              "verdict": verdict, "notes": notes,
              "settings": {**cfg.stats.model_dump(), "seeds": cfg.study.seeds, "tasks": tasks}}
    atomic_write_json(out / "stats" / "hypotheses.json", result)
    return result


def _partial_verdict(h1, h2, h3) -> dict:
    """The verdict when a hypothesis could not be tested: missing parts count as undecided."""
    prim = {}
    for name, rs in (("H1", h1), ("H2", h2), ("H3", h3)):
        p = [r for r in rs if r.primary]
        prim[name] = p[0].supported if p else None
    return {"rule": "H1 AND (H2 OR H3)", **prim, "overall": stats.combine_verdicts(prim["H1"], prim["H2"], prim["H3"]),
            "primary_scopes": {}, "by_scope": {}}
