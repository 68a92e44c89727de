"""The `loradrift` command: a thin shell over the library. Every command takes the same config
options (`--preset`, `--config`, `--out`, `--data-dir`, `--seed` and dotted `key=value`
overrides), resolved through `loradrift.config`.

    loradrift --help
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------
# shared options


def _config_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("config")
    g.add_argument("--preset", default=None, help="tiny | smollm2 (default) | tinyllama")
    g.add_argument("--config", action="append", type=Path, default=[], metavar="FILE", help="YAML config file (repeatable, later wins)")
    g.add_argument("--out", type=Path, default=None, help="study output folder (default: the preset's out_dir)")
    g.add_argument("--data-dir", type=Path, default=None, help="task data folder (default ../shared/data or $LORADRIFT_DATA)")
    g.add_argument("--seed", type=int, default=None, help="run seed (default 42)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lr=1e-4")
    return p


class Configs:
    """Builds the config for a (task, method, seed) from one command line's options."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self, task: str | None = None, method: str | None = None, seed: int | None = None, extra: list[str] | None = None):
        from loradrift.config import resolve_config

        a = self.args
        overrides = list(a.overrides)
        if a.data_dir is not None:
            overrides.append(f"data.data_dir={a.data_dir}")
        if method is not None:
            overrides.append(f"method.name={method}")
        overrides += extra or []
        seed = seed if seed is not None else a.seed
        return resolve_config(preset=a.preset, files=a.config, overrides=overrides, task=task,
                              out_dir=a.out, seed=seed)


def _tasks(value: str) -> list[str]:
    from loradrift.tasks import expand_tasks

    return expand_tasks(value)


def _methods(value: str) -> list[str]:
    methods = [m.strip() for m in value.split(",") if m.strip()]
    for m in methods:
        if m not in ("full", "lora"):
            raise ValueError(f"--method: unknown method {m!r} (full, lora)")
    return methods


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
    from loradrift.metrics import score_squad_v2_files

    if args.task != "squad_v2":
        raise ValueError(f"score: only squad_v2 has an official file scorer (got {args.task!r})")
    out = score_squad_v2_files(args.data, args.preds, args.na_prob_file, args.na_prob_thresh)
    print(json.dumps(out, indent=2))
    return 0


def cmd_train(args, configs: Configs) -> int:
    from rich.progress import Progress

    from loradrift.train import train_run

    cfg = configs(args.task, args.method)
    with Progress(transient=True) as prog:
        bar = prog.add_task(f"{cfg.task} {cfg.method.name} seed {cfg.seed}", total=None)
        r = train_run(cfg, force=args.force, on_step=lambda s, n: prog.update(bar, completed=s, total=n))
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
    _table("Sanity: overfit a small training sample", rows, ["task", "method", "examples", "steps", "metric", "score", "threshold", "passed", "seconds"])
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


def _memory_worker(cfg_json: str, queue) -> None:
    from loradrift.config import RunConfig
    from loradrift.phase0 import memory_profile

    queue.put(memory_profile(RunConfig.model_validate_json(cfg_json)))


def cmd_memory(args, configs: Configs) -> int:
    import multiprocessing as mp

    # One process per (task, method): CPU peak RSS is a process high-water mark.
    ctx = mp.get_context("spawn")
    rows = []
    for task in _tasks(args.task):
        for method in _methods(args.method):
            q = ctx.Queue()
            p = ctx.Process(target=_memory_worker, args=(configs(task, method).model_dump_json(), q))
            p.start()
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"memory profile of {task}/{method} failed (exit {p.exitcode})")
            rows.append(q.get())
    _table("Peak training memory", rows, ["task", "method", "batch_size", "max_length", "device", "peak_memory_mb", "seconds_per_step"])
    return 0


COMMANDS = {
    "train": (cmd_train, "train one run (full fine-tuning or LoRA)"),
    "extract-base": (cmd_extract_base, "Phase 0: base-model probe representations"),
    "sanity": (cmd_sanity, "Phase 0: overfit a small sample per task and method"),
    "baselines": (cmd_baselines, "Phase 0: majority / random baselines on dev"),
    "memory": (cmd_memory, "Phase 0: peak training memory per task and method"),
    "score": (cmd_score, "score SQuAD v2 predictions like the official evaluate-v2.0.py"),
}


def build_parser() -> argparse.ArgumentParser:
    from loradrift import __version__

    parent = _config_parent()
    ap = argparse.ArgumentParser(prog="loradrift", description="LoRA vs full fine-tuning: representational drift and serving cost.")
    ap.add_argument("--version", action="version", version=f"loradrift {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("data", help="task data commands")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = dsub.add_parser("check", parents=[parent], help="split sizes, label balance and source of each task")
    c.add_argument("--task", default="all")
    c.add_argument("--json", action="store_true", help="also print the summary as JSON")
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("model", help="model commands")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    c = msub.add_parser("info", parents=[parent], help="architecture, layers and parameters of a model")
    c.add_argument("name", help="tiny | smollm2-135m | minilm-l6 | tinyllama-1.1b | folder | Hub id")
    c.set_defaults(func=cmd_model_info)

    c = sub.add_parser("train", parents=[parent], help=COMMANDS["train"][1])
    c.add_argument("--task", required=True)
    c.add_argument("--method", choices=["full", "lora"], default=None, help="default: the config's method.name")
    c.add_argument("--force", action="store_true", help="redo a finished run")
    c.set_defaults(func=cmd_train)

    for name in ("extract-base", "sanity", "baselines", "memory"):
        c = sub.add_parser(name, parents=[parent], help=COMMANDS[name][1])
        c.add_argument("--task", default="all", help="task name, comma list or 'all'")
        if name in ("sanity", "memory"):
            c.add_argument("--method", default="full,lora")
        if name == "extract-base":
            c.add_argument("--force", action="store_true")
        c.set_defaults(func=COMMANDS[name][0])

    c = sub.add_parser("score", help=COMMANDS["score"][1])
    c.add_argument("task", help="squad_v2")
    c.add_argument("data", type=Path, help="official-format data JSON")
    c.add_argument("preds", type=Path, help="JSON object: question id -> answer text ('' = no answer)")
    c.add_argument("--na-prob-file", type=Path, default=None)
    c.add_argument("--na-prob-thresh", type=float, default=1.0)
    c.set_defaults(func=cmd_score, overrides=[], preset=None, config=[], out=None, data_dir=None, seed=None)
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
    try:
        return args.func(args, Configs(args))
    except (ConfigError, DataError, ModelError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"loradrift {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130


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
