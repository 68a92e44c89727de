"""End-to-end training on the tiny model: real runs, stored values checked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loradrift.context import setup
from loradrift.export import export_merged
from loradrift.io import ResultsStore
from loradrift.layout import run_dir_for
from loradrift.phase0 import extract_base
from loradrift.train import RunConflict, train_run


@pytest.mark.parametrize("task", ["sst2", "squad_v2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_run_writes_a_complete_run_folder(tiny_cfg, task, method):
    cfg = tiny_cfg(task, method)
    r = train_run(cfg)
    rd = Path(r["run_dir"])
    assert rd == run_dir_for(cfg)
    for f in ("config.yaml", "log.jsonl", "result.json", "head.safetensors", "snapshots/index.json"):
        assert (rd / f).exists(), f
    for f in (["adapter/adapter_model.safetensors", "serve_adapter/adapter_model.safetensors"] if method == "lora" else ["model/model.safetensors"]):
        assert (rd / f).exists(), f
    assert (rd / ("adapter" if method == "lora" else "model") / "README.md").exists()  # the model card
    assert not (rd / "checkpoints").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {str(p.relative_to(rd)): oct(p.stat().st_mode & 0o777) for p in rd.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # a shared folder stays readable
    assert r["steps"] == cfg.train.max_steps
    assert r["snapshot_steps"] == [0, 3, 6]
    log = [json.loads(line) for line in (rd / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6] and all(e["loss"] > 0 and e["grad_norm"] >= 0 for e in log)
    primary = r["primary_metric"]
    assert 0 <= r["dev"][primary] <= (100 if task == "squad_v2" else 1)
    if task == "squad_v2":
        assert {"HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh", "na_prob_thresh"} <= set(r["dev"])
        preds = json.loads((rd / "dev_predictions.json").read_text())
        assert len(preds) == r["dev_examples"]
    if method == "lora":
        assert r["trainable_params"] < r["total_params"] / 5
    rows = ResultsStore(cfg.out_dir / "results.sqlite").rows("run", task=task, method=method)
    assert len(rows) == 1 and rows[0]["metrics"]["dev"][primary] == r["dev"][primary]


def test_step0_snapshot_equals_base_and_training_moves_it(tiny_cfg):
    cfgs = {m: tiny_cfg("rte", m) for m in ("lora", "full")}
    runs = {m: train_run(c) for m, c in cfgs.items()}  # no base file yet: each run computes its step 0
    base = load_file(str(extract_base(cfgs["lora"])))
    for method, r in runs.items():
        snaps = Path(r["run_dir"]) / "snapshots"
        step0 = load_file(str(snaps / "step_000000.safetensors"))
        final = load_file(str(snaps / "step_000006.safetensors"))
        assert set(step0) == set(base) == {f"layer.{i}" for i in range(3)}
        for k in base:
            assert torch.equal(step0[k], base[k]), (method, k)
        assert not torch.equal(final["layer.2"], base["layer.2"])


def test_step0_snapshot_is_copied_from_base_only_for_the_same_probe(tiny_cfg):
    base_file = extract_base(tiny_cfg("rte", "lora"))
    same = train_run(tiny_cfg("rte", "lora"))
    assert (Path(same["run_dir"]) / "snapshots" / "step_000000.safetensors").read_bytes() == base_file.read_bytes()
    # Another probe size: the base file describes other inputs, so the run computes its own.
    other = train_run(tiny_cfg("rte", "lora", seed=7, overrides=["probe.size=8"]))
    step0 = load_file(str(Path(other["run_dir"]) / "snapshots" / "step_000000.safetensors"))
    assert step0["layer.0"].shape[0] == 8 != load_file(str(base_file))["layer.0"].shape[0]


def test_finished_run_is_skipped_and_conflicts_refused(tiny_cfg):
    cfg = tiny_cfg("sst2", "lora")
    r1 = train_run(cfg)
    mtime = (Path(r1["run_dir"]) / "result.json").stat().st_mtime
    assert train_run(cfg) == r1
    assert (Path(r1["run_dir"]) / "result.json").stat().st_mtime == mtime
    with pytest.raises(RunConflict, match="another config"):
        train_run(tiny_cfg("sst2", "lora", overrides=["train.lr=0.5"]))


def test_same_seed_same_numbers_and_same_head_init(tiny_cfg, tmp_path):
    a = train_run(tiny_cfg("sst2", "lora"))
    b_cfg = tiny_cfg("sst2", "lora")
    b_cfg.out_dir = tmp_path / "other"
    b = train_run(b_cfg)
    assert a["dev"] == b["dev"] and a["val_curve"] == b["val_curve"]


def test_merged_export_matches_unmerged_adapter(tiny_cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loradrift.models import resolve_model_dir

    cfg = tiny_cfg("sst2", "lora", overrides=["train.lr=0.01"])
    r = train_run(cfg)
    merged_dir = export_merged(r["run_dir"])
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(cfg.model))
    unmerged = PeftModel.from_pretrained(base, Path(r["run_dir"]) / "serve_adapter").eval()
    with torch.no_grad():
        lm, lu = merged(ids).logits, unmerged(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(resolve_model_dir(cfg.model))(ids).logits
    assert torch.allclose(lm, lu, atol=1e-5)
    assert not torch.allclose(lm, lb, atol=1e-4)  # the adapter really changed the model


def _train_cmd(out: Path, extra=()):
    return [sys.executable, "-m", "loradrift", "train", "--preset", "tiny", "--task", "sst2", "--method", "lora",
            "--out", str(out), "train.max_steps=40", "train.checkpoint_every=5", "train.eval_every=10", *extra]


def test_killed_run_resumes_to_identical_result(tmp_path):
    env = dict(os.environ)
    ref = subprocess.run(_train_cmd(tmp_path / "ref"), capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    run_dir = out / "runs"
    while time.time() < deadline:
        found = list(run_dir.glob("*/sst2/lora/seed42/checkpoints/last.pt")) if run_dir.exists() else []
        if found and torch.load(found[0], weights_only=True)["step"] >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rd = next(out.glob("runs/*/sst2/lora/seed42"))
    assert not (rd / "result.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_train_cmd(out), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads(next((tmp_path / "ref").glob("runs/*/sst2/lora/seed42/result.json")).read_text())
    b = json.loads((rd / "result.json").read_text())
    assert a["dev"] == b["dev"] and a["val"] == b["val"] and a["val_curve"] == b["val_curve"]
    wa = load_file(str(Path(a["run_dir"]) / "adapter/adapter_model.safetensors"))
    wb = load_file(str(rd / "adapter/adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_snapshot_rows_follow_the_probe_order(tiny_cfg):
    from loradrift.representations import extract

    ctx = setup(tiny_cfg("mrpc", "lora"))
    feats = ctx.feats["dev"][:10]
    whole = extract(ctx.model, feats, 4, ctx.pad_id, ctx.device)
    for i in (0, 5, 9):
        one = extract(ctx.model, [feats[i]], 4, ctx.pad_id, ctx.device)
        for k in whole:
            assert torch.allclose(whole[k][i], one[k][0], atol=1e-5), (i, k)


def test_bf16_and_fp32_weights_extract_identically(tiny_cfg):
    """Point 1: the same model held in bf16 (a LoRA backbone on GPU) and in fp32 must give the same
    snapshot: extraction always computes in fp32 with autocast off, so drift between them is 0."""
    import copy

    from loradrift.representations import extract

    ctx = setup(tiny_cfg("mrpc", "full"))
    fp32 = ctx.model
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_(p.bfloat16().float())  # values representable in bf16, so both hold the same weights
    bf16 = copy.deepcopy(fp32)
    for p in bf16.parameters():  # as from_pretrained(dtype=bf16) holds it: weights bf16, rotary buffers fp32
        p.data = p.data.bfloat16()
    feats = ctx.feats["dev"][:10]
    a = extract(fp32, feats, 4, ctx.pad_id, ctx.device)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an enclosing autocast must not leak in
        b = extract(bf16, feats, 4, ctx.pad_id, ctx.device)
    assert next(bf16.parameters()).dtype == torch.bfloat16  # the training model is left as it is
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]), k


def test_final_snapshot_describes_the_restored_best_weights(tiny_cfg, monkeypatch):
    """Point 10: with restore_best, the final snapshot (H2) and the exported, evaluated weights (H1)
    are the same model. Validation is rigged so that step 3 is best and the run ends at step 6."""
    import loradrift.train as T

    scores = iter([0.9])
    monkeypatch.setattr(T, "primary", lambda ctx, s: next(scores, 0.1))
    cfg = tiny_cfg("sst2", "full", overrides=["train.restore_best=true", "train.lr=0.01"])
    r = train_run(cfg)
    snaps = Path(r["run_dir"]) / "snapshots"
    at3 = load_file(str(snaps / "step_000003.safetensors"))
    final = load_file(str(snaps / "step_000006.safetensors"))
    for k in at3:
        assert torch.equal(at3[k], final[k]), k
    assert r["restored_best_step"] == 3 and r["steps"] == 6


def test_full_ft_seeds_torch_like_lora(tiny_cfg):
    """Point 12: full FT seeds torch's global RNG (dropout) from the run seed, as LoRA does."""
    draws = {}
    for method in ("full", "lora"):
        for prior in (1, 2):
            torch.manual_seed(prior)
            setup(tiny_cfg("sst2", method))
            draws[method, prior] = torch.rand(4)
    assert torch.equal(draws["full", 1], draws["full", 2])
    assert torch.equal(draws["lora", 1], draws["lora", 2])


# ---------------------------------------------------------------------------------------------
# the run folder is the record: nothing lost, nothing mixed


def _folder_state(rd: Path) -> dict:
    return {str(p.relative_to(rd)): p.read_bytes() for p in sorted(rd.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_force_with_a_config_that_fails_at_setup_keeps_the_finished_run(tiny_cfg):
    cfg = tiny_cfg("sst2", "lora")
    r = train_run(cfg)
    rd = Path(r["run_dir"])
    before = _folder_state(rd)
    bad = tiny_cfg("sst2", "lora", overrides=["method.lora.target_modules=[no_such_proj]"])
    with pytest.raises(ValueError, match="no_such_proj"):
        train_run(bad, force=True)
    assert _folder_state(rd) == before
    rows = ResultsStore(cfg.out_dir / "results.sqlite").rows("run")
    assert [(x["config_hash"], x["metrics"]["dev"]) for x in rows] == [(r["config_hash"], r["dev"])]
    # --force with a good config does redo it, and the store keeps one row for the folder.
    redo = train_run(tiny_cfg("sst2", "lora", overrides=["train.lr=0.01"]), force=True)
    rows = ResultsStore(cfg.out_dir / "results.sqlite").rows("run")
    assert [x["config_hash"] for x in rows] == [redo["config_hash"]] != [r["config_hash"]]


KILL_AT_STORE = """
import os, sys
from loradrift.config import resolve_config
from loradrift.io import ResultsStore
from loradrift.train import train_run
# Fault injection: the process dies after result.json is renamed into place, before the store commits.
ResultsStore.put = ResultsStore.put_run = lambda self, *a, **k: os._exit(137)
cfg = resolve_config(preset="tiny", task="sst2", overrides=["method.name=lora", "train.max_steps=4"], out_dir=sys.argv[1], seed=int(sys.argv[2]))
train_run(cfg)
"""


def test_kill_between_result_and_store_commit_is_healed(tiny_cfg, tmp_path):
    from loradrift.cli import main
    from loradrift.learning import performance_by_seed

    out = tmp_path / "out"
    for seed in (42, 1337):
        p = subprocess.run([sys.executable, "-c", KILL_AT_STORE, str(out), str(seed)], capture_output=True, text=True)
        assert p.returncode == 137, p.stderr
    store = ResultsStore(out / "results.sqlite")
    assert store.rows("run") == []
    results = {s: json.loads(next(out.glob(f"runs/*/sst2/lora/seed{s}/result.json")).read_text()) for s in (42, 1337)}

    # Phase 3's reader reconciles the store with the folders before it reads.
    cfg = tiny_cfg("sst2", "lora", seed=42, overrides=["train.max_steps=4"])
    cfg.out_dir = out
    perf = performance_by_seed(cfg)
    assert perf["lora"]["sst2"] == {s: results[s]["dev"]["accuracy"] for s in (42, 1337)}
    assert len(store.rows("run")) == 2

    # `loradrift store repair` does the same on demand.
    for s in (42, 1337):
        store.delete("run", results[s]["model"], "sst2", "lora", s, results[s]["config_hash"])
    assert main(["store", "repair", "--preset", "tiny", "--out", str(out)]) == 0
    assert sorted(r["seed"] for r in store.rows("run")) == [42, 1337]

    # And a rerun of the finished run writes its missing row instead of returning without it.
    store.delete("run", results[42]["model"], "sst2", "lora", 42, results[42]["config_hash"])
    again = train_run(cfg)
    assert again == results[42]
    (row,) = store.rows("run", seed=42)
    assert row["metrics"]["dev"] == results[42]["dev"]
    assert not (Path(again["run_dir"]) / "checkpoints").exists()


def test_store_that_cannot_be_written_once_is_healed_by_the_rerun(tiny_cfg, monkeypatch):
    from loradrift.io import StoreError

    cfg = tiny_cfg("sst2", "lora")

    def fail(self, result, created=None):
        raise StoreError(f"results store {self.path}: database is locked")

    monkeypatch.setattr(ResultsStore, "put_run", fail)
    with pytest.raises(StoreError, match="run itself finished and is recorded in .*result.json"):
        train_run(cfg)
    monkeypatch.undo()
    store = ResultsStore(cfg.out_dir / "results.sqlite")
    assert store.rows("run") == []
    r = train_run(cfg)
    (row,) = store.rows("run")
    assert row["metrics"]["dev"] == r["dev"] and row["config_hash"] == r["config_hash"]


def test_unfinished_folder_of_another_config_is_a_conflict_even_without_checkpoint(tiny_cfg):
    cfg = tiny_cfg("rte", "lora")

    class Killed(Exception):
        pass

    def die(step, total):
        raise Killed  # like a kill after the step-0 snapshot, before the first checkpoint

    with pytest.raises(Killed):
        train_run(cfg, on_step=die)
    rd = run_dir_for(cfg)
    assert (rd / "snapshots" / "step_000000.safetensors").exists() and not (rd / "checkpoints").exists()
    before = _folder_state(rd)
    with pytest.raises(RunConflict, match="unfinished run with another config"):
        train_run(tiny_cfg("rte", "lora", overrides=["probe.size=8"]))
    assert _folder_state(rd) == before  # no snapshot of the other probe set mixed in
    r = train_run(cfg)  # the same config finishes it
    assert r["probe_examples"] == 16


def test_two_processes_on_one_run_folder_one_runs_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(_train_cmd(out, ["train.max_steps=400", "train.lr=0.001"]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("runs/*/sst2/lora/seed42/config.yaml")):
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        rd = next(out.glob("runs/*/sst2/lora/seed42"))
        second = subprocess.run(_train_cmd(out, ["train.max_steps=400", "train.lr=0.002"]), capture_output=True, text=True)
        assert second.returncode == 2
        assert f"run in progress by pid {first.pid}" in second.stderr and str(rd) in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, untouched
        assert "lr: 0.001" in (rd / "config.yaml").read_text()
    finally:
        first.kill()
        first.wait()


def test_non_finite_loss_stops_the_run_without_a_result(tiny_cfg):
    from loradrift.train import NonFiniteLoss

    cfg = tiny_cfg("sst2", "full", overrides=["train.lr=1e30"])
    with pytest.raises(NonFiniteLoss, match=r"(training loss|gradient norm) is (nan|inf|-inf) by step \d+ .*--force"):
        train_run(cfg)
    rd = run_dir_for(cfg)
    assert not (rd / "result.json").exists()
    # log.jsonl grows as training goes: it keeps the finite steps before the failure, never a NaN.
    log = (rd / "log.jsonl").read_text()
    assert "NaN" not in log and "Infinity" not in log
    assert ResultsStore(cfg.out_dir / "results.sqlite").rows("run") == []


def _train_argv(cfg) -> list[str]:
    """The `loradrift train` command line of a tiny_cfg config (same config hash)."""
    return ["train", "--preset", "tiny", "--task", cfg.task, "--method", cfg.method.name, "--seed", str(cfg.seed),
            "--out", str(cfg.out_dir)]


def _kill_after_first_checkpoint(cfg) -> None:
    """Train until the first checkpoint is written, then stop the run as a kill would."""

    class Killed(Exception):
        pass

    def die(step, total):
        if step == cfg.train.checkpoint_every:
            raise Killed

    with pytest.raises(Killed):
        train_run(cfg, on_step=die)


def test_truncated_checkpoint_is_named_with_a_way_out_and_nothing_deleted(tiny_cfg, capsys):
    from loradrift.cli import main

    cfg = tiny_cfg("sst2", "lora")

    _kill_after_first_checkpoint(cfg)
    rd = run_dir_for(cfg)
    last = rd / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short, a full disk
    before = _folder_state(rd)
    assert main(_train_argv(cfg)) == 2
    err = capsys.readouterr().err
    assert f"{last}: not a readable checkpoint (truncated or corrupt" in err and "Traceback" not in err
    assert f"delete the run folder {rd} and rerun, or rerun `loradrift train` with --force" in err
    assert _folder_state(rd) == before
    # The way out it names works.
    assert main([*_train_argv(cfg), "--force"]) == 0
    assert (rd / "result.json").exists() and not (rd / "checkpoints").exists()


def test_checkpoint_keeps_its_keys_and_one_from_an_older_version_resumes(tiny_cfg, tmp_path):
    """The checkpoint file has the keys, in the order, it had before the loop's state became a
    RunState; one written before `padded_tokens` was counted still resumes to the same scores."""
    cfg = tiny_cfg("sst2", "lora")

    _kill_after_first_checkpoint(cfg)
    last = run_dir_for(cfg) / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert list(state) == ["step", "params", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "log", "curve", "pending",
                           "best_score", "bad_evals", "stopped_early", "tokens", "padded_tokens", "train_time"]
    # The loss of step 3 is not logged yet (log_every 2): it is kept as a float, not a device tensor.
    assert state["step"] == 3 and len(state["pending"]) == 1 and isinstance(state["pending"][0], float)
    del state["padded_tokens"]
    torch.save(state, last)
    resumed = train_run(cfg)
    ref = train_run(cfg.model_copy(update={"out_dir": tmp_path / "ref"}))
    assert resumed["dev"] == ref["dev"] and resumed["val_curve"] == ref["val_curve"] and resumed["tokens"] == ref["tokens"]
    assert 0 < resumed["padded_tokens"] < ref["padded_tokens"]  # counted from the old checkpoint on


def test_truncated_result_json_is_named_with_a_way_out_and_nothing_deleted(tiny_cfg, capsys):
    from loradrift.cli import main

    cfg = tiny_cfg("sst2", "lora")
    rd = Path(train_run(cfg)["run_dir"])
    result = rd / "result.json"
    result.write_text(result.read_text()[:100])
    before = _folder_state(rd)
    assert main(_train_argv(cfg)) == 2
    err = capsys.readouterr().err
    assert f"{result}: not a readable run result (truncated or corrupt" in err and "Traceback" not in err
    assert f"delete the run folder {rd} and rerun, or rerun `loradrift train` with --force" in err
    assert _folder_state(rd) == before
    assert main([*_train_argv(cfg), "--force"]) == 0
    assert json.loads(result.read_text())["config_hash"] == cfg.science_hash()


def test_config_rejected_at_setup_leaves_no_empty_run_folder(tiny_cfg, capsys):
    from loradrift.cli import main

    bad = tiny_cfg("sst2", "lora", overrides=["method.lora.target_modules=[no_such_proj]"])
    argv = [*_train_argv(bad), "method.lora.target_modules=[no_such_proj]"]
    assert main(argv) == 2
    assert "no_such_proj" in capsys.readouterr().err
    assert not (Path(bad.out_dir) / "runs").exists()  # not even runs/: this call created it
    # A folder this call did not create stays; only the lock file it made goes.
    rd = run_dir_for(bad)
    rd.mkdir(parents=True)
    assert main(argv) == 2
    assert rd.is_dir() and not any(rd.iterdir())


def test_setup_gives_torch_runtime_threads_else_the_cores_the_process_owns(tiny_cfg, monkeypatch):
    from loradrift import runtime

    before = torch.get_num_threads()
    try:
        # a process pinned to one core (taskset, a cpuset): one thread, whatever os.cpu_count() says
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {3}, raising=False)
        torch.set_num_threads(2)
        assert setup(tiny_cfg()).threads == 1 and torch.get_num_threads() == 1
        cfg = tiny_cfg(overrides=["runtime.threads=2"])
        assert setup(cfg).threads == 2 and torch.get_num_threads() == 2
        # how a process uses the cores is not part of what a run is
        assert cfg.science_hash() == tiny_cfg().science_hash()
    finally:
        torch.set_num_threads(before)
