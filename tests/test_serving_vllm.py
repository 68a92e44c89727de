"""vLLM backend on CPU with the tiny random Llama: adapters served unmerged in mixed batches must
reproduce the merged models, and vLLM must reproduce the hf backend token for token.

    pytest -m vllm tests/test_serving_vllm.py     (needs the [serve] extra; see docs/serving.md)
"""

from __future__ import annotations

import csv
import json

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs the serve extra: pip install 'loradrift[serve]'")

from loradrift import serving  # noqa: E402
from test_serving import make_adapter, make_base, make_prompts  # noqa: E402


def test_vllm_matches_merged_and_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    base = make_base(tmp_path / "base")  # head_dim 64: a size vLLM's CPU attention supports
    adapters = {t: make_adapter(base, tmp_path / t, seed=i + 1) for i, t in enumerate(("sst2", "squad_v2"))}
    out = tmp_path / "serve"
    res = serving.run_serve_bench(
        base, adapters, {}, make_prompts(), backend="hf,vllm", batch_sizes=[1, 2], max_tokens=4,
        rounds=2, warmup=1, out_dir=out, max_lora_rank=8, device="cpu", check_prompts=3,
        check_tokens=8, include_base=False,
    )
    corr = res["correctness"]
    # vLLM: unmerged vs merged, and every configuration vs hf
    vs_merged = [c for c in corr if c["backend"] == "vllm" and c["reference"].startswith("vllm:")]
    vs_hf = [c for c in corr if c["backend"] == "vllm" and c["reference"].startswith("hf:")]
    assert {(c["config"], c["task"]) for c in vs_merged} == {("adapters-2", "sst2"), ("adapters-2", "squad_v2")}
    assert {c["config"] for c in vs_hf} == {"merged-sst2", "merged-squad_v2", "adapters-2"}
    assert all(c["match_rate"] == 1.0 for c in corr), corr

    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["backend"] == "vllm"]
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert float(r["latency_mean_s"]) > 0
        assert float(r["peak_child_rss_mb"]) > 0  # the engine process was seen
        assert r["ttft_method"] != "unavailable" and 0 < float(r["ttft_mean_s"]) <= float(r["latency_mean_s"])
    ov = json.loads((out / "overhead.json").read_text())
    assert {(r["backend"], r["config"]) for r in ov} == {("hf", "adapters-2"), ("vllm", "adapters-2")}
