"""Atomic writes, run-folder locks and the results store as an index rebuilt from run folders."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from loradrift.io import (
    LockBusy,
    ResultsStore,
    StoreError,
    atomic_write_json,
    exclusive_lock,
    reconcile_store,
)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == mode
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_files_written_by_libraries_respect_the_umask_too(tmp_path):
    import torch
    from safetensors.torch import save_file

    from loradrift.io import atomic_path

    old = os.umask(0o002)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))  # safetensors itself creates 0600 files
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o664


def test_store_path_that_is_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "results.sqlite").mkdir()
    with pytest.raises(StoreError, match=r"results\.sqlite: is a folder, not a SQLite file"):
        ResultsStore(tmp_path / "results.sqlite")


def _result(out, model="m", task="sst2", method="lora", seed=42, chash="h1", acc=0.5):
    rd = out / "runs" / model / task / method / f"seed{seed}"
    r = {"model": model, "task": task, "method": method, "seed": seed, "config_hash": chash, "run_dir": str(rd),
         "val": {"accuracy": acc}, "dev": {"accuracy": acc}, "steps": 6, "train_time_s": 1.0, "wall_time_s": 2.0,
         "tokens_per_s": 3.0, "peak_memory_mb": 4.0, "trainable_params": 5}
    atomic_write_json(rd / "result.json", r)
    return r


def _keys(out):
    return sorted((r["task"], r["method"], r["seed"], r["config_hash"], r["metrics"]["dev"]["accuracy"])
                  for r in ResultsStore(out / "results.sqlite").rows("run"))


def test_reconcile_rebuilds_run_rows_from_the_folders(tmp_path):
    out = tmp_path / "out"
    a = _result(out, seed=1)
    _result(out, seed=2, acc=0.7)
    store = ResultsStore(out / "results.sqlite")
    store.put_run(a)
    store.put_run({**a, "seed": 3})  # its folder is being redone: no result.json in it
    (out / "runs/m/sst2/lora/seed3").mkdir()
    store.put_run({**a, "seed": 4})  # no folder at all (runs/ not copied along): kept
    store.put("baseline", "m", "sst2", "majority", 42, "h", {"accuracy": 0.5})  # not a run: kept
    assert reconcile_store(out) == {"added": 1, "updated": 0, "removed": 1}
    assert _keys(out) == [("sst2", "lora", 1, "h1", 0.5), ("sst2", "lora", 2, "h1", 0.7), ("sst2", "lora", 4, "h1", 0.5)]
    # A folder redone with another config: its row follows the folder.
    b = _result(out, seed=1, chash="h2", acc=0.9)
    assert reconcile_store(out) == {"added": 1, "updated": 0, "removed": 1}
    assert _keys(out) == [("sst2", "lora", 1, "h2", 0.9), ("sst2", "lora", 2, "h1", 0.7), ("sst2", "lora", 4, "h1", 0.5)]
    assert reconcile_store(out) == {"added": 0, "updated": 0, "removed": 0}
    store.put_run({**b, "dev": {"accuracy": 0.1}})  # a row that disagrees with its file
    assert reconcile_store(out) == {"added": 0, "updated": 1, "removed": 0}
    assert _keys(out)[0] == ("sst2", "lora", 1, "h2", 0.9)
    assert len(store.rows("baseline")) == 1


def test_reconcile_of_an_empty_folder_creates_no_store(tmp_path):
    assert reconcile_store(tmp_path) == {"added": 0, "updated": 0, "removed": 0}
    assert not (tmp_path / "results.sqlite").exists()


def test_unreadable_result_is_named(tmp_path):
    _result(tmp_path)
    bad = tmp_path / "runs/m/sst2/lora/seed42/result.json"
    bad.write_text("{")
    with pytest.raises(StoreError, match=r"seed42/result\.json: not a readable run result"):
        reconcile_store(tmp_path)


HOLDER = """
import sys, time
from loradrift.io import exclusive_lock
with exclusive_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path):
    lock = tmp_path / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockBusy, match=f"run in progress by pid {proc.pid}"), exclusive_lock(lock):
            pass
    finally:
        proc.kill()
        proc.wait()
    # The kernel dropped the dead process's lock: no stale lock to clean up.
    deadline = time.time() + 10
    while True:
        try:
            with exclusive_lock(lock):
                break
        except LockBusy:
            assert time.time() < deadline
            time.sleep(0.1)
    assert lock.read_text().strip() == str(os.getpid())


def test_report_reads_runs_that_the_store_lost(tmp_path):
    from loradrift.report import Artefacts

    _result(tmp_path, seed=1, acc=0.25)
    ResultsStore(tmp_path / "results.sqlite")  # a store without the run's row
    (row,) = Artefacts(tmp_path).rows("run")
    assert (row["seed"], row["metrics"]["dev"]["accuracy"]) == (1, 0.25)


def test_json_safe_numpy_scalars_and_non_finite():
    import json

    import numpy as np

    from loradrift.io import json_safe

    got = json_safe({"b": np.bool_(True), "i": np.int64(7), "f": np.float32(0.5), "nan": float("nan"),
                     "inf": np.float64("inf"), "nested": [np.int32(1), (np.float64("-inf"), 2.5)], "s": "x"})
    assert got == {"b": True, "i": 7, "f": 0.5, "nan": None, "inf": None, "nested": [1, [None, 2.5]], "s": "x"}
    assert type(got["b"]) is bool and type(got["i"]) is int
    json.dumps(got, allow_nan=False)  # strict JSON
