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
Content-Security-Policy that forbids any external resource) and `<out>/report/report.pdf`,
printed by headless Chromium when one is installed, else drawn with matplotlib (text pages and
one figure per page) so that a PDF always exists. A section whose artefacts are missing says
"not run" and names the missing file; it is never dropped.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from loradrift.io import ResultsStore, atomic_path, atomic_write_text, reconcile_store
from loradrift.tasks import TASKS

log = logging.getLogger(__name__)

TITLE = "loradrift study report"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SERVE_NOTE = ("The adapters were trained with a task head (a classifier or span head on top of the "
              "transformer), but only the transformer-block LoRA weights are served: the serving "
              "benchmark measures generation with the language-model head, so it times the adapter "
              "mechanics, not the task predictions.")

__all__ = ["build_report", "find_browser", "run_chromium", "fmt", "TITLE"]


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


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _verdict_word(v: Any) -> str:
    return {True: "supported", False: "not supported"}.get(v, "undetermined")


# ---------------------------------------------------------------------------------------------
# the document model: sections of blocks, rendered to HTML and (as a fallback) to matplotlib pages


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
        rows = [{"key": k, "value": v} for k, v in _flatten(mapping).items()]
        self.table(rows, ["key", "value"], caption=caption)

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if not self.missing:
            return "ok"
        return "not run" if all(b.kind in ("missing", "p", "note", "h3") for b in self.blocks) else "partial"


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
            if k not in out and (_scalar(v) or (isinstance(v, dict) and all(_scalar(x) for x in v.values()))):
                out.append(k)
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict) and d:
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix or "value"] = d
    return out


# ---------------------------------------------------------------------------------------------
# reading artefacts


class Artefacts:
    """Read access to one `<out>` folder. Missing files are None, never created; the one write is
    the results store's reconciliation with the run folders (`reconcile_store`)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self._rows: dict[str, list[dict]] | None = None

    def rel(self, path: Path | str) -> str:
        try:
            return str(Path(path).relative_to(self.out))
        except ValueError:
            return str(path)

    def json(self, rel: str) -> Any:
        """Parsed JSON, or None when the file is missing; an unreadable file raises (the section
        then reports the error instead of pretending the step did not run)."""
        p = self.out / rel
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def pngs(self, rel_dir: str) -> list[Path]:
        d = self.out / rel_dir
        return sorted(d.glob("*.png")) if d.is_dir() else []

    @property
    def store_path(self) -> Path:
        return self.out / "results.sqlite"

    def rows(self, kind: str) -> list[dict] | None:
        """Result rows of one kind, or None when there is no results store at all. The run rows
        are first reconciled with the run folders (their result.json is the record)."""
        if self._rows is None:
            reconcile_store(self.out)
        if not self.store_path.is_file():
            return None
        if self._rows is None:
            self._rows = {}
            for r in ResultsStore(self.store_path).rows():
                self._rows.setdefault(r["kind"], []).append(r)
        return self._rows.get(kind, [])


def _latest(rows: list[dict], key: Callable[[dict], tuple]) -> tuple[list[dict], int]:
    """The newest row per key, and how many older rows were left out (reruns with another
    config hash leave their old rows in the store)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = key(r)
        if k not in best or r.get("created", 0) >= best[k].get("created", 0):
            best[k] = r
    return list(best.values()), len(rows) - len(best)


def _task_order(task: str) -> tuple[int, str]:
    names = list(TASKS)
    return (names.index(task) if task in names else len(names), task)


def _method_order(m: str) -> tuple[int, str]:
    return ({"full": 0, "lora": 1}.get(m, 2), m)


# What to see in each figure the phases draw, by file name (the first pattern that matches).
FIGURE_CAPTIONS: list[tuple[str, str]] = [
    (r"final_by_layer_(?P<x>.+)", "{x}: drift from the base model at the end of training, per layer (0 = the "
     "embeddings), LoRA vs full fine-tuning, band = min–max over seeds. Where the LoRA line lies below the full-FT "
     "line, LoRA moved the representations less; the transformer-block layers are what H2 pools."),
    (r"heatmap_(?P<x>.+)", "{x}: drift per layer (rows) over training steps (columns), mean over seeds, one panel "
     "per method; CKA drift in the top row, cosine drift below. Compare the panels row by row: when and in which "
     "layers the colour darkens shows where each method moves the representations."),
    (r"over_training_(?P<x>.+)", "{x}: drift from the base model over training, averaged over the transformer-block "
     "layers that H2 pools, line = mean over seeds, band = min–max over seeds; linear CKA (left) and cosine (right), "
     "the two computed at every snapshot. A LoRA curve under the full-FT curve all along means LoRA moved the "
     "representations less throughout training, not only at its end."),
    (r"weights_by_layer_(?P<x>.+)", "{x}: relative update norm ‖ΔW‖/‖W‖ (left) and intruder dimensions (right) "
     "per layer, band = min–max over seeds. The levels show how far each method moved the weights, and where it "
     "added directions the base weights did not have."),
    (r"(?P<x>.+)_history", "{x}: the validation score of each search trial in order (dots) and the best so far "
     "(line). A line that flattens early means more trials would have changed little."),
    (r"(?P<x>.+)_slice", "{x}: the validation score against each searched parameter, one dot per trial. A trend or "
     "a peak in a panel marks a parameter that matters; a flat cloud, one that does not."),
    (r"latency", "Mean request latency against batch size per serving configuration. The gap between the adapters-k "
     "lines and the merged models is the multi-adapter overhead that H3 tests."),
]


def caption(stem: str) -> str:
    for pattern, text in FIGURE_CAPTIONS:
        m = re.fullmatch(pattern, stem)
        if m:
            return text.format(**m.groupdict())
    return stem.replace("_", " ")


def _figures(sec: Section, art: Artefacts, rel_dir: str, what: str, skip: str | None = None, gated: bool = False) -> None:
    """Every PNG of `rel_dir` with its caption, but those whose name matches `skip` (shown elsewhere).
    `gated`: the figures show runs, so a caption over a task that did not learn says so."""
    pngs = [p for p in art.pngs(rel_dir) if not (skip and re.fullmatch(skip, p.stem))]
    if not pngs:
        sec.note(f"No {'other ' if skip else ''}figures: {rel_dir}/ holds no {'other ' if skip else ''}PNG files.")
        return
    sec.h3(f"{what} ({rel_dir}/)")
    for p in pngs:
        sec.figure(p.read_bytes(), caption(p.stem) + (_not_learned_caveat(art, p.stem) if gated else ""))


def _not_learned(art: Artefacts) -> list[str]:
    """The tasks the learning gate of stats/hypotheses.json found not learned, in task order."""
    hyp = art.json("stats/hypotheses.json")
    gate = (hyp.get("learning_gate") or {}) if isinstance(hyp, dict) else {}
    return sorted(gate.get("not_learned") or {}, key=_task_order)


def _steps_by_task(runs: list[dict]) -> dict[str, str]:
    """{task: the optimizer steps of its final runs, '80' or '4/8' where runs differ}."""
    steps: dict[str, set] = {}
    for r in runs:
        steps.setdefault(r["task"], set()).add((r["metrics"] or {}).get("steps"))
    return {t: "/".join(fmt(v) for v in sorted(x for x in v if x is not None)) or "?" for t, v in steps.items()}


def _not_learned_caveat(art: Artefacts, stem: str) -> str:
    """A figure over runs of a task that either method did not learn shows the pipeline, not
    evidence about LoRA (the learning gate of stats/hypotheses.json); its caption says so."""
    not_learned = _not_learned(art)
    named = [t for t in TASKS if re.search(rf"(^|_){re.escape(t)}($|_)", stem)]
    bad = [t for t in named if t in not_learned] if named else not_learned
    if not bad:
        return ""
    if named:
        return f" ({', '.join(bad)}: did not learn, so no conclusion about LoRA)"
    return f" (includes runs of {', '.join(bad)}, which did not learn: no conclusion about LoRA from those)"


def _primary(task: str) -> str | None:
    spec = TASKS.get(task)
    return spec.primary if spec else None


def _rows_of(obj: Any, *keys: str) -> list[dict] | None:
    """A list of row dicts from a list, or from a dict holding one under one of `keys`."""
    if isinstance(obj, list):
        return [r for r in obj if isinstance(r, dict)]
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), list):
                return [r for r in obj[k] if isinstance(r, dict)]
    return None


# ---------------------------------------------------------------------------------------------
# sections

DRIFT_BY_LAYER = r"final_by_layer_.+"  # drift.py's final drift per layer, LoRA vs FT: the summary's figure


def sec_summary(art: Artefacts) -> Section:
    """One screen: the verdicts with their intervals and reasons, the scores against the baselines,
    and the drift by layer. The sections after it hold the evidence for each line."""
    sec = Section("summary", "Summary")
    h = art.json("stats/hypotheses.json")
    if h is None:
        sec.not_run("Verdicts", "stats/hypotheses.json")
    else:
        v = h.get("verdict") or {}
        sec.blocks.append(Block("verdict", v.get("rule", "H1 AND (H2 OR H3)"),
                                items=[(k, v.get(k)) for k in ("H1", "H2", "H3", "overall")]))
        sec.table(_primary_rows(h), ["scope", "estimate", "_ci", "_h0", "decision", "reason"], labels=_RESULT_LABELS,
                  caption="The three primary tests: estimate, interval at the corrected level, and why each is decided "
                          "as it is (details in Hypotheses)")
        sec.table(_verdict_scope(h), ["hypothesis", "decided on", "not decided on"],
                  caption="Scope of the verdicts: the tasks (or serving backend) each hypothesis was decided on, and "
                          "those left undetermined with the reason. " + _model_scale(art))
        _h3_backend_lines(sec, h)
    meta = art.json("serve/meta.json")
    findings = meta.get("findings") if isinstance(meta, dict) else None
    if findings:
        sec.note("Serving: adapter(s) whose outputs equal the base model's, so they change nothing the correctness "
                 "check can see (details in Serving benchmark): " + "; ".join(findings))
    if not art.store_path.is_file():
        sec.not_run("Scores", "results.sqlite")
    else:
        rows, base, _ = performance_table(art)
        if not rows:
            sec.not_run("Scores", "results.sqlite", 'has no kind="run" rows')
        else:
            methods = sorted({r["method"] for r in rows}, key=_method_order)
            label = {"full": "full FT", "lora": "LoRA"}
            table = []
            for key in sorted({(r.get("model", ""), r["task"]) for r in rows}, key=lambda k: (k[0], _task_order(k[1]))):
                row = {"model": key[0], "task": key[1], "metric": _primary(key[1])}
                for r in rows:
                    if (r.get("model", ""), r["task"]) == key:
                        row[r["method"]] = _mean_ci(r)
                row["baselines"] = {b["method"].split(": ", 1)[-1]: b["mean"] for b in base
                                    if (b.get("model", ""), b["task"]) == key} or None
                row["bar"] = (((h or {}).get("learning_gate") or {}).get("bars") or {}).get(key[1], {}).get("bar")
                table.append(row)
            cols = (["model"] if "model" in rows[0] else []) + ["task", "metric", *methods, "baselines", "bar"]
            sec.table(table, cols, labels={**{m: f"{label.get(m, m)} (mean ± 95% CI)" for m in methods},
                                           "bar": "learning bar (H1's metric)"},
                      caption="Dev score per task against the baselines, and the bar a method must beat by more "
                              "than its seed spread to have learned the task (details in Performance, Hypotheses)")
    figs = [p for p in art.pngs("drift/figures") if re.fullmatch(DRIFT_BY_LAYER, p.stem)]
    if not figs:
        sec.not_run("Drift by layer", "drift/figures/final_by_layer_<task>.png", "is missing")
    for p in figs:
        sec.figure(p.read_bytes(), caption(p.stem) + _not_learned_caveat(art, p.stem))
    return sec


def _verdict_scope(h: dict) -> list[dict]:
    """Per hypothesis, the scopes it was decided on and those it was not, with the short reason: a
    verdict reads differently when one task of four carries it."""
    rows = []
    for name in ("H1", "H2"):
        res = [r for r in _results(h)[name] if r.get("scope") != "pooled"]
        pooled = next((r for r in _results(h)[name] if r.get("scope") == "pooled"), None)
        decided = [f"{r['scope']} ({r.get('decision')})" for r in res if r.get("decision") != "undetermined"]
        undecided = [f"{r['scope']} ({_short_reason(r.get('reason'))})" for r in res if r.get("decision") == "undetermined"]
        if pooled is not None:
            (decided if pooled.get("decision") != "undetermined" else undecided).append(
                f"pooled, primary ({pooled.get('decision') if pooled.get('decision') != 'undetermined' else _short_reason(pooled.get('reason'))})")
        rows.append({"hypothesis": name, "decided on": ", ".join(decided) or "nothing",
                     "not decided on": ", ".join(undecided) or "–"})
    info = h.get("H3_backend") or {}
    where = f"{info.get('backend', '?')} backend on {info.get('device', '?')}" if info else "no serving benchmark"
    if not _results(h)["H3"]:
        rows.append({"hypothesis": "H3", "decided on": "nothing", "not decided on": where})
    elif info.get("pre_registered", True):
        rows.append({"hypothesis": "H3", "decided on": where, "not decided on": "–"})
    else:
        rows.append({"hypothesis": "H3", "decided on": f"{where}: secondary evidence only",
                     "not decided on": "the pre-registered H3 (needs vLLM)"})
    return rows


def _short_reason(reason: Any) -> str:
    text = str(reason or "").removeprefix("undetermined: ")
    for key, short in (("built on undetermined", "built on undetermined tasks"), ("every task is undetermined", None),
                       ("did not learn", None), ("no spread between seeds", None), ("too few seeds", None),
                       ("noise floor", "drift within the noise floor")):
        if key in text:
            return short or key
    return text[:80] + ("…" if len(text) > 80 else "")


def _model_scale(art: Artefacts) -> str:
    """Which model and how much training, in one sentence, from the manifest and the run rows."""
    man = art.json("study/manifest.json") or {}
    model = ((man.get("config") or {}).get("model") or {}).get("name")
    if not model:
        return "Model and scale: unknown (study/manifest.json is missing)."
    n = (man.get("model_info") or {}).get("parameters") if isinstance(man.get("model_info"), dict) else None
    dev = man.get("device") or {}
    where = dev.get("gpu") or ("CUDA GPU" if dev.get("cuda") else "CPU")
    data = {r["task"]: r["metrics"] for r in _latest(art.rows("data") or [], lambda r: (r["model"], r["task"]))[0]}
    steps = _steps_by_task(art.rows("run") or [])
    parts = []
    for t in sorted(set(data) | set(steps), key=_task_order):
        d = data.get(t) or {}
        parts.append(f"{t} {steps.get(t, '?')} steps on {fmt(d.get('train_used'))} train examples, dev {fmt(d.get('dev_used'))} of "
                     f"{fmt(d.get('dev_rows'))}")
    return (f"Model {model}" + (f" ({fmt(int(n))} parameters)" if n else "") + f", preset {man.get('preset', '?')}, "
            f"trained on {where}; per final run: " + ("; ".join(parts) or "no runs") + ".")


def _h3_backend_lines(sec: Section, h: dict) -> None:
    """What H3 was measured on, where that is not the pre-registered vLLM on a GPU: on the PEFT
    backend its result is shown as secondary evidence; on vLLM's CPU build it is no GPU figure."""
    info = h.get("H3_backend") or {}
    if not info.get("note"):
        return
    if info.get("pre_registered"):
        sec.note(info["note"])
        return
    # the verdict's H3 row already gives the reason; here the PEFT result itself
    at = [r for r in _results(h)["H3"] if str(r.get("scope", "")).endswith(f"batch={(h.get('settings') or {}).get('h3_batch', 8)}")]
    sec.table([_result_row(r) for r in at], ["scope", "estimate", "_ci", "_h0", "decision", "reason"],
              labels=_RESULT_LABELS, caption="H3 on the PEFT backend, not vLLM: secondary evidence, not in the verdict")


def sec_setup(art: Artefacts) -> Section:
    sec = Section("setup", "Setup and presets")
    man = art.json("study/manifest.json")
    if man is None:
        sec.not_run("Study manifest", "study/manifest.json")
    else:
        cfg = man.get("config") or {}
        model = cfg.get("model") or {}
        study = cfg.get("study") or {}
        sec.table([{
            "preset": man.get("preset"), "model": model.get("name"), "max_length": model.get("max_length"),
            "tasks": ", ".join(study.get("tasks", [])) or None, "methods": ", ".join(study.get("methods", [])) or None,
            "seeds": ", ".join(str(s) for s in study.get("seeds", [])) or None, "started": man.get("started"),
        }], caption="Study")
        keys = {"data": ["max_train_examples", "max_val_examples", "max_dev_examples"],
                "train": ["max_steps", "batch_size", "grad_accum", "lr", "lr_full", "lr_lora", "warmup_ratio", "weight_decay"],
                "method": ["name", "lora"], "probe": ["size", "snapshot_every"], "search": ["trials", "trial_max_steps"]}
        shown = {f"{grp}.{k}": (cfg.get(grp) or {}).get(k) for grp, ks in keys.items() for k in ks
                 if k in (cfg.get(grp) or {})}
        if shown:
            sec.kv(shown, caption="Key settings of the resolved config (the full config is in the reproducibility manifest)")
        by_task = man.get("configs_by_task") or {}
        diffs = []
        base_flat = _flatten({k: cfg.get(k) for k in ("model", "data", "train", "probe", "method")})
        for task, tcfg in sorted(by_task.items(), key=lambda kv: _task_order(kv[0])):
            for k, v in _flatten(tcfg).items():
                if base_flat.get(k, object()) != v:
                    diffs.append({"task": task, "setting": k, "value": v, "default": base_flat.get(k)})
        if diffs:
            sec.table(diffs, caption="Per-task settings that differ from the study config (preset per_task blocks)")
        elif by_task:
            sec.p("Every task uses the study config unchanged.")
    tim = art.json("study/timings.json")
    if tim is None:
        sec.not_run("Phase timings", "study/timings.json")
    else:
        rows = [{"phase": p.get("phase"), "seconds": p.get("seconds"),
                 "minutes": (p["seconds"] / 60 if _num(p.get("seconds")) is not None else None)}
                for p in tim.get("phases", [])]
        if _num(tim.get("total_seconds")) is not None:
            rows.append({"phase": "total", "seconds": tim["total_seconds"], "minutes": tim["total_seconds"] / 60})
        sec.table(rows, ["phase", "seconds", "minutes"], caption="Wall-clock time per phase")
        if tim.get("finished"):
            sec.p(f"Finished {tim['finished']}" + (f"; tasks: {', '.join(tim['tasks'])}." if tim.get("tasks") else "."))
    return sec


def sec_data(art: Artefacts) -> Section:
    sec = Section("data", "Data and splits")
    rows = art.rows("data")
    if rows is None:
        sec.not_run("Data summary", "results.sqlite")
        return sec
    if not rows:
        sec.not_run("Data summary", "results.sqlite", 'has no kind="data" rows (Phase 0 data check)')
        return sec
    rows, _ = _latest(rows, lambda r: (r["model"], r["task"]))
    multi = len({r["model"] for r in rows}) > 1
    out = [{"model": r["model"], **r["metrics"]} for r in sorted(rows, key=lambda r: (r["model"], _task_order(r["task"])))]
    cols = (["model"] if multi else []) + ["task", "source", "train_rows", "dev_rows", "dev_labels", "train_used",
                                            "val_used", "dev_used", "train_used_labels"]
    sec.p("Rows in the task files, and the subsets this study used. Validation is carved from the "
          "training file (used for early stopping, the search and the SQuAD no-answer threshold); "
          "dev is the held-out test set every score below is measured on.")
    sec.table(out, [c for c in cols if any(c in r for r in out)],
              labels={"dev_labels": "dev labels", "train_used_labels": "train labels (used)"})
    return sec


def _latest_metrics(rows: list[dict]) -> list[dict]:
    """The metrics of the newest row per (model, task, method), in task then method order."""
    rows, _ = _latest(rows, lambda r: (r["model"], r["task"], r["method"]))
    return [r["metrics"] for r in sorted(rows, key=lambda r: (_task_order(r["task"]), _method_order(r["method"])))]


def sec_sanity(art: Artefacts) -> Section:
    sec = Section("sanity", "Sanity checks and baselines")
    if not art.store_path.is_file():
        sec.not_run("Sanity checks, baselines and memory profile", "results.sqlite")
        return sec
    sec.h3("Sanity checks (overfit a small training sample)")
    rows = art.rows("sanity")
    if rows:
        out = _latest_metrics(rows)
        sec.table(out, pick_columns(out, ["task", "method", "examples", "steps", "metric", "score", "threshold",
                                          "passed", "seconds"]))
        failed = [f"{r.get('task')}/{r.get('method')}" for r in out if r.get("passed") is False]
        sec.p("All sanity checks passed." if not failed else f"FAILED: {', '.join(failed)}.")
    else:
        sec.not_run("Sanity checks", "results.sqlite", 'has no kind="sanity" rows')
    sec.h3("Baselines on dev")
    rows = art.rows("baseline")
    if rows:
        rows, _ = _latest(rows, lambda r: (r["model"], r["task"], r["method"]))
        by_kind: dict[str, list[dict]] = {}
        for r in sorted(rows, key=lambda r: (_task_order(r["task"]), r["method"])):
            kind = TASKS[r["task"]].kind if r["task"] in TASKS else "other"
            by_kind.setdefault(kind, []).append({"baseline": r["method"], "task": r["task"], **r["metrics"]})
        pref = {"classification": ["baseline", "task", "predicts", "dev_examples", "accuracy", "f1", "combined_score"],
                "extractive_qa": ["baseline", "task", "dev_examples", "exact", "f1", "HasAns_exact", "HasAns_f1",
                                  "NoAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"]}
        for kind, out in by_kind.items():
            sec.table(out, pick_columns(out, pref.get(kind, [])), caption=kind.replace("_", " "))
    else:
        sec.not_run("Baselines", "results.sqlite", 'has no kind="baseline" rows')
    sec.h3("Peak training memory")
    rows = art.rows("memory")
    if rows:
        out = _latest_metrics(rows)
        sec.table(out, pick_columns(out, ["task", "method", "batch_size", "grad_accum", "max_length", "device",
                                          "peak_memory_mb", "seconds_per_step"]))
        if any(str(r.get("device", "")).startswith("cpu") for r in out):
            sec.note("On CPU the peak is the process's peak resident memory (a high-water mark that includes "
                     "the Python process and the loaded model), not the training step alone.")
    else:
        sec.not_run("Memory profile", "results.sqlite", 'has no kind="memory" rows')
    return sec


def sec_search(art: Artefacts) -> Section:
    sec = Section("search", "Hyperparameter search and best configs")
    summary = art.json("search/report/summary.json")
    if summary is None:
        sec.not_run("Search summary", "search/report/summary.json")
    else:
        entries = _rows_of(summary, "studies")
        if entries is None and isinstance(summary, dict):
            entries = [{"study": k, **v} for k, v in summary.items() if isinstance(v, dict)]
        entries = entries or []
        if not entries:
            sec.p("The search summary lists no studies.")
        rows = []
        for e in entries:
            states = e.get("states") or e.get("n_trials_by_state")
            rows.append({**{k: v for k, v in e.items() if _scalar(v)},
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
                           "importances": dict(sorted(imp.items(), key=lambda kv: -(_num(kv[1]) or 0))) if isinstance(imp, dict) and imp else e.get("importance_note")})
        if detail:
            sec.table(detail, ["study", "best params", "importances"], caption="Best parameters and parameter importances")
    _figures(sec, art, "search/report/figures", "Search figures")
    sec.h3("Best configs (configs/best/)")
    yamls = sorted((art.out / "configs" / "best").glob("*/*.yaml")) if (art.out / "configs" / "best").is_dir() else []
    if not yamls:
        sec.not_run("Best configs", "configs/best/<model>/*.yaml", "are missing")
    for y in yamls:
        sec.pre(y.read_text(), art.rel(y))
    return sec


def _t_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided t-interval; the interval is undefined (nan) for n < 2."""
    import numpy as np
    from scipy import stats

    a = np.asarray(values, dtype=float)
    m = float(a.mean()) if len(a) else float("nan")
    if len(a) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return m, m - half, m + half


def performance_table(art: Artefacts) -> tuple[list[dict], list[dict], list[str]]:
    """(rows per task × method with mean, CI and per-seed values; baseline rows; notes)."""
    runs = art.rows("run") or []
    notes = []
    runs, dropped = _latest(runs, lambda r: (r["model"], r["task"], r["method"], r["seed"]))
    if dropped:
        notes.append(f"{dropped} older run row(s) of the same model, task, method and seed (another config "
                     f"hash) were left out; the newest row of each is used.")
    groups: dict[tuple, dict[int, float]] = {}
    for r in runs:
        metric = _primary(r["task"])
        dev = (r["metrics"] or {}).get("dev") or {}
        v = _num(dev.get(metric)) if metric else None
        if v is None:
            notes.append(f"run {r['task']}/{r['method']}/seed{r['seed']}: no dev {metric!r} value")
            continue
        groups.setdefault((r["model"], r["task"], r["method"]), {})[r["seed"]] = v
    multi = len({k[0] for k in groups}) > 1
    rows = []
    for (model, task, method), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0], _task_order(kv[0][1]), _method_order(kv[0][2]))):
        vals = [by_seed[s] for s in sorted(by_seed)]
        m, lo, hi = _t_ci(vals)
        rows.append({**({"model": model} if multi else {}), "task": task, "metric": _primary(task), "method": method,
                     "n": len(vals), "mean": m, "ci": [lo, hi] if len(vals) > 1 else None,
                     "half": (hi - lo) / 2 if len(vals) > 1 else None, "per_seed": {str(s): by_seed[s] for s in sorted(by_seed)}})
    base = []
    brows, _ = _latest(art.rows("baseline") or [], lambda r: (r["model"], r["task"], r["method"]))
    for r in sorted(brows, key=lambda r: (_task_order(r["task"]), r["method"])):
        metric = _primary(r["task"])
        v = _num((r["metrics"] or {}).get(metric)) if metric else None
        if v is not None:
            base.append({**({"model": r["model"]} if multi else {}), "task": r["task"], "metric": metric,
                         "method": f"baseline: {r['method']}", "n": None, "mean": v, "ci": None, "half": None, "per_seed": None})
    return rows, base, notes


def _mean_ci(r: dict) -> str:
    return fmt(r["mean"]) + ("" if r["half"] is None else f" ± {fmt(r['half'])}")


def _bar_chart(rows: list[dict], base: list[dict]) -> bytes:
    import numpy as np
    from matplotlib.figure import Figure

    tasks = sorted({r["task"] for r in rows}, key=_task_order)
    n = len(tasks)
    fig = Figure(figsize=(min(3.4 * n, 13), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    colors = {"full": "#4C72B0", "lora": "#DD8452"}
    for ax, task in zip(axes, tasks):
        rs = [r for r in rows if r["task"] == task]
        x = np.arange(len(rs))
        err = [r["half"] if r["half"] is not None else 0.0 for r in rs]
        ax.bar(x, [r["mean"] for r in rs], yerr=err, capsize=4, color=[colors.get(r["method"], "#8c8c8c") for r in rs])
        for i, r in enumerate(rs):
            seeds = list(r["per_seed"].values())
            ax.scatter([i] * len(seeds), seeds, s=12, color="black", zorder=3)
        for j, b in enumerate(r for r in base if r["task"] == task):
            ax.axhline(b["mean"], ls="--", lw=1, color=f"C{j + 2}", label=b["method"].split(": ", 1)[-1])
        ax.set_xticks(x, [r["method"] for r in rs])
        ax.set_title(f"{task} (dev {_primary(task)})", fontsize=9)
        if any(b["task"] == task for b in base):
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Dev score: mean over seeds, 95% t-interval, seeds as dots, baselines dashed", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def sec_performance(art: Artefacts) -> Section:
    sec = Section("performance", "Performance")
    if not art.store_path.is_file():
        sec.not_run("Final runs", "results.sqlite")
        return sec
    rows, base, notes = performance_table(art)
    if not rows:
        sec.not_run("Final runs (Phase 2)", "results.sqlite", 'has no kind="run" rows')
    else:
        sec.p("Primary dev metric per task (mrpc: mean of accuracy and F1, sst2/rte: accuracy, squad_v2: F1). "
              "Mean over seeds with a two-sided 95% t-interval (scipy.stats.t, n − 1 degrees of freedom; "
              "n is the number of seeds); baselines are single dev scores, for reference.")
        table = []
        for r in [*rows, *base]:
            table.append({**r, "_ci": ("—" if r["ci"] is None else f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]"),
                          "_pm": _mean_ci(r)})
        table.sort(key=lambda r: (r.get("model", ""), _task_order(r["task"]), r["method"].startswith("baseline"), _method_order(r["method"])))
        cols = (["model"] if "model" in rows[0] else []) + ["task", "metric", "method", "n", "_pm", "_ci", "per_seed"]
        sec.table(table, cols, labels={"_pm": "mean ± 95% CI half-width", "_ci": "95% CI", "per_seed": "per seed"})
        if any(r["n"] < 2 for r in rows):
            sec.note("A group with a single seed has no confidence interval.")
        sec.figure(_bar_chart(rows, base), "Dev score by task and method")
        eff = []
        runs, _ = _latest(art.rows("run") or [], lambda r: (r["model"], r["task"], r["method"], r["seed"]))
        groups: dict[tuple, list[dict]] = {}
        for r in runs:
            groups.setdefault((r["task"], r["method"]), []).append(r["metrics"] or {})
        for (task, method), ms in sorted(groups.items(), key=lambda kv: (_task_order(kv[0][0]), _method_order(kv[0][1]))):
            row: dict[str, Any] = {"task": task, "method": method, "n": len(ms)}
            for k in ("steps", "trainable_params", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb"):
                vals = [_num(m.get(k)) for m in ms if _num(m.get(k)) is not None]
                if vals:
                    mean = sum(vals) / len(vals)
                    row[k] = int(round(mean)) if k in ("steps", "trainable_params") else mean
            eff.append(row)
        sec.table(eff, pick_columns(eff, ["task", "method", "n", "steps", "trainable_params", "train_time_s",
                                          "wall_time_s", "tokens_per_s", "peak_memory_mb"]),
                  caption="Training cost (means over seeds)")
    sec.bullets(notes)
    return sec


def sec_drift(art: Artefacts) -> Section:
    sec = Section("drift", "Drift")
    comp = art.json("drift/comparison.json")
    if comp is None:
        sec.not_run("Drift comparison", "drift/comparison.json")
    else:
        items = ([(r.get("task"), r) for r in comp] if isinstance(comp, list)
                 else [(t, c) for t, c in comp.items() if isinstance(c, dict)])
        items.sort(key=lambda kv: _task_order(str(kv[0])))
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
            pm = lambda m, sd: fmt(m) + ("" if _num(sd) is None else f" ± {fmt(sd)}")  # noqa: E731
            ci = c.get("probe_ci")
            level = _num(c.get("ci_level"))
            main.append({"task": task, "primary_metric": c.get("primary_metric"), "aggregate_layers": c.get("aggregate_layers"),
                         "_n": f"{fmt(nf)} / {fmt(nl)}",
                         "_ft": pm(c.get("drift_full"), c.get("drift_full_sd")),
                         "_lo": pm(c.get("drift_lora"), c.get("drift_lora_sd")),
                         "reduction_pct": c.get("reduction_pct"), "noise_floor": c.get("noise_floor"),
                         "_ci": "—" if not ci or all(_num(x) is None for x in ci) else f"[{fmt(ci[0])}, {fmt(ci[1])}]"
                                + (f" ({fmt(level * 100)}%)" if level else ""),
                         "perm_p": c.get("perm_p"),
                         "_perm": f"{fmt(c.get('perm_n_relabellings'))}" + (f" ({c['perm_kind']})" if c.get("perm_kind") else ""),
                         "perm_min_p": c.get("perm_min_p")})
            e = {"task": task, "_l0": f"{fmt(c.get('drift_layer0_full'))} / {fmt(c.get('drift_layer0_lora'))}",
                 "_last": f"{fmt(c.get('drift_last_full'))} / {fmt(c.get('drift_last_lora'))}",
                 "cos_drift_full": c.get("cos_drift_full"), "cos_drift_lora": c.get("cos_drift_lora"),
                 "cos_reduction_pct": c.get("cos_reduction_pct")}
            e.update({k: v for k, v in c.items() if k not in shown and k not in skip and _scalar(v)})
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
    _figures(sec, art, "drift/figures", "Drift figures", skip=DRIFT_BY_LAYER, gated=True)
    return sec


def sec_weights(art: Artefacts) -> Section:
    sec = Section("weights", "Weight-space analysis")
    w = art.json("weights/summary.json")
    if w is None:
        sec.not_run("Weight analysis", "weights/summary.json")
    else:
        sec.p("Per run: the weight update ΔW of every adapted projection relative to the base weight "
              "(‖ΔW‖/‖W‖), its effective rank, and intruder dimensions (singular vectors of the tuned "
              "weight that are far from every base singular vector).")
        if isinstance(w, dict) and w.get("settings"):
            sec.kv(w["settings"], caption="Settings")
        summ = _rows_of(w, "summary") or []
        by_task = w.get("by_task") if isinstance(w, dict) else None
        if isinstance(by_task, dict) and by_task:
            rows = [{"task": t, "method": m, **(v if isinstance(v, dict) else {})}
                    for t, ms in sorted(by_task.items(), key=lambda kv: _task_order(kv[0]))
                    for m, v in sorted(ms.items(), key=lambda kv: _method_order(kv[0]))]
            sec.table(rows, pick_columns(rows, ["task", "method", "n_seeds", "mean_rel_norm", "mean_effective_rank",
                                                "total_intruders"]), caption="Means over seeds")
        summ.sort(key=lambda r: (_task_order(str(r.get("task"))), _method_order(str(r.get("method"))), r.get("seed", 0)))
        sec.table(summ, pick_columns(summ, ["task", "method", "seed", "n_modules", "mean_rel_norm",
                                            "mean_effective_rank", "total_intruders"]), caption="Per run")
        if not summ:
            sec.p("The weight summary lists no runs.")
    _figures(sec, art, "weights/figures", "Weight figures", gated=True)
    return sec


def sec_forgetting(art: Artefacts) -> Section:
    sec = Section("forgetting", "Forgetting (secondary, not pre-registered)")
    f = art.json("forgetting/summary.json")
    if f is None:
        sec.not_run("Forgetting", "forgetting/summary.json", "is missing (forgetting.enabled=false, or Phase 3 did not run)")
        return sec
    text, st, base = f.get("text") or {}, f.get("settings") or {}, f.get("base") or {}
    sec.p(f"{str(f.get('label', '')).capitalize()}: not one of the plan's hypotheses and not in the verdict. "
          f"{f.get('definition', '')}. Text: {fmt(text.get('paragraphs'))} paragraphs of {fmt(text.get('articles'))} "
          f"Wikipedia articles ({fmt(text.get('tokens'))} predicted tokens, at most {fmt(st.get('max_tokens'))} tokens each), "
          f"a seeded sample (seed {fmt(st.get('seed'))}) of the {fmt(text.get('pool_paragraphs'))} deduplicated SQuAD v2 dev "
          f"contexts outside the SQuAD v2 train articles ({text.get('source', '')}). No run trains on them; the squad_v2 "
          f"runs read some of them only in forward passes (dev score, probe set). Base model loss: "
          f"{fmt(base.get('loss'))} nats/token. Interval: Student t over seeds at {fmt(100 * st.get('confidence', 0.95))}%.")
    rows = [{**g, "_ci": "—" if g.get("ci_low") is None else f"[{fmt(g['ci_low'])}, {fmt(g['ci_high'])}]"}
            for g in sorted(f.get("by_task_method") or [], key=lambda g: (_task_order(g["task"]), _method_order(g["method"])))]
    sec.table(rows, ["task", "method", "n", "mean", "_ci"], labels={"mean": "mean Δloss", "_ci": "CI of Δloss"},
              caption="Δloss by task and method (positive: the run predicts general text worse than the base model)")
    # the gated correlations (stats/hypotheses.json applies the learning gate to this summary)
    hyp = art.json("stats/hypotheses.json")
    gated = ((hyp.get("secondary_analyses") or {}).get("forgetting") or {}).get("correlation") if isinstance(hyp, dict) else None
    corr = gated or f.get("correlation") or {}
    crows = [{"scope": "all runs", **corr.get("pooled", {})}]
    crows += [{"scope": f"task {t}", **c} for t, c in (corr.get("by_task") or {}).items()]
    crows += [{"scope": f"method {m}", **c} for m, c in (corr.get("by_method") or {}).items()]
    sec.table(crows, ["scope", "n", "rho", "p_value", "min_p", "decision", "reason"],
              labels={"rho": "Spearman rho", "p_value": "permutation p", "min_p": "smallest attainable p"},
              caption="Does the representation that moved more forget more? Final drift (H2's aggregate) vs Δloss, across runs")
    sec.bullets(f.get("notes") or [])
    _figures(sec, art, "forgetting/figures", "Forgetting figures", gated=True)
    return sec


def sec_rank_ablation(art: Artefacts) -> Section:
    sec = Section("rank-ablation", "LoRA rank ablation")
    paths = sorted((art.out / "ablation" / "rank").glob("*/summary.json"))
    if not paths:
        sec.not_run("Rank ablation", "ablation/rank/*/summary.json",
                    "is missing (off by default: ablation.rank.enabled=true in the study, or loradrift ablate-rank)")
        return sec
    sec.p("LoRA trained at several ranks with the task's best config (only rank, alpha and rsLoRA change), against "
          "the full fine-tuning runs of the same seeds: dev score, final drift (H2's aggregate), intruder dimensions "
          "(sum over the analysed modules) and forgetting (Δloss, nats/token). Means over seeds with Student "
          "t-intervals. A secondary analysis, not pre-registered.")
    for path in paths:
        s = json.loads(path.read_text())
        st = s.get("settings") or {}
        rel = art.rel(path.parent)
        sec.h3(f"{st.get('title', s.get('variant'))} ({rel}/)")
        for task, r in sorted((s.get("tasks") or {}).items(), key=lambda kv: _task_order(kv[0])):
            rows = []
            for label, g in (r.get("by_label") or {}).items():
                row: dict[str, Any] = {"run": "full FT" if label == "full" else f"LoRA r={g.get('rank')}",
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
        _figures(sec, art, f"{rel}/figures", "Rank ablation figures", gated=True)
    return sec


def _aggregate_rounds(rows: list[dict]) -> list[dict]:
    """Mean over measurement rounds per (backend, config, batch size); strings kept when equal."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("backend"), r.get("config"), r.get("batch_size")), []).append(r)
    out = []
    for (b, c, bs), rs in groups.items():
        row: dict[str, Any] = {"backend": b, "config": c, "batch_size": bs, "n_rounds": len(rs)}
        for k in dict.fromkeys(k for r in rs for k in r):
            if k in row or k == "round":
                continue
            vals = [r.get(k) for r in rs]
            nums = [_num(v) for v in vals if _num(v) is not None]
            if nums and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None):
                row[k] = sum(nums) / len(nums)
            elif all(_scalar(v) for v in vals):
                uniq = list(dict.fromkeys(v for v in vals if v is not None))
                row[k] = uniq[0] if len(uniq) == 1 else ", ".join(map(str, uniq)) if uniq else None
        out.append(row)
    return out


def _serving_offline_by_batch(sec: Section, art: Artefacts) -> None:
    """Offline benchmark: one table per batch size, each configuration's mean over rounds and its
    overhead vs the merged models (serve/results.json, serve/overhead.json)."""
    res = art.json("serve/results.json")
    rows = _aggregate_rounds(_rows_of(res, "rows", "results") or []) if res is not None else []
    if not rows:
        return
    over = {(r.get("backend"), r.get("config"), r.get("batch_size")): r
            for r in (_rows_of(art.json("serve/overhead.json") or [], "rows", "overhead") or [])}
    for b in sorted({r["batch_size"] for r in rows}):
        sub = []
        for r in rows:
            if r["batch_size"] != b:
                continue
            o = over.get((r["backend"], r["config"], b), {})
            sub.append({**r, "overhead_pct": o.get("overhead_pct"), "ci_low": o.get("ci_low"),
                        "ci_high": o.get("ci_high")})
        sec.h3(f"Offline, batch size {b}")
        sec.table(sub, pick_columns(sub, ["backend", "config", "adapters", "n_rounds", "latency_mean_s",
                                          "throughput_tok_s", "ttft_mean_s", "overhead_pct", "ci_low", "ci_high",
                                          "peak_child_rss_mb", "peak_gpu_mb"]),
                  labels={"overhead_pct": "overhead vs merged %", "ci_low": "CI low %", "ci_high": "CI high %"})


def _serving_online(sec: Section, art: Artefacts) -> None:
    """Online benchmark (vLLM's OpenAI server, Poisson arrivals): one table per request rate, and
    k merged engines vs one engine + k adapters (serve/online/)."""
    summary = art.json("serve/online/summary.json")
    if summary is None:
        sec.note("No online benchmark (serve/online/summary.json): it runs on vLLM only (serve-bench --online).")
        return
    rows = _rows_of(summary, "rows", "summary") or []
    meta = art.json("serve/online/meta.json") or {}
    slo = meta.get("slo_ms") or {}
    sec.p("vLLM's OpenAI-compatible server under Poisson arrivals; per request TTFT, TPOT, ITL and end-to-end "
          "latency with vLLM's definitions (docs/serving.md); goodput = requests meeting every SLO "
          f"({', '.join(f'{k} ≤ {v:g} ms' for k, v in slo.items())}) per second. Rate inf: all requests at once.")
    for rate in list(dict.fromkeys(r.get("request_rate") for r in rows)):
        sub = [r for r in rows if r.get("request_rate") == rate]
        sec.h3(f"Online, request rate {rate} req/s")
        sec.table(sub, pick_columns(sub, ["config", "engines", "completed", "request_throughput", "output_throughput", "goodput",
                                          "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms",
                                          "e2el_p50_ms", "e2el_p99_ms", "server_peak_rss_mb"]))
    k = art.json("serve/online/k_tasks.json")
    if k:
        sec.h3("k tasks: one engine + k adapters vs k merged engines")
        sec.table(k, pick_columns(k, ["setup", "k", "memory_mb", "max_request_throughput", "max_output_throughput",
                                      "how"]))


def sec_serving(art: Artefacts) -> Section:
    sec = Section("serving", "Serving benchmark")
    sec.p(SERVE_NOTE)
    over = art.json("serve/overhead.json")
    sec.h3("Multi-adapter overhead")
    if over is None:
        sec.not_run("Serving overhead", "serve/overhead.json")
    else:
        rows = _rows_of(over, "rows", "overhead") or []
        sec.p("Latency overhead of serving unmerged adapters (adapters-k: k adapters in one engine) vs the "
              "merged models of the same tasks, in %, mean over measurement rounds with its CI.")
        sec.table(rows, pick_columns(rows, ["backend", "config", "reference", "batch_size", "overhead_pct", "ci_low",
                                            "ci_high", "n_rounds", "ci_method"]),
                  labels={"overhead_pct": "overhead %", "ci_low": "CI low %", "ci_high": "CI high %"})
        if not rows:
            sec.p("serve/overhead.json holds no rows.")
    sec.h3("Latency, throughput and memory")
    res = art.json("serve/results.json")
    if res is None:
        sec.not_run("Serving measurements", "serve/results.json")
    else:
        rows = _rows_of(res, "rows", "results") or []
        known = ["backend", "config", "adapters", "batch_size", "n_rounds", "latency_mean_s", "latency_p50_s",
                 "latency_p95_s", "throughput_rps", "throughput_tok_s", "ttft_mean_s", "ttft_method", "peak_rss_mb",
                 "peak_child_rss_mb", "peak_gpu_mb", "device"]
        if rows and any("round" in r for r in rows):
            rows = _aggregate_rounds(rows)
            sec.p("Means over measurement rounds.")
        sec.table(rows, pick_columns(rows, known))
        if not rows:
            sec.p("serve/results.json holds no rows.")
    sec.h3("Correctness")
    meta = art.json("serve/meta.json")
    for f in (meta.get("findings") or []) if isinstance(meta, dict) else []:
        sec.note(f"Finding: {f}")
    corr = art.json("serve/correctness.json")
    if corr is None:
        sec.note("serve/correctness.json is not present: no correctness check was recorded.")
    else:
        rows = _rows_of(corr, "rows", "correctness") or []
        sec.p("Greedy tokens and per-token log-probabilities of each adapter served unmerged vs its merged model, "
              "within the dtype's tolerance; each adapter vs the base model (it must change a token, or a "
              "log-probability by more than its own margin: an adapter that does not is a finding, flagged above); "
              "and across backends. Match rate: the fraction of tokens in the common prefix.")
        sec.table(rows, pick_columns(rows, ["check", "backend", "config", "task", "reference", "passed", "match_rate",
                                            "min_match_rate", "max_abs_logprob_diff", "logprob_tolerance",
                                            "n_prompts", "n_tokens"]))
        if not rows:
            sec.p("serve/correctness.json holds no rows.")
    _serving_offline_by_batch(sec, art)
    _serving_online(sec, art)
    if isinstance(meta, dict) and meta:
        sec.kv(meta, caption="Benchmark settings (serve/meta.json)")
    _figures(sec, art, "serve/figures", "Serving figures")
    return sec


HYPOTHESES = {
    "H1": "Performance: LoRA's relative gap to full fine-tuning, (FT − LoRA) / FT × 100 per seed on H1's metric "
          "(accuracy for GLUE, F1 for SQuAD v2), is at most the threshold.",
    "H2": "Drift: LoRA reduces representational drift, (mean FT drift − mean LoRA drift) / mean FT drift × 100 "
          "(means over seeds; drift = 1 − CKA averaged over the transformer block outputs), by at least the threshold.",
    "H3": "Serving: the multi-adapter latency overhead vs the merged models is at most the threshold.",
}

_RESULT_COLUMNS = ["scope", "n", "estimate", "_ci", "ci_method", "_h0", "decision", "reason", "p_value", "p_bonferroni",
                   "p_holm"]
_RESULT_LABELS = {"_ci": "interval (level)", "ci_method": "interval method", "_h0": "supported when",
                  "p_value": "one-sided p", "p_bonferroni": "p (Bonferroni)", "p_holm": "p (Holm)"}


def _result_row(r: dict) -> dict:
    level = _num(r.get("ci_level"))
    side = "upper bound ≤" if r.get("alternative") == "less" else "lower bound ≥"
    return {**r, "scope": f"{r.get('name', '')} {r.get('scope')}".strip(),
            "_ci": f"[{fmt(r.get('ci_low'))}, {fmt(r.get('ci_high'))}]" + (f" ({fmt(level * 100)}%)" if level else ""),
            "_h0": f"{side} {fmt(r.get('threshold'))}",
            "decision": r.get("decision") or _verdict_word(r.get("supported"))}


def _results(h: dict) -> dict[str, list[dict]]:
    return {name: [r for r in (h.get(name) or []) if isinstance(r, dict)] for name in ("H1", "H2", "H3")}


def _primary_rows(h: dict) -> list[dict]:
    """The verdict's primary tests, and a row saying why for a hypothesis that has none."""
    results = _results(h)
    rows = [_result_row(r) for name in ("H1", "H2", "H3") for r in results[name] if r.get("primary")]
    reasons = (h.get("verdict") or {}).get("reasons") or {}
    for name in ("H1", "H2", "H3"):
        if not any(r.get("primary") for r in results[name]):
            rows.append({"scope": name, "decision": "undetermined", "reason": reasons.get(name, "undetermined: not tested")})
    return rows


def sec_hypotheses(art: Artefacts) -> Section:
    sec = Section("hypotheses", "Hypotheses")
    h = art.json("stats/hypotheses.json")
    if h is None:
        sec.not_run("Hypothesis tests", "stats/hypotheses.json")
        return sec
    sec.p(f"Verdict rule: {(h.get('verdict') or {}).get('rule', 'H1 AND (H2 OR H3)')}; the verdicts are in the summary.")
    fam = h.get("family") or {}
    level = _num(fam.get("primary_level"))
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
          + (f"{fmt(_num(fam.get('secondary_level')) * 100)}% " if _num(fam.get("secondary_level")) else "")
          + "intervals, not part of the verdict.")
    results = _results(h)
    sec.table(_primary_rows(h), _RESULT_COLUMNS, labels=_RESULT_LABELS, caption="Primary tests (the verdict)")
    notes: list[str] = list(h.get("notes") or [])
    for name in ("H1", "H2", "H3"):
        sec.h3(f"{name}: {HYPOTHESES[name]}")
        if not results[name]:
            sec.not_run(f"{name} test", "stats/hypotheses.json", f"has no {name} results")
            continue
        rows = []
        for r in results[name]:
            row = _result_row(r)
            row["scope"] = f"{r.get('scope')} ({'primary' if r.get('primary') else 'secondary'})"
            rows.append(row)
            for n in r.get("notes") or []:
                notes.append(n if str(n).startswith(name) else f"{name} {r.get('scope')}: {n}")
        sec.table(rows, _RESULT_COLUMNS[:-2] + ["df", "effect_size", "power"],
                  labels={**_RESULT_LABELS, "effect_size": "Cohen's d"})
    if notes:
        sec.h3("Notes")
        sec.bullets(dict.fromkeys(notes))
    gate = h.get("learning_gate") or {}
    if gate.get("bars"):
        not_learned = gate.get("not_learned") or {}
        rows = [{"task": t, "bar": b.get("bar"), "from": b.get("from"), "learned": t not in not_learned,
                 "why not": not_learned.get(t) or b.get("reason")} for t, b in sorted(gate["bars"].items(), key=lambda kv: _task_order(kv[0]))]
        sec.table(rows, ["task", "bar", "from", "learned", "why not"],
                  caption=f"Learning gate (H1, H2, forgetting, rank ablation): {gate.get('rule', '')}")
    if isinstance(h.get("settings"), dict):
        sec.kv(h["settings"], caption="Settings")
    return sec


def sec_limitations(art: Artefacts) -> Section:
    sec = Section("limitations", "Limitations")
    man = art.json("study/manifest.json") or {}
    cfg = man.get("config") or {}
    model = (cfg.get("model") or {}).get("name")
    facts = []
    runs = art.rows("run") or []
    n_params = (man.get("model_info") or {}).get("parameters") if isinstance(man.get("model_info"), dict) else None
    full_params = [_num((r["metrics"] or {}).get("trainable_params")) for r in runs if r["method"] == "full"]
    full_params = [p for p in full_params if p is not None]
    if model:
        size = f" ({fmt(int(n_params))} parameters)" if n_params else (
            f" (full fine-tuning trains {fmt(int(max(full_params)))} parameters, backbone and head)" if full_params else "")
        facts.append(f"One small model: {model}{size}. Results need not transfer to larger models, where LoRA "
                     f"is usually closer to full fine-tuning.")
    else:
        facts.append("Model: unknown (study/manifest.json is missing).")
    data = art.rows("data") or []
    if data:
        data, _ = _latest(data, lambda r: (r["model"], r["task"]))
        parts = [f"{r['task']} {fmt(r['metrics'].get('train_used'))} train / {fmt(r['metrics'].get('val_used'))} val / "
                 f"{fmt(r['metrics'].get('dev_used'))} dev" for r in sorted(data, key=lambda r: _task_order(r["task"]))]
        facts.append("Small task subsets (examples used): " + "; ".join(parts) + ". Scores are noisy and below "
                     "published full-data numbers.")
    else:
        facts.append('Subset sizes: unknown (results.sqlite is missing or has no kind="data" rows).')
    if runs:
        seeds = sorted({r["seed"] for r in runs})
        facts.append(f"{len(seeds)} seed(s) per task and method ({', '.join(map(str, seeds))}): confidence intervals "
                     f"are wide and the hypothesis tests have low power.")
    else:
        facts.append('Seeds: unknown (results.sqlite is missing or has no kind="run" rows).')
    by_task = man.get("configs_by_task") or {}
    if runs and by_task:
        steps = _steps_by_task(runs)
        parts = [f"{t} {steps.get(t, '?')} steps, "
                 f"{fmt(((by_task[t].get('model') or {}).get('max_length')))} tokens"
                 for t in sorted(by_task, key=_task_order)]
        not_learned = _not_learned(art)
        facts.append("Short training on short inputs (optimizer steps per final run; inputs or SQuAD windows cut to "
                     "this many tokens): " + "; ".join(parts) + "."
                     + (f" {', '.join(not_learned)}: at least one method did not learn the task at this scale, so "
                        "those tasks carry no verdict." if not_learned else ""))
    undefined = {t: c.get("cka_undefined_layers") for t, c in (art.json("drift/comparison.json") or {}).items()
                 if isinstance(c, dict) and c.get("cka_undefined_layers")}
    if undefined:
        facts.append("CKA is undefined where the base model's probe vectors are identical for every example (last-"
                     "token pooling at the embedding layer when every input ends with the same token): "
                     + "; ".join(f"{t} layer(s) {', '.join(map(str, v))}" for t, v in sorted(undefined.items(), key=lambda kv: _task_order(kv[0])))
                     + ". Those layers are left out of the drift means.")
    squad = TASKS.get("squad_v2")
    if squad is not None:
        facts.append(f"SQuAD v2 trains on a subset of only 10 articles ({squad.train_file}), so its scores are far "
                     f"below full-data SQuAD and dominated by the no-answer decision.")
    if model is None or "smollm2" in str(model).lower():
        facts.append("SmolLM2 weights come from a Q4_1-quantised GGUF, dequantised to float: they differ slightly "
                     "from the original bf16 checkpoint, so absolute scores are not those of the released model.")
    dev = man.get("device") or {}
    machine = man.get("machine") or {}
    if not dev:
        facts.append("Device: unknown (study/manifest.json is missing). Timings from a shared CPU machine are "
                     "indicative, not benchmarks.")
    elif not dev.get("cuda", False):
        cpus = machine.get("cpus")
        facts.append("Timings (training speed, memory, serving latency) were measured on CPU"
                     + (f" ({cpus} logical cores" + (f", {dev['torch_threads']} torch threads" if dev.get("torch_threads") else "") + ")" if cpus else "")
                     + ", possibly shared with other processes: they are indicative, not benchmarks, and GPU "
                       "serving overheads can differ in sign and size.")
    else:
        facts.append(f"Timings were measured on {dev.get('gpu', 'a GPU')}; other hardware can give other overheads.")
    facts.append("Drift is measured on a small probe set with CKA-based similarity; other similarity measures "
                 "or probe sets can rank methods differently.")
    sec.bullets(facts)
    return sec


def sec_manifest(art: Artefacts) -> Section:
    sec = Section("manifest", "Reproducibility manifest")
    man = art.json("study/manifest.json")
    if man is None:
        sec.not_run("Manifest", "study/manifest.json")
        return sec
    import yaml

    sec.table([{"command": man.get("command"), "git commit": man.get("git_commit"), "preset": man.get("preset"),
                "started": man.get("started"), "data dir": man.get("data_dir")}],
              ["command", "git commit", "preset", "started", "data dir"])
    if man.get("versions"):
        sec.table([{"package": k, "version": v} for k, v in man["versions"].items()], caption="Package versions")
    if man.get("device") or man.get("machine"):
        sec.kv({"device": man.get("device") or {}, "machine": man.get("machine") or {}}, caption="Device and machine")
    sums = man.get("data_checksums") or {}
    if sums:
        sec.table([{"file": k, "sha256": v} for k, v in sorted(sums.items())], caption="Data checksums (SHA-256)")
    else:
        sec.note("No data checksums were recorded (the data folder has no SHA256SUMS file).")
    if man.get("config"):
        sec.pre(yaml.safe_dump(man["config"], sort_keys=False, allow_unicode=True), "Resolved config (YAML)")
    for task, c in (man.get("configs_by_task") or {}).items():
        sec.pre(yaml.safe_dump(c, sort_keys=False, allow_unicode=True), f"Resolved config for {task} (YAML)")
    return sec


def header_facts(art: Artefacts) -> dict[str, str | None]:
    """The report's first lines: what ran (preset, model, training device, serving backend), and
    for a study on the random-init `tiny` model a warning that its results are a pipeline check."""
    def read(rel: str) -> Any:  # an unreadable file is the business of its section, not of the header
        try:
            return art.json(rel)
        except (OSError, ValueError):
            return None

    man = read("study/manifest.json") or {}
    preset = man.get("preset")
    model = ((man.get("config") or {}).get("model") or {}).get("name")
    dev = man.get("device")
    device = (dev.get("gpu") or "a CUDA GPU" if dev.get("cuda") else "CPU") if isinstance(dev, dict) else None
    fingerprint = read("serve/fingerprint.json") or {}
    backends = fingerprint.get("backend") or ",".join(dict.fromkeys(
        r["backend"] for r in (read("serve/overhead.json") or []) if isinstance(r, dict) and r.get("backend")))
    names = {"hf": "hf (transformers + PEFT)", "vllm": "vLLM"}
    backend = " and ".join(names.get(b, b) for b in backends.split(",")) if backends else None
    line = " · ".join([f"Preset {preset or 'unknown'}", f"model {model or 'unknown'}", f"trained on {device or 'an unknown device'}",
                       f"served with {backend}" if backend else "no serving benchmark"])
    warning = None
    if preset == "tiny" or model == "tiny":
        warning = ("Pipeline check, not findings: this study ran on the random-init tiny model (2 layers, hidden 64) "
                   "on a few dozen examples per task. It shows that every phase runs end to end; its scores, drift "
                   "and verdicts say nothing about LoRA or full fine-tuning.")
    return {"line": line, "warning": warning}


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


def build_sections(out_dir: Path) -> list[Section]:
    art = Artefacts(out_dir)
    out = []
    for sid, title, make in SECTIONS:
        try:
            sec = make(art)
        except Exception as e:  # a malformed artefact costs its section, not the whole report
            log.warning("report: section %r failed: %s: %s", title, type(e).__name__, e)
            sec = Section(sid, title, error=f"{type(e).__name__}: {e}")
            sec.note(f"This section could not be built from its artefacts: {type(e).__name__}: {e}")
        out.append(sec)
    return out


# ---------------------------------------------------------------------------------------------
# HTML: the markup lives in templates/ (Jinja2); Python hands over the sections as data

# Forbids every external fetch: the report must render from the file alone.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_NUMERIC = re.compile(r"^[-+−]?[\d,]*\.?\d+(e[-+]?\d+)?%?( ± [\d.,e+-]+)?$")


def _unknown_block(kind: str) -> None:
    raise ValueError(f"unknown block kind {kind!r}")


def _environment() -> "jinja2.Environment":
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("loradrift", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.filters["verdict_word"] = _verdict_word
    env.tests["numeric"] = lambda cell: bool(_NUMERIC.match(cell))  # right-aligned, tabular digits
    env.globals["raise_unknown"] = _unknown_block
    return env


def render_html(sections: list[Section], out_dir: Path, generated: str, header: dict[str, str | None]) -> str:
    parts = [{"id": s.id, "title": s.title, "number": i, "status": s.status, "blocks": s.blocks,
              "part_title": PARTS.get(s.id)} for i, s in enumerate(sections, 1)]
    return _environment().get_template("report.html.j2").render(
        title=TITLE, csp=CSP, out_dir=str(out_dir), generated=generated, header=header, sections=parts)


# ---------------------------------------------------------------------------------------------
# PDF


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
            lines += [("h3", "Verdict (" + b.text + ")")] + [("text", f"  {n:8} {_verdict_word(v)}") for n, v in b.items]
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


# ---------------------------------------------------------------------------------------------
# entry point


def build_report(out_dir: Path, pdf: bool = True, renderer: str | None = None) -> dict:
    """Write `<out>/report/report.html` and (if `pdf`) `<out>/report/report.pdf`.

    `renderer` forces the PDF renderer ("chromium" or "matplotlib"); by default Chromium when a
    browser is installed, else matplotlib, and matplotlib also when Chromium fails.
    Returns {"html": path, "pdf": path | None, "pdf_renderer": name | None,
    "sections": [{"id", "title", "status", "missing"}]} (status: ok | partial | not run | error).
    """
    out_dir = Path(out_dir)
    report_dir = out_dir / "report"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = build_sections(out_dir)
    header = header_facts(Artefacts(out_dir))
    html_path = report_dir / "report.html"
    atomic_write_text(html_path, render_html(sections, out_dir.resolve(), generated, header))
    log.info("report: HTML written to %s", html_path)

    pdf_path, used = None, None
    if pdf:
        pdf_path = report_dir / "report.pdf"
        browser = find_browser() if renderer in (None, "chromium") else None
        if renderer == "chromium" and browser is None:
            raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)})")
        if browser:
            try:
                _pdf_chromium(browser, html_path, pdf_path)
                used = "chromium"
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
                if renderer == "chromium":
                    raise
                log.warning("report: Chromium could not print the PDF (%s); falling back to matplotlib", e)
        if used is None:
            _pdf_matplotlib(sections, pdf_path, generated, header)
            used = "matplotlib"
        log.info("report: PDF written to %s (renderer: %s%s)", pdf_path, used, f", {browser}" if used == "chromium" else "")
    return {"html": html_path, "pdf": pdf_path, "pdf_renderer": used,
            "sections": [{"id": s.id, "title": s.title, "status": s.status, "missing": list(s.missing)} for s in sections]}
