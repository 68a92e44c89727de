"""The online benchmark: vLLM's OpenAI-compatible server on 127.0.0.1, driven by Poisson arrivals.

For each configuration (a merged model; the base with k adapters via ``--lora-modules``) the
command starts ``python -m vllm.entrypoints.openai.api_server`` with the offline benchmark's
engine settings, keeps its log in ``online/server-<config>.log``, sends a request-rate sweep and
stops the server. Requests go to ``/v1/completions`` with token-id prompts, ``stream: true``,
greedy, ``ignore_eos``; adapters-<k> assigns requests to its adapters round-robin.

The client is our own (threads + ``http.client``, no extra dependency) with vLLM's definitions
from ``vllm/benchmarks/serve.py`` (``calculate_metrics``) and
``vllm/benchmarks/lib/endpoint_request_func.py``:

* TTFT: arrival of the first streamed chunk with choices, from the request's send time;
* ITL: the gaps between successive such chunks;
* E2EL: arrival of the last chunk, from the send time;
* TPOT: ``(E2EL - TTFT) / (output tokens - 1)`` per request with more than one output token;
* request throughput: completed requests / benchmark duration; output throughput: output tokens
  / duration; goodput: requests meeting every stated SLO / duration;
* percentiles: ``np.percentile`` (linear), ITL pooled over all requests; a p95 only over >= 20
  values and a p99 only over >= 100 (fewer cannot place a value beyond it), else None;
* send times: vLLM's ``get_request`` (burstiness 1): exponential gaps, rescaled so that the last
  request goes out at n / rate, so the offered rate is the labelled one (``offered_rate``);
* connections: kept alive and reused across requests, as vLLM's aiohttp client does, so a TTFT
  holds a TCP handshake only on a connection's first use.

``vllm bench serve`` exists in vLLM 0.32 too (with ``--lora-modules`` and round-robin
assignment), but its datasets are text or random tokens, not the offline benchmark's token ids;
this client reproduces its metric definitions, and a test checks them against vLLM's own
``calculate_metrics``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import descendant_pids
from .adapters import ServeConfig, ServeError
from .backends import cpu_binds, cpu_kvcache_gib, engine_cli_args, peak_rss_mb

DEFAULT_RATES = (1.0, 2.0, 4.0, float("inf"))
# A percentile q is reported only over at least 1 / (1 - q) values, so that on average one value
# lies beyond it; below that it is the sample's maximum under another name.
PERCENTILE_MIN_N = {50: 1, 95: 20, 99: 100}
# Stated service-level objectives for goodput, in ms (a request counts when it meets all three).
DEFAULT_SLO_MS = {"ttft": 2000.0, "tpot": 500.0, "e2el": 10000.0}


@dataclass
class RequestTiming:
    """One request as the client saw it; times are ``time.perf_counter()`` seconds."""

    config: str
    adapter: str | None
    rate: float
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    ok: bool = False
    error: str = ""

    def metrics(self) -> dict[str, Any]:
        return request_metrics(self.sent, self.chunk_times, self.output_tokens)


def request_metrics(sent: float, chunk_times: Sequence[float], output_tokens: int) -> dict[str, Any]:
    """TTFT, ITLs, TPOT and E2EL (seconds) of one streamed request, vLLM's definitions."""
    if not chunk_times:
        return {"ttft": None, "itl": [], "tpot": None, "e2el": None}
    ttft = chunk_times[0] - sent
    e2el = chunk_times[-1] - sent
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    tpot = (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None
    return {"ttft": ttft, "itl": itl, "tpot": tpot, "e2el": e2el}


def _pct(values: Sequence[float], prefix: str) -> dict[str, float | None]:
    x = np.asarray(values, dtype=float) * 1000.0
    out: dict[str, float | None] = {f"{prefix}_mean_ms": float(x.mean()) if x.size else None}
    for q, need in PERCENTILE_MIN_N.items():
        out[f"{prefix}_p{q}_ms"] = float(np.percentile(x, q)) if x.size and x.size >= need else None
    return out


def summarize(requests: Sequence[RequestTiming], duration_s: float, slo_ms: Mapping[str, float]) -> dict[str, Any]:
    """One row of the sweep: percentiles, throughputs and goodput over the completed requests.
    For goodput a request with one output token has TPOT 0, as in vLLM; its TPOT percentiles
    leave such requests out."""
    done = [r for r in requests if r.ok]
    ms = [r.metrics() for r in done]
    good = sum(all((m[k] or 0.0) * 1000.0 <= v for k, v in slo_ms.items()) for m in ms)
    out_tokens = sum(r.output_tokens for r in done)
    return {
        "n_requests": len(requests), "completed": len(done), "duration_s": duration_s,
        "request_throughput": len(done) / duration_s, "output_throughput": out_tokens / duration_s,
        "goodput": good / duration_s, "total_output_tokens": out_tokens,
        **_pct([m["ttft"] for m in ms], "ttft"),
        **_pct([m["tpot"] for m in ms if m["tpot"] is not None], "tpot"),
        **_pct([x for m in ms for x in m["itl"]], "itl"),
        **_pct([m["e2el"] for m in ms], "e2el"),
    }


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of n requests, as vLLM's ``get_request`` draws them
    (``--request-rate`` with burstiness 1): n exponential gaps of mean 1 / ``rate``, the first one
    included, cumulated and rescaled so that the last request goes out at n / ``rate``. Unscaled,
    32 draws labelled 1, 2 and 4 req/s offered 0.85, 1.49 and 4.53; rescaled, every seed offers
    the labelled rate. ``inf`` sends all at 0."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if not np.isfinite(rate):
        return [0.0] * n
    t = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=n))
    return (t * (n / rate) / t[-1]).tolist()


def offered_rate(offsets: Sequence[float]) -> float | str:
    """Requests per second the send times offer: n over the last send time, the span vLLM's
    normalisation fixes at n / rate ("inf" when every request goes out at once)."""
    return len(offsets) / offsets[-1] if offsets and offsets[-1] > 0 else "inf"


# vLLM's server closes a connection idle for 5 s (uvicorn's keep-alive timeout, which vLLM keeps);
# a request sent on it just then would fail, so the pool drops connections idle for longer than this.
MAX_IDLE_S = 4.0


class ConnectionPool:
    """Idle keep-alive connections per (host, port), shared by the client's threads: a request takes
    one (or opens one when none was idle for less than ``max_idle_s``) and gives it back when its
    response was read to the end, as aiohttp's pool does for vLLM's client. ``opened`` counts the
    connections made."""

    def __init__(self, timeout: float = 600.0, max_idle_s: float = MAX_IDLE_S):
        self.timeout, self.max_idle_s = timeout, max_idle_s
        self.opened = 0
        self._idle: dict[tuple[str, int], list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()

    def take(self, host: str, port: int) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((host, port)) or []
            while idle:
                since, conn = idle.pop()
                if time.monotonic() - since < self.max_idle_s:
                    return conn
                conn.close()
            self.opened += 1
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def give_back(self, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault((host, port), []).append((time.monotonic(), conn))

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for _, c in conns:
                    c.close()
            self._idle.clear()


def stream_completion(host: str, port: int, body: Mapping[str, Any], timing: RequestTiming,
                      pool: ConnectionPool) -> RequestTiming:
    """POST one streamed completion on a kept-alive connection of ``pool`` and record when each
    chunk with text arrives."""
    conn, reusable = pool.take(host, port), False
    try:
        timing.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            timing.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return timing
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                timing.ok = True
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            choices = chunk.get("choices") or []
            # as vLLM's client: every chunk with choices is a token step, even with empty text
            # (a special token); the usage chunk carries no choices
            if choices:
                timing.chunk_times.append(now)
            elif chunk.get("usage"):
                timing.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        if timing.ok and not timing.output_tokens:
            timing.ok, timing.error = False, "the stream carried no usage (completion_tokens)"
        # the chunked stream's terminator follows [DONE]; read to it, or the connection cannot be reused
        resp.read()
        reusable = not resp.will_close
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        timing.error = f"{type(e).__name__}: {e}"
    finally:
        if reusable:
            pool.give_back(host, port, conn)
        else:
            conn.close()
    return timing


def run_rate(targets: Sequence[tuple[str, int, str]], config: str, prompts: Sequence[Sequence[int]],
             rate: float, max_tokens: int, seed: int, pool: ConnectionPool,
             max_workers: int = 256) -> tuple[list[RequestTiming], float]:
    """Send ``len(prompts)`` requests at Poisson times (:func:`arrival_offsets`) over ``pool``'s
    connections; request i goes to ``targets[i % k]``, a (host, port, model name): one server's k
    adapters, or k servers' merged models. Returns the timings and the benchmark duration (start
    to last completion)."""
    offsets = arrival_offsets(len(prompts), rate, seed)
    timings: list[RequestTiming] = []
    futures = []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(prompts))) as workers:
        t0 = time.perf_counter()
        for i, (ids, off) in enumerate(zip(prompts, offsets)):
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            host, port, name = targets[i % len(targets)]
            t = RequestTiming(config, name, rate, 0.0)
            timings.append(t)
            body = {"model": name, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            futures.append(workers.submit(stream_completion, host, port, body, t, pool))
        for f in futures:
            f.result()
    return timings, time.perf_counter() - t0


def _rate_label(rate: float) -> float | str:
    # JSON has no infinity; "inf" (all requests at once) stays readable in the tables
    return rate if np.isfinite(rate) else "inf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, in its own process group,
    log to ``log_path``; a context manager that stops it (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, cli_args: Sequence[str], served_name: str, log_path: Path, lora_modules: Mapping[str, Path],
                 startup_timeout: float = 900.0, cpu_bind: str | None = None):
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.served_name = served_name
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *cli_args,
                    "--host", self.host, "--port", str(self.port), "--served-model-name", served_name,
                    "--disable-uvicorn-access-log"]
        if lora_modules:
            self.cmd += ["--lora-modules", *[f"{n}={p}" for n, p in lora_modules.items()]]
        self.log_path = Path(log_path)
        self.timeout = startup_timeout
        self.cpu_bind = cpu_bind  # VLLM_CPU_OMP_THREADS_BIND of this server (backends.cpu_binds)
        self.proc: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        """Launch the server without waiting for it (k servers start side by side)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open while the server runs; closed in __exit__
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": cpu_kvcache_gib(),
               **({"VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind} if self.cpu_bind else {})}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self._deadline = time.monotonic() + self.timeout
        return self

    def wait_ready(self) -> VLLMServer:
        """Poll ``/health`` until it answers 200; stop the server and raise if it exits or times out."""
        while time.monotonic() < self._deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise ServeError(f"the vLLM server exited with code {self.proc.returncode} while starting; "
                                 f"see {self.log_path}")
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise ServeError(f"the vLLM server did not answer /health within {self.timeout:.0f} s; see {self.log_path}")

    def __enter__(self) -> VLLMServer:
        return self.start().wait_ready()

    def peak_rss_mb(self) -> float | None:
        """Sum of VmHWM over the server and its children (API server, engine core)."""
        if self.proc is None:
            return None
        return peak_rss_mb([self.proc.pid, *descendant_pids(self.proc.pid)]) or None

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()


def online_configs(configs: Sequence[ServeConfig]) -> list[ServeConfig]:
    """The merged model of the first adapters-1 task, adapters-1, and the widest adapters-<k>."""
    adapters = [c for c in configs if c.kind == "adapters"]
    if not adapters:
        raise ServeError("the online benchmark needs at least one adapter")
    one, widest = adapters[0], max(adapters, key=lambda c: len(c.tasks))
    merged = next(c for c in configs if c.name == f"merged-{one.tasks[0]}")
    out: list[ServeConfig] = []
    for c in (merged, one, widest):
        if c.name not in {o.name for o in out}:
            out.append(c)
    return out


def merged_engines(configs: Sequence[ServeConfig]) -> list[ServeConfig]:
    """The merged models of the widest adapters-<k>'s tasks: serving those k tasks merged takes
    these k engines (empty when k < 2 or a merged model is missing)."""
    adapters = [c for c in configs if c.kind == "adapters"]
    if not adapters:
        return []
    widest = max(adapters, key=lambda c: len(c.tasks))
    by_name = {c.name: c for c in configs if c.kind == "merged"}
    group = [by_name.get(f"merged-{t}") for t in widest.tasks]
    return [c for c in group if c is not None] if len(widest.tasks) > 1 and all(group) else []


def group_name(k: int) -> str:
    return f"merged-engines-{k}"


# vLLM's default share of GPU memory for one engine; k engines on one GPU split it.
VLLM_GPU_MEMORY_UTILIZATION = 0.9


def run_online(
    configs: Sequence[ServeConfig], settings_for: Callable[[ServeConfig], dict[str, Any]],
    prompts: Sequence[Sequence[int]], out_dir: Path, *, rates: Sequence[float] = DEFAULT_RATES,
    requests_per_rate: int = 32, max_tokens: int = 32, seed: int = 0, slo_ms: Mapping[str, float] = DEFAULT_SLO_MS,
    merged_group: Sequence[ServeConfig] = (), device: str = "cpu", log: Callable[..., Any] = print,
) -> dict[str, Any]:
    """Start one server per configuration, sweep the request rates (the same prompts and Poisson
    send times for every configuration), stop it. With ``merged_group`` (k merged models), then
    start those k servers at once and sweep them as one configuration, ``merged-engines-<k>``:
    request i goes to the server of task i mod k, as adapters-<k> sends it to that task's
    adapter. On a GPU the k servers split vLLM's default memory share; on a CPU each keeps its
    ``VLLM_CPU_KVCACHE_SPACE``. Returns ``{"summary", "requests", "meta"}``."""
    out_dir = Path(out_dir)
    if requests_per_rate < 1:
        raise ServeError("online: requests_per_rate must be >= 1")
    unknown = set(slo_ms) - {"ttft", "tpot", "e2el"}
    if unknown:
        raise ServeError(f"online: unknown SLO metric(s) {sorted(unknown)} (ttft | tpot | e2el)")
    stream = [prompts[i % len(prompts)] for i in range(requests_per_rate)]
    summary, requests, server_meta = [], [], {}

    def sweep(name: str, adapters: str, targets: list[tuple[str, int, str]], servers: list[VLLMServer]) -> None:
        logs = ", ".join(str(s.log_path) for s in servers)
        pool = ConnectionPool()
        try:
            # one untimed request per target: the first request of a LoRA loads its weights
            run_rate(targets, name, stream[: len(targets)], float("inf"), max_tokens, seed, pool)
            for i, rate in enumerate(rates):
                sweep_rate(name, adapters, targets, servers, logs, pool, i, rate)
        finally:
            pool.close()

    def sweep_rate(name: str, adapters: str, targets: list[tuple[str, int, str]], servers: list[VLLMServer],
                   logs: str, pool: ConnectionPool, i: int, rate: float) -> None:
        timings, dur = run_rate(targets, name, stream, rate, max_tokens, seed + i, pool)
        failed = [t.error for t in timings if not t.ok]
        if failed:
            raise ServeError(f"online {name} at {rate} req/s: {len(failed)} request(s) failed, "
                             f"first: {failed[0]} (server log {logs})")
        rss = [s.peak_rss_mb() for s in servers]
        row = {"config": name, "adapters": adapters, "engines": len(servers), "request_rate": _rate_label(rate),
               "offered_rate": offered_rate(arrival_offsets(len(stream), rate, seed + i)),
               **summarize(timings, dur, slo_ms),
               "server_peak_rss_mb": None if any(r is None for r in rss) else float(sum(rss))}
        summary.append(row)
        requests.extend({**asdict(t), "rate": _rate_label(rate), **{k: v for k, v in t.metrics().items() if k != "itl"}}
                        for t in timings)
        ms = lambda v: "n/a" if v is None else f"{v:.0f} ms"  # noqa: E731
        log(f"[serve] online {name} @ {rate} req/s: {row['request_throughput']:.2f} req/s, "
            f"p50 TTFT {ms(row['ttft_p50_ms'])}, p99 TTFT {ms(row['ttft_p99_ms'])}, p99 TPOT {ms(row['tpot_p99_ms'])}")

    for cfg in configs:
        settings = settings_for(cfg)
        names = list(cfg.tasks) if cfg.kind == "adapters" else [cfg.name]
        loras = {t: cfg.adapter_dirs[t] for t in cfg.tasks} if cfg.kind == "adapters" else {}
        bind = cpu_binds(1)[0] if device == "cpu" else None
        server = VLLMServer(engine_cli_args(settings), cfg.name, out_dir / f"server-{cfg.name}.log", loras, cpu_bind=bind)
        log(f"[serve] online: starting the vLLM server for {cfg.name} (log {server.log_path})")
        with server:
            sweep(cfg.name, "+".join(cfg.tasks) if cfg.kind == "adapters" else "",
                  [(server.host, server.port, n) for n in names], [server])
        server_meta[cfg.name] = {"command": server.cmd, "log": str(server.log_path), "engine_settings": settings,
                                 "cpu_bind": bind}

    if merged_group:
        k, name = len(merged_group), group_name(len(merged_group))
        servers, ports = [], set()
        binds = cpu_binds(k) if device == "cpu" else [None] * k  # the k servers share the cores out
        for cfg, bind in zip(merged_group, binds):
            settings = dict(settings_for(cfg))
            if device.startswith("cuda"):
                settings["gpu_memory_utilization"] = round(VLLM_GPU_MEMORY_UTILIZATION / k, 4)
            srv = VLLMServer(engine_cli_args(settings), cfg.name, out_dir / f"server-{name}-{cfg.name}.log", {}, cpu_bind=bind)
            while srv.port in ports:  # a free port is only free until a server binds it
                srv = VLLMServer(engine_cli_args(settings), cfg.name, srv.log_path, {}, cpu_bind=bind)
            ports.add(srv.port)
            servers.append((srv, settings))
        log(f"[serve] online: starting {k} vLLM servers at once for {name} "
            f"({', '.join(c.name for c in merged_group)})")
        with ExitStack() as stack:
            for srv, _ in servers:
                srv.start()
                stack.callback(srv.__exit__, None, None, None)
            for srv, _ in servers:
                srv.wait_ready()
            sweep(name, "", [(s.host, s.port, s.served_name) for s, _ in servers],
                  [s for s, _ in servers])
        server_meta[name] = {"servers": [{"command": s.cmd, "log": str(s.log_path), "engine_settings": st, "cpu_bind": s.cpu_bind}
                                         for s, st in servers],
                             "kv_cache": (f"gpu_memory_utilization {VLLM_GPU_MEMORY_UTILIZATION}/{k} each"
                                          if device.startswith("cuda") else
                                          f"VLLM_CPU_KVCACHE_SPACE={cpu_kvcache_gib()} GiB each")}
    meta = {"client": "loradrift.serving.online (threads + http.client), vLLM's metric definitions",
            "endpoint": "/v1/completions, stream, token-id prompts, temperature 0, ignore_eos",
            "rates": list(rates), "requests_per_rate": requests_per_rate, "max_tokens": max_tokens,
            "arrivals": "Poisson (exponential gaps), rescaled as vLLM's get_request so the last request goes out at "
                        "n / rate; seed + rate index", "seed": seed, "slo_ms": dict(slo_ms),
            "connections": "kept alive, reused across requests (one pool per configuration's sweep)",
            "percentiles": {f"p{q}": f"over >= {n} values, else None" for q, n in PERCENTILE_MIN_N.items()},
            "goodput": "requests meeting every SLO / duration", "servers": server_meta}
    return {"summary": summary, "requests": requests, "meta": meta}


def k_tasks_cost(summary: Sequence[Mapping[str, Any]], configs: Sequence[ServeConfig]) -> list[dict[str, Any]]:
    """Serving k tasks: one engine + k adapters vs k merged engines, each at its best throughput
    of the sweep, with its servers' summed peak RSS. The k-merged row is measured when the sweep
    ran ``merged-engines-<k>`` (k servers at once); otherwise it is derived, and says so: k times
    one merged server's peak RSS, and one merged engine's saturation throughput, which k engines
    on the same device share."""
    sat: dict[str, Mapping[str, Any]] = {}
    for r in summary:
        if r["config"] not in sat or r["request_throughput"] > sat[r["config"]]["request_throughput"]:
            sat[r["config"]] = r
    widest = max((c for c in configs if c.kind == "adapters" and c.name in sat), key=lambda c: len(c.tasks), default=None)
    if widest is None:
        return []
    k = len(widest.tasks)
    a = sat[widest.name]
    rows = [{"setup": f"one engine + {k} adapters ({widest.name})", "k": k, "how": "measured",
             "memory_mb": a.get("server_peak_rss_mb"), "max_request_throughput": a["request_throughput"],
             "max_output_throughput": a["output_throughput"]}]
    group = sat.get(group_name(k))
    if group is not None:
        return rows + [{"setup": f"{k} merged engines ({group_name(k)})", "k": k,
                        "how": f"measured: {k} servers running at once, requests round-robin over them",
                        "memory_mb": group.get("server_peak_rss_mb"), "max_request_throughput": group["request_throughput"],
                        "max_output_throughput": group["output_throughput"]}]
    merged = next((c for c in configs if c.kind == "merged" and c.name in sat), None)
    if merged is None:
        return rows
    m = sat[merged.name]
    mem = m.get("server_peak_rss_mb")
    return rows + [{"setup": f"{k} merged engines ({k} x {merged.name})", "k": k,
                    "how": f"derived: {k} x one merged server's peak RSS; throughput of one merged engine at "
                           "saturation, which k engines on the same device share",
                    "memory_mb": None if mem is None else k * mem, "max_request_throughput": m["request_throughput"],
                    "max_output_throughput": m["output_throughput"]}]
