"""Atomic file writes, run-folder locks and the results store.

Every artefact is written to a temporary file in the same folder and renamed into place, so a
kill never leaves a half-written result that a later phase would trust. A run folder's
`result.json` is the record of a finished run; `results.sqlite` is an index over those records
that `reconcile_store` rebuilds from the folders (docs/layout.md).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loradrift import layout


class OutputError(RuntimeError):
    """An output folder or file cannot be written; the message names the path."""


class StoreError(RuntimeError):
    """The results store cannot be opened, read or written; the message names the path."""


class LockBusy(RuntimeError):
    """Another process holds the lock; `pid` is its process id when it could be read."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = Path(path), pid
        super().__init__(f"{self.path.parent}: run in progress by pid {pid if pid is not None else '(unknown)'} "
                         f"(lock file {self.path.name}); wait for it to finish or stop that process")


def make_dir(path: Path, what: str = "output folder") -> Path:
    """mkdir -p with a message naming the path instead of a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{what} {path}: a file is in the way (it or a parent is a file, not a folder)") from None
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: not writable")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 lets the umask decide the mode, as for any file the user creates
    # (mkstemp would make it 0600 and a shared output folder unreadable to colleagues).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # read without changing it (Linux)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def respect_umask(path: Path) -> None:
    """Give a file, or every file under a folder, the mode an ordinary open() would: some writers
    (safetensors, hence save_pretrained) create 0600 files, unreadable to colleagues who share
    the output folder."""
    path = Path(path)
    mode = 0o666 & ~_umask()
    for f in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(f, mode)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (for libraries that write files themselves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file():
            respect_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists() and tmp.is_file():
            tmp.unlink()


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an OS lock (flock) on `path` until the block ends; the kernel drops it when the
    process dies, so a killed run never leaves a stale lock. Raises LockBusy at once (naming the
    holder's pid) instead of waiting."""
    import fcntl

    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip() or "x")
            except ValueError:
                pid = None
            os.close(fd)
            raise LockBusy(path, pid) from None
        # Someone may have removed the file between our open and flock: a lock on an unlinked
        # inode excludes nobody, so take the lock again on the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


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
        if self.path.is_dir():
            raise StoreError(f"results store {self.path}: is a folder, not a SQLite file; move it away")
        make_dir(self.path.parent, "output folder")
        with self._connect() as con:
            con.execute(self.SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, and whose SQLite errors name the store."""
        try:
            # A generous timeout lets several processes (sharded study, search workers) share the file.
            con = sqlite3.connect(self.path, timeout=60)
            try:
                with con:
                    yield con
            finally:
                con.close()
        except sqlite3.Error as e:
            raise StoreError(f"results store {self.path}: {e}") from None

    def put(self, kind: str, model: str, task: str, method: str, seed: int, config_hash: str,
            metrics: dict, run_dir: str | Path | None = None, created: float | None = None) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                (kind, model, task, method, int(seed), config_hash, str(run_dir) if run_dir else None,
                 json.dumps(metrics, default=_json_default), time.time() if created is None else created),
            )

    def put_run(self, result: dict, created: float | None = None) -> None:
        """The index row of a finished run (from its result.json). A run folder holds one run, so
        rows of the same folder with another config hash (a `--force` rerun) are dropped."""
        key = (result["model"], result["task"], result["method"], int(result["seed"]))
        with self._connect() as con:
            con.execute("DELETE FROM results WHERE kind = 'run' AND model = ? AND task = ? AND method = ? AND seed = ? "
                        "AND config_hash != ?", (*key, result["config_hash"]))
            con.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                ("run", *key, result["config_hash"], result.get("run_dir"), json.dumps(run_metrics(result), default=_json_default),
                 time.time() if created is None else created),
            )

    def delete(self, kind: str, model: str, task: str, method: str, seed: int, config_hash: str) -> None:
        with self._connect() as con:
            con.execute("DELETE FROM results WHERE kind = ? AND model = ? AND task = ? AND method = ? AND seed = ? AND config_hash = ?",
                        (kind, model, task, method, int(seed), config_hash))

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


# What a run's index row keeps of its result.json.
RUN_METRIC_KEYS = ("val", "dev", "steps", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb", "trainable_params")


def run_metrics(result: dict) -> dict:
    return {k: result[k] for k in RUN_METRIC_KEYS}


def reconcile_store(out_dir: Path) -> dict[str, int]:
    """Make the `run` rows of `<out>/results.sqlite` match the run folders' `result.json` files,
    which are the record: add a missing row (a kill or a failed write between result.json and
    the store), refresh a stale one, drop one whose folder holds another run or none (redone
    with --force, or being redone). Rows without a folder, and other row kinds, are left alone. Returns the counts {"added", "updated", "removed"}."""
    out = Path(out_dir)
    store_path = layout.results_db(out)
    found: dict[tuple, tuple[dict, float]] = {}
    for f in (p for run in layout.iter_runs(out) if (p := layout.run_path(run.path, "result")).exists()):
        try:
            r = json.loads(f.read_text())
            key = (r["model"], r["task"], r["method"], int(r["seed"]), r["config_hash"])
            run_metrics(r)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{f}: not a readable run result ({type(e).__name__}: {e}); "
                             f"remove that run folder or redo it with `loradrift train --force`") from None
        found[key] = (r, f.stat().st_mtime)
    counts = {"added": 0, "updated": 0, "removed": 0}
    if not found and not store_path.exists():
        return counts  # nothing to index: do not create an empty store
    store = ResultsStore(store_path)
    indexed = {(r["model"], r["task"], r["method"], r["seed"], r["config_hash"]): r for r in store.rows("run")}
    for key in indexed:
        model, task, method, seed, _ = key
        # A row whose folder is absent is kept: the heavy runs/ tree may have been left behind
        # when <out> was copied for the report. A folder that exists holds one run, or none yet.
        if key not in found and layout.run_dir(out, model, task, method, seed).is_dir():
            store.delete("run", *key)
            counts["removed"] += 1
    for key, (r, mtime) in found.items():
        want = json.loads(json.dumps(run_metrics(r), default=_json_default))  # as the store holds it
        if key not in indexed:
            store.put_run(r, created=mtime)
            counts["added"] += 1
        elif json.dumps(indexed[key]["metrics"], sort_keys=True) != json.dumps(want, sort_keys=True):
            store.put_run(r, created=mtime)
            counts["updated"] += 1
    return counts


def serve_adapter_dir(run_dir: Path) -> Path:
    """A LoRA run's adapter with CausalLM keys and no head (vLLM, merging, the weight analysis):
    `serve_adapter/`; runs made before the PEFT-native `adapter/` existed kept it in `adapter/`."""
    run_dir = Path(run_dir)
    new, old = layout.run_path(run_dir, "serve_adapter"), layout.run_path(run_dir, "adapter")
    return new if new.is_dir() or not old.is_dir() else old


def json_safe(o: Any) -> Any:
    """NaN and inf are not valid JSON; null is what a reader in another language expects. NumPy
    scalars (bool, int, float) become the Python values the json module writes."""
    import math

    import numpy as np

    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
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
