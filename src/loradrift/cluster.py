"""Phase 2 on a Ray cluster: one Ray task per (task, method, seed) run.

    loradrift study --ray                      # a local Ray cluster on this machine
    loradrift study --ray --ray-address auto   # join the cluster started with `ray start`

What a task does is exactly what sequential Phase 2 does, `train_run(cfg)`, so the two modes
write the same run folders and the same numbers, and mix freely: a re-run after a crash (in
either mode) returns finished runs from their result.json and resumes killed ones from their
last checkpoint.

Requirements on a real cluster (several machines):
- `--out` must be a shared filesystem (NFS, a mounted bucket...) at the same path on every
  node: tasks write their run folders there and Phase 3 reads them back on the driver.
- every node has the same Python environment with loradrift installed (`pip install
  'loradrift[ray]'`), and the task data at the same path. The driver's LORADRIFT_* and HF_*
  environment variables are passed to the tasks, so paths in them must exist on every node.

Resources: a task takes `runtime.threads` CPUs (default 1), and one GPU when the cluster has
GPUs, so a CPU-only node runs cores / runtime.threads runs at once. Each task trains with as many
torch threads as CPUs it took: N runs on N cores each using every core would fight over them and
finish later than one at a time. Memory is not reserved; to run fewer runs at once (large
models), raise `runtime.threads`, or start the cluster yourself with `ray start --head --num-cpus
K` and pass `--ray-address auto`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from loradrift import layout
from loradrift.config import RunConfig

# Environment a task needs to find what the driver finds (model cache, data, Hub settings).
_FORWARD_PREFIXES = ("LORADRIFT_", "HF_")
_FORWARD_NAMES = ("TOKENIZERS_PARALLELISM",)


class GridError(RuntimeError):
    """Some runs of the grid failed; the others finished. `failures`: (task, method, seed, error)."""

    def __init__(self, failures: list[tuple[str, str, int, str]], n: int):
        self.failures = failures
        lines = [f"  {t}/{m}/seed{s}: {err}" for t, m, s, err in failures]
        super().__init__(f"{len(failures)} of {n} Phase 2 runs failed on Ray (the others finished; "
                         f"rerun the study to retry only these):\n" + "\n".join(lines))


class RayMissing(ImportError, RuntimeError):
    """ray is not installed. Also a RuntimeError so the CLI prints it as one line."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing("running Phase 2 on Ray needs the ray package: pip install 'loradrift[ray]'") from None
    return ray


def _train_task(cfg_json: str) -> dict:
    """Body of one Ray task. The config travels as JSON so the worker validates it afresh with
    its own copy of the schema instead of unpickling objects built by the driver. Its
    runtime.threads is the task's num_cpus, which train_run's setup applies."""
    from loradrift.train import train_run

    return train_run(RunConfig.model_validate_json(cfg_json))


def _task_env() -> dict[str, str]:
    # --data-dir travels inside the config and workers carry loradrift's own copy of the data, so
    # only $LORADRIFT_DATA (and the caches) need forwarding.
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES) or k in _FORWARD_NAMES}


def _describe(err: BaseException) -> str:
    # A RayTaskError wraps the task's exception; its `cause` is the part worth reading.
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"


def run_grid_on_ray(grid: list[RunConfig], address: str | None = None, say: Callable[[str], None] = print,
                    progress: Callable[[int, int, bool], None] | None = None) -> list[dict]:
    """Train every config of `grid` as one Ray task each; results in grid order.

    `address`: None starts a local Ray cluster bound to 127.0.0.1 (unless this process already
    called `ray.init`, which is then used as it is), "auto" or "host:port" joins a running one. A failed run does
    not stop the others; once all have ended a GridError lists the failed ones. `progress(done,
    runs, already_done)` as runs end (`already_done`: those found finished, which took no time)."""
    ray = import_ray()
    from loradrift.train import RunConflict, train_run

    # Tasks may start in another working directory (or machine): a relative --out would
    # scatter run folders. out_dir is not part of the science hash, so finished runs still match.
    grid = [c.model_copy(update={"out_dir": Path(c.out_dir).resolve()}) for c in grid]
    n = len(grid)
    results: list[dict | None] = [None] * n
    failures: list[tuple[int, str]] = []

    # Finished runs are read here rather than sent out: each Ray task pays for a worker that
    # imports torch, which is most of a re-run's time when nearly everything is done.
    todo = []
    for i, cfg in enumerate(grid):
        if layout.run_path(layout.run_dir_for(cfg), "result").exists():
            try:
                results[i] = train_run(cfg)
            except (RunConflict, ValueError, OSError) as e:  # another config's run, or an unreadable result.json
                failures.append((i, _describe(e)))
        else:
            todo.append(i)
    if len(todo) < n:
        say(f"ray: {n - len(todo)} of {n} runs already finished")
        if progress:
            progress(n - len(todo), n, True)
    if not todo:
        return _finish(grid, results, failures)

    started = False
    if not ray.is_initialized():
        # A cluster started here serves this process only: its node address is loopback, so its
        # services are not reachable from the network (a cluster the user names is theirs to set up).
        kw = {} if address else {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        ray.init(address=address, **kw)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        remote = ray.remote(_train_task)
        pending = {}
        for i in todo:
            # A task owns num_cpus cores and trains with as many torch threads (runtime.threads).
            cpus = grid[i].runtime.threads or 1
            cfg = grid[i].model_copy(update={"runtime": grid[i].runtime.model_copy(update={"threads": cpus})})
            opts = {"num_cpus": cpus, **({"num_gpus": 1} if gpus > 0 else {})}
            pending[remote.options(**opts, runtime_env={"env_vars": _task_env()}).remote(cfg.model_dump_json())] = i
        per_run = "/".join(str(c) for c in sorted({grid[i].runtime.threads or 1 for i in todo}))
        say(f"ray: {len(todo)} runs on " + (f"{int(gpus)} GPU(s)" if gpus else f"{int(ray.cluster_resources().get('CPU', 0))} CPU(s)")
            + f", {per_run} CPU(s) and torch thread(s) each")
        done = n - len(todo)
        while pending:
            # A timeout, so that the driver's progress thread gets to print while every run is long.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            if not ready:
                continue
            ref = ready[0]
            i = pending.pop(ref)
            cfg = grid[i]
            done += 1
            name = f"{cfg.task}/{cfg.method.name}/seed{cfg.seed}"
            try:
                r = ray.get(ref)
            except ray.exceptions.RayError as e:  # the task raised, or its worker died past Ray's retries
                failures.append((i, _describe(e)))
                say(f"run {done}/{n} {name}: FAILED ({_describe(e)})")
            else:
                results[i] = r
                say(f"run {done}/{n} {name}: dev {r['primary_metric']} {r['dev'][r['primary_metric']]:.4g} "
                    f"({r['wall_time_s']:.0f}s) done")
            if progress:
                progress(done, n, False)
    finally:
        if started:
            ray.shutdown()
    return _finish(grid, results, failures)


def _finish(grid: list[RunConfig], results: list[dict | None], failures: list[tuple[int, str]]) -> list[dict]:
    if failures:
        failures.sort()
        raise GridError([(grid[i].task, grid[i].method.name, grid[i].seed, err) for i, err in failures], len(grid))
    return results  # type: ignore[return-value]
