"""The study report: one self-contained HTML file and a PDF with the same content.

    loradrift report [--out DIR]          # build_report(out_dir)

Reads artefacts only, never the training code paths, so a report can be rebuilt on any machine
from a copied `<out>` folder:

    study/manifest.json, study/timings.json          setup, presets, reproducibility
    results.sqlite  kind=data|sanity|baseline|memory|run (run rows first reconciled with
                    runs/*/*/*/seed*/result.json, the record of each run: the one write it makes)
    search/report/summary.json, search/report/figures/*.png, configs/best/<model>/*.yaml
    drift/comparison.json, drift/figures/*.png
    weights/summary.json, weights/figures/*.png
    forgetting/summary.json, forgetting/figures/*.png, ablation/rank/*/summary.json and figures/
    serve/overhead.json, serve/results.json, serve/correctness.json, serve/meta.json, serve/figures/*.png
    stats/hypotheses.json

Writes `<out>/report/report.html` (figures as base64 PNG data URIs, inline CSS, a
Content-Security-Policy that forbids any external resource), `<out>/report/sections.json` (each
section's title and status) and `<out>/report/report.pdf`, printed by headless Chromium when one
is installed, else drawn with matplotlib (text pages and one figure per page) so that a PDF always
exists. A section whose artefacts are missing says "not run" and names the missing file; one whose
artefact cannot be read says "error" and names it; it is never dropped. Any other exception in a
section is a bug and fails the report.

The modules, in the order the report is built:

    build.py        SECTIONS (the table of contents) and build_report
    artefacts.py    the artefact reader (Artefacts, ArtefactError) and facts several sections share
    summary.py      the header lines and the summary section
    performance.py, drift.py, secondary.py (weights, forgetting, rank ablation), serving.py,
    hypotheses.py, limitations.py, setup.py (setup, data, sanity, manifest), search.py
                    one family of sections each
    figures.py      the phases' figures with their captions
    render.py       the document model (Section, Block, fmt), the HTML and the two PDF renderers
"""

from loradrift.report import render
from loradrift.report.artefacts import ArtefactError, Artefacts
from loradrift.report.build import PARTS, SECTIONS, build_report, build_sections
from loradrift.report.render import TITLE, Section, find_browser, fmt, run_chromium

__all__ = ["build_report", "build_sections", "find_browser", "run_chromium", "fmt", "TITLE", "SECTIONS", "PARTS",
           "Artefacts", "ArtefactError", "Section", "render"]
