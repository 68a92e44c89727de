"""The drift section: representational drift of the probe set from the base model, LoRA vs full
fine-tuning (H2's quantity), with its noise floor, probe-example interval and permutation p, and
the drift figures but the by-layer one (in the summary).

    drift/comparison.json, drift/figures/*.png
"""

from __future__ import annotations

from loradrift.layout import PATHS
from loradrift.report.artefacts import Artefacts, task_order
from loradrift.report.figures import DRIFT_BY_LAYER, add_figures
from loradrift.report.render import Section, fmt, num, pick_columns, scalar


def sec_drift(art: Artefacts) -> Section:
    sec = Section("drift", "Drift")
    comp = art.json(PATHS["drift_comparison"], (dict, list))
    if comp is None:
        sec.not_run("Drift comparison", PATHS["drift_comparison"])
    else:
        items = ([(r.get("task"), r) for r in comp] if isinstance(comp, list)
                 else [(t, c) for t, c in comp.items() if isinstance(c, dict)])
        items.sort(key=lambda kv: task_order(str(kv[0])))
        sec.p("Representational drift of the probe set from the base model at the final step: drift = 1 − CKA "
              "(estimator in the 'metric' column), averaged over the transformer block outputs (the 'layers' "
              "column; the embedding layer and the last entry, the output after the final norm, are shown apart "
              "because LoRA cannot move them and full FT can), mean ± sd over seeds. Reduction = (mean FT drift − "
              "mean LoRA drift) / mean FT drift × 100, the quantity H2 tests. Noise floor: the same base model "
              "extracted twice with different batch compositions. Probe CI: delete-one jackknife over probe "
              "examples of the reduction (normal interval on the log ratio). perm p: exact one-sided permutation "
              "test over seeds (with 3 + 3 seeds the smallest attainable p is 0.05).")
        main, extra = [], []
        shown = {"task", "primary_metric", "aggregate_layers", "n_seeds_full", "n_seeds_lora", "drift_full", "drift_full_sd",
                 "drift_lora", "drift_lora_sd", "reduction_pct", "noise_floor", "probe_ci", "ci_level", "perm_p",
                 "perm_n_relabellings", "perm_min_p", "perm_kind", "drift_layer0_full", "drift_layer0_lora",
                 "drift_last_full", "drift_last_lora", "cos_drift_full", "cos_drift_lora", "cos_reduction_pct"}
        skip = {"model", "probe_metric", "probe_var_log_ratio"}
        for task, c in items:
            nf = c.get("n_seeds_full", len(c.get("drift_full_by_seed") or {}) or None)
            nl = c.get("n_seeds_lora", len(c.get("drift_lora_by_seed") or {}) or None)
            pm = lambda m, sd: fmt(m) + ("" if num(sd) is None else f" ± {fmt(sd)}")  # noqa: E731
            ci = c.get("probe_ci")
            level = num(c.get("ci_level"))
            main.append({"task": task, "primary_metric": c.get("primary_metric"), "aggregate_layers": c.get("aggregate_layers"),
                         "_n": f"{fmt(nf)} / {fmt(nl)}",
                         "_ft": pm(c.get("drift_full"), c.get("drift_full_sd")),
                         "_lo": pm(c.get("drift_lora"), c.get("drift_lora_sd")),
                         "reduction_pct": c.get("reduction_pct"), "noise_floor": c.get("noise_floor"),
                         "_ci": "—" if not ci or all(num(x) is None for x in ci) else f"[{fmt(ci[0])}, {fmt(ci[1])}]"
                                + (f" ({fmt(level * 100)}%)" if level else ""),
                         "perm_p": c.get("perm_p"),
                         "_perm": f"{fmt(c.get('perm_n_relabellings'))}" + (f" ({c['perm_kind']})" if c.get("perm_kind") else ""),
                         "perm_min_p": c.get("perm_min_p")})
            e = {"task": task, "_l0": f"{fmt(c.get('drift_layer0_full'))} / {fmt(c.get('drift_layer0_lora'))}",
                 "_last": f"{fmt(c.get('drift_last_full'))} / {fmt(c.get('drift_last_lora'))}",
                 "cos_drift_full": c.get("cos_drift_full"), "cos_drift_lora": c.get("cos_drift_lora"),
                 "cos_reduction_pct": c.get("cos_reduction_pct")}
            e.update({k: v for k, v in c.items() if k not in shown and k not in skip and scalar(v)})
            extra.append(e)
        labels = {"primary_metric": "metric", "aggregate_layers": "layers", "_n": "seeds FT / LoRA", "_ft": "drift FT",
                  "_lo": "drift LoRA", "reduction_pct": "reduction %", "noise_floor": "noise floor",
                  "_ci": "probe CI of reduction %", "perm_p": "perm p", "_perm": "relabellings",
                  "perm_min_p": "min attainable p", "_l0": "layer 0 drift FT / LoRA",
                  "_last": "last layer drift FT / LoRA", "cos_drift_full": "cos drift FT",
                  "cos_drift_lora": "cos drift LoRA", "cos_reduction_pct": "cos reduction %"}
        sec.table(main, list(main[0]) if main else None, labels=labels, caption="LoRA vs full fine-tuning")
        sec.table(extra, pick_columns(extra, list(dict.fromkeys(k for e in extra for k in e))), labels=labels,
                  caption="The layers outside the aggregate, and the cosine-distance drift")
        if not items:
            sec.p("The comparison lists no tasks (no task had finished runs of both methods).")
    sec.p("The final drift by layer, LoRA vs full fine-tuning, is in the summary.")
    add_figures(sec, art, PATHS["drift"] + "figures", "Drift figures", skip=DRIFT_BY_LAYER, gated=True)
    return sec
