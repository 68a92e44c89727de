"""Shared fixtures. Tests use loradrift's own copy of the task data (src/loradrift/taskdata) and
build the `tiny` model in a per-session cache, so nothing is downloaded and nothing outside the
repository is read."""

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="loradrift-test-cache-")
# Slow tests that need the real SmolLM2 keep the user's cache (its conversion takes ~30 s).
os.environ.setdefault("LORADRIFT_REAL_CACHE", os.environ.get("LORADRIFT_CACHE", str(Path.home() / ".cache" / "loradrift")))
os.environ["LORADRIFT_CACHE"] = _SESSION_CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A user's own data folder must not leak into the tests: each test that wants one names it.
os.environ.pop("LORADRIFT_DATA", None)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from loradrift.data import PACKAGED_DATA

    if not (PACKAGED_DATA / "SHA256SUMS").is_file():
        pytest.fail(f"loradrift's own copy of the task data is missing: {PACKAGED_DATA}")
    return PACKAGED_DATA


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: the tiny preset with output under tmp_path."""
    from loradrift.config import resolve_config

    def make(task="sst2", method="lora", seed=42, overrides=()):
        return resolve_config(preset="tiny", task=task, overrides=[f"method.name={method}", *overrides], out_dir=tmp_path / "out", seed=seed)

    return make
