"""Where a process runs: how many threads its torch uses (`runtime.threads`), and which commit
of this code it is (`code_commit`, for manifests and trackers).

torch starts one intra-op (OpenMP) thread per core it sees. That suits a process alone on a
machine, and hurts as soon as several share it: Ray tasks, search workers, or a study beside
anything else each spawn a thread per core, and the threads spin against each other for the same
cores (issue 28: on a 2-core machine a SmolLM2 run fell from ~60 tokens/s with one thread to 6-10
tokens/s with two threads beside two other torch processes). So each process takes the cores it
owns: `runtime.threads` when set, else its CPU affinity (all cores for a lone process, those of a
`taskset` or cpuset otherwise), and a Ray task its `num_cpus` (loradrift.cluster).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), read from /proc; [] where there is none."""
    parents: dict[int, list[int]] = {}
    try:
        entries = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    except OSError:
        return []
    for d in entries:
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def owned_core_ids() -> list[int]:
    """The ids of the cores this process may run on: its CPU affinity, which os.cpu_count() ignores."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return list(range(os.cpu_count() or 1))


def owned_cores() -> int:
    return len(owned_core_ids())


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to `requested`, or to the cores owned when None; returns the
    number set, which a run records in its result.json."""
    import torch

    n = requested or owned_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def code_commit() -> str | None:
    """The git commit of this code, else $LORADRIFT_COMMIT: a copy without .git (a lent GPU
    machine gets the working tree only) names its commit through the environment."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return commit or os.environ.get("LORADRIFT_COMMIT") or None
