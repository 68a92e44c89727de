"""The appendix section on the hyperparameter search (Phase 1): the studies, their best
parameters and importances, the search figures, and the best configs verbatim.

    search/report/summary.json, search/report/figures/*.png, configs/best/<model>/*.yaml
"""

from __future__ import annotations

from loradrift.layout import PATHS
from loradrift.report.artefacts import Artefacts, rows_of
from loradrift.report.figures import add_figures
from loradrift.report.render import Section, num, pick_columns, scalar


def sec_search(art: Artefacts) -> Section:
    sec = Section("search", "Hyperparameter search and best configs")
    summary_rel = PATHS["search_report"] + "summary.json"
    summary = art.json(summary_rel)
    if summary is None:
        sec.not_run("Search summary", summary_rel)
    else:
        entries = rows_of(summary, "studies")
        if entries is None and isinstance(summary, dict):
            entries = [{"study": k, **v} for k, v in summary.items() if isinstance(v, dict)]
        entries = entries or []
        if not entries:
            sec.p("The search summary lists no studies.")
        rows = []
        for e in entries:
            states = e.get("states") or e.get("n_trials_by_state")
            rows.append({**{k: v for k, v in e.items() if scalar(v)},
                         "states": states if isinstance(states, dict) else None,
                         "gap": e.get("best_worst_gap", e.get("gap"))})
        sec.table(rows, pick_columns(rows, ["study", "task", "method", "metric", "n_trials", "states", "best_value",
                                            "worst_value", "gap", "best_trial"]),
                  labels={"gap": "best − worst", "states": "trials by state"},
                  caption="Studies (value = the task's primary metric on validation)")
        detail = []
        for e in entries:
            name = e.get("study") or f"{e.get('task')}_{e.get('method')}"
            imp = e.get("importances")
            if isinstance(imp, dict) and imp:
                imp = dict(sorted(imp.items(), key=lambda kv: -(num(kv[1]) or 0)))
            else:
                imp = e.get("importance_note")
            detail.append({"study": name, "best params": e.get("best_params"), "importances": imp})
        if detail:
            sec.table(detail, ["study", "best params", "importances"], caption="Best parameters and parameter importances")
    add_figures(sec, art, PATHS["search_report"] + "figures", "Search figures")
    # configs/best/{model}/<file>: every YAML file in the per-model folders
    best_dir = PATHS["best_config"].rpartition("/")[0]
    sec.h3(f"Best configs ({best_dir.partition('{')[0]})")
    yamls = sorted(art.out.glob(best_dir.format(model="*") + "/*.yaml"))
    if not yamls:
        sec.not_run("Best configs", best_dir.format(model="<model>") + "/*.yaml", "are missing")
    for y in yamls:
        sec.pre(art.read_text(y), art.rel(y))
    return sec
