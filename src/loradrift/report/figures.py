"""The figures the phases drew, embedded with a caption that says what to look at.

A figure over runs of a task that did not learn (the learning gate of stats/hypotheses.json)
says so in its caption: it shows the pipeline, not evidence about LoRA.
"""

from __future__ import annotations

import re

from loradrift.report.artefacts import Artefacts, not_learned
from loradrift.report.render import Section
from loradrift.tasks import TASKS

# drift.py's final drift per layer, LoRA vs FT: the summary's figure (the drift section shows the others)
DRIFT_BY_LAYER = r"final_by_layer_.+"

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


def not_learned_caveat(art: Artefacts, stem: str) -> str:
    """A figure over runs of a task that either method did not learn shows the pipeline, not
    evidence about LoRA (the learning gate of stats/hypotheses.json); its caption says so."""
    bad_tasks = not_learned(art)
    named = [t for t in TASKS if re.search(rf"(^|_){re.escape(t)}($|_)", stem)]
    bad = [t for t in named if t in bad_tasks] if named else bad_tasks
    if not bad:
        return ""
    if named:
        return f" ({', '.join(bad)}: did not learn, so no conclusion about LoRA)"
    return f" (includes runs of {', '.join(bad)}, which did not learn: no conclusion about LoRA from those)"


def add_figures(sec: Section, art: Artefacts, rel_dir: str, what: str, skip: str | None = None,
                gated: bool = False) -> None:
    """Every PNG of `rel_dir` with its caption, but those whose name matches `skip` (shown elsewhere).
    `gated`: the figures show runs, so a caption over a task that did not learn says so."""
    pngs = [p for p in art.pngs(rel_dir) if not (skip and re.fullmatch(skip, p.stem))]
    if not pngs:
        sec.note(f"No {'other ' if skip else ''}figures: {rel_dir}/ holds no {'other ' if skip else ''}PNG files.")
        return
    sec.h3(f"{what} ({rel_dir}/)")
    for p in pngs:
        sec.figure(art.read_bytes(p), caption(p.stem) + (not_learned_caveat(art, p.stem) if gated else ""))
