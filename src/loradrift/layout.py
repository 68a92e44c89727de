"""The on-disk layout of a study folder, declared once: the code twin of docs/layout.md.

    layout.run_dir(out, "smollm2-135m", "sst2", "lora", 42)   # <out>/runs/smollm2-135m/sst2/lora/seed42
    layout.run_path(rd, "result")                             # <run>/result.json
    layout.path(out, "hypotheses")                            # <out>/stats/hypotheses.json
    for run in layout.iter_runs(out): run.model, run.task, run.method, run.seed, run.path

`PATHS` holds every path under `<out>` and `RUN_PATHS` every path under a run folder, as
`str.format` templates (fields: model, task, method, seed, step, variant, rank, suffix, time,
group, run); a template ending in "/" is a folder. tests/test_layout.py checks these tables
against the tree in docs/layout.md, both ways. Import-light: no torch, no pydantic.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

#: The suffix of the base representations' noise-floor twin (`PATHS["base_floor"]`).
FLOOR_SUFFIX = ".floor.safetensors"

#: Paths under the study output folder `<out>`.
PATHS: dict[str, str] = {
    "results": "results.sqlite",  # the results store (an index over the run folders' result.json)
    "base": "base/{model}/{task}.safetensors",  # Phase 0 base representations of the probe set
    "base_floor": "base/{model}/{task}" + FLOOR_SUFFIX,  # the same, another batch composition
    "runs": "runs/",
    "run": "runs/{model}/{task}/{method}/seed{seed}/",  # one training run (RUN_PATHS inside)
    "best_config": "configs/best/{model}/{task}_{method}{suffix}.yaml",  # Phase 1 best configs
    "search": "search/",
    "search_db": "search/optuna.db",  # the default Optuna storage
    "search_report": "search/report/",
    "search_trials": "search/{model}/{task}_{method}{suffix}/",  # one study's trial run folders
    "weights": "weights/",
    "forgetting": "forgetting/",
    "forgetting_cache": "forgetting/cache.json",
    "forgetting_summary": "forgetting/summary.json",
    "ablation": "ablation/rank/{variant}/",
    "ablation_rank": "ablation/rank/{variant}/r{rank}/",  # an <out> of its own: runs/... inside
    "ablation_summary": "ablation/rank/{variant}/summary.json",
    "hypotheses": "stats/hypotheses.json",
    "manifest": "study/manifest.json",
    "timings": "study/timings.json",
    "drift": "drift/",
    "drift_comparison": "drift/comparison.json",  # read by the stats and the forgetting analysis
    "serve": "serve/",
    "serve_overhead": "serve/overhead.json",
    "serve_meta": "serve/meta.json",
    "serve_fingerprint": "serve/fingerprint.json",
    "serve_online": "serve/online/",
    "serve_old": "serve.old-{time}/",
    "report": "report/",
    "mlflow_db": "mlflow.db",
    "mlflow_artifacts": "mlflow-artifacts/",
    "tensorboard": "tensorboard/{group}/{run}/",
    "wandb": "wandb/",
}

#: Paths under one run folder (`PATHS["run"]`).
RUN_PATHS: dict[str, str] = {
    "lock": ".lock",  # flock held by the process training here
    "config": "config.yaml",  # the resolved config, written when the folder is first used
    "log": "log.jsonl",  # training log
    "result": "result.json",  # THE RECORD of a finished run, written last
    "snapshots": "snapshots/",
    "snapshot": "snapshots/step_{step:06d}.safetensors",
    "snapshot_index": "snapshots/index.json",
    "adapter": "adapter/",  # LoRA: the PEFT adapter as users load it
    "serve_adapter": "serve_adapter/",  # LoRA: CausalLM keys, no head (vLLM, merging, weights)
    "head": "head.safetensors",  # the trained task head (both methods)
    "model": "model/",  # full FT: the fine-tuned backbone as a CausalLM folder
    "merged": "merged/",  # LoRA: adapter merged into the base (on demand)
    "checkpoints": "checkpoints/",  # resume state, removed when the run finishes
    "dev_predictions": "dev_predictions.json",
    "dev_na_probs": "dev_na_probs.json",  # SQuAD v2: the no-answer probabilities beside them
}

#: Folders that hold weights (bundles leave them out); `merged_cache` is the serving benchmark's.
WEIGHT_DIRS: frozenset[str] = frozenset(
    {*(RUN_PATHS[k].rstrip("/") for k in ("model", "merged", "adapter", "serve_adapter", "checkpoints", "snapshots")),
     "merged_cache"})

#: The name of a run folder: seed<S>.
SEED_DIR = re.compile(r"^seed(\d+)$")


def _fill(template: str, fields: dict) -> str:
    try:
        return template.format(**fields)
    except KeyError as e:
        raise ValueError(f"layout path {template!r} needs the field {e.args[0]!r}") from None


def path(out: Path | str, name: str, **fields) -> Path:
    """`<out>/PATHS[name]`, its fields filled in (`suffix` defaults to "")."""
    if name not in PATHS:
        raise ValueError(f"unknown layout path {name!r} (known: {', '.join(PATHS)})")
    return Path(out) / _fill(PATHS[name], {"suffix": "", **fields})


def run_path(run_dir: Path | str, name: str, **fields) -> Path:
    """`<run>/RUN_PATHS[name]`."""
    if name not in RUN_PATHS:
        raise ValueError(f"unknown run folder path {name!r} (known: {', '.join(RUN_PATHS)})")
    return Path(run_dir) / _fill(RUN_PATHS[name], fields)


def runs_dir(out: Path | str, model: str | None = None, task: str | None = None, method: str | None = None) -> Path:
    """`<out>/runs[/<model>[/<task>[/<method>]]]`: the folders above the run folders."""
    d = Path(out) / PATHS["runs"]
    for part in (model, task, method):
        if part is None:
            break
        d = d / part
    return d


def run_dir(out: Path | str, model: str, task: str, method: str, seed: int) -> Path:
    return path(out, "run", model=model, task=task, method=method, seed=seed)


def run_dir_for(cfg) -> Path:
    """The run folder of a resolved RunConfig."""
    return run_dir(cfg.out_dir, model_key(cfg.model), cfg.task, cfg.method.name, cfg.seed)


def seed_of(name: str) -> int | None:
    """The seed a run folder's name (seed<S>) gives, or None for any other name."""
    m = SEED_DIR.match(name)
    return int(m.group(1)) if m else None


class RunRef(NamedTuple):
    """A run folder found on disk, and what its path says about it."""

    model: str
    task: str
    method: str
    seed: int | None  # None: a seed* folder whose name is not seed<digits>
    path: Path


def iter_runs(out: Path | str, model: str = "*", task: str = "*", method: str = "*") -> Iterator[RunRef]:
    """Every run folder `<out>/runs/<model>/<task>/<method>/seed*` (glob patterns allowed), in
    sorted path order, finished or not."""
    for p in sorted(Path(out).glob(f"{PATHS['runs']}{model}/{task}/{method}/seed*")):
        if p.is_dir():
            yield RunRef(p.parent.parent.parent.name, p.parent.parent.name, p.parent.name, seed_of(p.name), p)


def results_db(out: Path | str) -> Path:
    return path(out, "results")


def base_file(out: Path | str, model: str, task: str) -> Path:
    return path(out, "base", model=model, task=task)


def best_config_for(out: Path | str, model: str, task: str, method: str, tune_rank: bool = False) -> Path:
    """Phase 1's best config of one (model, task, method); `tune_rank`: the --tune-rank study's."""
    return path(out, "best_config", model=model, task=task, method=method, suffix="_rank" if tune_rank else "")


def model_key(mcfg) -> str:
    """The name used in artefact paths: the registry name (none holds "/" or ":", so the
    sanitising below keeps it as it is; tests/test_layout.py checks), or a sanitised path / Hub id.
    Layout needs nothing from the model registry, so paths import no model code."""
    import hashlib
    import json

    if mcfg.name == "tiny":
        d = mcfg.tiny.model_dump()
        # Shape options added later enter the key only when set, so existing tiny models keep their key.
        for k, default in (("vocab_size", None), ("tie_word_embeddings", True)):
            if d[k] == default:
                del d[k]
        tiny = json.dumps(d, sort_keys=True)
        return "tiny-" + hashlib.sha256(tiny.encode()).hexdigest()[:8]
    return mcfg.name.strip("/").replace("/", "--").replace(":", "_")
