"""Phase 2 on Ray (loradrift.cluster), on a local `ray.init()` only: the same numbers as
sequential training, failures collected, finished runs skipped, and a clear error without ray."""

import json
import os
import sys

import pytest

from loradrift.layout import run_dir_for
from loradrift.train import train_run


@pytest.fixture
def ray_local(data_dir):
    ray = pytest.importorskip("ray")
    # Workers are separate processes: they need the test's model cache (the tiny model is
    # built there) and data folder, which conftest only sets in this process.
    env = {"LORADRIFT_CACHE": os.environ["LORADRIFT_CACHE"], "LORADRIFT_DATA": str(data_dir), "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_grid_on_ray_matches_sequential_collects_failures_and_skips_finished(tiny_cfg, ray_local, tmp_path):
    from loradrift.cluster import GridError, run_grid_on_ray

    grid = [tiny_cfg("sst2", m, s) for m in ("full", "lora") for s in (42, 1337)]
    # The reference runs go first, in this process: they also build the tiny model in the cache,
    # so the workers do not race to build it.
    sequential = {(c.task, c.method.name, c.seed): train_run(c.model_copy(update={"out_dir": tmp_path / "seq"})) for c in grid}

    bad = tiny_cfg("sst2", "lora", 7, overrides=[f"data.data_dir={tmp_path / 'no-such-data'}"])
    said: list[str] = []
    with pytest.raises(GridError) as exc:
        run_grid_on_ray([*grid, bad], say=said.append)
    assert [f[:3] for f in exc.value.failures] == [("sst2", "lora", 7)]
    assert "DataError" in exc.value.failures[0][3] and "sst2/lora/seed7" in str(exc.value)
    assert sum("done" in s for s in said) == 4 and any(s.startswith("run 5/5") for s in said)

    # The other runs finished despite the failure, with the numbers of sequential training.
    for c in grid:
        r = json.loads((run_dir_for(c) / "result.json").read_text())
        ref = sequential[(c.task, c.method.name, c.seed)]
        assert r["config_hash"] == ref["config_hash"]
        assert r["dev"] == ref["dev"] and r["val"] == ref["val"], (c.method.name, c.seed)
        assert r["torch_threads"] == 1  # a task's one CPU

    mtimes = [(run_dir_for(c) / "result.json").stat().st_mtime_ns for c in grid]
    said.clear()
    again = run_grid_on_ray(grid, say=said.append)
    assert [r["seed"] for r in again] == [c.seed for c in grid] and [r["method"] for r in again] == [c.method.name for c in grid]
    assert mtimes == [(run_dir_for(c) / "result.json").stat().st_mtime_ns for c in grid]
    assert said == ["ray: 4 of 4 runs already finished"]


def test_missing_ray_is_a_clear_error_before_any_work(monkeypatch, tiny_cfg, tmp_path, capsys):
    from loradrift.cli import main
    from loradrift.cluster import RayMissing, run_grid_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayMissing, match=r"pip install 'loradrift\[ray\]'"):
        run_grid_on_ray([tiny_cfg("sst2", "lora")])
    out = tmp_path / "study"
    assert main(["study", "--preset", "tiny", "--out", str(out), "--phases", "0,2", "--ray"]) == 2
    assert "pip install 'loradrift[ray]'" in capsys.readouterr().err
    assert not (out / "results.sqlite").exists()  # refused before Phase 0 started


class _FakeRay:
    """Just enough of the ray module for run_grid_on_ray to start (or join) a cluster and get
    results back, one per ray.wait after a wait that times out; records the ray.init keyword
    arguments, each task's options and config, and the order of events in `log`."""

    class exceptions:
        class RayError(Exception):
            pass

    def __init__(self, resources=None):
        self.init_calls: list[dict] = []
        self.tasks: list[tuple[dict, dict]] = []  # (options, config as JSON)
        self.resources = resources or {"CPU": 1}
        self.log: list = []

    def is_initialized(self):
        return False

    def init(self, **kw):
        self.init_calls.append(kw)

    def shutdown(self):
        pass

    def cluster_resources(self):
        return self.resources

    def remote(self, fn):
        fake = self

        class Remote:
            def __init__(self, opts=None):
                self.opts = opts or {}

            def options(self, **opts):
                return Remote(opts)

            def remote(self, cfg_json):
                fake.tasks.append((self.opts, json.loads(cfg_json)))
                return len(fake.tasks) - 1

        return Remote()

    def wait(self, refs, num_returns, timeout=None):
        self.log.append(("wait", timeout))
        if self.log[-2:-1] != [("wait", timeout)]:
            return [], refs  # every other call times out with nothing ready, as a long run would
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return {"primary_metric": "accuracy", "dev": {"accuracy": 0.5}, "wall_time_s": 1.0}


@pytest.mark.parametrize("address, node_ip", [(None, "127.0.0.1"), ("auto", None)])
def test_local_ray_cluster_binds_loopback_only(monkeypatch, tiny_cfg, address, node_ip):
    from loradrift.cluster import run_grid_on_ray

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    run_grid_on_ray([tiny_cfg("sst2", "lora")], address=address, say=lambda _: None)
    [kw] = fake.init_calls
    assert kw["address"] == address
    # Started here: every Ray service on loopback. Joined: the user's cluster, its own settings.
    assert kw.get("_node_ip_address") == node_ip


@pytest.mark.parametrize("resources, threads, opts", [({"CPU": 4}, None, {"num_cpus": 1}),
                                                      ({"CPU": 4}, 2, {"num_cpus": 2}),
                                                      ({"CPU": 16, "GPU": 2}, 4, {"num_cpus": 4, "num_gpus": 1})])
def test_ray_tasks_take_their_threads_as_cpus_and_report_each_run_as_it_ends(monkeypatch, tiny_cfg, resources, threads, opts):
    from loradrift.cluster import run_grid_on_ray

    fake = _FakeRay(resources)
    monkeypatch.setitem(sys.modules, "ray", fake)
    extra = [f"runtime.threads={threads}"] if threads else []
    grid = [tiny_cfg("sst2", "lora", s, overrides=extra) for s in (1, 2, 3)]
    run_grid_on_ray(grid, say=lambda m: fake.log.append(m.split(":")[0]),
                    progress=lambda done, n, cached: fake.log.append(("progress", done, n, cached)))
    # The cores a task reserves are the torch threads its train_run sets (runtime.threads, default 1).
    assert [{k: v for k, v in o.items() if k != "runtime_env"} for o, _ in fake.tasks] == [opts] * 3
    assert [c["runtime"]["threads"] for _, c in fake.tasks] == [opts["num_cpus"]] * 3
    # Each run is reported when ray.wait hands it back, not after the last one; the waits time out
    # so that the progress thread is not starved while the runs are long.
    events = [e for e in fake.log if (isinstance(e, tuple) and e[0] == "progress") or (isinstance(e, str) and e.startswith("run"))]
    assert events == ["run 1/3 sst2/lora/seed1", ("progress", 1, 3, False), "run 2/3 sst2/lora/seed2", ("progress", 2, 3, False),
                      "run 3/3 sst2/lora/seed3", ("progress", 3, 3, False)]
    waits = [e[1] for e in fake.log if isinstance(e, tuple) and e[0] == "wait"]
    assert len(waits) == 6 and None not in waits
