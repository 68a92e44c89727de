"""The hypotheses section: the three primary tests that make the verdict, every per-task and
per-batch result of H1, H2 and H3 with its interval, p-values and power, the notes, the learning
gate and the settings. The summary reuses the primary rows.

    stats/hypotheses.json
"""

from __future__ import annotations

from loradrift.layout import PATHS
from loradrift.report.artefacts import Artefacts, task_order
from loradrift.report.render import Section, fmt, num, verdict_word

HYPOTHESES = {
    "H1": "Performance: LoRA's relative gap to full fine-tuning, (FT − LoRA) / FT × 100 per seed on H1's metric "
          "(accuracy for GLUE, F1 for SQuAD v2), is at most the threshold.",
    "H2": "Drift: LoRA reduces representational drift, (mean FT drift − mean LoRA drift) / mean FT drift × 100 "
          "(means over seeds; drift = 1 − CKA averaged over the transformer block outputs), by at least the threshold.",
    "H3": "Serving: the multi-adapter latency overhead vs the merged models is at most the threshold.",
}


RESULT_COLUMNS = ["scope", "n", "estimate", "_ci", "ci_method", "_h0", "decision", "reason", "p_value", "p_bonferroni",
                   "p_holm"]


RESULT_LABELS = {"_ci": "interval (level)", "ci_method": "interval method", "_h0": "supported when",
                  "p_value": "one-sided p", "p_bonferroni": "p (Bonferroni)", "p_holm": "p (Holm)"}


def result_row(r: dict) -> dict:
    level = num(r.get("ci_level"))
    side = "upper bound ≤" if r.get("alternative") == "less" else "lower bound ≥"
    return {**r, "scope": f"{r.get('name', '')} {r.get('scope')}".strip(),
            "_ci": f"[{fmt(r.get('ci_low'))}, {fmt(r.get('ci_high'))}]" + (f" ({fmt(level * 100)}%)" if level else ""),
            "_h0": f"{side} {fmt(r.get('threshold'))}",
            "decision": r.get("decision") or verdict_word(r.get("supported"))}


def results_by_name(h: dict) -> dict[str, list[dict]]:
    return {name: [r for r in (h.get(name) or []) if isinstance(r, dict)] for name in ("H1", "H2", "H3")}


def primary_rows(h: dict) -> list[dict]:
    """The verdict's primary tests, and a row saying why for a hypothesis that has none."""
    results = results_by_name(h)
    rows = [result_row(r) for name in ("H1", "H2", "H3") for r in results[name] if r.get("primary")]
    reasons = (h.get("verdict") or {}).get("reasons") or {}
    for name in ("H1", "H2", "H3"):
        if not any(r.get("primary") for r in results[name]):
            rows.append({"scope": name, "decision": "undetermined", "reason": reasons.get(name, "undetermined: not tested")})
    return rows


def sec_hypotheses(art: Artefacts) -> Section:
    sec = Section("hypotheses", "Hypotheses")
    h = art.require(PATHS["hypotheses"], "Hypothesis tests", dict)
    sec.p(f"Verdict rule: {(h.get('verdict') or {}).get('rule', 'H1 AND (H2 OR H3)')}; the verdicts are in the summary.")
    fam = h.get("family") or {}
    level = num(fam.get("primary_level"))
    sec.p("The verdict uses three primary tests, the pre-registered family: H1 pooled over tasks, H2 pooled over "
          "tasks, H3 at the primary batch size. Each is decided by its interval at the Bonferroni-corrected level"
          + (f" {fmt(level * 100)}%" if level else " 1 − α/3")
          + " (the same decision as a Bonferroni-corrected one-sided p below α/2); Holm-corrected p-values are "
          "reported beside it, for the decided members only (an undetermined one counts as p = 1). A result is "
          "undetermined when the data cannot decide it: a task that either method did not learn (its mean does not "
          "beat the baseline bar by more than its seed spread; H1 and H2), full-FT drift not above the noise floor "
          "and the minimum drift, no spread between seeds or rounds, fewer serving rounds or engine starts than "
          "H3's interval was validated for, too few values; undetermined propagates through H1 AND (H2 OR H3). "
          "H3 measured on the PEFT backend, not vLLM, is secondary evidence. Per-task and per-batch results are "
          "secondary: uncorrected "
          + (f"{fmt(num(fam.get('secondary_level')) * 100)}% " if num(fam.get("secondary_level")) else "")
          + "intervals, not part of the verdict.")
    results = results_by_name(h)
    sec.table(primary_rows(h), RESULT_COLUMNS, labels=RESULT_LABELS, caption="Primary tests (the verdict)")
    notes: list[str] = list(h.get("notes") or [])
    for name in ("H1", "H2", "H3"):
        sec.h3(f"{name}: {HYPOTHESES[name]}")
        if not results[name]:
            sec.not_run(f"{name} test", PATHS["hypotheses"], f"has no {name} results")
            continue
        rows = []
        for r in results[name]:
            row = result_row(r)
            row["scope"] = f"{r.get('scope')} ({'primary' if r.get('primary') else 'secondary'})"
            rows.append(row)
            for n in r.get("notes") or []:
                notes.append(n if str(n).startswith(name) else f"{name} {r.get('scope')}: {n}")
        sec.table(rows, RESULT_COLUMNS[:-2] + ["df", "effect_size", "power"],
                  labels={**RESULT_LABELS, "effect_size": "Cohen's d"})
    if notes:
        sec.h3("Notes")
        sec.bullets(dict.fromkeys(notes))
    gate = h.get("learning_gate") or {}
    if gate.get("bars"):
        not_learned = gate.get("not_learned") or {}
        rows = [{"task": t, "bar": b.get("bar"), "from": b.get("from"), "learned": t not in not_learned,
                 "why not": not_learned.get(t) or b.get("reason")} for t, b in sorted(gate["bars"].items(), key=lambda kv: task_order(kv[0]))]
        sec.table(rows, ["task", "bar", "from", "learned", "why not"],
                  caption=f"Learning gate (H1, H2, forgetting, rank ablation): {gate.get('rule', '')}")
    if isinstance(h.get("settings"), dict):
        sec.kv(h["settings"], caption="Settings")
    return sec
