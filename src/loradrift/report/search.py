"""The appendix section on the hyperparameter search (Phase 1): the studies, their best
parameters and importances, the search figures, and the best configs verbatim.

    search/report/summary.json, search/report/figures/*.png, configs/best/<model>/*.yaml
"""

from __future__ import annotations

from loradrift.report.artefacts import Artefacts, rows_of
from loradrift.report.figures import add_figures
from loradrift.report.render import Section, num, pick_columns, scalar


def sec_search(art: Artefacts) -> Section:
    sec = Section("search", "Hyperparameter search and best configs")
    summary = art.json("search/report/summary.json")
    if summary is None:
        sec.not_run("Search summary", "search/report/summary.json")
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
            detail.append({"study": name, "best params": e.get("best_params"),
                           "importances": dict(sorted(imp.items(), key=lambda kv: -(num(kv[1]) or 0))) if isinstance(imp, dict) and imp else e.get("importance_note")})
        if detail:
            sec.table(detail, ["study", "best params", "importances"], caption="Best parameters and parameter importances")
    add_figures(sec, art, "search/report/figures", "Search figures")
    sec.h3("Best configs (configs/best/)")
    yamls = sorted((art.out / "configs" / "best").glob("*/*.yaml")) if (art.out / "configs" / "best").is_dir() else []
    if not yamls:
        sec.not_run("Best configs", "configs/best/<model>/*.yaml", "are missing")
    for y in yamls:
        sec.pre(art.read_text(y), art.rel(y))
    return sec
