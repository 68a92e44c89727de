"""A study folder without its weights: the records and everything `loradrift report` reads, small
enough to commit or mail, so that the report can be rebuilt (and checked) on any machine.

    loradrift bundle DEST [--out STUDY]      # then: loradrift report --out DEST

Left out: model weights and everything derived from them that the report does not read (full-FT
models, LoRA adapters and merged models, checkpoints, representation snapshots, the base
representations, the serving merge cache), lock files, and the experiment trackers' copies. Kept:
every run's `result.json`, `config.yaml`, `log.jsonl` and dev predictions, the results store, the
search storage and report, and every Phase 3 table, figure and verdict (docs/layout.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loradrift import layout

# Folders of weights (docs/layout.md); nothing in them is read by the report.
WEIGHT_DIRS = layout.WEIGHT_DIRS
WEIGHT_SUFFIXES = frozenset({".safetensors", ".pt", ".bin", ".gguf"})
# Tracker copies of what the study folder already holds (report_to=[...]); nothing reads them.
TRACKER_ENTRIES = frozenset(layout.PATHS[k].split("/")[0] for k in ("mlflow_db", "mlflow_artifacts", "tensorboard", "wandb"))


def bundle_files(out: Path) -> list[Path]:
    """The files of a bundle of `out`, relative to it, in a stable order."""
    out = Path(out)
    keep = []
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        dirs[:] = sorted(d for d in dirs if d not in WEIGHT_DIRS and not (rel_root == Path(".") and d in TRACKER_ENTRIES))
        for name in sorted(files):
            if Path(name).suffix in WEIGHT_SUFFIXES or name.endswith(".lock") or name.endswith(".tmp"):
                continue
            if rel_root == Path(".") and name in TRACKER_ENTRIES:
                continue
            keep.append(rel_root / name)
    return keep


def write_bundle(out: Path, dest: Path) -> dict:
    """Copy the bundle of `out` to `dest`, which must not exist yet (nothing is overwritten). It
    is built beside `dest` and renamed into place, so `dest` is either complete or absent."""
    out, dest = Path(out), Path(dest)
    if not layout.path(out, "manifest").parent.is_dir() and not layout.results_db(out).is_file():
        raise FileNotFoundError(f"{out}: not a study folder (no study/ and no results.sqlite)")
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists; name a new folder (a bundle never overwrites)")
    if dest.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{dest}: inside the study folder {out}; name a folder outside it")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files = bundle_files(out)
    size = 0
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / rel, tmp / rel)
        size += (tmp / rel).stat().st_size
    tmp.rename(dest)
    return {"dest": str(dest), "files": len(files), "bytes": size}
