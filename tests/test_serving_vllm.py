"""vLLM on CPU with the tiny random Llama: the offline benchmark (adapters served unmerged in mixed
batches reproduce the merged models and hf, and differ from the base), the online benchmark
against vLLM's OpenAI server, and the client's metrics against vLLM's own ``calculate_metrics``.

    pytest -m vllm tests/test_serving_vllm.py     (needs vLLM; see docs/serving.md)
"""

from __future__ import annotations

import csv
import json

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="needs vLLM: pip install 'loradrift[serve]' (GPU) or scripts/install_vllm_cpu.sh")

from test_serving import make_adapter, make_base, make_prompts  # noqa: E402

from loradrift import serving  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vllm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    base = make_base(root / "base")  # head_dim 64: a size vLLM's CPU attention supports
    adapters = {t: make_adapter(base, root / t, seed=i + 1) for i, t in enumerate(("sst2", "squad_v2"))}
    return {"root": root, "base": base, "adapters": adapters}


def test_vllm_offline_matches_merged_and_hf(tiny_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    out = tmp_path / "serve"
    res = serving.run_serve_bench(
        tiny_vllm["base"], tiny_vllm["adapters"], {}, make_prompts(8), backend="hf,vllm", batch_sizes=[1, 2],
        max_tokens=4, rounds=2, warmup=1, out_dir=out, device="cpu", check_prompts=8, check_tokens=8,
        # one engine start per configuration keeps CI short; the schedule over several starts is
        # the same code for both backends and is tested in test_serving.py
        include_base=False, engine_restarts=1, cache_dir=tiny_vllm["root"] / "merged",
    )
    corr = res["correctness"]
    vs_merged = [c for c in corr if c["backend"] == "vllm" and c["check"] == "adapter vs merged"]
    assert {(c["config"], c["task"]) for c in vs_merged} == {
        ("adapters-1", "sst2"), ("adapters-2", "sst2"), ("adapters-2", "squad_v2")}
    vs_hf = [c for c in corr if c["check"] == "across backends"]
    assert {c["config"] for c in vs_hf} == {"merged-sst2", "merged-squad_v2", "adapters-1", "adapters-2"}
    differs = [c for c in corr if c["backend"] == "vllm" and c["check"] == "adapter differs from base"]
    assert sorted(c["task"] for c in differs) == ["squad_v2", "sst2"]
    assert all(c["passed"] for c in corr), corr
    assert all(c["match_rate"] == 1.0 for c in vs_merged + vs_hf)

    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["backend"] == "vllm"]
    assert len(rows) == 4 * 2 * 2
    for r in rows:
        assert float(r["latency_mean_s"]) > 0
        assert float(r["peak_child_rss_mb"]) > 0  # the engine process was seen
        assert r["ttft_method"] != "unavailable" and 0 < float(r["ttft_mean_s"]) <= float(r["latency_mean_s"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["engine_restarts"] == {"hf": 1, "vllm": 1}
    a2 = meta["engine_settings"]["vllm"]["adapters-2"]
    assert a2["enable_prefix_caching"] is False and a2["max_num_seqs"] == 2
    assert meta["max_lora_rank"] == 4 and a2["max_lora_rank"] == 8  # rank 4 -> vLLM's next accepted value
    ov = json.loads((out / "overhead.json").read_text())
    assert {(r["backend"], r["config"]) for r in ov} == {(b, c) for b in ("hf", "vllm") for c in ("adapters-1", "adapters-2")}
    assert all(r["paired"] is (r["backend"] == "hf") for r in ov)


def test_vllm_online_server_sweep(tiny_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    base, adapters = tiny_vllm["base"], tiny_vllm["adapters"]
    merged = {"sst2": serving.ensure_merged(base, adapters["sst2"], tiny_vllm["root"] / "merged" / "sst2")}
    cfgs = {c.name: c for c in serving.plan_configs(base, adapters, {**merged, "squad_v2": base}, include_base=False)}
    ids = serving.encode_prompts(AutoTokenizer.from_pretrained(base), serving.prompt_pool(make_prompts(4), ["sst2"]), 64)
    out = tmp_path / "online"
    group = serving.merged_engines(list(cfgs.values()))
    assert [c.name for c in group] == ["merged-sst2", "merged-squad_v2"]
    res = serving.run_online(
        [cfgs["merged-sst2"], cfgs["adapters-2"]],
        lambda c: serving.engine_settings(c, base, "cpu", "float32", 128, 4, 8), ids, out,
        rates=[20.0, float("inf")], requests_per_rate=8, max_tokens=6, seed=0,
        slo_ms={"ttft": 60000.0, "tpot": 60000.0}, merged_group=group, log=lambda *_: None)
    serving.write_online_results(res, out)
    assert {(r["config"], r["request_rate"]) for r in res["summary"]} == {
        (c, r) for c in ("merged-sst2", "adapters-2", "merged-engines-2") for r in (20.0, "inf")}
    for r in res["summary"]:
        assert r["completed"] == 8 and r["total_output_tokens"] == 8 * 6
        assert 0 < r["ttft_p50_ms"] <= r["e2el_p50_ms"]
        # 8 requests place no p95 or p99; their 40 pooled ITLs a p95 but no p99
        assert r["ttft_p99_ms"] is None and r["ttft_p95_ms"] is None and r["itl_p99_ms"] is None
        assert r["tpot_p50_ms"] > 0 and r["itl_p95_ms"] > 0
        assert r["offered_rate"] == ("inf" if r["request_rate"] == "inf" else pytest.approx(20.0))
        assert r["goodput"] == pytest.approx(r["request_throughput"])  # SLOs of a minute: every request meets them
        assert r["server_peak_rss_mb"] > 0
    assert {q["adapter"] for q in res["requests"] if q["config"] == "adapters-2"} == {"sst2", "squad_v2"}
    for name in ("merged-sst2", "adapters-2"):
        log = (out / f"server-{name}.log").read_text()
        assert "--no-enable-prefix-caching" in log.splitlines()[0]
    assert "--lora-modules" in (out / "server-adapters-2.log").read_text().splitlines()[0]
    # two merged servers ran at once, each served its own model
    assert {q["adapter"] for q in res["requests"] if q["config"] == "merged-engines-2"} == {"merged-sst2", "merged-squad_v2"}
    for c in group:
        assert "--served-model-name " + c.name in (out / f"server-merged-engines-2-{c.name}.log").read_text().splitlines()[0]
    k = serving.k_tasks_cost(res["summary"], list(cfgs.values()))
    assert [r["how"].split(":")[0] for r in k] == ["measured", "measured"] and k[1]["memory_mb"] > 0
    for f in ("summary.csv", "summary.json", "requests.json", "meta.json"):
        assert (out / f).is_file()


def test_client_metrics_equal_vllms_calculate_metrics():
    """The same synthetic requests through vLLM's calculate_metrics and ours (120 of them, so that
    every percentile is one we report)."""
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    from loradrift.serving import online

    ours, theirs = [], []
    rng = __import__("numpy").random.default_rng(0)
    for i in range(120):
        n = int(rng.integers(1, 9))
        sent = float(i) * 0.3
        times = list(sent + rng.uniform(0.05, 0.5) + __import__("numpy").cumsum([0.0] + list(rng.uniform(0.01, 0.2, n - 1))))
        t = online.RequestTiming("c", None, 1.0, sent, times, n, True)
        ours.append(t)
        m = t.metrics()
        theirs.append(RequestFuncOutput(success=True, latency=m["e2el"], output_tokens=n, ttft=m["ttft"],
                                        itl=m["itl"], prompt_len=3, start_time=sent))
    slo = {"ttft": 300.0, "tpot": 100.0, "e2el": 900.0}
    ref, _ = calculate_metrics([SampleRequest(prompt=[1, 2, 3], prompt_len=3)] * 120, theirs, 9.0, None,
                               [50.0, 95.0, 99.0], dict(slo))
    got = online.summarize(ours, 9.0, slo)
    assert got["request_throughput"] == pytest.approx(ref.request_throughput)
    assert got["output_throughput"] == pytest.approx(ref.output_throughput)
    assert got["goodput"] == pytest.approx(ref.request_goodput)
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert got[f"{name}_mean_ms"] == pytest.approx(getattr(ref, f"mean_{name}_ms"))
        pct = dict(getattr(ref, f"percentiles_{name}_ms"))
        for p in (50, 95, 99):
            assert got[f"{name}_p{p}_ms"] == pytest.approx(pct[float(p)])


TERM_SCRIPT = """
import sys
from pathlib import Path
from loradrift.cli import Terminated, _stop_on_sigterm
from loradrift import serving
from test_serving import make_prompts

if __name__ == "__main__":
    _stop_on_sigterm()  # what cli.main does for every command
    base, adapter, out = map(Path, sys.argv[1:4])
    try:
        serving.run_serve_bench(base, {"sst2": adapter}, {}, make_prompts(8), backend="vllm", batch_sizes=[1],
                                max_tokens=4, rounds=100000, warmup=0, out_dir=out, device="cpu", check_prompts=2,
                                check_tokens=2, include_base=False, engine_restarts=1, cache_dir=out / "merged")
    except Terminated:
        sys.exit(143)
"""


def test_sigterm_leaves_no_vllm_engine_process_behind(tiny_vllm, tmp_path):
    """Issue 28 item 14: a terminated benchmark left vLLM's engine processes running. SIGTERM now
    reaches the command's children and unwinds it; it is sent while the engine may still be
    starting, the case where vLLM alone carried on."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from loradrift.runtime import descendant_pids

    script = tmp_path / "term.py"
    script.write_text(TERM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_vllm["base"]), str(tiny_vllm["adapters"]["sst2"]),
                             str(tmp_path / "serve")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)

    def cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        except OSError:
            return ""

    def running(pid):  # a zombie has ended; only its parent's wait is missing
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    try:
        deadline, engine = time.time() + 600, []
        while time.time() < deadline and proc.poll() is None and not engine:
            engine = [p for p in descendant_pids(proc.pid) if "EngineCore" in cmdline(p)]
            time.sleep(0.5)
        assert engine and proc.poll() is None, "the benchmark ended before its engine could be seen"
        time.sleep(10)
        children = descendant_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 143, err[-3000:]
        deadline = time.time() + 30
        while time.time() < deadline and [p for p in children if running(p)]:
            time.sleep(0.5)
        assert not [p for p in children if running(p)], "engine processes still running after SIGTERM"
    finally:  # never leave an engine behind for the rest of the suite
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in descendant_pids(proc.pid):
            if running(p):
                os.kill(p, signal.SIGKILL)
