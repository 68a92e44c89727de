"""The serving section: the multi-adapter overhead (H3's quantity), latency, throughput and memory
per configuration, the correctness checks, the offline tables per batch size, the online
benchmark (vLLM only) and the serving figures.

    serve/overhead.json, serve/results.json, serve/correctness.json, serve/meta.json,
    serve/online/{summary,meta,k_tasks}.json, serve/figures/*.png
"""

from __future__ import annotations

from typing import Any

from loradrift.layout import PATHS
from loradrift.report.artefacts import Artefacts, rows_of
from loradrift.report.figures import add_figures
from loradrift.report.render import Section, num, pick_columns, scalar

# The serving benchmark's files: inside its folders (PATHS["serve"], PATHS["serve_online"]) but
# overhead.json and meta.json, which have entries of their own.
OVERHEAD, META = PATHS["serve_overhead"], PATHS["serve_meta"]
RESULTS, CORRECTNESS = PATHS["serve"] + "results.json", PATHS["serve"] + "correctness.json"
ONLINE_SUMMARY, ONLINE_META = PATHS["serve_online"] + "summary.json", PATHS["serve_online"] + "meta.json"
ONLINE_K_TASKS = PATHS["serve_online"] + "k_tasks.json"

SERVE_NOTE = ("The adapters were trained with a task head (a classifier or span head on top of the "
              "transformer), but only the transformer-block LoRA weights are served: the serving "
              "benchmark measures generation with the language-model head, so it times the adapter "
              "mechanics, not the task predictions.")


def _aggregate_rounds(rows: list[dict]) -> list[dict]:
    """Mean over measurement rounds per (backend, config, batch size); strings kept when equal."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("backend"), r.get("config"), r.get("batch_size")), []).append(r)
    out = []
    for (b, c, bs), rs in groups.items():
        row: dict[str, Any] = {"backend": b, "config": c, "batch_size": bs, "n_rounds": len(rs)}
        for k in dict.fromkeys(k for r in rs for k in r):
            if k in row or k == "round":
                continue
            vals = [r.get(k) for r in rs]
            nums = [num(v) for v in vals if num(v) is not None]
            if nums and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None):
                row[k] = sum(nums) / len(nums)
            elif all(scalar(v) for v in vals):
                uniq = list(dict.fromkeys(v for v in vals if v is not None))
                row[k] = uniq[0] if len(uniq) == 1 else ", ".join(map(str, uniq)) if uniq else None
        out.append(row)
    return out


def _serving_offline_by_batch(sec: Section, art: Artefacts) -> None:
    """Offline benchmark: one table per batch size, each configuration's mean over rounds and its
    overhead vs the merged models (serve/results.json, serve/overhead.json)."""
    res = art.json(RESULTS)
    rows = _aggregate_rounds(rows_of(res, "rows", "results") or []) if res is not None else []
    if not rows:
        return
    over = {(r.get("backend"), r.get("config"), r.get("batch_size")): r
            for r in (rows_of(art.json(OVERHEAD) or [], "rows", "overhead") or [])}
    for b in sorted({r["batch_size"] for r in rows}):
        sub = []
        for r in rows:
            if r["batch_size"] != b:
                continue
            o = over.get((r["backend"], r["config"], b), {})
            sub.append({**r, "overhead_pct": o.get("overhead_pct"), "ci_low": o.get("ci_low"),
                        "ci_high": o.get("ci_high")})
        sec.h3(f"Offline, batch size {b}")
        sec.table(sub, pick_columns(sub, ["backend", "config", "adapters", "n_rounds", "latency_mean_s",
                                          "throughput_tok_s", "ttft_mean_s", "overhead_pct", "ci_low", "ci_high",
                                          "peak_child_rss_mb", "peak_gpu_mb"]),
                  labels={"overhead_pct": "overhead vs merged %", "ci_low": "CI low %", "ci_high": "CI high %"})


def _serving_online(sec: Section, art: Artefacts) -> None:
    """Online benchmark (vLLM's OpenAI server, Poisson arrivals): one table per request rate, and
    k merged engines vs one engine + k adapters (serve/online/)."""
    summary = art.json(ONLINE_SUMMARY)
    if summary is None:
        sec.note(f"No online benchmark ({ONLINE_SUMMARY}): it runs on vLLM only (serve-bench --online).")
        return
    rows = rows_of(summary, "rows", "summary") or []
    meta = art.json(ONLINE_META, dict) or {}
    slo = meta.get("slo_ms") or {}
    sec.p("vLLM's OpenAI-compatible server under Poisson arrivals; per request TTFT, TPOT, ITL and end-to-end "
          "latency with vLLM's definitions (docs/serving.md); goodput = requests meeting every SLO "
          f"({', '.join(f'{k} ≤ {v:g} ms' for k, v in slo.items())}) per second. Rate inf: all requests at once.")
    for rate in list(dict.fromkeys(r.get("request_rate") for r in rows)):
        sub = [r for r in rows if r.get("request_rate") == rate]
        sec.h3(f"Online, request rate {rate} req/s")
        sec.table(sub, pick_columns(sub, ["config", "engines", "completed", "request_throughput", "output_throughput", "goodput",
                                          "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p99_ms",
                                          "e2el_p50_ms", "e2el_p99_ms", "server_peak_rss_mb"]))
    k = art.json(ONLINE_K_TASKS, list)
    if k:
        sec.h3("k tasks: one engine + k adapters vs k merged engines")
        sec.table(k, pick_columns(k, ["setup", "k", "memory_mb", "max_request_throughput", "max_output_throughput",
                                      "how"]))


def sec_serving(art: Artefacts) -> Section:
    sec = Section("serving", "Serving benchmark")
    sec.p(SERVE_NOTE)
    over = art.json(OVERHEAD)
    sec.h3("Multi-adapter overhead")
    if over is None:
        sec.not_run("Serving overhead", OVERHEAD)
    else:
        rows = rows_of(over, "rows", "overhead") or []
        sec.p("Latency overhead of serving unmerged adapters (adapters-k: k adapters in one engine) vs the "
              "merged models of the same tasks, in %, mean over measurement rounds with its CI.")
        sec.table(rows, pick_columns(rows, ["backend", "config", "reference", "batch_size", "overhead_pct", "ci_low",
                                            "ci_high", "n_rounds", "ci_method"]),
                  labels={"overhead_pct": "overhead %", "ci_low": "CI low %", "ci_high": "CI high %"})
        if not rows:
            sec.p(f"{OVERHEAD} holds no rows.")
    sec.h3("Latency, throughput and memory")
    res = art.json(RESULTS)
    if res is None:
        sec.not_run("Serving measurements", RESULTS)
    else:
        rows = rows_of(res, "rows", "results") or []
        known = ["backend", "config", "adapters", "batch_size", "n_rounds", "latency_mean_s", "latency_p50_s",
                 "latency_p95_s", "throughput_rps", "throughput_tok_s", "ttft_mean_s", "ttft_method", "peak_rss_mb",
                 "peak_child_rss_mb", "peak_gpu_mb", "device"]
        if rows and any("round" in r for r in rows):
            rows = _aggregate_rounds(rows)
            sec.p("Means over measurement rounds.")
        sec.table(rows, pick_columns(rows, known))
        if not rows:
            sec.p(f"{RESULTS} holds no rows.")
    sec.h3("Correctness")
    meta = art.json(META)
    for f in (meta.get("findings") or []) if isinstance(meta, dict) else []:
        sec.note(f"Finding: {f}")
    corr = art.json(CORRECTNESS)
    if corr is None:
        sec.note(f"{CORRECTNESS} is not present: no correctness check was recorded.")
    else:
        rows = rows_of(corr, "rows", "correctness") or []
        sec.p("Greedy tokens and per-token log-probabilities of each adapter served unmerged vs its merged model, "
              "within the dtype's tolerance; each adapter vs the base model (it must change a token, or a "
              "log-probability by more than its own margin: an adapter that does not is a finding, flagged above); "
              "and across backends. Match rate: the fraction of tokens in the common prefix.")
        sec.table(rows, pick_columns(rows, ["check", "backend", "config", "task", "reference", "passed", "match_rate",
                                            "min_match_rate", "max_abs_logprob_diff", "logprob_tolerance",
                                            "n_prompts", "n_tokens"]))
        if not rows:
            sec.p(f"{CORRECTNESS} holds no rows.")
    _serving_offline_by_batch(sec, art)
    _serving_online(sec, art)
    if isinstance(meta, dict) and meta:
        sec.kv(meta, caption=f"Benchmark settings ({META})")
    add_figures(sec, art, PATHS["serve"] + "figures", "Serving figures")
    return sec
