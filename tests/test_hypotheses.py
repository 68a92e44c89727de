"""`loradrift stats` on planted artefacts: which metric and baselines H1 uses, the family, the JSON."""

import json

import pytest

from loradrift.config import resolve_config
from loradrift.hypotheses import run_stats
from loradrift.io import ResultsStore
from loradrift.models import model_key

SEEDS = [42, 1337, 2024]


def _setup(tmp_path, runs, baselines):
    cfg = resolve_config(preset="tiny", out_dir=tmp_path, overrides=["study.tasks=[mrpc,sst2]"])
    store = ResultsStore(tmp_path / "results.sqlite")
    key = model_key(cfg.model)
    for (task, method), dev in runs.items():
        for seed, d in zip(SEEDS, dev):
            store.put("run", key, task, method, seed, "h", {"dev": d})
    for task, (name, metrics) in baselines.items():
        store.put("baseline", key, task, name, 42, "h", metrics)
    return cfg


def _mrpc(acc, f1):
    return {"accuracy": acc, "f1": f1, "combined_score": (acc + f1) / 2}


def test_h1_uses_accuracy_for_mrpc_and_reports_f1(tmp_path):
    """Point 9: (accuracy + F1)/2 says LoRA equals FT, accuracy says it is 12 % worse."""
    runs = {("mrpc", "full"): [_mrpc(0.80, 0.60), _mrpc(0.81, 0.59), _mrpc(0.79, 0.61)],
            ("mrpc", "lora"): [_mrpc(0.70, 0.70), _mrpc(0.71, 0.69), _mrpc(0.69, 0.71)],
            ("sst2", "full"): [{"accuracy": a} for a in (0.90, 0.91, 0.92)],
            ("sst2", "lora"): [{"accuracy": a} for a in (0.90, 0.91, 0.92)]}
    cfg = _setup(tmp_path, runs, {"mrpc": ("majority", {"accuracy": 0.5, "f1": 0.0}),
                                  "sst2": ("majority", {"accuracy": 0.5})})
    res = run_stats(cfg)
    mrpc = next(r for r in res["H1"] if r["scope"] == "mrpc")
    assert mrpc["estimate"] == pytest.approx((0.8 - 0.7) / 0.8 * 100, abs=0.1)
    assert mrpc["decision"] == "not supported"
    assert any("F1 beside accuracy" in n for n in mrpc["notes"])
    assert res["settings"]["h1_metrics"] == {"mrpc": "accuracy", "sst2": "accuracy"}
    on_disk = json.loads((tmp_path / "stats" / "hypotheses.json").read_text())
    assert on_disk["family"]["size"] == 3 and on_disk["family"]["primary_level"] == pytest.approx(1 - 0.05 / 3)
    assert on_disk["verdict"]["decisions"]["H2"] == "undetermined" and on_disk["verdict"]["H3"] is None


def test_runs_at_the_baseline_make_h1_undetermined(tmp_path):
    """Point 3: both methods predict the majority class on MRPC (accuracy = baseline)."""
    runs = {("mrpc", "full"): [_mrpc(0.684, 0.0)] * 3, ("mrpc", "lora"): [_mrpc(0.684, 0.0)] * 3,
            ("sst2", "full"): [{"accuracy": a} for a in (0.90, 0.91, 0.92)],
            ("sst2", "lora"): [{"accuracy": a} for a in (0.90, 0.905, 0.92)]}
    cfg = _setup(tmp_path, runs, {"mrpc": ("majority", {"accuracy": 0.684, "f1": 0.0}),
                                  "sst2": ("majority", {"accuracy": 0.5})})
    res = run_stats(cfg)
    pooled = next(r for r in res["H1"] if r["scope"] == "pooled")
    assert pooled["decision"] == "undetermined" and "mrpc" in pooled["reason"]
    assert res["verdict"]["H1"] is None and res["verdict"]["overall"] is None


def _overhead_row(backend, config, batch, factor, paired):
    merged = [1.0 + 0.01 * r for r in range(10)]
    return {"backend": backend, "config": config, "batch_size": batch, "paired": paired,
            "adapter_latency_by_round": [m * factor * (1 + 0.002 * (r % 3)) for r, m in enumerate(merged)],
            "merged_latency_by_round": merged}


def test_h3_is_decided_on_vllm_when_it_ran_and_labels_peft(tmp_path):
    """Issue 13 point 5: with hf and vllm rows (hf first), H3 takes vLLM's; with hf only, every
    H3 result says "PEFT backend, not vLLM"."""
    from loradrift.io import atomic_write_json

    cfg = _setup(tmp_path, {}, {})
    rows = [_overhead_row("hf", "adapters-4", b, 2.0, True) for b in (1, 8)]
    rows += [_overhead_row("vllm", "adapters-4", b, 1.1, False) for b in (1, 8)]
    atomic_write_json(tmp_path / "serve" / "overhead.json", rows)
    h3 = run_stats(cfg)["H3"]
    assert {r["scope"] for r in h3} == {"vllm/adapters-4/batch=1", "vllm/adapters-4/batch=8"}
    primary = next(r for r in h3 if r["role"] == "primary")
    assert primary["estimate"] == pytest.approx(10.0, abs=0.5)  # vLLM's 10 %, not PEFT's 100 %
    assert not any("PEFT backend" in n for r in h3 for n in r["notes"])

    atomic_write_json(tmp_path / "serve" / "overhead.json", [r for r in rows if r["backend"] == "hf"])
    h3 = run_stats(cfg)["H3"]
    assert {r["scope"] for r in h3} == {"hf/adapters-4/batch=1", "hf/adapters-4/batch=8"}
    assert all(any(n.startswith("PEFT backend, not vLLM") for n in r["notes"]) for r in h3)
