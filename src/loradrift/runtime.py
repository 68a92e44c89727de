"""How many threads a process's torch uses (`runtime.threads`).

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
