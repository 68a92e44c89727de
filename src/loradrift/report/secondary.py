"""The secondary sections, outside the pre-registered hypotheses: the weight-space analysis,
forgetting (Δloss on general text) and the LoRA rank ablation.

    weights/summary.json, weights/figures/*.png
    forgetting/summary.json, forgetting/figures/*.png, stats/hypotheses.json (the gated correlations)
    ablation/rank/<variant>/summary.json, ablation/rank/<variant>/figures/*.png
"""

from __future__ import annotations

from typing import Any

from loradrift.layout import PATHS
from loradrift.methods import FULL, LORA, METHODS
from loradrift.report.artefacts import Artefacts, method_order, rows_of, task_order
from loradrift.report.figures import add_figures
from loradrift.report.render import Section, fmt, pick_columns


def sec_weights(art: Artefacts) -> Section:
    sec = Section("weights", "Weight-space analysis")
    summary_rel = PATHS["weights"] + "summary.json"
    w = art.json(summary_rel)
    if w is None:
        sec.not_run("Weight analysis", summary_rel)
    else:
        sec.p("Per run: the weight update ΔW of every adapted projection relative to the base weight "
              "(‖ΔW‖/‖W‖), its effective rank, and intruder dimensions (singular vectors of the tuned "
              "weight that are far from every base singular vector).")
        if isinstance(w, dict) and w.get("settings"):
            sec.kv(w["settings"], caption="Settings")
        summ = rows_of(w, "summary") or []
        by_task = w.get("by_task") if isinstance(w, dict) else None
        if isinstance(by_task, dict) and by_task:
            rows = [{"task": t, "method": m, **(v if isinstance(v, dict) else {})}
                    for t, ms in sorted(by_task.items(), key=lambda kv: task_order(kv[0]))
                    for m, v in sorted(ms.items(), key=lambda kv: method_order(kv[0]))]
            sec.table(rows, pick_columns(rows, ["task", "method", "n_seeds", "mean_rel_norm", "mean_effective_rank",
                                                "total_intruders"]), caption="Means over seeds")
        summ.sort(key=lambda r: (task_order(str(r.get("task"))), method_order(str(r.get("method"))), r.get("seed", 0)))
        sec.table(summ, pick_columns(summ, ["task", "method", "seed", "n_modules", "mean_rel_norm",
                                            "mean_effective_rank", "total_intruders"]), caption="Per run")
        if not summ:
            sec.p("The weight summary lists no runs.")
    add_figures(sec, art, PATHS["weights"] + "figures", "Weight figures", gated=True)
    return sec


def sec_forgetting(art: Artefacts) -> Section:
    sec = Section("forgetting", "Forgetting (secondary, not pre-registered)")
    f = art.require(PATHS["forgetting_summary"], "Forgetting", dict,
                    why="is missing (forgetting.enabled=false, or Phase 3 did not run)")
    text, st, base = f.get("text") or {}, f.get("settings") or {}, f.get("base") or {}
    sec.p(f"{str(f.get('label', '')).capitalize()}: not one of the plan's hypotheses and not in the verdict. "
          f"{f.get('definition', '')}. Text: {fmt(text.get('paragraphs'))} paragraphs of {fmt(text.get('articles'))} "
          f"Wikipedia articles ({fmt(text.get('tokens'))} predicted tokens, at most {fmt(st.get('max_tokens'))} tokens each), "
          f"a seeded sample (seed {fmt(st.get('seed'))}) of the {fmt(text.get('pool_paragraphs'))} deduplicated SQuAD v2 dev "
          f"contexts outside the SQuAD v2 train articles ({text.get('source', '')}). No run trains on them; the squad_v2 "
          f"runs read some of them only in forward passes (dev score, probe set). Base model loss: "
          f"{fmt(base.get('loss'))} nats/token. Interval: Student t over seeds at {fmt(100 * st.get('confidence', 0.95))}%.")
    rows = [{**g, "_ci": "—" if g.get("ci_low") is None else f"[{fmt(g['ci_low'])}, {fmt(g['ci_high'])}]"}
            for g in sorted(f.get("by_task_method") or [], key=lambda g: (task_order(g["task"]), method_order(g["method"])))]
    sec.table(rows, ["task", "method", "n", "mean", "_ci"], labels={"mean": "mean Δloss", "_ci": "CI of Δloss"},
              caption="Δloss by task and method (positive: the run predicts general text worse than the base model)")
    # the gated correlations (stats/hypotheses.json applies the learning gate to this summary)
    hyp = art.json(PATHS["hypotheses"])
    gated = ((hyp.get("secondary_analyses") or {}).get("forgetting") or {}).get("correlation") if isinstance(hyp, dict) else None
    corr = gated or f.get("correlation") or {}
    crows = [{"scope": "all runs", **corr.get("pooled", {})}]
    crows += [{"scope": f"task {t}", **c} for t, c in (corr.get("by_task") or {}).items()]
    crows += [{"scope": f"method {m}", **c} for m, c in (corr.get("by_method") or {}).items()]
    sec.table(crows, ["scope", "n", "rho", "p_value", "min_p", "decision", "reason"],
              labels={"rho": "Spearman rho", "p_value": "permutation p", "min_p": "smallest attainable p"},
              caption="Does the representation that moved more forget more? Final drift (H2's aggregate) vs Δloss, across runs")
    sec.bullets(f.get("notes") or [])
    add_figures(sec, art, PATHS["forgetting"] + "figures", "Forgetting figures", gated=True)
    return sec


def sec_rank_ablation(art: Artefacts) -> Section:
    sec = Section("rank-ablation", "LoRA rank ablation")
    summaries = PATHS["ablation_summary"].format(variant="*")
    paths = sorted(art.out.glob(summaries))
    if not paths:
        sec.not_run("Rank ablation", summaries,
                    "is missing (off by default: ablation.rank.enabled=true in the study, or loradrift ablate-rank)")
        return sec
    sec.p("LoRA trained at several ranks with the task's best config (only rank, alpha and rsLoRA change), against "
          "the full fine-tuning runs of the same seeds: dev score, final drift (H2's aggregate), intruder dimensions "
          "(sum over the analysed modules) and forgetting (Δloss, nats/token). Means over seeds with Student "
          "t-intervals. A secondary analysis, not pre-registered.")
    for path in paths:
        s = art.json(art.rel(path), dict)
        st = s.get("settings") or {}
        rel = art.rel(path.parent)
        sec.h3(f"{st.get('title', s.get('variant'))} ({rel}/)")
        for task, r in sorted((s.get("tasks") or {}).items(), key=lambda kv: task_order(kv[0])):
            rows = []
            for label, g in (r.get("by_label") or {}).items():
                row: dict[str, Any] = {"run": METHODS[FULL].label if label == FULL else f"{METHODS[LORA].label} r={g.get('rank')}",
                                       "learned": g.get("learned")}
                for q in ("dev_score", "drift", "total_intruders", "delta_loss"):
                    v = g.get(q) or {}
                    row["n"] = max(row.get("n", 0), v.get("n") or 0)
                    row[q] = fmt(v.get("mean")) + ("" if v.get("ci_low") is None else f" [{fmt(v['ci_low'])}, {fmt(v['ci_high'])}]")
                rows.append(row)
            sec.table(rows, ["run", "n", "learned", "dev_score", "drift", "total_intruders", "delta_loss"],
                      labels={"dev_score": "dev score", "drift": "drift", "total_intruders": "intruders", "delta_loss": "Δloss"},
                      caption=f"{task}: mean [t-interval] over seeds {st.get('seeds')}; alpha rule {st.get('alpha_rule')}")
            sec.bullets([*(r.get("notes") or []),
                         *([f"LoRA ranks {', '.join(r['phase2_reused'])} are the Phase 2 runs (the best config's rank)"]
                           if r.get("phase2_reused") else [])])
        add_figures(sec, art, f"{rel}/figures", "Rank ablation figures", gated=True)
    return sec
