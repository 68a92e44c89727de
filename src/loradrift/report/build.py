"""The report's table of contents and its entry point, `build_report`.

`SECTIONS` lists every section in order, each a builder `sec_<id>(art) -> Section`. A builder
that raises `ArtefactError` (an artefact missing, unreadable or invalid; the error names the
file) costs its own section, which then says "not run" or "error" and names the file; any other
exception is a bug in the report and propagates. `report/sections.json` records each section's
status beside report.html.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from loradrift import layout
from loradrift.io import atomic_write_json, atomic_write_text
from loradrift.report import render
from loradrift.report.artefacts import ArtefactError, Artefacts
from loradrift.report.drift import sec_drift
from loradrift.report.hypotheses import sec_hypotheses
from loradrift.report.limitations import sec_limitations
from loradrift.report.performance import sec_performance
from loradrift.report.render import Section
from loradrift.report.search import sec_search
from loradrift.report.secondary import sec_forgetting, sec_rank_ablation, sec_weights
from loradrift.report.serving import sec_serving
from loradrift.report.setup import sec_data, sec_manifest, sec_sanity, sec_setup
from loradrift.report.summary import header_facts, sec_summary

log = logging.getLogger("loradrift.report")

SECTIONS: list[tuple[str, str, Callable[[Artefacts], Section]]] = [
    ("summary", "Summary", sec_summary),
    ("performance", "Performance", sec_performance),
    ("drift", "Drift", sec_drift),
    ("weights", "Weight-space analysis", sec_weights),
    ("forgetting", "Forgetting (secondary, not pre-registered)", sec_forgetting),
    ("rank-ablation", "LoRA rank ablation", sec_rank_ablation),
    ("serving", "Serving benchmark", sec_serving),
    ("hypotheses", "Hypotheses", sec_hypotheses),
    ("limitations", "Limitations", sec_limitations),
    ("data", "Data and splits", sec_data),
    ("sanity", "Sanity checks and baselines", sec_sanity),
    ("setup", "Setup and presets", sec_setup),
    ("search", "Hyperparameter search and best configs", sec_search),
    ("manifest", "Reproducibility manifest", sec_manifest),
]
# A heading in the contents and the body before the section that opens a part of the report.
PARTS: dict[str, str] = {"performance": "Evidence", "setup": "Appendices"}


def build_section(art: Artefacts, sid: str, title: str, make: Callable[[Artefacts], Section]) -> Section:
    """One section; an artefact it cannot do without (ArtefactError) costs this section only."""
    try:
        return make(art)
    except ArtefactError as e:
        sec = Section(sid, title)
        if e.missing:
            sec.not_run(e.what or title, e.rel, e.why)
        else:
            log.warning("report: section %r could not be built: %s", title, e)
            sec.error = str(e)
            sec.note(f"This section could not be built from its artefacts: {e}")
        return sec


def build_sections(out_dir: Path) -> list[Section]:
    art = Artefacts(out_dir)
    return [build_section(art, sid, title, make) for sid, title, make in SECTIONS]


def section_records(sections: list[Section]) -> list[dict]:
    """What sections.json holds, and build_report returns: per section its id, title, status
    (ok | partial | not run | error), the missing files and the error."""
    return [{"id": s.id, "title": s.title, "status": s.status, "missing": list(s.missing), "error": s.error}
            for s in sections]


def build_report(out_dir: Path, pdf: bool = True, renderer: str | None = None) -> dict:
    """Write `<out>/report/report.html`, `<out>/report/sections.json` and (if `pdf`)
    `<out>/report/report.pdf`.

    `renderer` forces the PDF renderer ("chromium" or "matplotlib"); by default Chromium when a
    browser is installed, else matplotlib, and matplotlib also when Chromium fails.
    Returns {"html": path, "pdf": path | None, "pdf_renderer": name | None,
    "sections": [{"id", "title", "status", "missing", "error"}]} (status: ok | partial | not run | error).
    """
    out_dir = Path(out_dir)
    report_dir = layout.path(out_dir, "report")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = build_sections(out_dir)
    header = header_facts(Artefacts(out_dir))
    html_path = report_dir / "report.html"
    atomic_write_text(html_path, render.render_html(sections, out_dir.resolve(), generated, header, PARTS))
    log.info("report: HTML written to %s", html_path)
    records = section_records(sections)
    atomic_write_json(report_dir / "sections.json", records)

    pdf_path, used = None, None
    if pdf:
        pdf_path = report_dir / "report.pdf"
        used = render.write_pdf(sections, html_path, pdf_path, generated, header, renderer)
    return {"html": html_path, "pdf": pdf_path, "pdf_renderer": used, "sections": records}
