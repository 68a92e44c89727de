"""The report's document model and its two outputs.

A report is a list of `Section`s, each a list of `Block`s (paragraphs, tables, figures, ...) that
the section builders fill with numbers already formatted by `fmt`. `render_html` hands them to the
Jinja2 templates (src/loradrift/templates/: all of the markup); `write_pdf` prints that HTML with
headless Chromium when one is installed, else typesets the same blocks with matplotlib (text
pages and one figure per page), so that a PDF always exists.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loradrift.io import atomic_path

if TYPE_CHECKING:
    import jinja2

log = logging.getLogger("loradrift.report")

TITLE = "loradrift study report"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ---------------------------------------------------------------------------------------------
# formatting


def fmt(v: Any, digits: int = 4) -> str:
    """A cell: floats to `digits` significant digits, big numbers with thousands separators,
    missing and non-finite values as a dash."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()  # numpy scalars
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v == 0:
            return "0"
        if 1e4 <= abs(v) < 1e15:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x, digits)}" for k, x in v.items()) or "—"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    return str(v)


def num(v: Any) -> float | None:
    """`v` as a finite float, or None (booleans, missing, non-numeric and non-finite values)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def verdict_word(v: Any) -> str:
    return {True: "supported", False: "not supported"}.get(v, "undetermined")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(d, dict) and d:
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix or "value"] = d
    return out


def pick_columns(rows: list[dict], preferred: Iterable[str] = ()) -> list[str]:
    """The preferred columns that some row has; if none, every column holding scalars (in
    first-seen order), so an artefact with an unexpected shape still shows its numbers."""
    preferred = list(preferred)
    have = {k for r in rows for k in r}
    cols = [c for c in preferred if c in have]
    if cols:
        return cols
    out: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in out and (scalar(v) or (isinstance(v, dict) and all(scalar(x) for x in v.values()))):
                out.append(k)
    return out


# ---------------------------------------------------------------------------------------------
# the document model: sections of blocks


@dataclass
class Block:
    kind: str  # p | note | missing | h3 | table | pre | figure | verdict | bullets
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes = b""
    items: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    error: str | None = None

    def h3(self, text: str) -> None:
        self.blocks.append(Block("h3", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def bullets(self, items: Iterable[str]) -> None:
        items = [str(i) for i in items]
        if items:
            self.blocks.append(Block("bullets", items=[(i, None) for i in items]))

    def not_run(self, what: str, rel: str, why: str = "is missing") -> None:
        self.missing.append(rel)
        self.blocks.append(Block("missing", f"{what}: not run — {rel} {why}."))

    def pre(self, text: str, caption: str = "") -> None:
        self.blocks.append(Block("pre", caption, rows=[[text]]))

    def figure(self, png: bytes, caption: str) -> None:
        self.blocks.append(Block("figure", caption, png=png))

    def table(self, rows: list[dict], columns: list[str] | None = None, labels: dict[str, str] | None = None,
              caption: str = "") -> None:
        if not rows:
            return
        columns = columns or pick_columns(rows)
        labels = labels or {}
        cells = [[fmt(r.get(c)) for c in columns] for r in rows]
        self.blocks.append(Block("table", caption, columns=[labels.get(c, c) for c in columns], rows=cells))

    def kv(self, mapping: dict, caption: str = "") -> None:
        """A two-column key/value table (nested dicts flattened with dots)."""
        rows = [{"key": k, "value": v} for k, v in flatten(mapping).items()]
        self.table(rows, ["key", "value"], caption=caption)

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if not self.missing:
            return "ok"
        return "not run" if all(b.kind in ("missing", "p", "note", "h3") for b in self.blocks) else "partial"


# ---------------------------------------------------------------------------------------------
# HTML: the markup lives in templates/ (Jinja2); Python hands over the sections as data

# Forbids every external fetch: the report must render from the file alone.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_NUMERIC = re.compile(r"^[-+−]?[\d,]*\.?\d+(e[-+]?\d+)?%?( ± [\d.,e+-]+)?$")


def _unknown_block(kind: str) -> None:
    raise ValueError(f"unknown block kind {kind!r}")


def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("loradrift", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.filters["verdict_word"] = verdict_word
    env.tests["numeric"] = lambda cell: bool(_NUMERIC.match(cell))  # right-aligned, tabular digits
    env.globals["raise_unknown"] = _unknown_block
    return env


def render_html(sections: list[Section], out_dir: Path, generated: str, header: dict[str, str | None],
                parts: dict[str, str]) -> str:
    """The page. `parts`: {section id: the heading of the part of the report it opens}."""
    sections_data = [{"id": s.id, "title": s.title, "number": i, "status": s.status, "blocks": s.blocks,
                      "part_title": parts.get(s.id)} for i, s in enumerate(sections, 1)]
    return _environment().get_template("report.html.j2").render(
        title=TITLE, csp=CSP, out_dir=str(out_dir), generated=generated, header=header, sections=sections_data)


# ---------------------------------------------------------------------------------------------
# PDF: printed by Chromium, else typeset with matplotlib


def write_pdf(sections: list[Section], html_path: Path, pdf_path: Path, generated: str,
              header: dict[str, str | None], renderer: str | None = None) -> str:
    """Write `pdf_path`; returns the renderer used. `renderer` forces one ("chromium" or
    "matplotlib"); by default Chromium when a browser is installed, else matplotlib, and
    matplotlib also when Chromium fails."""
    browser = find_browser() if renderer in (None, "chromium") else None
    if renderer == "chromium" and browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)})")
    if browser:
        try:
            _pdf_chromium(browser, html_path, pdf_path)
            log.info("report: PDF written to %s (renderer: chromium, %s)", pdf_path, browser)
            return "chromium"
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            if renderer == "chromium":
                raise
            log.warning("report: Chromium could not print the PDF (%s); falling back to matplotlib", e)
    _pdf_matplotlib(sections, pdf_path, generated, header)
    log.info("report: PDF written to %s (renderer: matplotlib)", pdf_path)
    return "matplotlib"


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(browser: str, args: list[str], url: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Headless Chromium with a throwaway profile and no network chatter; the whole process group
    is killed on timeout (Chromium's helpers would otherwise outlive it)."""
    with tempfile.TemporaryDirectory(prefix="loradrift-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _pdf_chromium(browser: str, html_path: Path, pdf_path: Path) -> None:
    with atomic_path(pdf_path) as tmp:
        r = run_chromium(browser, [f"--print-to-pdf={tmp}", "--no-pdf-header-footer"], html_path.resolve().as_uri())
        if not tmp.is_file() or tmp.stat().st_size == 0 or tmp.read_bytes()[:5] != b"%PDF-":
            tail = (r.stderr or "").strip().splitlines()[-3:]
            raise RuntimeError(f"{browser} wrote no PDF (exit {r.returncode}): {' | '.join(tail)}")


_PAGE_W, _PAGE_H = 8.27, 11.69  # A4, inches
_FONT = 7.0
_LINE = 10.0 / 72  # inches per line
_WIDTH = 112  # monospace characters per line at _FONT on A4 with margins
_H3_WIDTH = 90  # the same at the bold heading size


def _text_table(columns: list[str], rows: list[list[str]], width: int = _WIDTH, cell: int = 36) -> list[str]:
    def cut(s: str) -> str:
        s = s.replace("\n", " ")
        return s if len(s) <= cell else s[: cell - 1] + "…"

    cols = [cut(c) for c in columns]
    body = [[cut(c) for c in r] for r in rows]
    widths = [max([len(cols[i])] + [len(r[i]) for r in body]) for i in range(len(cols))]
    chunks, cur, used = [], [0], widths[0]
    for i in range(1, len(cols)):  # split wide tables into column groups, repeating the first column
        if used + 2 + widths[i] > width and len(cur) > 1:
            chunks.append(cur)
            cur, used = [0], widths[0]
        cur.append(i)
        used += 2 + widths[i]
    chunks.append(cur)
    lines = []
    def line(r: list[str], ch: list[int]) -> str:
        return "  ".join(r[i].ljust(widths[i]) for i in ch).rstrip()

    for ch in chunks:
        lines += [line(cols, ch), "  ".join("-" * widths[i] for i in ch)] + [line(r, ch) for r in body] + [""]
    return lines


def _section_lines(sec: Section, number: int) -> list[tuple[str, str]]:
    """(style, text) lines; style is title | h3 | text."""
    lines: list[tuple[str, str]] = [("title", f"{number}. {sec.title}"), ("text", "")]
    wrap = lambda s, indent="": [("text", x) for x in textwrap.wrap(s, _WIDTH, subsequent_indent=indent)] or [("text", "")]  # noqa: E731
    for b in sec.blocks:
        if b.kind == "h3":
            lines += [("text", "")] + [("h3", x) for x in textwrap.wrap(b.text, _H3_WIDTH)]
        elif b.kind in ("p", "note"):
            lines += wrap(b.text) + [("text", "")]
        elif b.kind == "missing":
            lines += wrap("!! " + b.text, "   ") + [("text", "")]
        elif b.kind == "bullets":
            for t, _ in b.items:
                lines += [("text", x) for x in textwrap.wrap(t, _WIDTH, initial_indent="- ", subsequent_indent="  ")]
            lines.append(("text", ""))
        elif b.kind == "pre":
            if b.text:
                lines += [("h3", x) for x in textwrap.wrap(b.text, _H3_WIDTH)]
            for raw in b.rows[0][0].splitlines():
                lines += [("text", x) for x in (textwrap.wrap(raw, _WIDTH, drop_whitespace=False) or [""])]
            lines.append(("text", ""))
        elif b.kind == "table":
            if b.text:
                lines += [("h3", x) for x in textwrap.wrap(b.text, _H3_WIDTH)]
            lines += [("text", x) for x in _text_table(b.columns, b.rows)]
        elif b.kind == "verdict":
            lines += [("h3", "Verdict (" + b.text + ")")] + [("text", f"  {n:8} {verdict_word(v)}") for n, v in b.items]
            lines.append(("text", ""))
        elif b.kind == "figure":
            lines.append(("text", f"[figure: {b.text} — on a following page]"))
    return lines


def _pdf_matplotlib(sections: list[Section], pdf_path: Path, generated: str, header: dict[str, str | None]) -> None:
    import matplotlib.image as mpimg
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    per_page = int((_PAGE_H - 1.2) / _LINE)
    style = {"title": dict(fontsize=13, fontweight="bold", family="sans-serif"),
             "h3": dict(fontsize=8.5, fontweight="bold", family="monospace"),
             "text": dict(fontsize=_FONT, family="monospace")}

    def text_page(pdf, lines):
        fig = Figure(figsize=(_PAGE_W, _PAGE_H))
        y = _PAGE_H - 0.6
        for st, t in lines:
            fig.text(0.5 / _PAGE_W, y / _PAGE_H, t, va="top", ha="left", **style[st])
            y -= _LINE * (1.8 if st == "title" else 1.0)
        pdf.savefig(fig)

    with atomic_path(pdf_path) as tmp, PdfPages(tmp) as pdf:
        intro = [("title", TITLE), *[("text", x) for x in textwrap.wrap(header["line"], _WIDTH)], ("text", f"generated {generated}"), ("text", "")]
        if header["warning"]:
            intro += [("h3", line) for line in textwrap.wrap(header["warning"], _H3_WIDTH)] + [("text", "")]
        intro += [("h3", "Contents")]
        intro += [("text", f"{i:2}. {s.title}" + (f"  ({s.status})" if s.status != "ok" else "")) for i, s in enumerate(sections, 1)]
        intro += [("text", ""), ("text", "(PDF drawn with matplotlib: no browser was available; the HTML report has the same content.)")]
        text_page(pdf, intro)
        for i, sec in enumerate(sections, 1):
            lines = _section_lines(sec, i)
            for start in range(0, len(lines), per_page):
                text_page(pdf, lines[start:start + per_page])
            for b in (b for b in sec.blocks if b.kind == "figure"):
                img = mpimg.imread(io.BytesIO(b.png), format="png")
                # Figures are saved at about 100 dpi: show them at that size, shrunk only to fit the page.
                h_in, w_in = img.shape[0] / 100, img.shape[1] / 100
                scale = min(1.0, (_PAGE_W - 1.0) / w_in, (_PAGE_H - 1.6) / h_in)
                w, h = w_in * scale / _PAGE_W, h_in * scale / _PAGE_H
                fig = Figure(figsize=(_PAGE_W, _PAGE_H))
                ax = fig.add_axes((0.5 / _PAGE_W, 1 - 1.0 / _PAGE_H - h, w, h))
                ax.imshow(img)
                ax.set_axis_off()
                fig.text(0.05, 0.95, f"{i}. {sec.title}: {b.text}", fontsize=10, va="top")
                pdf.savefig(fig)
        info = pdf.infodict()
        info["Title"] = TITLE
