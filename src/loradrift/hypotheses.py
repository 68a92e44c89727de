"""The pre-registered decisions, computed from the study's artefacts.

    loradrift stats [--out DIR]

Reads the results store (Phase 2 runs, reconciled first with the run folders, which are the
record, and Phase 0 baselines), `drift/comparison.json` and `serve/overhead.json` (with
`serve/meta.json`), runs `loradrift.stats` (H1, H2, H3; Bonferroni and Holm over the family of the
three primary tests; the overall verdict H1 AND (H2 OR H3)) and writes `stats/hypotheses.json`.
Every result there carries its estimate, interval (level and method), decision and the reason for
it; `docs/study.md` defines the quantities and the rules.
"""

from __future__ import annotations

import json
from pathlib import Path

from loradrift import layout, stats
from loradrift.config import RunConfig
from loradrift.io import atomic_write_json
from loradrift.learning import LEARNING_RULE, baseline_bars, h1_metric, not_learned, performance_by_seed
from loradrift.methods import FULL, LORA
from loradrift.serving.offline import round_starts
from loradrift.tasks import TASKS

H3_NOT_VLLM = "PEFT backend, not vLLM"
VLLM_CPU_NOTE = ("vLLM on a CPU: its LoRA kernels there are generic PyTorch code, so this overhead is not a GPU "
                 "deployment figure")


def _starts(row: dict, meta: dict | None) -> list[int] | None:
    """Each round's engine start: recorded in the row, else rebuilt from serve/meta.json as the
    benchmark split the rounds (offline.round_starts), else unknown."""
    if row.get("start_by_round") is not None:
        return row["start_by_round"]
    restarts = ((meta or {}).get("engine_restarts") or {}).get(row["backend"])
    if restarts is None:
        return None
    return round_starts(len(row["adapter_latency_by_round"]), int(restarts))


def _h3_inputs(cfg: RunConfig, overhead_rows: list[dict], meta: dict | None) -> tuple[str, dict[int, dict]] | None:
    """Per-round latencies (and engine starts) by batch size of the primary configuration, from
    vLLM when the benchmark ran it (H3 is about serving engines; PEFT's mixed-batch forward is the
    naive baseline), else from the first backend."""
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
                                                       "paired": bool(r.get("paired")), "starts": _starts(r, meta)}
                                 for r in rows if r["config"] == name}


def _h3(cfg: RunConfig, out: Path, notes: list[str]) -> tuple[list[stats.HypothesisResult], dict | None]:
    """H3's results and what they were measured on; on the PEFT backend every result is secondary
    evidence and the pre-registered H3 has no primary result."""
    s = cfg.stats
    over_file = layout.path(out, "serve_overhead")
    if not over_file.exists():
        notes.append(f"H3: no serving benchmark ({over_file} missing)")
        return [], None
    meta_file = layout.path(out, "serve_meta")
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
    picked = _h3_inputs(cfg, json.loads(over_file.read_text()), meta)
    if not picked or s.h3_batch not in picked[1]:
        notes.append(f"H3: no multi-adapter configuration with per-round latencies at batch {s.h3_batch} in {over_file}")
        return [], None
    label, by_batch = picked
    h3 = stats.h3_serving(by_batch, primary_batch=s.h3_batch, threshold=s.h3_threshold, label=label,
                          confidence=s.confidence)
    backend, device = label.split("/")[0], (meta or {}).get("device")
    info = {"backend": backend, "device": device, "pre_registered": backend == "vllm", "note": None}
    if backend != "vllm":
        prim = next(r for r in h3 if r.primary)
        info["note"] = (f"{H3_NOT_VLLM}: H3 is about serving adapters in a serving engine; measured on transformers + "
                        f"PEFT's mixed-batch forward (which loops over adapters in Python) the overhead at batch "
                        f"{s.h3_batch} is {prim.estimate:+.1f} % [{prim.ci_low:.1f}, {prim.ci_high:.1f}], "
                        f"{prim.decision}: secondary evidence, not the pre-registered H3")
        for r in h3:
            r.primary = False
            r.notes.append(f"{H3_NOT_VLLM}: secondary evidence, outside the verdict and the family (its interval is at "
                           "the level the pre-registered H3 would use); install the serve extra to decide H3 on vLLM")
    elif device == "cpu":
        info["note"] = VLLM_CPU_NOTE
        for r in h3:
            r.notes.append(VLLM_CPU_NOTE)
    return h3, info


def run_stats(cfg: RunConfig) -> dict:
    out = Path(cfg.out_dir)
    s = cfg.stats
    notes: list[str] = []

    perf = performance_by_seed(cfg)
    bars = baseline_bars(cfg)
    notes += [f"baseline bar of {t}: {b['reason']}" for t, b in bars.items() if b["reason"]]
    tasks = sorted(set(perf[FULL]) & set(perf[LORA]))
    h1 = []
    if tasks:
        h1 = stats.h1_performance({t: perf[FULL][t] for t in tasks}, {t: perf[LORA][t] for t in tasks},
                                  s.h1_threshold, baselines={t: b["bar"] for t, b in bars.items() if b["bar"] is not None},
                                  confidence=s.confidence)
        f1 = performance_by_seed(cfg, metric=lambda t: "f1" if TASKS[t].metric == "accuracy_f1" else None)
        for r in h1:
            if r.scope in tasks and TASKS[r.scope].metric == "accuracy_f1":
                mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
                r.notes.append(f"F1 beside accuracy (reported, not tested): FT {mean(f1['full'][r.scope]):.4g}, "
                               f"LoRA {mean(f1['lora'][r.scope]):.4g}")
    else:
        notes.append("H1: no task has finished runs of both methods")

    h2 = []
    gate: dict[str, str] = not_learned(perf, bars, cfg.study.tasks)
    comp_file = layout.path(out, "drift_comparison")
    if comp_file.exists():
        comp = json.loads(comp_file.read_text())
        ok = {t: c for t, c in comp.items() if c.get("drift_full_by_seed") and c.get("drift_lora_by_seed")}
        if ok:
            gate.update(not_learned(perf, bars, [t for t in ok if t not in cfg.study.tasks]))
            h2 = stats.h2_drift({t: c["drift_full_by_seed"] for t, c in ok.items()},
                                {t: c["drift_lora_by_seed"] for t, c in ok.items()}, s.h2_threshold,
                                probe_var_by_task={t: c.get("probe_var_log_ratio") for t, c in ok.items()},
                                floor_by_task={t: c["noise_floor"] for t, c in ok.items()
                                               if c.get("noise_floor") is not None},
                                floor_factor=s.floor_factor, min_drift=s.min_drift,
                                not_learned={t: w for t, w in gate.items() if t in ok}, confidence=s.confidence)
    if not h2:
        notes.append(f"H2: no drift comparison ({comp_file} missing or without both methods)")

    h3, h3_info = _h3(cfg, out, notes)

    # The family is the three pre-registered primary tests; a missing or undetermined one still
    # counts in its size, as p = 1, and gets no adjusted p-value (stats.correct).
    family = [r for r in [*h1, *h2, *h3] if r.primary]
    stats.correct(family, family_size=stats.FAMILY_SIZE)
    present = {r.name for r in family}
    left_out = [f"{r.name} {r.scope} (undetermined)" for r in family if r.supported is None]
    left_out += [f"{n} (no primary result)" for n in ("H1", "H2", "H3") if n not in present]
    missing = {"H3": h3_info["note"]} if h3_info and not h3_info["pre_registered"] else {}
    verdict = stats.overall_verdict(h1, h2, h3, missing=missing)
    result = {"H1": [r.to_dict() for r in h1], "H2": [r.to_dict() for r in h2], "H3": [r.to_dict() for r in h3],
              "verdict": verdict, "notes": notes, "H3_backend": h3_info,
              "learning_gate": {"rule": LEARNING_RULE, "bars": bars, "not_learned": gate},
              "family": {"tests": [f"{r.name} {r.scope}" for r in family], "size": stats.FAMILY_SIZE,
                         "primary_level": stats.primary_level(s.confidence), "secondary_level": s.confidence,
                         "left_out_of_adjustment": left_out,
                         "corrections": "Bonferroni (decides, via the interval level) and Holm (reported); a member "
                                        "that is undetermined or has no primary result is left out of the adjustment: "
                                        "it counts as p = 1 in the family of 3 and gets no adjusted p-value"},
              "settings": {**cfg.stats.model_dump(), "seeds": cfg.study.seeds, "tasks": tasks,
                           "h1_metrics": {t: h1_metric(t) for t in tasks}}}
    from loradrift.forgetting import secondary_result

    # Not part of the family or the verdict: analyses the plan did not pre-register.
    result["secondary_analyses"] = {"forgetting": secondary_result(out, gate)}
    atomic_write_json(layout.path(out, "hypotheses"), result)
    return result


def verdict_line(res: dict) -> str:
    """The verdict in one line, naming the backend H3 was measured on when it is not vLLM."""
    d, info = res["verdict"]["decisions"], res.get("H3_backend") or {}
    h3 = d["H3"]
    if info and not info.get("pre_registered"):
        h3 += f" ({H3_NOT_VLLM}; its overhead is secondary evidence)"
    elif info.get("device") == "cpu":
        h3 += " (vLLM on a CPU, not a GPU deployment figure)"
    return f"H1 {d['H1']}, H2 {d['H2']}, H3 {h3} → {res['verdict']['rule']}: {d['overall']}"
