"""Experiment trackers, named in the config's `report_to` (empty by default):

    loradrift study --preset tiny report_to=[mlflow,tensorboard]
    loradrift train --task sst2 report_to=[wandb]

Each tracker is an optional extra (`pip install "loradrift[mlflow]"`, `[tensorboard]`, `[wandb]`),
imported only when named. What each run logs: its config as parameters, with the values the run
resolved in place of the config's defaults (`train.lr` is the learning rate used, not null; and
`resolved.*`: lr, batch size, steps, seed, model); the git commit of the code as a tag; per
logging step the training loss, learning rate, gradient norm and throughput (tokens/s); each
validation score; at the end every validation and dev score with the run's cost (steps, time,
tokens/s, memory), and the run folder's config.yaml, result.json and model card as artifacts. A
run belongs to a group: `runs` for the final runs, the Optuna study's name for a search trial,
`study` for the one run that holds the hypothesis verdicts.

Where they write (under the study's `--out` folder):

    mlflow       $MLFLOW_TRACKING_URI if set (the server's artifact store), else
                 sqlite:///<out>/mlflow.db (MLflow 3 refuses a plain folder store) with artifacts
                 in <out>/mlflow-artifacts/; one experiment per out folder, `loradrift/<out name>`;
                 the group in the tag `loradrift.group`, the commit in `mlflow.source.git.commit`
    tensorboard  <out>/tensorboard/<group>/<run>/ (event files; `tensorboard --logdir <out>/tensorboard`),
                 with the parameters and final scores in the HParams dashboard
    wandb        project $WANDB_PROJECT or `loradrift`, W&B group = the group, local files in
                 <out>/wandb; WANDB_MODE=offline logs without an account (`wandb sync` later);
                 W&B's own messages go to stderr, never into loradrift's stdout

The trackers only receive copies of what the run folders already record (log.jsonl, result.json,
stats/hypotheses.json); nothing in the study reads them back.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from loradrift import layout
from loradrift.config import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("mlflow", "tensorboard", "wandb")
# The module each tracker imports, and the extra that installs it.
_MODULE = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerError(ConfigError):
    """A tracker named in report_to that is not installed; the message says how to install it."""


def check(report_to: list[str]) -> None:
    """Fail before any work when a named tracker is not installed."""
    for name in report_to:
        if importlib.util.find_spec(_MODULE[name]) is None:
            raise TrackerError(f"report_to: {name!r} is named but not installed; "
                               f"pip install \"loradrift[{name}]\" (or drop it from report_to)")


def _flat(d: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, sep, f"{prefix}{sep}{k}" if prefix else str(k)))
        return out
    return {prefix: d} if prefix else {}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a (flattened) dict; trackers take no strings, None or NaN as metrics."""
    out = {}
    for k, v in _flat(metrics, "/").items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) or "_"


# ---------------------------------------------------------------------------------------------
# backends: start in __init__, then log / summary / close


class _MLflow:
    def __init__(self, out: Path, group: str, name: str, params: dict[str, Any], tags: dict[str, str]):
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        # Without a server, artifacts beside the store: MLflow's default is ./mlruns under
        # whatever folder the command was started in.
        artifacts = None if uri else layout.path(out.resolve(), "mlflow_artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{layout.path(out.resolve(), 'mlflow_db')}")
        exp_name = f"loradrift/{out.resolve().name}"
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else self._create(exp_name, artifacts)
        tags = {**tags, "loradrift.group": group}
        if "git_commit" in tags:  # the tag MLflow's UI shows as the run's source version
            tags["mlflow.source.git.commit"] = tags["git_commit"]
        run = self.client.create_run(exp_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self._tag = RunTag

    def _create(self, exp_name: str, artifact_location: str | None) -> str:
        try:
            return self.client.create_experiment(exp_name, artifact_location=artifact_location)
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(exp_name)
            if exp is None:
                raise
            return exp.experiment_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def summary(self, metrics: dict[str, float], step: int, text: dict[str, str]) -> None:
        self.log(metrics, step)
        if text:
            self.client.log_batch(self.run_id, tags=[self._tag(k, v[:5000]) for k, v in text.items()])

    def artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _TensorBoard:
    def __init__(self, out: Path, group: str, name: str, params: dict[str, Any], tags: dict[str, str]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(layout.path(out, "tensorboard", group=_safe(group), run=_safe(name))))
        self.params = params
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def summary(self, metrics: dict[str, float], step: int, text: dict[str, str]) -> None:
        self.log(metrics, step)
        for k, v in text.items():
            self.writer.add_text(k, v, step)
        if self.params and metrics:
            # The HParams dashboard compares runs by these parameters against the final scores,
            # which are this run's scalars of the same names. Written into this run's own event
            # file (SummaryWriter.add_hparams would make a separate run for them).
            from torch.utils.tensorboard.summary import hparams

            values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.params.items()}
            writer = self.writer._get_file_writer()
            for event in hparams(values, metrics):
                writer.add_summary(event)

    def artifacts(self, paths: list[Path]) -> None:
        pass  # TensorBoard keeps no files; the config is in its text and HParams tabs

    def close(self, ok: bool) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, group: str, name: str, params: dict[str, Any], tags: dict[str, str]):
        import wandb

        layout.path(out, "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "loradrift"), group=group, name=name,
                              config=params, tags=sorted(f"{k}={v}"[:64] for k, v in tags.items()), dir=str(out),
                              reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, float], step: int, text: dict[str, str]) -> None:
        self.run.summary.update({**metrics, **text})

    def artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            self.run.save(str(p), base_path=str(p.parent), policy="now")

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


_BACKENDS = {"mlflow": _MLflow, "tensorboard": _TensorBoard, "wandb": _WandB}


class Tracking:
    """The trackers of one run, started at the first value logged (so a finished run that a
    rerun only returns leaves no empty run behind). With none named every call is a no-op. A
    tracker that cannot start, or fails while logging, is dropped with a warning: a tracking
    server's hiccup must not cost a training run (the run folder keeps the full record)."""

    def __init__(self, names: list[str], out_dir: Path | None = None, group: str = "", name: str = "",
                 config: dict | None = None, tags: dict[str, Any] | None = None):
        self.names = list(dict.fromkeys(names))
        self._args = (Path(out_dir) if out_dir else Path("."), group, name, _flat(config or {}, "."),
                      {k: str(v) for k, v in (tags or {}).items() if v is not None})
        self.backends: dict[str, Any] | None = None

    def params(self, values: dict[str, Any]) -> None:
        """Values the run resolved once set up (the learning rate a null `train.lr` stands for,
        the number of steps...): they replace or join the config's parameters. Only before the
        first value is logged, since the trackers take parameters when the run starts there."""
        if self.backends is not None:
            raise RuntimeError("tracking: parameters are set before the first value is logged")
        self._args[3].update(values)

    def _each(self, what: str, *args: Any) -> None:
        if self.backends is None:
            self.backends = {}
            for t in self.names:
                try:
                    self._args[0].mkdir(parents=True, exist_ok=True)
                    self.backends[t] = _BACKENDS[t](*self._args)
                except Exception as e:  # noqa: BLE001 - a tracker that cannot start (no W&B login, say) costs no run
                    log.warning("report_to %s: could not start run %r (%s: %s); it is not tracked there",
                                t, self._args[2], type(e).__name__, e)
        for name, b in list(self.backends.items()):
            try:
                getattr(b, what)(*args)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                log.warning("report_to %s: %s failed (%s: %s); this run logs no more to it", name, what, type(e).__name__, e)
                del self.backends[name]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Values of one step; nested dicts become `a/b` names."""
        nums = _numbers(metrics)
        if nums and self.names:
            self._each("log", nums, step)

    def summary(self, metrics: dict[str, Any], step: int, text: dict[str, str] | None = None) -> None:
        """Final values (scores, cost) and short texts (decisions, reasons)."""
        if self.names:
            self._each("summary", _numbers(metrics), step, dict(text or {}))

    def artifacts(self, paths: list[Path]) -> None:
        """Files to keep with the run (its config, result and model card), copied by the trackers
        that keep files."""
        if self.names:
            self._each("artifacts", [Path(p) for p in paths if Path(p).is_file()])

    def close(self, ok: bool = True) -> None:
        if self.backends:
            self._each("close", ok)
        self.backends = {}

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def start(report_to: list[str], out_dir: Path, group: str, name: str, config: dict | None = None,
          tags: dict[str, Any] | None = None) -> Tracking:
    """One tracked run in every tracker of `report_to` (none: a no-op). A named tracker that is
    not installed fails here, before any work. The code's git commit joins the tags."""
    check(report_to)
    if report_to:
        from loradrift.runtime import code_commit

        tags = {"git_commit": code_commit(), **(tags or {})}
    return Tracking(report_to, out_dir, group, name, config, tags)


def log_verdicts(report_to: list[str], out_dir: Path, hypotheses: dict) -> None:
    """The study's hypothesis results as one run (`study/verdicts`): per primary test its estimate
    and interval, per hypothesis and overall the decision (1 supported, 0 not, -1 undetermined)
    and its reason."""
    if not report_to:
        return
    code = {True: 1.0, False: 0.0, None: -1.0}
    verdict = hypotheses.get("verdict") or {}
    metrics: dict[str, Any] = {}
    text: dict[str, str] = {"verdict.rule": str(verdict.get("rule", ""))}
    for h in ("H1", "H2", "H3", "overall"):
        metrics[f"verdict/{h}"] = code.get(verdict.get(h), -1.0)
    for h in ("H1", "H2", "H3"):
        for r in hypotheses.get(h) or []:
            if isinstance(r, dict) and r.get("primary"):
                metrics.update({f"{h}/{k}": r.get(k) for k in ("estimate", "ci_low", "ci_high", "threshold", "p_value", "p_holm")})
                text[f"{h}.decision"] = str(r.get("decision"))
                text[f"{h}.reason"] = str(r.get("reason"))
        text.setdefault(f"{h}.reason", str((verdict.get("reasons") or {}).get(h, "not tested")))
    with start(report_to, out_dir, "study", "verdicts", tags={"kind": "verdicts"}) as trk:
        trk.summary(metrics, 0, text)
