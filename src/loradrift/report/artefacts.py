"""Read access to one study folder, `<out>`, for the report.

Missing files read as None (a section then says "not run" and names them); a file that is
there but cannot be read, or does not hold what its reader expects, raises `ArtefactError`
naming it: the only exception a section builder turns into a section status. The one write
is the results store's reconciliation with the run folders (`reconcile_store`).

Below the reader: the small facts several sections take from the artefacts (the newest row per
key, the task and method order, the tasks the learning gate found not learned, steps per task).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loradrift import layout
from loradrift.io import ResultsStore, StoreError, reconcile_store
from loradrift.layout import PATHS
from loradrift.methods import METHOD_NAMES, METHODS
from loradrift.report.render import fmt
from loradrift.tasks import TASKS


class ArtefactError(RuntimeError):
    """An artefact is missing, unreadable or invalid. `rel`: the file, relative to `<out>`;
    `why`: what is wrong with it, as it reads after the file name ("is missing", ...). A
    RuntimeError, so a command it escapes from reports it as one line."""

    def __init__(self, rel: str, why: str, *, what: str | None = None, missing: bool = False):
        super().__init__(f"{rel} {why}")
        self.rel, self.why, self.what, self.missing = rel, why, what, missing


_JSON_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_kinds(expect: type | tuple[type, ...]) -> str:
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,)))


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

    def json(self, rel: str, expect: type | tuple[type, ...] | None = None) -> Any:
        """Parsed JSON, or None when the file is missing. A file that cannot be read, is not JSON,
        or (with `expect`, dict or list) holds another kind of value raises ArtefactError: the
        section then reports the error instead of pretending the step did not run."""
        p = self.out / rel
        if not p.is_file():
            return None
        try:
            obj = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ArtefactError(rel, f"could not be read ({type(e).__name__}: {e})") from e
        except ValueError as e:
            raise ArtefactError(rel, f"is not valid JSON ({e})") from e
        if expect is not None and not isinstance(obj, expect):
            raise ArtefactError(rel, f"holds {_json_kinds(type(obj))}, not {_json_kinds(expect)}")
        return obj

    def require(self, rel: str, what: str, expect: type | tuple[type, ...] | None = None,
                why: str = "is missing") -> Any:
        """`json(rel, expect)` for an artefact the section cannot do without: a missing file raises
        ArtefactError (`missing`), and the section says "`what`: not run — `rel` `why`"."""
        obj = self.json(rel, expect)
        if obj is None:
            raise ArtefactError(rel, why, what=what, missing=True)
        return obj

    def read_bytes(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise ArtefactError(self.rel(path), f"could not be read ({type(e).__name__}: {e})") from e

    def read_text(self, path: Path) -> str:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ArtefactError(self.rel(path), f"could not be read ({type(e).__name__}: {e})") from e

    def pngs(self, rel_dir: str) -> list[Path]:
        d = self.out / rel_dir
        return sorted(d.glob("*.png")) if d.is_dir() else []

    @property
    def store_path(self) -> Path:
        return layout.results_db(self.out)

    def rows(self, kind: str) -> list[dict] | None:
        """Result rows of one kind, or None when there is no results store at all. The run rows
        are first reconciled with the run folders (their result.json is the record)."""
        try:
            if self._rows is None:
                reconcile_store(self.out)
            if not self.store_path.is_file():
                return None
            if self._rows is None:
                self._rows = {}
                for r in ResultsStore(self.store_path).rows():
                    self._rows.setdefault(r["kind"], []).append(r)
        except StoreError as e:  # names the run's result.json
            raise ArtefactError(PATHS["results"], f"does not match the run folders: {e}") from e
        except (sqlite3.Error, OSError) as e:
            raise ArtefactError(PATHS["results"], f"could not be read ({type(e).__name__}: {e})") from e
        return self._rows.get(kind, [])


# ---------------------------------------------------------------------------------------------
# facts several sections take from the artefacts


def latest(rows: list[dict], key: Callable[[dict], tuple]) -> tuple[list[dict], int]:
    """The newest row per key, and how many older rows were left out (reruns with another
    config hash leave their old rows in the store)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        k = key(r)
        if k not in best or r.get("created", 0) >= best[k].get("created", 0):
            best[k] = r
    return list(best.values()), len(rows) - len(best)


def task_order(task: str) -> tuple[int, str]:
    names = list(TASKS)
    return (names.index(task) if task in names else len(names), task)


def method_order(m: str) -> tuple[int, str]:
    return (METHOD_NAMES.index(m) if m in METHODS else len(METHOD_NAMES), m)


def primary_metric(task: str) -> str | None:
    spec = TASKS.get(task)
    return spec.primary if spec else None


def rows_of(obj: Any, *keys: str) -> list[dict] | None:
    """A list of row dicts from a list, or from a dict holding one under one of `keys`."""
    if isinstance(obj, list):
        return [r for r in obj if isinstance(r, dict)]
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), list):
                return [r for r in obj[k] if isinstance(r, dict)]
    return None


def not_learned(art: Artefacts) -> list[str]:
    """The tasks the learning gate of stats/hypotheses.json found not learned, in task order."""
    hyp = art.json(PATHS["hypotheses"])
    gate = (hyp.get("learning_gate") or {}) if isinstance(hyp, dict) else {}
    return sorted(gate.get("not_learned") or {}, key=task_order)


def steps_by_task(runs: list[dict]) -> dict[str, str]:
    """{task: the optimizer steps of its final runs, '80' or '4/8' where runs differ}."""
    steps: dict[str, set] = {}
    for r in runs:
        steps.setdefault(r["task"], set()).add((r["metrics"] or {}).get("steps"))
    return {t: "/".join(fmt(v) for v in sorted(x for x in v if x is not None)) or "?" for t, v in steps.items()}
