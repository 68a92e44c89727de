"""Phase 1: hyperparameter search, one Optuna study per (model, task, method).

    run_search(cfg, search_cfg)          # what `loradrift search --task sst2 --method lora` runs
    search_report(out_dir)               # what `loradrift search-report` runs

A trial is an ordinary training run (`train_run`, the code behind `loradrift train`) with the
trial's values applied as config overrides, in its own folder under `<out>/search/`. The objective
is the task's primary metric on the validation split carved from train; the official dev set,
which is the final test, is never looked at. Spaces are data (`SearchConfig.spaces`), so the
objective has no hyperparameter names in it. See docs/search.md for the storage, resume and
multi-worker story.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from loradrift import layout, tracking
from loradrift.config import ConfigError, ParamSpec, PrunerConfig, RunConfig, SearchConfig, _validate, deep_merge
from loradrift.io import LockBusy, atomic_write_json, atomic_write_text, exclusive_lock

# A trial is scored on validation only: snapshots and the dev set (the final test, which a search
# must not look at) would cost time and change none of the training numbers.
TRIAL_ONLY = {"probe": {"enabled": False}, "train": {"eval_dev": False}}
# Run folders keep these after a trial; weights and snapshots go unless keep_trial_weights.
_TRIAL_KEEP = {layout.RUN_PATHS[k] for k in ("config", "result", "log", "lock")}


class SearchError(RuntimeError):
    """A search that cannot start or go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# config


def load_search_config(raw: dict | SearchConfig | None) -> SearchConfig:
    """A SearchConfig from a mapping (e.g. a preset's `search:` block), errors naming the key."""
    if isinstance(raw, SearchConfig):
        return raw
    try:
        return SearchConfig.model_validate(raw or {})
    except ValidationError as e:
        lines = [f"  search.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid search config:\n" + "\n".join(lines)) from None


def _nested(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node: Any = value
        for part in reversed(key.split(".")):
            node = {part: node}
        out = deep_merge(out, node)
    return out


def trial_config(cfg: RunConfig, overrides: dict[str, Any], out_dir: Path, seed: int,
                 max_steps: int | None = None) -> RunConfig:
    """The config a trial trains with: the study's base config + the trial's dotted overrides
    (+ the shorter trial length `search.trial_max_steps`, which is not part of the best config)."""
    raw = deep_merge(cfg.model_dump(mode="json"), _nested(overrides))
    raw = deep_merge(raw, TRIAL_ONLY)
    if max_steps is not None:
        raw["train"]["max_steps"] = max_steps
    # The pruner acts on intermediate validation scores, so a trial evaluates at least once
    # before its end even when final runs (eval_every null or longer than a trial) do not.
    steps = raw["train"].get("max_steps")
    if steps and steps > 1 and not (raw["train"].get("eval_every") and raw["train"]["eval_every"] < steps):
        raw["train"]["eval_every"] = max(1, steps // 2)
    raw.update(out_dir=str(out_dir), seed=seed)
    return _validate(raw, "search trial")


def validate_space(cfg: RunConfig, space: list[ParamSpec], fixed: dict[str, Any]) -> None:
    """Every declared value must give a valid config: a typo in a parameter name or a value the
    schema rejects fails here, naming the parameter, before any trial runs."""
    base = cfg.model_dump(mode="json")
    checks = [(k, v) for k, v in fixed.items()] + [(p.name, v) for p in space for v in p.extremes()]
    for name, value in checks:
        parts = name.split(".")
        node: Any = base
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"search parameter {name!r}: not a config key")
            node = node[part]
        if isinstance(node, dict):
            raise ConfigError(f"search parameter {name!r}: a config section, not a value")
        try:
            _validate(deep_merge(base, _nested({name: value})), f"search parameter {name}={value!r}")
        except ConfigError as e:
            raise ConfigError(f"search parameter {name!r}: value {value!r} is invalid: {e}") from None


# ---------------------------------------------------------------------------------------------
# storage and study


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{layout.path(out_dir, 'search_db').resolve()}"


@contextmanager
def _creation_lock(url: str):
    path = url.split(":///", 1)[-1].split("?", 1)[0] if url.startswith("sqlite:") else ""
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_storage(url: str, search_cfg: SearchConfig):
    """RDBStorage with heartbeats, so a trial whose worker died is failed and retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        # Several workers on one SQLite file wait for its lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SearchError(f"storage {_safe_url(url)}: cannot create its folder ({e.strerror})") from None
    last: Exception | None = None
    # Workers started together race to create the tables (and Optuna's alembic version row); on
    # one machine a file lock serialises that, elsewhere the loser just tries again.
    for attempt in range(5):
        try:
            with warnings.catch_warnings(), _creation_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs,
                    heartbeat_interval=search_cfg.heartbeat_interval, grace_period=search_cfg.grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=search_cfg.max_retry, inherit_intermediate_values=True),
                )
        except ImportError as e:
            raise SearchError(f"storage {_safe_url(url)}: no database driver for it ({e.__cause__ or e})") from None
        except _storage_errors() as e:  # unreachable host, bad credentials, bad URL, a lost creation race
            last = e
            if not any(m in str(e) for m in ("already exists", "locked", "UNIQUE constraint failed")):
                break
            time.sleep(0.5 * (attempt + 1))
    raise SearchError(f"storage {_safe_url(url)}: cannot open it ({type(last).__name__}: {_first_line(last)})")


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What opening an Optuna RDB storage raises for a bad URL, host or database (SQLAlchemy's
    errors, Optuna's storage errors, a malformed URL's ValueError), not a bug of ours. A function:
    an `except` clause evaluates it only when something was raised, so optuna loads lazily."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    return (SQLAlchemyError, optuna.exceptions.OptunaError, ValueError, OSError)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except _storage_errors():
        return "<unparseable URL>" if "@" in url else url


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0] if e and str(e).strip() else ""


def study_name_for(model: str, task: str, method: str, tune_rank: bool) -> str:
    return f"{model}-{task}-{method}" + ("-rank" if tune_rank else "")


def _space_record(space: list[ParamSpec], fixed: dict[str, Any]) -> dict:
    return {"params": [p.model_dump(mode="json") for p in space], "fixed": fixed}


def _base_fingerprint(cfg: RunConfig, space: list[ParamSpec], fixed: dict[str, Any]) -> str:
    """What else decides a trial's score (model, data sizes, steps...): workers and resumed runs
    must agree on it, or their trials would not be comparable. Paths are left out so machines
    with different data folders can share a study."""
    d = cfg.model_dump(mode="json", exclude={"out_dir", "per_task", "preset", "seed", "sanity", "probe"})
    d["data"].pop("data_dir", None)
    d["data"].pop("source", None)
    d.pop("search", None)
    for name in [p.name for p in space] + list(fixed):
        node = d
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _sampler(seed: int):
    """TPE whose random draws for trial n come from a generator seeded with (seed, n).

    One `TPESampler(seed)` per process would replay the same draws in every process: two
    workers on one storage would suggest the same values in pairs, and a resumed study would
    repeat its first trials. Trial numbers are unique in a study, so per-trial seeds give every
    trial its own draws, and one uninterrupted worker still reproduces its run exactly. The
    constant liar (Optuna's default) keeps concurrent TPE trials away from each other."""
    import numpy as np
    import optuna

    class PerTrialSeedTPE(optuna.samplers.TPESampler):
        def before_trial(self, study, trial) -> None:
            # TPE draws from _rng; its start-up trials come from the RandomSampler it wraps. Both get
            # an MT19937 state spread from (seed, n) by SeedSequence: the legacy RandomState.seed(int)
            # gives nearby first draws for different seeds (trials 0-2 of a study all drew a
            # learning rate of ~8e-5), so start-up trials explored one point.
            for lazy in (self._rng, self._random_sampler._rng):
                lazy._rng = np.random.RandomState(np.random.MT19937(np.random.SeedSequence([seed, trial.number])))
            super().before_trial(study, trial)

    return PerTrialSeedTPE(seed=seed, constant_liar=True)


def open_study(storage, name: str, attrs: dict, seed: int, pruner_cfg: PrunerConfig):
    """Create the study, or load it and refuse (touching nothing) if it was made for another
    direction, search space or base config."""
    import optuna

    sampler = _sampler(seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_cfg.n_startup_trials,
                                         n_warmup_steps=pruner_cfg.n_warmup_steps)
    existing = name in optuna.study.get_all_study_names(storage)
    if existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise SearchError(f"study {name!r} exists with direction {study.direction.name.lower()} "
                              f"(this search maximizes); use another storage or delete the study")
        stored = study.user_attrs
        for key, what in (("space", "search space"), ("base_config", "base config")):
            if key in stored and stored[key] != attrs[key]:
                raise SearchError(
                    f"study {name!r} exists with another {what}:\n  stored: {json.dumps(stored[key])}\n"
                    f"  now:    {json.dumps(attrs[key])}\nits {len(study.trials)} trials are kept as they are; "
                    f"use another --storage/--out, or delete the study (optuna delete-study --study-name {name})")
    else:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
        except _storage_errors() as e:
            raise SearchError(f"study {name!r}: cannot create it ({type(e).__name__}: {_first_line(e)})") from None
    for key, value in attrs.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    return study


# ---------------------------------------------------------------------------------------------
# the search


def run_search(cfg: RunConfig, search_cfg: SearchConfig | dict | None = None, trials: int | None = None,
               storage: str | None = None, tune_rank: bool = False, log=print,
               progress: Callable[[float, int], None] | None = None) -> dict:
    """Run (or resume, or join) the study of cfg's model, task and method until it holds `trials`
    finished (complete + pruned) trials; write the best config as YAML. Returns a summary dict:
    study, storage, best_value, best_trial, best_params, best_config (path), n_finished.
    `progress(finished, trials)`: finished trials, a fraction of one for the steps of the trial
    this worker runs."""
    import optuna
    from optuna.trial import TrialState

    from loradrift.layout import model_key
    from loradrift.tasks import get_task
    from loradrift.train import train_run

    if cfg.task is None:
        raise ConfigError("search: a task is needed")
    scfg = load_search_config(search_cfg if search_cfg is not None else getattr(cfg, "search", None))
    n_target = trials if trials is not None else scfg.trials
    if n_target <= 0:
        raise ConfigError(f"--trials: must be positive (got {n_target})")
    method, model = cfg.method.name, model_key(cfg.model)
    space, fixed = scfg.space_for(method, tune_rank)
    validate_space(cfg, space, fixed)
    spec = get_task(cfg.task)

    url = storage or scfg.storage or default_storage(cfg.out_dir)
    store = open_storage(url, scfg)
    name = study_name_for(model, cfg.task, method, tune_rank)
    attrs = {"space": _space_record(space, fixed), "base_config": _base_fingerprint(cfg, space, fixed),
             "model": model, "task": cfg.task, "method": method, "tune_rank": tune_rank,
             "primary_metric": spec.primary}
    study = open_study(store, name, attrs, scfg.seed, scfg.pruner)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial_root = layout.path(cfg.out_dir, "search_trials", model=model, task=cfg.task, method=method, suffix="_rank" if tune_rank else "")

    class Surplus(Exception):
        """Another worker started the last trial first; this one is recorded as a failed no-op."""

    ran: dict[str, int] = {}

    def objective(trial) -> float:
        ran["number"] = trial.number
        frozen = study._storage.get_trial(trial._trial_id)
        if _is_surplus(study, frozen, n_target):
            trial.set_user_attr("surplus", True)
            raise Surplus(f"the study already has {n_target} finished or running trials")
        overrides = {**fixed, **{p.name: p.suggest(trial) for p in space}}
        # A retried trial (its worker died) continues the dead one's run from its checkpoint.
        origin = frozen.system_attrs.get("failed_trial", trial.number)
        tcfg = trial_config(cfg, overrides, trial_root / f"trial_{origin}", scfg.seed, scfg.trial_max_steps)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("config_hash", tcfg.science_hash())
        trial.set_user_attr("trial_dir", str(tcfg.out_dir))

        # Batch size and accumulation are searched, so optimizer steps of two trials are unlike
        # amounts of training: the pruner compares trials at equal training examples seen.
        per_step = tcfg.train.batch_size * tcfg.train.grad_accum

        def on_eval(step: int, score: float) -> None:
            trial.report(score, step * per_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {step} ({step * per_step} examples): validation {spec.primary} "
                                         f"{score:.4f} below the median")

        def on_step(step: int, total: int) -> None:
            # `finished`: the study's count when this trial began (the loop below sets it)
            progress(finished + step / total, n_target)

        t0 = time.time()
        try:
            result = train_run(tcfg, on_step=on_step if progress else None, on_eval=on_eval, tracker=tracking.start(
                cfg.report_to, cfg.out_dir, name, f"trial-{trial.number}", tcfg.model_dump(mode="json"),
                {"task": cfg.task, "method": method, "study": name, "trial": trial.number, "run_dir": tcfg.out_dir}))
        except optuna.TrialPruned:
            trial.set_user_attr("train_seconds", time.time() - t0)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {_first_line(e)}"[:500])
            raise
        finally:
            if not scfg.keep_trial_weights:
                _strip_trial(trial_root / f"trial_{origin}")
        value = float(result["val"][result["primary_metric"]])
        trial.set_user_attr("train_seconds", time.time() - t0)
        trial.set_user_attr("steps", result["steps"])
        if not math.isfinite(value):
            raise ValueError(f"validation {spec.primary} is {value}")
        return value

    failures = 0
    waited = False
    while True:
        _fail_stale(study)
        counts = _counts(study)
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if progress:
            progress(min(finished, n_target), n_target)
        if finished >= n_target:
            break
        if finished + counts[TrialState.RUNNING] >= n_target:
            # Other workers run the last trials. Wait instead of stopping: if one of them dies,
            # its trial goes stale, is failed and re-queued, and this worker runs it.
            if not waited:
                log(f"{name}: {finished}/{n_target} finished, waiting for {counts[TrialState.RUNNING]} running trial(s)")
                waited = True
            time.sleep(max(1.0, scfg.heartbeat_interval / 2))
            continue
        waited = False
        ran.clear()
        study.optimize(objective, n_trials=1, catch=(Exception,))
        last = study.trials[ran["number"]] if "number" in ran else None
        if last is not None and last.state == TrialState.FAIL and not last.user_attrs.get("surplus"):
            failures += 1
            log(f"{name}: trial {last.number} failed: {last.user_attrs.get('error', '?')}")
            if failures >= scfg.max_failures:
                raise SearchError(f"{name}: {failures} trials in a row failed; last error: "
                                  f"{last.user_attrs.get('error', '?')} (trial folders under {trial_root})")
        elif last is not None:
            failures = 0
            if last.state == TrialState.COMPLETE:
                log(f"{name}: trial {last.number} complete, validation {spec.primary} {last.value:.4f}")
            elif last.state == TrialState.PRUNED:
                log(f"{name}: trial {last.number} pruned after {max(last.intermediate_values, default=0)} training examples")

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SearchError(f"{name}: no trial completed (all pruned or failed); nothing to write")
    best = study.best_trial
    path = layout.best_config_for(cfg.out_dir, model, cfg.task, method, tune_rank)
    write_best_config(path, study, best)
    return {"study": name, "storage": _safe_url(url), "best_value": best.value, "best_trial": best.number,
            "best_params": dict(best.params), "best_overrides": best.user_attrs.get("overrides", {}),
            "best_config": str(path),
            "n_finished": len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))),
            "primary_metric": spec.primary}


def _counts(study) -> dict:
    from optuna.trial import TrialState

    counts = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def _fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        _fail_unstarted(study)


def _fail_unstarted(study) -> None:
    """Fail (and retry) RUNNING trials that never recorded a heartbeat and are older than the
    grace period. Optuna only fails trials whose heartbeat went stale, so a worker killed between
    creating a trial and its heartbeat thread's first beat left a trial RUNNING for ever, and the
    other workers waited on it for ever."""
    import sqlalchemy.orm
    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    storage = study._storage  # the study's cache in front of the RDBStorage, which holds the sessions
    rdb = getattr(storage, "_backend", storage)
    if not isinstance(rdb, RDBStorage) or rdb.heartbeat_interval is None:
        return
    grace = rdb.grace_period or 2 * rdb.heartbeat_interval
    now = datetime.now()  # datetime_start is the local naive time of the worker that started it
    with _create_scoped_session(rdb.scoped_session) as session:
        ids = [t.trial_id for t in session.query(models.TrialModel)
               .options(sqlalchemy.orm.selectinload(models.TrialModel.heartbeats))
               .filter(models.TrialModel.state == TrialState.RUNNING,
                       models.TrialModel.study_id == study._study_id)
               if not t.heartbeats and t.datetime_start is not None
               and (now - t.datetime_start).total_seconds() > grace]
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in ids:
        if storage.set_trial_state_values(trial_id, state=TrialState.FAIL) and callback is not None:
            callback(study, storage.get_trial(trial_id))


def _is_surplus(study, me, n_target: int) -> bool:
    """Two workers can both see room for one more trial and both start one. The trial that
    started later (ties: higher number) steps back, so a study never exceeds its budget."""
    from optuna.trial import TrialState

    key = (me.datetime_start, me.number)
    taken = 0
    for t in study.get_trials(deepcopy=False):
        if t.number == me.number:
            continue
        started_before = t.state == TrialState.RUNNING and t.datetime_start is not None and (t.datetime_start, t.number) < key
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or started_before:
            taken += 1
    return taken >= n_target


def _strip_trial(trial_dir: Path) -> None:
    """Drop the bulky parts of a trial's run folder; config, log and result stay for the report.
    Only a killed worker leaves a checkpoint behind (it never gets here): its retry resumes it."""
    for run_dir in (run.path for run in layout.iter_runs(trial_dir)):
        try:
            # A worker declared dead by mistake may still train here (its retry was refused
            # with "run in progress"): its folder is not ours to strip.
            with exclusive_lock(layout.run_path(run_dir, "lock")):
                for child in run_dir.iterdir():
                    if child.name not in _TRIAL_KEEP:
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
        except LockBusy:
            continue


# ---------------------------------------------------------------------------------------------
# best config


def write_best_config(path: Path, study, trial) -> None:
    """Only the trial's overrides (searched and fixed values), as nested YAML, so
    `loradrift train --config <path>` gives the best trial's config on the same preset."""
    overrides = dict(trial.user_attrs.get("overrides") or trial.params)
    body = _nested({"method.name": study.user_attrs["method"], **overrides})
    header = (
        f"# Best trial of Optuna study {study.study_name!r} (loradrift search)\n"
        f"# trial {trial.number}: validation {study.user_attrs.get('primary_metric', 'score')} = {trial.value!r}\n"
        f"# config hash of the trial run: {trial.user_attrs.get('config_hash', '?')}\n"
        f"# Use: loradrift train --task {study.user_attrs['task']} --config {path.name}\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(body, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# report


def search_report(
    out_dir: Path,
    storage: str | None = None,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    search_cfg: SearchConfig | dict | None = None,
) -> dict:
    """Per study: trial table, best-worst gap, parameter importances and figures, written to
    `<out>/search/report/` (summary.json, trials.csv, figures/*.png). Returns the summary."""
    import optuna
    from optuna.trial import TrialState

    scfg = load_search_config(search_cfg)
    url = storage or scfg.storage or default_storage(out_dir)
    if url == default_storage(out_dir) and not layout.path(out_dir, "search_db").exists():
        raise SearchError(f"no search storage at {layout.path(out_dir, 'search_db')}; run `loradrift search` first")
    store = open_storage(url, scfg)
    report_dir = layout.path(out_dir, "search_report")
    fig_dir = report_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    studies, rows = [], []
    for name in sorted(optuna.study.get_all_study_names(store)):
        study = optuna.load_study(study_name=name, storage=store)
        ua = study.user_attrs
        if (tasks and ua.get("task") not in tasks) or (methods and ua.get("method") not in methods):
            continue
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            rows.append(_trial_row(name, ua, t))
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        entry: dict[str, Any] = {
            "study": name,
            "model": ua.get("model"),
            "task": ua.get("task"),
            "method": ua.get("method"),
            "tune_rank": ua.get("tune_rank", False),
            "metric": ua.get("primary_metric"),
            "n_trials": len(trials),
            "states": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)},
            "space": ua.get("space"),
        }
        if done:
            best, worst = max(done, key=lambda t: t.value), min(done, key=lambda t: t.value)
            entry.update(
                best_value=best.value,
                best_trial=best.number,
                best_params=dict(best.params),
                worst_value=worst.value,
                best_worst_gap=best.value - worst.value,
            )
        entry["importances"], entry["importance_note"] = _importances(study, done)
        entry["figures"] = _figures(study, name, fig_dir, done)
        studies.append(entry)
    atomic_write_json(report_dir / "summary.json", {"storage": _safe_url(url), "studies": studies})
    _write_csv(report_dir / "trials.csv", rows)
    return {"report_dir": str(report_dir), "studies": studies, "trials": rows}


def _trial_row(study_name: str, ua: dict, t) -> dict:
    dur = t.duration.total_seconds() if t.duration is not None else None
    state = t.state.name.lower()
    if t.user_attrs.get("surplus"):
        state = "surplus"  # a no-op: another worker had started the last trial
    return {
        "study": study_name,
        "task": ua.get("task"),
        "method": ua.get("method"),
        "trial": t.number,
        "state": state,
        "value": t.value,
        "duration_s": dur,
        "last_examples_seen": max(t.intermediate_values) if t.intermediate_values else None,
        "retry_of": t.system_attrs.get("failed_trial"),
        "error": t.user_attrs.get("error"),
        **{f"param:{k}": v for k, v in t.params.items()},
    }


def _importances(study, done: list) -> tuple[dict[str, float], str | None]:
    import optuna

    if len(done) < 2:
        return {}, f"parameter importances need at least 2 complete trials (have {len(done)})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
        return {k: float(v) for k, v in imp.items()}, None
    except (RuntimeError, ValueError, ZeroDivisionError) as e:  # e.g. every complete trial has the same value
        return {}, f"parameter importances unavailable: {_first_line(e)}"


def _figures(study, name: str, fig_dir: Path, done: list) -> dict[str, str]:
    """Optimisation history and parameter slices as PNG (optuna's matplotlib backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    out = {}
    if not done:
        return out
    plots = {"history": ovm.plot_optimization_history, "slice": ovm.plot_slice}
    for kind, plot in plots.items():
        # optuna's plots call plt.style.use("ggplot"), which would restyle every later figure of
        # the process: the study's report would differ from `loradrift report` run on its own.
        with warnings.catch_warnings(), plt.rc_context():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            ax = plot(study)
            fig = np.atleast_1d(ax).flat[0].figure
            fig.suptitle(name, fontsize=9)
            path = fig_dir / f"{name}_{kind}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
        out[kind] = str(path)
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or ["study"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
