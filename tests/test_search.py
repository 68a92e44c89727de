"""Phase 1 search on the tiny model: real trials, a real SQLite storage, killed and parallel
workers as separate processes (the CLI does not need to exist for them)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from loradrift.config import ConfigError, _read_yaml, _validate, resolve_config
from loradrift.search import (
    SearchError,
    _is_surplus,
    load_search_config,
    run_search,
    search_report,
    trial_config,
)

# Heartbeat every second, a trial is dead after 2 s without one: short enough for a test.
FAST = {"heartbeat_interval": 1, "grace_period": 2, "pruner": {"n_startup_trials": 1}}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

WORKER = """
import json, sys
from loradrift.config import resolve_config
from loradrift.search import run_search
out, url, n, data_dir, search = sys.argv[1:6]
cfg = resolve_config(preset="tiny", task="sst2", overrides=["method.name=lora", f"data.data_dir={data_dir}"], out_dir=out)
print(json.dumps(run_search(cfg, json.loads(search), trials=int(n), storage=url)), flush=True)
"""


def _cfg(out: Path, data_dir: Path, overrides=()):
    return resolve_config(preset="tiny", task="sst2", overrides=["method.name=lora", f"data.data_dir={data_dir}", *overrides],
                          out_dir=out)


def _worker(out: Path, url: str, n: int, data_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(out), url, str(n), str(data_dir), json.dumps(FAST)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=os.environ.copy())


def _trials(url: str) -> list:
    (name,) = optuna.study.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url).get_trials()


def _snapshot(url: str) -> list:
    return [(t.number, t.state, t.value, t.params) for t in _trials(url)]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, data_dir):
    """One small finished study, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("search")
    cfg = _cfg(out, data_dir)
    result = run_search(cfg, FAST, trials=3, log=lambda *_: None)
    return out, cfg, result


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_built(data_dir):
    # Built once here so parallel workers do not all build it at the same time.
    from loradrift.models import resolve_model_dir

    resolve_model_dir(resolve_config(preset="tiny").model)


# ---------------------------------------------------------------------------------------------
# storage: resume and parallel workers


def test_killed_search_resumes_and_ends_with_the_requested_trials(tmp_path, data_dir):
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'search' / 'optuna.db'}"
    proc = _worker(out, url, 3, data_dir, tmp_path / "w1.log")
    try:
        # Kill the worker mid-trial: at least one trial finished and another one running.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                states = [t.state for t in _trials(url)]
            except Exception:  # noqa: BLE001 - polling: the study or its tables may not exist yet
                states = []
            if sum(s in FINISHED for s in states) >= 1 and TrialState.RUNNING in states:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "w1.log").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _trials(url)
    running = [t for t in before if t.state == TrialState.RUNNING]
    assert len(running) <= 1  # none only if the kill landed in the millisecond between two trials

    r = run_search(_cfg(out, data_dir), FAST, trials=3, storage=url, log=lambda *_: None)

    after = _trials(url)
    assert r["n_finished"] == 3 == sum(t.state in FINISHED for t in after)
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    _assert_no_repeats(after)
    for t in before:  # what was finished before the kill is kept as it was
        if t.state in FINISHED:
            assert (after[t.number].state, after[t.number].value) == (t.state, t.value)
    # The dead worker's trial is failed, and retried with the same values in the same folder.
    for killed in running:
        assert after[killed.number].state == TrialState.FAIL
        (retry,) = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
        # A kill while the trial was still suggesting leaves only its first values: the retry
        # keeps those and draws the rest.
        assert killed.params.items() <= retry.params.items() and retry.state in FINISHED
        assert retry.user_attrs["trial_dir"].endswith(f"trial_{killed.number}")


def test_two_workers_share_one_study(tmp_path, data_dir):
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'search' / 'optuna.db'}"
    procs = [_worker(out, url, 4, data_dir, tmp_path / f"w{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"w{i}.log").read_text()
    trials = _trials(url)
    assert sum(t.state in FINISHED for t in trials) == 4
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # unique, none missing
    # Only a worker that lost the race for the last trial leaves a failed record, marked surplus.
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    _assert_no_repeats(trials)
    # Both workers report the same best trial and wrote the same file.
    results = [json.loads((tmp_path / f"w{i}.log").read_text().strip().splitlines()[-1]) for i in range(2)]
    assert results[0]["best_trial"] == results[1]["best_trial"]
    assert Path(results[0]["best_config"]).exists()


def _assert_no_repeats(trials) -> None:
    """No two finished trials drew the same parameter set: the sampler never replays another
    trial's draws. Retries are left out: a retry copies its failed trial's values by design (and
    under heavy load a live trial can miss its heartbeat, be failed and retried, and still finish)."""
    sets = [tuple(sorted(t.params.items())) for t in trials if t.state in FINISHED and "failed_trial" not in t.system_attrs]
    assert len(set(sets)) == len(sets), sets


def test_workers_and_resumed_studies_draw_new_parameters(tmp_path):
    from loradrift.search import open_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    attrs = {"space": {}, "base_config": "x"}

    def worker():  # each call is a new process's view: its own sampler, seeded alike
        return open_study(url, "m-sst2-lora", attrs, seed=42, pruner_cfg=load_search_config({}).pruner)

    def run_one(study):
        t = study.ask()
        t.suggest_float("train.lr", 1e-5, 1e-2, log=True)
        t.suggest_categorical("train.batch_size", [4, 8, 16])
        t.suggest_int("method.lora.alpha", 8, 64)
        study.tell(t, t.params["train.lr"])

    a, b = worker(), worker()
    for _ in range(6):  # two workers taking turns, past TPE's 10 random start-up trials
        run_one(a)
        run_one(b)
    for _ in range(3):  # a study resumed twice by a fresh process
        run_one(worker())
    trials = optuna.load_study(study_name="m-sst2-lora", storage=url).get_trials()
    assert len(trials) == 15
    _assert_no_repeats(trials)
    assert len({t.params["train.lr"] for t in trials}) == 15

    # One uninterrupted worker is still reproducible: same seed, same storage history, same draws.
    def solo(path):
        s = open_study(f"sqlite:///{path}", "m", attrs, seed=42, pruner_cfg=load_search_config({}).pruner)
        for _ in range(12):
            run_one(s)
        return [t.params for t in s.get_trials()]

    assert solo(tmp_path / "a.db") == solo(tmp_path / "b.db")


def test_surplus_guard_keeps_the_earlier_trial(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    done = study.ask()
    study.tell(done, 0.5)
    first, second = study.ask(), study.ask()
    frozen = {t.number: t for t in study.get_trials()}
    assert not _is_surplus(study, frozen[first.number], 2)
    assert _is_surplus(study, frozen[second.number], 2)
    assert not _is_surplus(study, frozen[second.number], 3)


# ---------------------------------------------------------------------------------------------
# best config and report


def test_best_config_yaml_reproduces_the_best_trial(finished_study, data_dir):
    out, cfg, r = finished_study
    path = Path(r["best_config"])
    assert path == out / "configs" / "best" / r["study"].rsplit("-sst2-", 1)[0] / "sst2_lora.yaml"
    text = path.read_text()
    assert text.startswith("# Best trial of Optuna study") and f"trial {r['best_trial']}" in text
    body = yaml.safe_load(text)
    assert body["method"]["lora"]["r"] == 8  # fixed, not searched, by default

    again = resolve_config(preset="tiny", task="sst2", files=[path], overrides=[f"data.data_dir={data_dir}"], out_dir=out)
    for name, value in r["best_overrides"].items():
        node = again
        for part in name.split("."):
            node = getattr(node, part)
        assert node == value, name
    best = optuna.load_study(study_name=r["study"], storage=f"sqlite:///{out / 'search' / 'optuna.db'}").best_trial
    # The trial's own run folder holds the config it trained with; the YAML gives the same one.
    trial_cfg_file = next(Path(best.user_attrs["trial_dir"]).glob("runs/*/*/*/seed*/config.yaml"))
    trained = _validate(_read_yaml(trial_cfg_file, "trial config"), "trial config")
    rebuilt = trial_config(again, {}, trained.out_dir, trained.seed)
    assert rebuilt.science_hash() == trained.science_hash() == best.user_attrs["config_hash"]


def test_pruner_compares_trials_at_equal_examples_seen(finished_study):
    """Point 11 of issue 12: batch size is searched, so intermediate values are reported against
    training examples seen (step x batch x accumulation), not optimizer steps."""
    out, _, r = finished_study
    trials = optuna.load_study(study_name=r["study"], storage=f"sqlite:///{out / 'search' / 'optuna.db'}").trials
    sizes = set()
    for t in trials:
        if not t.intermediate_values:
            continue
        trained = _validate(_read_yaml(next(Path(t.user_attrs["trial_dir"]).glob("runs/*/*/*/seed*/config.yaml")), "trial"),
                            "trial")
        per_step = trained.train.batch_size * trained.train.grad_accum
        sizes.add(per_step)
        assert set(t.intermediate_values) == {trained.train.eval_every * per_step}, t.number
    assert sizes and min(sizes) > 1


def test_search_report_writes_tables_importances_and_figures(finished_study):
    import matplotlib

    out, _, r = finished_study
    def style():  # the backend (Agg, set for headless plotting) is not style
        return {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")}

    before = style()
    rep = search_report(out, storage=f"sqlite:///{out / 'search' / 'optuna.db'}")
    # optuna's plots switch matplotlib to its ggplot style; later figures of the process (the
    # study's report) must not inherit it.
    assert style() == before
    rd = out / "search" / "report"
    summary = json.loads((rd / "summary.json").read_text())
    (study,) = summary["studies"]
    assert study["study"] == r["study"] and study["best_value"] == r["best_value"]
    assert study["best_worst_gap"] >= 0
    assert study["importances"] or study["importance_note"]
    rows = (rd / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + study["n_trials"] and "param:train.lr" in rows[0] and "duration_s" in rows[0]
    for kind in ("history", "slice"):
        png = Path(study["figures"][kind])
        assert png.parent == rd / "figures" and png.read_bytes()[:4] == b"\x89PNG"
    assert rep["studies"][0]["study"] == r["study"]


def test_report_with_one_complete_trial_notes_missing_importances(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="m-rte-full", direction="maximize")
    for k, v in {"model": "m", "task": "rte", "method": "full", "primary_metric": "accuracy"}.items():
        study.set_user_attr(k, v)
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 1e-5}, value=0.6,
                                              distributions={"train.lr": optuna.distributions.FloatDistribution(1e-6, 1e-4, log=True)}))
    (s,) = search_report(tmp_path, storage=url)["studies"]
    assert s["importances"] == {} and "at least 2 complete trials" in s["importance_note"]
    assert s["best_worst_gap"] == 0


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("param, message", [
    ({"name": "train.lr", "type": "float", "low": 1e-3, "high": 1e-5, "log": True}, r"'train.lr'.*low .* > high"),
    ({"name": "train.batch_size", "type": "categorical", "choices": []}, r"'train.batch_size'.*non-empty"),
    ({"name": "train.lr", "type": "float", "low": 0.0, "high": 1e-3, "log": True}, r"'train.lr'.*log scale"),
    ({"name": "train.lr", "type": "float"}, r"'train.lr'.*needs 'low' and 'high'"),
])
def test_bad_parameter_declarations_name_the_parameter(param, message):
    with pytest.raises(ConfigError, match=message):
        load_search_config({"spaces": {"lora": [param]}})


@pytest.mark.parametrize("param, message", [
    ({"name": "train.lrr", "type": "float", "low": 1e-5, "high": 1e-3}, r"'train.lrr': not a config key"),
    ({"name": "train", "type": "categorical", "choices": [1]}, r"'train': a config section"),
    ({"name": "train.warmup_ratio", "type": "float", "low": 0.0, "high": 1.5}, r"'train.warmup_ratio': value 1.5 is invalid"),
])
def test_bad_parameter_names_and_values_fail_before_any_storage(tmp_path, data_dir, param, message):
    with pytest.raises(ConfigError, match=message):
        run_search(_cfg(tmp_path, data_dir), {"spaces": {"lora": [param]}}, trials=1)
    assert not (tmp_path / "search").exists()


def test_existing_study_with_another_space_is_refused_and_untouched(finished_study, data_dir, tmp_path):
    out, cfg, r = finished_study
    url = f"sqlite:///{out / 'search' / 'optuna.db'}"
    before = _snapshot(url)
    other = {**FAST, "spaces": {"lora": [{"name": "train.lr", "type": "float", "low": 1e-4, "high": 1e-2, "log": True}]}}
    with pytest.raises(SearchError, match="another search space"):
        run_search(cfg, other, trials=5, storage=url)
    with pytest.raises(SearchError, match="another base config"):
        run_search(_cfg(out, data_dir, ["train.max_steps=4"]), FAST, trials=5, storage=url)
    assert _snapshot(url) == before


def test_unreachable_storage_is_a_clear_error_without_the_password(tmp_path, data_dir):
    with pytest.raises(SearchError, match="storage") as e:
        run_search(_cfg(tmp_path, data_dir), FAST, trials=1, storage="postgresql://user:hunter2@127.0.0.1:1/loradrift")
    assert "hunter2" not in str(e.value)
    with pytest.raises(SearchError, match="cannot open"):
        run_search(_cfg(tmp_path, data_dir), FAST, trials=1, storage="not a url")


def test_tune_rank_searches_r_only_for_lora(tmp_path, data_dir):
    from loradrift.search import SearchConfig

    space, fixed = SearchConfig().space_for("lora", tune_rank=True)
    assert "method.lora.r" in [p.name for p in space] and "method.lora.r" not in fixed
    space, fixed = SearchConfig().space_for("lora")
    assert fixed == {"method.lora.r": 8} and "method.lora.r" not in [p.name for p in space]
    with pytest.raises(ConfigError, match="only LoRA"):
        SearchConfig().space_for("full", tune_rank=True)


def test_a_trial_skips_snapshots_and_dev_and_evaluates_midway(tiny_cfg, tmp_path):
    from loradrift.train import train_run

    cfg = tiny_cfg("sst2", "lora", overrides=["train.eval_every=null"])
    t = trial_config(cfg, {}, tmp_path / "trial", 0, 4)
    assert not t.probe.enabled and not t.train.eval_dev and t.train.eval_every == 2
    r = train_run(t)
    assert r["dev"] is None and r["dev_examples"] == 0 and r["snapshot_steps"] == []
    assert not (Path(r["run_dir"]) / "snapshots").exists()
    # the pruner needs an intermediate score; the final one closes the curve
    assert [c["step"] for c in r["val_curve"]] == [2, 4]


def test_trial_folder_of_a_live_worker_is_not_stripped(tmp_path):
    from loradrift.search import _strip_trial

    rd = tmp_path / "trial_0" / "runs" / "m" / "sst2" / "lora" / "seed42"
    (rd / "checkpoints").mkdir(parents=True)
    (rd / "checkpoints" / "last.pt").write_bytes(b"state")
    holder = ("import sys, time\nfrom loradrift.io import exclusive_lock\n"
              "with exclusive_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(rd / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        _strip_trial(tmp_path / "trial_0")
        assert (rd / "checkpoints" / "last.pt").exists()  # the live run keeps its resume state
    finally:
        proc.kill()
        proc.wait()
    _strip_trial(tmp_path / "trial_0")
    assert not (rd / "checkpoints").exists()


def test_trial_killed_before_its_first_heartbeat_is_failed_and_retried(tmp_path):
    import optuna

    from loradrift.config import SearchConfig
    from loradrift.search import _fail_stale, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", SearchConfig(heartbeat_interval=1, grace_period=1))
    study = optuna.create_study(storage=storage, study_name="s")
    orphan = study.ask()  # RUNNING, and no heartbeat thread ever beats for it
    beating = study.ask()
    storage.record_heartbeat(beating._trial_id)
    time.sleep(1.5)
    storage.record_heartbeat(beating._trial_id)  # alive
    young = study.ask()  # within its grace period: its worker may be about to beat
    _fail_stale(study)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number] == TrialState.FAIL
    assert states[beating.number] == TrialState.RUNNING and states[young.number] == TrialState.RUNNING
    (retry,) = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state == TrialState.WAITING


def test_progress_counts_finished_trials_and_the_steps_of_the_running_one(tmp_path, data_dir):
    calls: list[tuple[float, int]] = []
    run_search(_cfg(tmp_path, data_dir), FAST, trials=2, log=lambda *_: None, progress=lambda d, n: calls.append((d, n)))
    done = [d for d, _ in calls]
    assert {n for _, n in calls} == {2} and done[0] == 0 and done[-1] == 2
    assert done == sorted(done)
    # within each trial, its steps: a study's ETA moves during a long first trial
    assert any(0 < d < 1 for d in done) and any(1 < d < 2 for d in done)


def test_start_up_trials_draw_spread_out_values():
    """Trial n's draws come from (seed, n) through SeedSequence: numpy's legacy RandomState.seed(int)
    gave trials 0-2 of a study almost one learning rate (8.19e-5, 8.20e-5, ...), so a 2-trial
    search tried one point. Two runs of the same seed still draw the same values."""
    import numpy as np
    import optuna

    from loradrift.search import _sampler

    def draws(seed, n=8):
        study = optuna.create_study(sampler=_sampler(seed), direction="maximize")
        out = []
        for _ in range(n):
            t = study.ask()
            out.append(np.log10(t.suggest_float("lr", 1e-6, 1e-4, log=True)))
            study.tell(t, 0.5)
        return np.array(out)

    for seed in (42, 1337, 2024):
        u = (draws(seed) + 6) / 2  # where each draw falls in the log range, 0..1
        assert np.min(np.abs(np.diff(u[:3]))) > 0.01, u  # the old draws: first three within 0.004
        assert u.max() - u.min() > 0.3, u
    np.testing.assert_array_equal(draws(42), draws(42))
