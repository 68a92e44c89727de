"""Experiment trackers (`report_to`): config checks, and what MLflow, TensorBoard and W&B (offline)
receive from a real tiny run and from the verdicts, read back from their own stores."""

import importlib.util
import json
import time
from pathlib import Path

import pytest

from loradrift import tracking
from loradrift.config import ConfigError, resolve_config

HYP = {"H1": [{"name": "H1", "scope": "pooled", "primary": True, "estimate": 1.25, "ci_low": 0.5, "ci_high": 2.0,
               "threshold": 3.0, "p_value": 0.01, "p_holm": 0.03, "decision": "supported", "reason": "upper bound 2 <= 3"}],
       "H2": [], "H3": [],
       "verdict": {"rule": "H1 AND (H2 OR H3)", "H1": True, "H2": None, "H3": False, "overall": None,
                   "reasons": {"H2": "undetermined: planted"}}}


def test_report_to_is_empty_by_default_and_checks_names():
    assert resolve_config(preset="tiny").report_to == []
    assert resolve_config(preset="tiny", overrides=["report_to=[mlflow,tensorboard]"]).report_to == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match=r"report_to\.0"):
        resolve_config(preset="tiny", overrides=["report_to=[neptune]"])


def test_a_tracker_that_is_not_installed_fails_before_any_work(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(tracking.TrackerError, match=r'pip install "loradrift\[wandb\]"'):
        tracking.start(["wandb"], tmp_path, "runs", "x")
    tracking.start([], tmp_path, "runs", "x").log({"a": 1.0}, 1)  # none named: nothing happens
    assert not list(tmp_path.iterdir())


def _tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_runs(out: Path) -> dict:
    """{(group, run name): run} of the study's MLflow experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"loradrift/{out.resolve().name}")
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    return {(r.data.tags["loradrift.group"], r.info.run_name): r for r in runs}, client


def check_run_in_trackers(out: Path, result: dict, group: str, name: str) -> None:
    """A finished run's curves and scores are in MLflow and TensorBoard, equal to its folder's."""
    runs, client = mlflow_runs(out)
    run = runs[(group, name)]
    assert run.info.status == "FINISHED"
    assert run.data.params["task"] == result["task"] and run.data.params["method.name"] == result["method"]
    log = [json.loads(line) for line in (Path(result["run_dir"]) / "log.jsonl").read_text().splitlines()]
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(e["step"], e["loss"]) for e in log]
    for k in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert k in run.data.metrics
    primary = result["primary_metric"]
    for split in ("val", "dev"):
        if result.get(split):
            assert run.data.metrics[f"{split}/{primary}"] == pytest.approx(result[split][primary])
    assert run.data.metrics["cost/steps"] == result["steps"]
    # Parameters are what the run used (train.lr is the method's default when the config says null),
    # the code's commit is the run's source version, and the run folder's record is attached.
    params = run.data.params
    assert params["train.lr"] == params["resolved.lr"] == str(result["lr"])
    assert params["resolved.seed"] == str(result["seed"]) and params["resolved.model"] == result["model"]
    assert int(params["resolved.steps"]) >= result["steps"] and int(params["resolved.batch_size"]) > 0
    from loradrift.runtime import code_commit

    assert run.data.tags.get("mlflow.source.git.commit") == code_commit()
    card = "adapter" if result["method"] == "lora" else "model"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "result.json", "README.md"} <= artifacts
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(out.resolve() / "mlflow-artifacts")
    local = Path(client.download_artifacts(run.info.run_id, "README.md", str(Path(result["run_dir"]).parent)))
    assert local.read_text() == (Path(result["run_dir"]) / card / "README.md").read_text()
    tb_dir = out / "tensorboard" / tracking._safe(group) / tracking._safe(name)
    tb = _tb_scalars(tb_dir)
    assert tb["train/loss"] == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in log]
    assert tb[f"val/{primary}"][-1][1] == pytest.approx(result["val"][primary], rel=1e-6)
    assert "train/lr" in tb and "train/grad_norm" in tb and "train/tokens_per_s" in tb
    hp, metrics = _tb_hparams(tb_dir)
    assert hp["resolved.lr"] == pytest.approx(result["lr"]) and hp["method.name"] == result["method"]
    assert f"dev/{primary}" in metrics and f"dev/{primary}" in tb  # the HParams table's column is the run's scalar


def _tb_hparams(run_dir: Path) -> tuple[dict, list[str]]:
    """A run's HParams dashboard entry: its parameter values and the metric tags it compares."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value") else v.bool_value
              for k, v in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]


def test_tiny_run_and_verdicts_in_mlflow_and_tensorboard(tiny_cfg):
    pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from loradrift.train import train_run

    cfg = tiny_cfg("sst2", "lora", overrides=["report_to=[mlflow,tensorboard]"])
    r = train_run(cfg)
    check_run_in_trackers(cfg.out_dir, r, "runs", "sst2-lora-seed42")
    train_run(cfg)  # finished: returned as it is, and no second (empty) run is tracked
    runs, _ = mlflow_runs(cfg.out_dir)
    assert list(runs) == [("runs", "sst2-lora-seed42")]

    tracking.log_verdicts(["mlflow", "tensorboard"], cfg.out_dir, HYP)
    runs, _ = mlflow_runs(cfg.out_dir)
    v = runs[("study", "verdicts")]
    assert v.data.metrics["verdict/H1"] == 1 and v.data.metrics["verdict/H2"] == -1 and v.data.metrics["verdict/H3"] == 0
    assert v.data.metrics["H1/ci_high"] == 2.0 and v.data.tags["H1.reason"] == "upper bound 2 <= 3"
    assert v.data.tags["H2.reason"] == "undetermined: planted"
    tb = _tb_scalars(cfg.out_dir / "tensorboard" / "study" / "verdicts")
    assert tb["verdict/overall"] == [(0, -1.0)] and tb["H1/estimate"] == [(0, 1.25)]


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file: W&B's 7-byte file header, then a
    LevelDB-style log (32 KiB blocks; 7-byte chunk headers: crc32, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, raw = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            raw.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            raw.append(buf + chunk)
    out = []
    for r in raw:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(r)
        out.append(rec)
    return out


def _items(items) -> dict:
    # W&B stores a key with "/" as its parts (nested_key)
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_wandb_offline(tiny_cfg, monkeypatch, capfd):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    from loradrift.cli import main
    from loradrift.layout import run_dir_for

    cfg = tiny_cfg("sst2", "lora", overrides=["report_to=[wandb]"])
    assert main(["train", "--preset", "tiny", "--task", "sst2", "--method", "lora", "--out", str(cfg.out_dir), "report_to=[wandb]"]) == 0
    out, err = capfd.readouterr()
    # loradrift's stdout is its own (scripts parse it); W&B's banner goes to stderr.
    assert out.strip().startswith("run folder: ") and "wandb:" not in out and "wandb:" in err
    r = json.loads((run_dir_for(cfg) / "result.json").read_text())
    files = list((cfg.out_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # The W&B service process writes the file; finish() can return before the last records land.
    deadline = time.time() + 60
    while True:
        recs = _wandb_records(files[0])
        if any(x.WhichOneof("record_type") == "exit" for x in recs):
            break
        assert time.time() < deadline, "the offline run file never got its exit record"
        time.sleep(0.5)
    run = next(x.run for x in recs if x.WhichOneof("record_type") == "run")
    assert run.display_name == "sst2-lora-seed42" and run.run_group == "runs"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train.max_steps"] == 6 and config["method.name"] == "lora"
    history = [_items(x.history.item) for x in recs if x.WhichOneof("record_type") == "history"]
    log = [json.loads(line) for line in (Path(r["run_dir"]) / "log.jsonl").read_text().splitlines()]
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == [(e["step"], e["loss"]) for e in log]
    summary = {}
    for x in recs:
        if x.WhichOneof("record_type") == "summary":
            summary.update(_items(x.summary.update))
    assert summary["dev/accuracy"] == r["dev"]["accuracy"] and summary["cost/steps"] == r["steps"]
    assert any(x.WhichOneof("record_type") == "exit" and x.exit.exit_code == 0 for x in recs)
    assert config["train.lr"] == config["resolved.lr"] == r["lr"] and config["resolved.seed"] == 42
    saved = {f.path for x in recs if x.WhichOneof("record_type") == "files" for f in x.files.files}
    assert {"config.yaml", "result.json", "README.md"} <= saved


def test_a_tracker_that_fails_costs_no_run(tmp_path, caplog, monkeypatch):
    class Broken:
        def __init__(self, *a):
            raise RuntimeError("no login")

    class Flaky:
        calls: list = []

        def __init__(self, *a):
            pass

        def log(self, metrics, step):
            self.calls.append(step)
            raise OSError("server gone")

        def close(self, ok):
            raise AssertionError("a dropped tracker is not closed")

    monkeypatch.setattr(tracking, "_BACKENDS", {"mlflow": Broken, "tensorboard": Flaky})
    monkeypatch.setattr(tracking, "check", lambda names: None)
    with tracking.start(["mlflow", "tensorboard"], tmp_path, "runs", "x") as trk:
        trk.log({"train": {"loss": 1.0}}, 1)
        trk.log({"train": {"loss": 0.5}}, 2)
    assert Flaky.calls == [1]  # dropped after its first failure
    assert "could not start run 'x'" in caplog.text and "server gone" in caplog.text
