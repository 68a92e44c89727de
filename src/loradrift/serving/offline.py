"""The offline benchmark: every configuration gets the same batches of token ids, greedy, EOS
ignored, timed per round and batch size; then the overhead of each ``adapters-<k>`` vs the merged
models of its tasks.

Fairness rules (issue 13): ``max_lora_rank`` is the largest served adapter's rank unless set;
prefix caching is off (:func:`~.backends.engine_settings`); the rows of every batch, batch 1
included, are assigned to adapters round-robin over the request stream; the timed rounds of all
configurations are interleaved (:func:`interleaved_schedule`) and, on vLLM, spread over several
engine starts, which are the unit of H3's interval there (:func:`loradrift.stats.h3_serving`).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import stats
from . import correctness as corr
from .adapters import (
    DEFAULT_BATCH_SIZES,
    ServeConfig,
    ServeError,
    encode_prompts,
    ensure_merged,
    plan_configs,
    prompt_pool,
    validate_adapters,
)
from .backends import (
    _INTERLEAVED,
    _LOADED,
    BACKENDS,
    BASE_ROW,
    GenOut,
    _resolve_device,
    _resolve_dtype,
    cpu_binds,
    cpu_kvcache_gib,
    parse_backends,
)
from .results import write_serve_results

# vLLM engines start once per block of rounds, and a configuration's speed depends on the start
# (memory placement, thread pinning) more than on the round within it: the start is the unit of
# H3's interval, so five starts of two rounds each rather than two of five.
DEFAULT_VLLM_RESTARTS = 5


def latency_stats(latencies: Sequence[float]) -> dict[str, float]:
    x = np.asarray(list(latencies), dtype=float)
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95))}


def overhead_per_round(
    adapter_latency: Sequence[float], merged_latency: Mapping[str, Sequence[float]]
) -> list[float]:
    """Per-round overhead in %, ``(a_r / m_r - 1) * 100``.

    ``a_r`` is the adapters configuration's mean request latency in round r; ``m_r`` is the mean,
    over the tasks whose adapters that configuration serves, of each merged model's mean request
    latency in round r. Rounds are matched by index (same batch size, same prompts).
    """
    if not merged_latency:
        raise ValueError("no merged latencies to compare with")
    n = len(adapter_latency)
    for task, lat in merged_latency.items():
        if len(lat) != n:
            raise ValueError(f"merged '{task}' has {len(lat)} rounds, adapters have {n}")
    m = np.mean(np.asarray([list(v) for v in merged_latency.values()], dtype=float), axis=0)
    return [float(v) for v in stats.overhead_pct(list(adapter_latency), list(m), label="serving")]


def mean_ci(
    values: Sequence[float], level: float = 0.95, method: str = "t", n_boot: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and a two-sided CI: Student t-interval (:func:`loradrift.stats.t_interval`) or
    percentile bootstrap. One value gives NaN bounds, not a zero-width interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci of an empty sample")
    if method == "t":
        mean, lo, hi, _, _ = stats.t_interval(x, level)
        return mean, lo, hi
    if method == "bootstrap":
        if x.size < 2:
            return float(x.mean()), float("nan"), float("nan")
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
        alpha = (1 - level) / 2
        return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
    raise ValueError(f"unknown CI method '{method}' (t | bootstrap)")


def round_starts(rounds: int, restarts: int) -> list[int]:
    """The engine start (block) of each round: the rounds split into ``restarts`` consecutive
    blocks of (nearly) equal size."""
    return [i for i, block in enumerate(np.array_split(np.arange(rounds), restarts)) for _ in block]


def interleaved_schedule(
    configs: Sequence[str], rounds: int, restarts: int, all_loaded: bool, seed: int = 0
) -> list[tuple[str, str, int]]:
    """The order of loads, timed rounds and closes: ``("load" | "round" | "close", config, n)``
    where n is the block (engine start) for load/close and the round index for a round.

    The rounds are split into ``restarts`` blocks; every configuration is (re)loaded once per
    block. ``all_loaded`` (every configuration fits at once, the hf backend): within a block each
    round times every configuration once in a fresh random order, so rounds pair them. Otherwise
    (one engine at a time, vLLM): each block visits the configurations in a fresh random order and
    runs that block's rounds of each, so a configuration's rounds are spread over the whole run
    and over ``restarts`` engine starts instead of running back to back.
    """
    if rounds < 1 or restarts < 1:
        raise ValueError("rounds and restarts must be >= 1")
    if restarts > rounds:
        raise ValueError(f"{restarts} engine starts need at least as many rounds (got {rounds})")
    rng = np.random.default_rng(seed)
    starts = round_starts(rounds, restarts)
    blocks = [[r for r in range(rounds) if starts[r] == bi] for bi in range(restarts)]
    out: list[tuple[str, str, int]] = []
    for bi, block in enumerate(blocks):
        order = [configs[i] for i in rng.permutation(len(configs))]
        if out and len(order) > 1 and order[0] == out[-1][1]:
            # a configuration closing one block would otherwise run straight on into the next
            order = order[1:] + order[:1]
        if all_loaded:
            out += [("load", c, bi) for c in order]
            for r in block:
                out += [("round", configs[i], r) for i in rng.permutation(len(configs))]
            out += [("close", c, bi) for c in order]
        else:
            for c in order:
                out += [("load", c, bi)] + [("round", c, r) for r in block] + [("close", c, bi)]
    return out


def _cyclic(pool: Sequence[Any], start: int, n: int) -> list[Any]:
    return [pool[(start + i) % len(pool)] for i in range(n)]


def row_adapters(config: ServeConfig, start: int, n: int) -> list[str] | None:
    """Adapter of each of n requests starting at request ``start`` of the stream: round-robin over
    the whole stream, so at batch 1 successive requests still go to different adapters."""
    if config.kind != "adapters":
        return None
    return [config.tasks[(start + i) % len(config.tasks)] for i in range(n)]


def _check_lengths(out: GenOut, max_tokens: int, where: str) -> None:
    bad = [len(t) for t in out.tokens if len(t) != max_tokens]
    if bad:
        raise ServeError(f"{where}: generated {bad[0]} tokens instead of {max_tokens}; EOS was not ignored")


def check_rows(configs: Sequence[ServeConfig], n: int) -> dict[str, list[int]]:
    """Which of the n check prompts each merged model must answer: the rows any adapters-<k>
    assigns to its task (round-robin, as in the timed runs)."""
    need: dict[str, set[int]] = {}
    for c in configs:
        if c.kind == "adapters":
            for j, t in enumerate(row_adapters(c, 0, n)):
                need.setdefault(t, set()).add(j)
    return {t: sorted(v) for t, v in need.items()}


def _check_outputs(be: Any, cfg: ServeConfig, check_ids: Sequence[Sequence[int]], need: Mapping[str, list[int]],
                   with_base: bool, n_tokens: int) -> dict[str, Any]:
    """Greedy tokens and logprobs for the correctness checks: ``{"rows": {j: out}, "base": {j: out}}``
    keyed by check-prompt index. A merged model answers the rows its task needs; an adapters-<k>
    answers all rows, round-robin; with ``with_base`` the same engine also answers every row
    without an adapter (the base reference of the differs-from-base check)."""
    if cfg.kind == "base":
        return {}
    if cfg.kind == "merged":
        idx = need.get(cfg.tasks[0], [])
        names = None
    else:
        idx = list(range(len(check_ids)))
        names = row_adapters(cfg, 0, len(idx))
        if with_base:
            idx, names = idx + idx, names + [BASE_ROW] * len(idx)
    if not idx:
        return {}
    out = be.generate([check_ids[j] for j in idx], names, n_tokens, logprobs=True)
    _check_lengths(out, n_tokens, f"{be.name}/{cfg.name} (correctness)")
    res: dict[str, dict[int, dict]] = {"rows": {}, "base": {}}
    for pos, j in enumerate(idx):
        key = "base" if names is not None and names[pos] == BASE_ROW else "rows"
        res[key][j] = {"tokens": out.tokens[pos], "logprobs": out.logprobs[pos]}
    return res


def _stack(rows: Mapping[int, Mapping[str, Any]], idx: Sequence[int]) -> dict[str, list]:
    return {"tokens": [rows[j]["tokens"] for j in idx], "logprobs": [rows[j]["logprobs"] for j in idx]}


def correctness_report(check_out: Mapping[str, Mapping[str, Any]], configs: Sequence[ServeConfig],
                       dtype: str) -> list[dict]:
    """One row per (backend, adapters-<k>, task): unmerged vs merged; one per (backend, task): the
    adapter differs from the base; and across backends, each configuration vs the first backend."""
    out = []
    backends = list(check_out)
    for b in backends:
        widest = max((c for c in configs if c.kind == "adapters"), key=lambda c: len(c.tasks), default=None)
        for cfg in configs:
            if cfg.kind != "adapters":
                continue
            got = check_out[b][cfg.name]["rows"]
            for t in cfg.tasks:
                idx = [j for j, a in enumerate(row_adapters(cfg, 0, len(got))) if a == t]
                ref = check_out[b][f"merged-{t}"]["rows"]
                out.append(corr.agreement_row(b, cfg.name, t, f"{b}:merged-{t}", _stack(ref, idx), _stack(got, idx),
                                              dtype))
                if cfg is widest:
                    base = check_out[b][cfg.name]["base"]
                    out.append(corr.differs_row(b, cfg.name, t, _stack(base, idx), _stack(got, idx), dtype))
    ref_b = backends[0]
    for b in backends[1:]:
        for cfg in configs:
            mine, theirs = check_out[b].get(cfg.name, {}).get("rows", {}), check_out[ref_b].get(cfg.name, {}).get("rows", {})
            idx = sorted(set(mine) & set(theirs))
            if idx:
                row = corr.agreement_row(b, cfg.name, "+".join(cfg.tasks), f"{ref_b}:{cfg.name}", _stack(theirs, idx),
                                         _stack(mine, idx), dtype)
                row["check"] = "across backends"
                out.append(row)
    return out


def overhead_table(rows: Sequence[Mapping[str, Any]], configs: Sequence[ServeConfig], ci_method: str = "t") -> list[dict]:
    """Overhead of each adapters-<k> (and of ``base``, as a control) vs the mean of the merged
    models of the same tasks (all tasks for ``base``), per backend and batch size. The descriptive
    interval is over rounds when they all come from one engine start, else over the per-start
    mean overheads (rounds of one start are not independent)."""
    lat: dict[tuple, dict[int, float]] = {}
    start: dict[tuple, int] = {}
    for r in rows:
        lat.setdefault((r["backend"], r["config"], r["batch_size"]), {})[r["round"]] = r["latency_mean_s"]
        start[(r["backend"], r["round"])] = int(r["start"])
    all_tasks = [t for c in configs if c.kind == "merged" for t in c.tasks]
    out = []
    for (bname, cname, b), by_round in sorted(lat.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        cfg = next(c for c in configs if c.name == cname)
        if cfg.kind == "merged":
            continue
        tasks = list(cfg.tasks) if cfg.kind == "adapters" else all_tasks
        rounds_ = sorted(by_round)
        merged_lat = {t: [lat[(bname, f"merged-{t}", b)][r] for r in rounds_] for t in tasks}
        per_round = overhead_per_round([by_round[r] for r in rounds_], merged_lat)
        starts = [start[(bname, r)] for r in rounds_]
        k = len(set(starts))
        units = per_round if k == 1 else [float(np.mean([v for v, s in zip(per_round, starts) if s == u]))
                                          for u in sorted(set(starts))]
        mean, lo, hi = mean_ci(units, method=ci_method)
        out.append({"backend": bname, "config": cname, "reference": "mean(" + "+".join(f"merged-{t}" for t in tasks) + ")",
                    "batch_size": b, "overhead_pct": mean, "ci_low": lo, "ci_high": hi,
                    "n_rounds": len(per_round), "engine_starts": k,
                    "ci_method": ci_method + ("" if k == 1 else f" over {k} per-start means"), "per_round": per_round,
                    # what stats.h3_serving takes: raw latencies, whether rounds really pair them,
                    # and each round's engine start
                    "paired": bname in _INTERLEAVED,
                    "adapter_latency_by_round": [by_round[r] for r in rounds_],
                    "merged_latency_by_round": np.mean([merged_lat[t] for t in tasks], axis=0).tolist(),
                    "start_by_round": starts})
    return out


def rebuild_overhead(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> list[dict]:
    """``overhead.json`` from a benchmark's ``results.csv`` (or ``results.json``) rows and its
    ``meta.json``, for a benchmark written before its tables carried each round's engine start:
    the starts are rebuilt as the benchmark split the rounds (``engine_restarts``), the
    configurations from ``meta["configs"]``. Then H3 can be recomputed from the tables alone."""
    configs = [ServeConfig(c["name"], c["name"].split("-")[0], Path(meta["base_dir"]), tuple(c["tasks"]))
               for c in meta["configs"]]
    starts = {b: round_starts(int(meta["rounds"]), int(n)) for b, n in meta["engine_restarts"].items()}
    typed = [{**r, "batch_size": int(r["batch_size"]), "round": int(r["round"]),
              "latency_mean_s": float(r["latency_mean_s"]),
              "start": int(r["start"]) if r.get("start") not in (None, "") else starts[r["backend"]][int(r["round"])]}
             for r in rows]
    return overhead_table(typed, configs, meta.get("ci_method", "t"))


def run_serve_bench(
    base_dir: Path,
    adapters: Mapping[str, Path],
    merged: Mapping[str, Path] | None,
    prompts: Mapping[str, Sequence[str]],
    backend: str | Sequence[str] = "hf",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_tokens: int = 128,
    rounds: int = 10,
    warmup: int = 1,
    out_dir: Path = Path("serve"),
    max_lora_rank: int | None = None,
    device: str = "auto",
    *,
    dtype: str = "auto",
    batches_per_round: int = 1,
    max_prompt_tokens: int = 256,
    check_prompts: int = 32,
    check_tokens: int = 32,
    ci_method: str = "t",
    check_base_name: bool = True,
    include_base: bool = True,
    cpu_threads: int | None = None,
    cache_dir: Path | None = None,
    order_seed: int = 0,
    engine_restarts: int | None = None,
    max_num_seqs: int | None = None,
    log: Callable[..., Any] = print,
    progress: Callable[[int, int], None] | None = None,  # (timed rounds done, all of them): configs x rounds x backends
) -> dict:
    """Benchmark base, merged-<task> and adapters-<k> on each backend; write ``out_dir`` tables.

    ``loradrift serve-bench`` calls this. ``backend`` is ``hf``, ``vllm``, or ``hf,vllm`` /
    ``both`` (then outputs are also compared across backends). ``merged`` maps task -> merged
    CausalLM folder; a task without one is merged here into ``cache_dir/<task>`` (default
    ``out_dir/merged_cache``). ``prompts`` maps task -> prompt strings. ``max_lora_rank`` None
    means the largest rank among the adapters. ``include_base=False`` skips the ``base`` control.
    ``cpu_threads`` sets torch's intra-op threads for hf on CPU. Per round and batch size,
    ``batches_per_round`` batches are timed. ``engine_restarts`` (default 1 on hf, where all
    configurations stay loaded and rounds are paired; 5 on vLLM, one engine at a time) splits the
    rounds into that many blocks with one engine start per configuration and block; see
    :func:`interleaved_schedule` (seed ``order_seed``). ``max_num_seqs`` (default: the largest
    batch size) caps vLLM's running sequences. The correctness checks run greedy on the first
    ``check_prompts`` prompts of the shared pool with ``check_tokens`` tokens each.

    Writes the tables, then returns ``{"results", "overhead", "correctness", "findings", "meta"}``;
    ``findings`` lists the adapters whose outputs equal the base model's (a finding about the
    adapters, for the report). Raises :class:`ServeError` on bad input, or after writing the tables
    when served outputs disagree with what they must reproduce (adapter vs merged, across backends).
    """
    from transformers import AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    backends = parse_backends(backend)
    if not (base_dir / "config.json").is_file():
        raise ServeError(f"base model folder {base_dir} has no config.json")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1 or max_tokens < 1 or rounds < 1 or warmup < 0:
        raise ServeError("batch sizes, max_tokens and rounds must be >= 1, warmup >= 0")
    adapters = {t: Path(p) for t, p in adapters.items()}
    ranks = validate_adapters(base_dir, adapters, max_lora_rank or 2**31, check_base_name)
    lora_rank = int(max_lora_rank or max(ranks.values()))
    missing = [t for t in adapters if not prompts.get(t)]
    if missing:
        raise ServeError(f"no prompts for task(s) {missing}")

    merged = {t: Path(p) for t, p in (merged or {}).items() if t in adapters}
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "merged_cache"
    for t in adapters:
        if t not in merged or not (merged[t] / "config.json").is_file():
            merged[t] = ensure_merged(base_dir, adapters[t], cache_dir / t)
            log(f"[serve] merged model for '{t}' (made here or reused): {merged[t]}")
    configs = plan_configs(base_dir, adapters, merged, include_base)
    by_name = {c.name: c for c in configs}

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tasks = list(adapters)
    pool = encode_prompts(tokenizer, prompt_pool(prompts, tasks), max_prompt_tokens)
    check_ids = pool[:check_prompts]
    need = check_rows(configs, len(check_ids))
    widest = max((c for c in configs if c.kind == "adapters"), key=lambda c: len(c.tasks))
    if len(check_ids) < len(widest.tasks):  # round-robin would leave an adapter without a checked row
        raise ServeError(f"check_prompts={check_prompts} gives {len(check_ids)} correctness prompt(s) for "
                         f"{len(widest.tasks)} adapters: each adapter needs at least one; raise check_prompts")
    base_cfg = json.loads((base_dir / "config.json").read_text())
    max_model_len = max(len(p) for p in pool) + max(max_tokens, check_tokens)
    if base_cfg.get("max_position_embeddings") and max_model_len > base_cfg["max_position_embeddings"]:
        raise ServeError(f"prompt + max_tokens = {max_model_len} exceeds the model's "
                         f"{base_cfg['max_position_embeddings']} positions; lower max_prompt_tokens")
    resolved_device = _resolve_device(device)
    resolved_dtype = _resolve_dtype(dtype, resolved_device)
    corr.tolerance(resolved_dtype)  # fail before any timing on a dtype without a stated tolerance
    if cpu_threads is not None and resolved_device == "cpu":
        import torch

        torch.set_num_threads(int(cpu_threads))
    vllm_bind = None
    if "vllm" in backends and resolved_device == "cpu":  # one engine at a time: it takes every owned core
        vllm_bind = cpu_binds(1, cpu_threads)[0]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = vllm_bind
    seqs = int(max_num_seqs or max(batch_sizes))
    timed = 0

    rows: list[dict] = []
    check_out: dict[str, dict[str, Any]] = {}
    settings: dict[str, dict[str, Any]] = {}
    restarts_used: dict[str, int] = {}
    starts: dict[str, list[int]] = {}

    for bname in backends:
        check_out[bname], settings[bname] = {}, {}
        all_loaded = bname in _INTERLEAVED
        restarts = engine_restarts or (1 if all_loaded else DEFAULT_VLLM_RESTARTS)
        restarts = min(restarts, rounds)
        restarts_used[bname] = restarts
        starts[bname] = round_starts(rounds, restarts)
        plan = interleaved_schedule([c.name for c in configs], rounds, restarts, all_loaded, order_seed)
        loaded: dict[str, Any] = {}
        try:
            for what, cname, n in plan:
                if what == "round":
                    if progress:
                        progress(timed, rounds * len(configs) * len(backends))
                    timed += 1
                cfg = by_name[cname]
                if what == "load":
                    log(f"[serve] {bname}: loading {cname} (start {n + 1}/{restarts})")
                    be = BACKENDS[bname](base_dir, resolved_device, resolved_dtype, max_model_len, lora_rank, seqs)
                    be.load(cfg)
                    loaded[cname] = be
                    settings[bname][cname] = be.settings
                    if cname not in check_out[bname]:
                        check_out[bname][cname] = _check_outputs(be, cfg, check_ids, need, cfg is widest, check_tokens)
                    for _ in range(warmup):
                        for b in batch_sizes:
                            # warm-up prompts come from the end of the pool, not round 0's
                            be.generate(_cyclic(pool, len(pool) - b, b), row_adapters(cfg, 0, b), max_tokens)
                elif what == "round":
                    rows += _timed_round(loaded[cname], cfg, n, starts[bname][n], pool, batch_sizes, batches_per_round,
                                         max_tokens, resolved_device)
                else:
                    loaded.pop(cname).close()
        finally:
            for be in loaded.values():
                be.close()
            _LOADED.clear()  # a later benchmark in this process shares nothing with this one's models

    correctness = correctness_report(check_out, configs, resolved_dtype)
    findings = corr.findings(correctness)
    overhead = overhead_table(rows, configs, ci_method)
    import torch

    meta = {
        "base_dir": str(base_dir), "adapters": {t: str(p) for t, p in adapters.items()},
        "merged": {t: str(p) for t, p in merged.items()}, "ranks": ranks,
        "backends": backends, "batch_sizes": batch_sizes, "max_tokens": max_tokens, "rounds": rounds,
        "warmup": warmup, "batches_per_round": batches_per_round, "max_prompt_tokens": max_prompt_tokens,
        "max_lora_rank": lora_rank, "max_lora_rank_source": "given" if max_lora_rank else "largest adapter rank",
        "device": resolved_device, "dtype": resolved_dtype,
        "check_prompts": len(check_ids), "check_tokens": check_tokens,
        "tolerance": {"dtype": resolved_dtype, "max_abs_logprob_diff": corr.tolerance(resolved_dtype)[0],
                      "min_match_rate": corr.tolerance(resolved_dtype)[1],
                      "differs_from_base_margin": corr.DIFFERS_MARGIN[resolved_dtype]},
        "findings": findings, "max_num_seqs": seqs,
        "ci_method": ci_method, "cpu_threads": cpu_threads, "order_seed": order_seed,
        "engine_restarts": restarts_used, "engine_settings": settings,
        "vllm_cpu_kvcache_space_gib": cpu_kvcache_gib() if "vllm" in backends else None,
        "vllm_cpu_omp_threads_bind": vllm_bind,
        "adapter_assignment": "round-robin over the request stream (batch 1 included)",
        "interleaved": [b for b in backends if b in _INTERLEAVED],
        "configs": [{"name": c.name, "tasks": list(c.tasks)} for c in configs],
        "machine": machine_info(resolved_device),
        "peak_rss_note": "peak_rss_mb is this process's high-water mark since it started (it never "
                         "decreases across configs); peak_child_rss_mb sums VmHWM of the vLLM engine "
                         "processes of the current configuration",
    }
    if "vllm" in backends:
        import vllm

        meta["machine"]["vllm"] = vllm.__version__
    results = {"results": rows, "overhead": overhead, "correctness": correctness, "findings": findings, "meta": meta}
    write_serve_results(results, out_dir)
    bad = corr.failures(correctness)
    if bad:
        raise ServeError("correctness check failed: " + "; ".join(bad) + f" (tables were written to {out_dir})")
    for f in findings:
        log(f"[serve] finding: {f}")
    return results


def machine_info(device: str) -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}


def _timed_round(be: Any, cfg: ServeConfig, r: int, engine_start: int, pool: Sequence[Sequence[int]],
                 batch_sizes: Sequence[int], batches_per_round: int, max_tokens: int, device: str) -> list[dict]:
    out = []
    for b in batch_sizes:
        lats, ttfts = [], []
        for k in range(batches_per_round):
            start = (r * batches_per_round + k) * b
            g = be.generate(_cyclic(pool, start, b), row_adapters(cfg, start, b), max_tokens)
            _check_lengths(g, max_tokens, f"{be.name}/{cfg.name}")
            # offline generate submits every request at t0 and returns them together
            lats += [g.wall_s] * b
            if g.ttft_s is not None:
                ttfts.append(g.ttft_s)
        st = latency_stats(lats)
        total_s = sum(lats) / b
        out.append({
            "backend": be.name, "config": cfg.name, "adapters": "+".join(cfg.tasks),
            "batch_size": b, "round": r, "start": engine_start, "n_requests": len(lats), "max_tokens": max_tokens,
            "latency_mean_s": st["mean"], "latency_p50_s": st["p50"], "latency_p95_s": st["p95"],
            "throughput_rps": len(lats) / total_s, "throughput_tok_s": len(lats) * max_tokens / total_s,
            "ttft_mean_s": float(np.mean(ttfts)) if ttfts else None,
            "ttft_method": be.ttft_method if ttfts else "unavailable",
            **be.memory(), "device": device,
        })
    return out
