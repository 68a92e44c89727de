"""The `loradrift` command: a thin shell over the library. Every command takes the same config
options (`--preset`, `--config`, `--out`, `--data-dir`, `--seed` and dotted `key=value`
overrides), resolved through `loradrift.config`.

    loradrift --help
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from loradrift import layout
from loradrift.methods import METHOD_NAMES, get_method

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------
# shared options


def _config_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("config")
    g.add_argument("--preset", default=None, help="tiny | smollm2 | smollm2-gpu | tinyllama (default: smollm2-gpu where a CUDA GPU is "
                   "available, else smollm2)")
    g.add_argument("--config", action="append", type=Path, default=[], metavar="FILE", help="YAML config file (repeatable, later wins)")
    g.add_argument("--out", type=Path, default=None, help="study output folder (default: the preset's out_dir)")
    g.add_argument("--data-dir", type=Path, default=None, help="task data folder (default: $LORADRIFT_DATA, else loradrift's own copy; docs/data.md)")
    g.add_argument("--seed", type=int, default=None, help="run seed (default 42)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lr=1e-4")
    return p


class Configs:
    """Builds the config for a (task, method, seed) from one command line's options."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self, task: str | None = None, method: str | None = None, seed: int | None = None,
                 files: list[Path] | None = None, extra: list[str] | None = None):
        """`files` (e.g. a best-config YAML from the search) sit between the preset and the
        user's own --config files and overrides, which still win."""
        from loradrift.config import resolve_config

        a = self.args
        overrides = list(a.overrides)
        if a.data_dir is not None:
            overrides.append(f"data.data_dir={a.data_dir}")
        if method is not None:
            overrides.append(f"method.name={method}")
        overrides += extra or []
        seed = seed if seed is not None else a.seed
        return resolve_config(preset=a.preset, files=[*(files or []), *a.config], overrides=overrides, task=task,
                              out_dir=a.out, seed=seed)


def _tasks(value: str) -> list[str]:
    from loradrift.tasks import expand_tasks

    return expand_tasks(value)


def _methods(value: str) -> list[str]:
    from loradrift.methods import parse_methods

    return parse_methods(value)


def _table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    # Off a terminal rich would wrap at 80 columns; logs read better wide.
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------------------------
# commands


def cmd_data_check(args, configs: Configs) -> int:
    from loradrift.data import load_task, summary

    rows = []
    for task in _tasks(args.task):
        rows.append(summary(load_task(configs(task))))
    _table("Task data: files, and the splits this config uses (val is carved from train; dev is the test set)", rows,
           ["task", "train_rows", "dev_rows", "dev_labels", "train_used", "val_used", "dev_used", "source"])
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def cmd_model_info(args, configs: Configs) -> int:
    from loradrift.models import describe, resolve_model_dir

    cfg = configs(extra=[f"model.name={args.name}"])
    info = describe(resolve_model_dir(cfg.model))
    for k, v in info.items():
        print(f"{k:18} {v}")
    return 0


def cmd_score(args, configs: Configs) -> int:
    from loradrift.tasks import TASKS, file_scorer_tasks, resolve

    spec = TASKS.get(args.task)
    if spec is None or not spec.task_kind.file_scorer:
        raise ValueError(f"score: only {', '.join(file_scorer_tasks())} has an official file scorer (got {args.task!r})")
    out = resolve(spec.task_kind.file_scorer)(args.data, args.preds, args.na_prob_file, args.na_prob_thresh, allow_missing=args.allow_missing,
                               allow_extra=args.allow_extra)
    print(json.dumps(out, indent=2))
    return 0


def cmd_train(args, configs: Configs) -> int:
    from loradrift.progress import Reporter
    from loradrift.train import train_run

    cfg = configs(args.task, args.method)
    with Reporter() as rep, rep.stage("train", total=1) as st:
        st.start(f"{cfg.task}/{cfg.method.name}/seed{cfg.seed} steps")
        r = train_run(cfg, force=args.force, on_step=st.inner)
        st.advance()
    keys = {k: v for k, v in r["dev"].items() if not k.startswith("_")}
    print(f"run folder: {r['run_dir']}")
    print(f"dev:  {json.dumps(keys)}")
    print(f"val:  {json.dumps({k: v for k, v in r['val'].items() if not k.startswith('_')})}")
    print(f"steps {r['steps']}, train {r['train_time_s']:.1f}s, {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_memory_mb']:.0f} MB")
    return 0


def cmd_extract_base(args, configs: Configs) -> int:
    from loradrift.phase0 import extract_base

    for task in _tasks(args.task):
        print(f"{task}: {extract_base(configs(task), force=args.force)}")
    return 0


def cmd_sanity(args, configs: Configs) -> int:
    from loradrift.phase0 import run_sanity

    rows = run_sanity(lambda t, m: configs(t, m), _tasks(args.task), _methods(args.method))
    _table("Sanity: overfit a small training sample", rows,
           ["task", "method", "examples", "steps", "metric", "score", "threshold", "passed", "seconds"])
    failed = [f"{r['task']}/{r['method']}" for r in rows if not r["passed"]]
    if failed:
        print(f"sanity check failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_baselines(args, configs: Configs) -> int:
    from loradrift.phase0 import baselines

    rows = []
    for task in _tasks(args.task):
        for r in baselines(configs(task)):
            main = {k: r[k] for k in ("accuracy", "f1", "combined_score", "exact", "HasAns_f1", "NoAns_f1") if k in r}
            rows.append({"task": task, "baseline": r["baseline"], "dev_examples": r["dev_examples"], "scores": main})
    _table("Baselines on dev", rows, ["task", "baseline", "dev_examples", "scores"])
    return 0


def cmd_memory(args, configs: Configs) -> int:
    from loradrift.phase0 import memory_profile_isolated

    rows = [memory_profile_isolated(configs(task, method)) for task in _tasks(args.task) for method in _methods(args.method)]
    _table("Peak training memory", rows, ["task", "method", "batch_size", "max_length", "device", "peak_memory_mb", "seconds_per_step"])
    return 0


def cmd_search(args, configs: Configs) -> int:
    from loradrift.progress import Reporter
    from loradrift.search import run_search

    methods = _methods(args.method)
    if args.tune_rank and any(not get_method(m).adapter for m in methods):
        raise ValueError("--tune-rank: only LoRA has a rank to search; add --method lora")
    rows = []
    pairs = [(task, method) for task in _tasks(args.task) for method in methods]
    with Reporter() as rep, rep.stage("search", total=len(pairs)) as st:
        for task, method in pairs:
            st.start(f"{task}/{method} trials")
            r = run_search(configs(task, method), None, trials=args.trials, storage=args.storage, tune_rank=args.tune_rank, progress=st.inner)
            st.advance()
            rows.append({"task": task, "method": method, **{k: r[k] for k in ("study", "n_finished", "best_trial", "best_value", "best_config")}})
    _table(
        "Search: best trial per study (score on the validation split)",
        rows,
        ["task", "method", "study", "n_finished", "best_trial", "best_value", "best_config"],
    )
    return 0


def cmd_search_report(args, configs: Configs) -> int:
    from loradrift.search import search_report

    cfg = configs()
    rep = search_report(
        cfg.out_dir,
        storage=args.storage,
        tasks=_tasks(args.task) if args.task else None,
        methods=_methods(args.method) if args.method else None,
        search_cfg=cfg.search,
    )
    _table("Search studies", rep["studies"], ["study", "n_trials", "states", "best_value", "worst_value", "best_worst_gap", "importance_note"])
    print(f"report: {rep['report_dir']}")
    return 0


def cmd_drift(args, configs: Configs) -> int:
    from loradrift.drift import analyse_drift
    from loradrift.layout import model_key
    from loradrift.models import resolve_model_dir

    cfg = configs()
    tasks = _tasks(args.task)
    d = cfg.drift
    res = analyse_drift(cfg.out_dir, model_key(cfg.model), tasks, metric=d.metric)
    rows = [
        {"task": t, **{k: c.get(k) for k in ("drift_full", "drift_lora", "reduction_pct", "noise_floor", "perm_p", "probe_ci")}}
        for t, c in res["comparison"].items()
    ]
    _table(
        f"Drift (1 - {d.metric} CKA, mean over block outputs, final step)",
        rows,
        ["task", "drift_full", "drift_lora", "reduction_pct", "noise_floor", "perm_p", "probe_ci"],
    )
    if d.weights:
        from loradrift.weights import analyse_weights

        w = analyse_weights(
            cfg.out_dir,
            model_key(cfg.model),
            resolve_model_dir(cfg.model),
            tasks,
            rank_threshold=d.rank_threshold,
            intruder_k=d.intruder_k,
            intruder_eps=d.intruder_eps,
            modules=d.weight_modules,
        )
        _table("Weight updates", w["summary"], ["task", "method", "seed", "n_modules", "mean_rel_norm", "mean_effective_rank", "total_intruders"])
    print(f"written under {cfg.out_dir}/drift" + (f" and {cfg.out_dir}/weights" if d.weights else ""))
    return 0


def cmd_ablate_rank(args, configs: Configs) -> int:
    from loradrift.ablation import ablation_dir, run_rank_ablation

    for flag, key in ((args.ranks, "ranks"), (args.seeds, "seeds")):
        if flag:
            try:
                values = [int(v) for v in flag.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"--{key}: expected a comma list of integers, got {flag!r}") from None
            args.overrides.append(f"ablation.rank.{key}={values}")
    if args.rslora:
        args.overrides.append("ablation.rank.rslora=true")
    res = run_rank_ablation(configs, _tasks(args.task), say=print)
    rows = [
        {"task": t, "run": label, **{q: g[q]["mean"] for q in ("dev_score", "drift", "total_intruders", "delta_loss")}}
        for t, r in res["tasks"].items()
        for label, g in r["by_label"].items()
    ]
    _table(
        f"Rank ablation ({res['settings']['title']}): means over seeds {res['settings']['seeds']}",
        rows,
        ["task", "run", "dev_score", "drift", "total_intruders", "delta_loss"],
    )
    print(f"written under {ablation_dir(configs().out_dir, configs().ablation.rank)}")
    return 0


def cmd_serve_bench(args, configs: Configs) -> int:
    from loradrift.study import serve_bench

    extra = [f"serve.batch_sizes=[{args.batch_sizes}]"] if args.batch_sizes else []
    cfg = configs(extra=extra)
    res = serve_bench(cfg, _tasks(args.adapters), backend=args.backend, online=args.online)
    _table("Serving overhead vs merged (%)", res["overhead"], ["backend", "config", "batch_size", "overhead_pct", "ci_low", "ci_high", "n_rounds"])
    _table("Correctness", res["correctness"], ["check", "backend", "config", "task", "passed", "match_rate", "max_abs_logprob_diff"])
    for f in res["findings"]:
        print(f"finding: {f}")
    if "online" in res:
        _table(
            "Online (vLLM OpenAI server, Poisson arrivals)",
            res["online"]["summary"],
            [
                "config",
                "request_rate",
                "offered_rate",
                "request_throughput",
                "output_throughput",
                "goodput",
                "ttft_p99_ms",
                "tpot_p99_ms",
                "itl_p99_ms",
                "e2el_p99_ms",
            ],
        )
    print(f"written under {cfg.out_dir}/serve")
    return 0


def cmd_stats(args, configs: Configs) -> int:
    from loradrift.hypotheses import run_stats, verdict_line

    res = run_stats(configs())
    rows = [r for h in ("H1", "H2", "H3") for r in res[h]]
    _table(
        "Pre-registered hypotheses",
        rows,
        ["name", "scope", "role", "estimate", "ci_low", "ci_high", "ci_level", "threshold", "p_value", "p_bonferroni", "p_holm", "decision"],
    )
    v = res["verdict"]
    print(f"verdict: {verdict_line(res)}")
    for name, why in v["reasons"].items():
        print(f"  {name}: {why}")
    for n in res["notes"]:
        print(f"note: {n}")
    return 0


def cmd_report(args, configs: Configs) -> int:
    from loradrift.report import build_report

    rep = build_report(Path(configs().out_dir), pdf=not args.no_pdf)
    print(f"report: {rep['html']}" + (f"\npdf:    {rep['pdf']} ({rep['pdf_renderer']})" if rep.get("pdf") else ""))
    return 0


def cmd_bundle(args, configs: Configs) -> int:
    from loradrift.bundle import write_bundle

    out = Path(configs().out_dir)
    b = write_bundle(out, args.dest)
    print(
        f"{b['dest']}: {b['files']} files, {b['bytes'] / 1e6:.1f} MB from {out} (no weights); "
        f"rebuild the report there with: loradrift report --out {b['dest']}"
    )
    return 0


def cmd_store_repair(args, configs: Configs) -> int:
    from loradrift.io import reconcile_store

    out = Path(configs().out_dir)
    counts = reconcile_store(out)
    print(
        f"{layout.results_db(out)}: run rows rebuilt from {layout.runs_dir(out)}: "
        f"{counts['added']} added, {counts['updated']} updated, {counts['removed']} removed"
    )
    return 0


def cmd_study(args, configs: Configs) -> int:
    from loradrift.study import StudyStop, run_study

    phases = sorted({int(p) for p in args.phases.split(",")})
    if not set(phases) <= {0, 1, 2, 3}:
        raise ValueError(f"--phases: phases are 0, 1, 2, 3 (got {args.phases})")
    tasks = _tasks(args.task) if args.task else None
    if args.preset is None:
        from loradrift.config import default_preset

        name, why = default_preset()
        print(f"loradrift study: preset {name}, because {why} (--preset names another)", flush=True)
    else:
        print(f"loradrift study: preset {args.preset} (from --preset)", flush=True)
    try:
        res = run_study(
            configs,
            phases,
            tasks,
            command="loradrift " + " ".join(sys.argv[1:]),
            use_ray=args.ray or args.ray_address is not None,
            ray_address=args.ray_address,
        )
    except StudyStop as e:
        print(f"loradrift study: stopped: {e}", file=sys.stderr)
        return 1
    for p in res["phases"]:
        print(f"{p['phase']}: {p['seconds']:.0f} s")
    print(f"total: {res['total_seconds']:.0f} s")
    return 0


COMMANDS = {
    "train": (cmd_train, "train one run (full fine-tuning or LoRA)"),
    "extract-base": (cmd_extract_base, "Phase 0: base-model probe representations"),
    "sanity": (cmd_sanity, "Phase 0: overfit a small sample per task and method"),
    "baselines": (cmd_baselines, "Phase 0: majority / random baselines on dev"),
    "memory": (cmd_memory, "Phase 0: peak training memory per task and method"),
    "score": (cmd_score, "score SQuAD v2 predictions like the official evaluate-v2.0.py"),
    "search": (cmd_search, "Phase 1: Optuna TPE search per task and method (resumable, multi-worker)"),
    "search-report": (cmd_search_report, "Phase 1: trial tables, importances and figures"),
    "drift": (cmd_drift, "Phase 3: CKA/cosine drift vs the base model, and weight-space analysis"),
    "ablate-rank": (cmd_ablate_rank, "LoRA at several ranks with the task's best config: drift, intruders, forgetting vs rank"),
    "serve-bench": (cmd_serve_bench, "Phase 3: serving cost of LoRA adapters side by side vs merged weights"),
    "stats": (cmd_stats, "Phase 3: the pre-registered hypothesis tests"),
    "report": (cmd_report, "Phase 3: the HTML and PDF report (reads artefacts only)"),
    "study": (cmd_study, "the whole study, Phase 0 to the report, resumable"),
    "bundle": (cmd_bundle, "copy a study's records, tables, figures and report inputs (no weights) to a new folder"),
    "store": (cmd_store_repair, "results store commands"),
}


# The end of each command's --help: one or two command lines that work as they are (a test parses
# every one). Keyed by the command's words after `loradrift`.
EXAMPLES = {
    "": ["loradrift study --preset tiny", "loradrift data check"],
    "data": ["loradrift data check"],
    "data check": ["loradrift data check", "loradrift data check --task sst2,rte --json"],
    "model": ["loradrift model info smollm2-135m"],
    "model info": ["loradrift model info tiny", "loradrift model info smollm2-135m"],
    "train": ["loradrift train --task sst2 --method lora", "loradrift train --preset tiny --task squad_v2 --method full --seed 1337 train.lr=1e-4"],
    "extract-base": ["loradrift extract-base --task all", "loradrift extract-base --task sst2 --force"],
    "sanity": ["loradrift sanity --task all", "loradrift sanity --preset tiny --task rte --method lora"],
    "baselines": ["loradrift baselines --task all"],
    "memory": ["loradrift memory --task squad_v2 --method full,lora"],
    "store": ["loradrift store repair --out runs/smollm2"],
    "store repair": ["loradrift store repair --out runs/smollm2"],
    "study": ["loradrift study", "loradrift study --task squad_v2 --phases 0,1,2 --out /shared/out"],
    "search": [
        "loradrift search --task mrpc --method full,lora --trials 6",
        "loradrift search --task sst2 --method lora --tune-rank --storage postgresql://user:pass@db-host/loradrift",
    ],
    "search-report": ["loradrift search-report", "loradrift search-report --task sst2 --method lora"],
    "drift": ["loradrift drift --task all", "loradrift drift --task sst2,rte drift.metric=debiased"],
    "ablate-rank": [
        "loradrift ablate-rank --task sst2 --ranks 4,8,16,64,256",
        "loradrift ablate-rank --task rte --ranks 8,64 --seeds 42,1337 --rslora",
    ],
    "serve-bench": ["loradrift serve-bench --backend hf --adapters sst2,squad_v2", "loradrift serve-bench --backend vllm --adapters all --online"],
    "stats": ["loradrift stats", "loradrift stats --preset tiny --out runs/tiny"],
    "report": ["loradrift report", "loradrift report --out study-bundle --no-pdf"],
    "bundle": ["loradrift bundle study-bundle --out runs/smollm2"],
    "score": [
        "loradrift score squad_v2 dev-v2.0.json predictions.json",
        "loradrift score squad_v2 dev-v2.0.json predictions.json --na-prob-file na_probs.json --allow-missing",
    ],
}


def _finish_help(parser: argparse.ArgumentParser, words: str = "") -> None:
    """Give every command's --help its examples (EXAMPLES) as an epilog, and its one-line summary
    as a description, for this parser and every subcommand below it."""
    if words in EXAMPLES:
        parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[words])
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                sub.description = sub.description or summaries.get(name)
                _finish_help(sub, f"{words} {name}".strip())


def build_parser() -> argparse.ArgumentParser:
    from loradrift import __version__

    parent = _config_parent()
    ap = argparse.ArgumentParser(prog="loradrift", description="LoRA vs full fine-tuning: representational drift and serving cost.")
    ap.add_argument("--version", action="version", version=f"loradrift {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("data", help="task data commands")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("check", parents=[parent], help="split sizes, label balance and source of each task")
    c.add_argument("--task", default="all", help="task name, comma list or 'all' (default: all)")
    c.add_argument("--json", action="store_true", help="also print the summary as JSON")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("model", help="model commands")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    c = msub.add_parser("info", parents=[parent], help="architecture, layers and parameters of a model")
    c.add_argument("name", help="tiny | smollm2-135m | minilm-l6 | tinyllama-1.1b | folder | Hub id")
    c.set_defaults(func=cmd_model_info)

    c = sub.add_parser("train", parents=[parent], help=COMMANDS["train"][1])
    c.add_argument("--task", required=True, help="one task: sst2, mrpc, rte or squad_v2")
    c.add_argument("--method", choices=list(METHOD_NAMES), default=None, help="default: the config's method.name")
    c.add_argument("--force", action="store_true", help="redo the run from step 0: empties its folder (after the new config has been built)")
    c.set_defaults(func=cmd_train)

    for name in ("extract-base", "sanity", "baselines", "memory"):
        c = sub.add_parser(name, parents=[parent], help=COMMANDS[name][1])
        c.add_argument("--task", default="all", help="task name, comma list or 'all' (default: all)")
        if name in ("sanity", "memory"):
            c.add_argument("--method", default="full,lora", help="full, lora or full,lora (default: both)")
        if name == "extract-base":
            c.add_argument("--force", action="store_true", help="recompute representations that are already there")
        c.set_defaults(func=COMMANDS[name][0])

    p = sub.add_parser("store", help=COMMANDS["store"][1])
    ssub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    c = ssub.add_parser(
        "repair", parents=[parent], help="rebuild the run rows of <out>/results.sqlite from the run folders' result.json files (the record)"
    )
    c.set_defaults(func=cmd_store_repair)

    c = sub.add_parser("study", parents=[parent], help=COMMANDS["study"][1])
    # --task as in every other command; --tasks, its earlier spelling here, still works.
    c.add_argument(
        "--task",
        "--tasks",
        dest="task",
        default=None,
        help="task name or comma list for this machine (default: study.tasks); --tasks is the same option",
    )
    c.add_argument("--phases", default="0,1,2,3", help="which phases to run, e.g. 0,1,2 on each machine, then 3 once")
    c.add_argument("--ray", action="store_true", help="run Phase 2 as Ray tasks (pip install 'loradrift[ray]'; see docs/study.md)")
    c.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join, e.g. auto (implies --ray; default: start a local one, bound to 127.0.0.1)",
    )
    c.set_defaults(func=cmd_study)

    c = sub.add_parser("search", parents=[parent], help=COMMANDS["search"][1])
    c.add_argument("--task", required=True, help="task name, comma list or 'all'")
    c.add_argument("--method", default="full,lora", help="full, lora or full,lora (default: both, one study each)")
    c.add_argument("--trials", type=int, default=None, help="finished (complete+pruned) trials per study (default: search.trials)")
    c.add_argument("--storage", default=None, help="SQLAlchemy URL shared by workers (default sqlite:///<out>/search/optuna.db)")
    c.add_argument("--tune-rank", action="store_true", help="also search LoRA r (a separate study and best-config file)")
    c.set_defaults(func=cmd_search)

    c = sub.add_parser("search-report", parents=[parent], help=COMMANDS["search-report"][1])
    c.add_argument("--task", default=None, help="task name, comma list or 'all' (default: every study in the storage)")
    c.add_argument("--method", default=None, help="full, lora or full,lora (default: both)")
    c.add_argument("--storage", default=None, help="the search's SQLAlchemy URL (default sqlite:///<out>/search/optuna.db)")
    c.set_defaults(func=cmd_search_report)

    c = sub.add_parser("drift", parents=[parent], help=COMMANDS["drift"][1])
    c.add_argument("--task", default="all", help="task name, comma list or 'all' (default: all)")
    c.set_defaults(func=cmd_drift)

    c = sub.add_parser("ablate-rank", parents=[parent], help=COMMANDS["ablate-rank"][1])
    c.add_argument("--task", required=True, help="task name, comma list or 'all'")
    c.add_argument("--ranks", default=None, help="comma list, e.g. 4,8,16,64,256 (default: ablation.rank.ranks)")
    c.add_argument("--seeds", default=None, help="comma list (default: ablation.rank.seeds, else study.seeds)")
    c.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA (scale alpha / sqrt(r))")
    c.set_defaults(func=cmd_ablate_rank)

    c = sub.add_parser("serve-bench", parents=[parent], help=COMMANDS["serve-bench"][1])
    c.add_argument("--backend", default=None, help="auto | hf | vllm | hf,vllm (default: serve.backend; auto = vllm when importable, else hf)")
    c.add_argument(
        "--online",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the online benchmark on vLLM's OpenAI server (default: serve.online; needs vllm)",
    )
    c.add_argument("--adapters", default="all", help="tasks whose Phase 2 LoRA adapters to serve, e.g. sst2,squad_v2")
    c.add_argument("--batch-sizes", default=None, help="comma list, e.g. 1,2,4,8,16 (default: serve.batch_sizes)")
    c.set_defaults(func=cmd_serve_bench)

    c = sub.add_parser("stats", parents=[parent], help=COMMANDS["stats"][1])
    c.set_defaults(func=cmd_stats)

    c = sub.add_parser("report", parents=[parent], help=COMMANDS["report"][1])
    c.add_argument("--no-pdf", action="store_true", help="HTML only")
    c.set_defaults(func=cmd_report)

    c = sub.add_parser("bundle", parents=[parent], help=COMMANDS["bundle"][1])
    c.add_argument("dest", type=Path, help="new folder (must not exist); `loradrift report --out DEST` rebuilds the report from it")
    c.set_defaults(func=cmd_bundle)

    c = sub.add_parser("score", help=COMMANDS["score"][1])
    c.add_argument("task", help="squad_v2")
    c.add_argument("data", type=Path, help="official-format data JSON")
    c.add_argument("preds", type=Path, help="JSON object: question id -> answer text ('' = no answer)")
    c.add_argument(
        "--na-prob-file",
        type=Path,
        default=None,
        help="JSON object: question id -> probability (0 to 1) that it has no answer; adds the best_* fields",
    )
    c.add_argument("--na-prob-thresh", type=float, default=1.0, help="answer '' where the no-answer probability is above this (default 1.0: never)")
    c.add_argument(
        "--allow-missing",
        action="store_true",
        help="score only the questions that have a prediction (the official script's behaviour); without it, missing predictions are an error",
    )
    c.add_argument(
        "--allow-extra",
        action="store_true",
        help="ignore predictions whose id is in no question of DATA, with a warning giving their count (the "
        "official script ignores them silently); without it they are an error, since they usually mean "
        "predictions made on another file",
    )
    c.set_defaults(func=cmd_score, overrides=[], preset=None, config=[], out=None, data_dir=None, seed=None)
    _finish_help(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    from loradrift.config import ConfigError
    from loradrift.data import DataError
    from loradrift.models import ModelError

    _quiet_libraries()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    previous = _stop_on_sigterm()
    try:
        return args.func(args, Configs(args))
    except (ConfigError, DataError, ModelError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"loradrift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder or file the command cannot create, read or write
        where = f"{e.filename}: " if e.filename else ""
        print(f"loradrift {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# How long a terminated command may take to unwind (closing engines, releasing locks) before it
# exits regardless.
TERM_GRACE_S = 30


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every `finally` runs on the way out: locks are
    released, and vLLM engines are shut down by their backend's close()."""


def _stop_on_sigterm():
    """Turn SIGTERM into `Terminated` for the duration of a command; returns the handler it replaced
    (None off the main thread, where Python allows no signal handler).

    The command's own child processes get the SIGTERM first: a default SIGTERM death left vLLM's
    engine processes running (issue 28 item 14). And a process that has not ended `TERM_GRACE_S`
    seconds later ends then (exit 143): vLLM, terminated while it waits for its engine to start,
    sits in a ZMQ poll that swallows the exception."""

    def stop(signum, frame):
        from loradrift.runtime import descendant_pids

        for pid in descendant_pids(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        watchdog = threading.Timer(TERM_GRACE_S, os._exit, args=(143,))
        watchdog.daemon = True
        watchdog.start()
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


if __name__ == "__main__":
    sys.exit(main())
