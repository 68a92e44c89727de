"""`loradrift stats` on planted artefacts: which metric and baselines H1 uses, the family, the JSON."""

import json

import pytest

from loradrift.config import resolve_config
from loradrift.hypotheses import run_stats
from loradrift.io import ResultsStore
from loradrift.layout import model_key

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


def _comparison(tmp_path, ft, lora, floor=1e-9):
    from loradrift.io import atomic_write_json

    atomic_write_json(tmp_path / "drift" / "comparison.json", {
        t: {"drift_full_by_seed": dict(zip(map(str, SEEDS), ft)), "drift_lora_by_seed": dict(zip(map(str, SEEDS), lora)),
            "noise_floor": floor, "probe_var_log_ratio": 1e-4} for t in ("mrpc", "sst2")})


def test_h2_is_undetermined_when_nothing_learned(tmp_path):
    """Issue 25 point 1, planted like the committed CPU study: no run beats its baseline (H1
    undetermined), LoRA drifts 5 x more than FT. H2 said 'not supported' (-400 %) and so did the
    overall verdict: a verdict about two untrained models. Now H2 and the verdict are undetermined
    because the tasks were not learned."""
    runs = {("mrpc", m): [_mrpc(a, 0.8) for a in (0.68, 0.66, 0.70)] for m in ("full", "lora")}
    runs |= {("sst2", m): [{"accuracy": a} for a in (0.50, 0.52, 0.49)] for m in ("full", "lora")}
    cfg = _setup(tmp_path, runs, {"mrpc": ("majority", {"accuracy": 0.684, "f1": 0.81}),
                                  "sst2": ("majority", {"accuracy": 0.51})})
    _comparison(tmp_path, [1e-3, 1.1e-3, 0.9e-3], [5e-3, 5.5e-3, 4.5e-3])
    res = run_stats(cfg)
    by = {r["scope"]: r for r in res["H2"]}
    assert by["mrpc"]["decision"] == "undetermined" and "did not learn" in by["mrpc"]["reason"]
    assert by["pooled"]["decision"] == "undetermined" and "did not learn" in by["pooled"]["reason"]
    assert res["verdict"]["decisions"] == {"H1": "undetermined", "H2": "undetermined", "H3": "undetermined",
                                           "overall": "undetermined"}
    assert set(res["learning_gate"]["not_learned"]) == {"mrpc", "sst2"}
    # undetermined primaries are left out of the family's adjustment, and hypotheses.json says so
    assert all(r["p_holm"] is None for h in ("H1", "H2") for r in res[h] if r["role"] == "primary")
    assert res["family"]["left_out_of_adjustment"] == ["H1 pooled (undetermined)", "H2 pooled (undetermined)",
                                                       "H3 (no primary result)"]
    # the same drifts from runs that learned: H2 is decided (and not supported)
    learned = {k: [{**d, "accuracy": d["accuracy"] + 0.3} for d in v] for k, v in runs.items()}
    cfg = _setup(tmp_path / "learned", learned, {"mrpc": ("majority", {"accuracy": 0.684, "f1": 0.81}),
                                                "sst2": ("majority", {"accuracy": 0.51})})
    _comparison(tmp_path / "learned", [1e-3, 1.1e-3, 0.9e-3], [5e-3, 5.5e-3, 4.5e-3])
    assert run_stats(cfg)["verdict"]["decisions"]["H2"] == "not supported"


def test_the_baseline_bar_is_at_least_chance_and_the_dev_majority_rate(tmp_path):
    """Issue 25 point 2: on SST-2 the train-majority class is the dev minority (0.44), so runs at
    chance (0.50-0.52) 'beat the baseline' by more than their spread and H1 was decided on them.
    The bar is the largest of chance, the dev-majority rate and the stored rows: 0.56 here, from
    an old store's majority row (two labels: 1 - 0.44), or the rate a new store records."""
    from loradrift.learning import baseline_bars

    runs = {("sst2", "full"): [{"accuracy": a} for a in (0.52, 0.52, 0.51)],
            ("sst2", "lora"): [{"accuracy": a} for a in (0.51, 0.52, 0.52)]}
    cfg = _setup(tmp_path, runs, {"sst2": ("majority", {"accuracy": 0.44})})
    cfg.study.tasks = ["sst2"]
    ResultsStore(tmp_path / "results.sqlite").put("baseline", model_key(cfg.model), "sst2", "random", 42, "h",
                                                  {"accuracy": 0.47})
    bars = baseline_bars(cfg)["sst2"]
    assert bars["bar"] == pytest.approx(0.56) and bars["from"] == pytest.approx(
        {"chance": 0.5, "majority": 0.44, "random": 0.47, "dev_majority": 0.56})
    (task, _) = run_stats(cfg)["H1"]
    assert task["decision"] == "undetermined" and "did not learn" in task["reason"] and "0.56" in task["reason"]
    # a store that records the dev-majority rate (Phase 0 now does) uses it
    ResultsStore(tmp_path / "results.sqlite").put("baseline", model_key(cfg.model), "sst2", "majority", 42, "h2",
                                                  {"accuracy": 0.44, "dev_majority_accuracy": 0.58})
    assert baseline_bars(cfg)["sst2"]["bar"] == pytest.approx(0.58)
    # without a majority row there is no dev-majority rate: no bar, so no task can count as learned
    cfg2 = _setup(tmp_path / "chance", runs, {"sst2": ("random", {"accuracy": 0.31})})
    cfg2.study.tasks = ["sst2"]
    assert baseline_bars(cfg2)["sst2"]["bar"] is None and "dev-majority rate" in baseline_bars(cfg2)["sst2"]["reason"]
    (task, _) = run_stats(cfg2)["H1"]
    assert task["decision"] == "undetermined" and "no baseline bar for sst2" in task["reason"]


def test_h3_on_peft_is_secondary_evidence_and_vllm_on_cpu_says_so(tmp_path):
    """Issue 25 point 8: H3 measured on transformers + PEFT decided the verdict as if it were the
    pre-registered H3 (on a serving engine). Planted: H1 supported, H2 not supported, H3 'supported'
    on hf, so the overall verdict was 'supported'; now H3 and the verdict are undetermined, and the
    PEFT result is shown as secondary evidence, named in the verdict line."""
    from loradrift.hypotheses import verdict_line
    from loradrift.io import atomic_write_json

    runs = {("mrpc", "full"): [_mrpc(a, 0.8) for a in (0.90, 0.91, 0.92)],
            ("mrpc", "lora"): [_mrpc(a, 0.8) for a in (0.90, 0.912, 0.918)],
            ("sst2", "full"): [{"accuracy": a} for a in (0.90, 0.91, 0.92)],
            ("sst2", "lora"): [{"accuracy": a} for a in (0.899, 0.91, 0.921)]}
    cfg = _setup(tmp_path, runs, {"mrpc": ("majority", {"accuracy": 0.684, "f1": 0.81}),
                                  "sst2": ("majority", {"accuracy": 0.51})})
    _comparison(tmp_path, [1e-2, 1.1e-2, 0.9e-2], [1e-2, 1.1e-2, 0.9e-2])
    atomic_write_json(tmp_path / "serve" / "overhead.json", [_overhead_row("hf", "adapters-4", b, 1.1, True) for b in (1, 8)])
    atomic_write_json(tmp_path / "serve" / "meta.json", {"device": "cpu", "engine_restarts": {"hf": 1}})
    res = run_stats(cfg)
    v = res["verdict"]
    assert (v["H1"], v["H2"], v["H3"], v["overall"]) == (True, False, None, None)
    assert v["reasons"]["H3"].startswith("undetermined: PEFT backend, not vLLM") and "secondary evidence" in v["reasons"]["H3"]
    assert all(r["role"] == "secondary" and r["p_holm"] is None for r in res["H3"])
    assert next(r for r in res["H3"] if r["scope"].endswith("batch=8"))["decision"] == "supported"
    assert res["H3_backend"]["backend"] == "hf" and res["H3_backend"]["pre_registered"] is False
    assert "PEFT backend, not vLLM" in verdict_line(res) and verdict_line(res).endswith("undetermined")
    html = __import__("loradrift.report", fromlist=["x"]).build_report(tmp_path, pdf=False)["html"].read_text()
    summary = html.split('id="summary"')[1].split("</section>")[0]
    assert "PEFT backend, not vLLM" in summary and "secondary evidence, not in the verdict" in summary

    # vLLM on a CPU: the pre-registered H3, with its note (5 engine starts of 2 rounds)
    row = {**_overhead_row("vllm", "adapters-4", 8, 1.1, False), "start_by_round": [r // 2 for r in range(10)]}
    atomic_write_json(tmp_path / "serve" / "overhead.json", [row])
    res = run_stats(cfg)
    (h3,) = res["H3"]
    assert h3["role"] == "primary" and h3["decision"] == "supported" and "5 engine starts" in h3["ci_method"]
    assert any("not a GPU deployment figure" in n for n in h3["notes"]) and res["verdict"]["overall"] is True
    assert "not a GPU deployment figure" in verdict_line(res)


def test_forgetting_conclusions_pass_the_learning_gate(tmp_path):
    """Issue 25 point 1: 'the same gate applies to any conclusion drawn from forgetting'. The
    committed CPU study's drift-vs-forgetting correlation (rho 0.69, p 0.0006, 'positive') was
    drawn over runs that learned nothing."""
    from loradrift.forgetting import gate_correlations

    corr = {"pooled": {"n": 12, "rho": 0.69, "p_value": 6e-4, "decision": "positive", "reason": "p < 0.05"},
            "by_task": {"mrpc": {"n": 6, "decision": "positive"}, "sst2": {"n": 6, "decision": "no evidence"}},
            "by_method": {"full": {"n": 6, "decision": "undetermined", "reason": "n = 6 too few"}}}
    gated = gate_correlations(corr, {"mrpc": "FT did not learn: ..."})
    assert gated["pooled"]["decision"] == "undetermined" and gated["pooled"]["rho"] == 0.69
    assert gated["pooled"]["reason"] == "built on task(s) that did not learn: mrpc"
    assert gated["by_task"]["mrpc"]["reason"].startswith("did not learn (FT did not learn")
    assert gated["by_task"]["sst2"] == corr["by_task"]["sst2"]
    assert gated["by_method"]["full"]["reason"].endswith("; n = 6 too few")
    assert gate_correlations(corr, {}) == corr
