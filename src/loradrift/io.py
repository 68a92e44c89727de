"""Atomic file writes and the results store.

Every artefact is written to a temporary file in the same folder and renamed into place, so a
kill never leaves a half-written result that a later phase would trust.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (for libraries that write files themselves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() and tmp.is_file():
            tmp.unlink()


class ResultsStore:
    """One SQLite table of result rows; (kind, model, task, method, seed, config_hash) is the key,
    so re-running a finished piece of work replaces its row instead of adding a duplicate."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS results (
        kind TEXT NOT NULL,          -- run | baseline | sanity | memory | trial
        model TEXT NOT NULL,
        task TEXT NOT NULL,
        method TEXT NOT NULL,        -- full | lora | majority | random | ...
        seed INTEGER NOT NULL,
        config_hash TEXT NOT NULL,
        run_dir TEXT,
        metrics TEXT NOT NULL,       -- JSON object
        created REAL NOT NULL,
        PRIMARY KEY (kind, model, task, method, seed, config_hash)
    )"""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(self.SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # A generous timeout lets several processes (sharded study, search workers) share the file.
        return sqlite3.connect(self.path, timeout=60)

    def put(self, kind: str, model: str, task: str, method: str, seed: int, config_hash: str,
            metrics: dict, run_dir: str | Path | None = None) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                (kind, model, task, method, int(seed), config_hash, str(run_dir) if run_dir else None,
                 json.dumps(metrics, default=_json_default), time.time()),
            )

    def rows(self, kind: str | None = None, **where: Any) -> list[dict]:
        clauses, args = [], []
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind)
        for k, v in where.items():
            clauses.append(f"{k} = ?")
            args.append(v)
        sql = "SELECT kind, model, task, method, seed, config_hash, run_dir, metrics, created FROM results"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._connect() as con:
            out = []
            for r in con.execute(sql + " ORDER BY task, method, seed", args):
                out.append(dict(zip(["kind", "model", "task", "method", "seed", "config_hash", "run_dir", "metrics", "created"], r)))
                out[-1]["metrics"] = json.loads(out[-1]["metrics"])
            return out


def json_safe(o: Any) -> Any:
    """NaN and inf are not valid JSON; null is what a reader in another language expects."""
    import math

    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, float) or type(o).__name__ in ("float32", "float64"):
        return float(o) if math.isfinite(o) else None
    return o


def write_csv(path: Path, columns: list[str], rows) -> None:
    """A CSV with these columns (extra keys ignored); missing and non-finite values are empty,
    floats keep full precision."""
    import csv
    import io as _stdio
    import math

    def fmt(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, float) or type(v).__name__ in ("float32", "float64"):
            return repr(float(v)) if math.isfinite(v) else ""
        return v

    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: fmt(r.get(c)) for c in columns})
    atomic_write_text(path, buf.getvalue())
