"""Shared fixtures. Tests use the task data in ../shared/data (or $LORADRIFT_DATA) and build the
`tiny` model in a per-session cache, so nothing is downloaded."""

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="loradrift-test-cache-")
# Slow tests that need the real SmolLM2 keep the user's cache (its conversion takes ~30 s).
os.environ.setdefault("LORADRIFT_REAL_CACHE", os.environ.get("LORADRIFT_CACHE", str(Path.home() / ".cache" / "loradrift")))
os.environ["LORADRIFT_CACHE"] = _SESSION_CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from loradrift.data import default_data_dir

    d = default_data_dir()
    if d is None or not d.is_dir():
        pytest.fail("task data folder not found: set LORADRIFT_DATA or keep ../shared/data beside the repo")
    return d


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: the tiny preset with output under tmp_path."""
    from loradrift.config import resolve_config

    def make(task="sst2", method="lora", seed=42, overrides=()):
        return resolve_config(preset="tiny", task=task, overrides=[f"method.name={method}", *overrides], out_dir=tmp_path / "out", seed=seed)

    return make
