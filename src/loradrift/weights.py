"""Phase 3b: weight-space analysis of the fine-tuning update.

For every adapted weight matrix of a run we form the update ``dW`` and the fine-tuned matrix
``W_ft = W_base + dW``:

* LoRA: ``dW = scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` when
  ``use_rslora`` is set), read from the run's ``serve_adapter/`` folder exactly as PEFT merges it.
* full FT: ``dW = W_ft - W_base`` from the run's ``model/model.safetensors``, restricted to the
  linear projections of the transformer blocks (q, k, v, o, gate, up, down_proj).

Per matrix we report:

* ``rel_norm`` = ``||dW||_F / ||W_base||_F``: how far the weights moved.
* the top singular values of ``dW`` and its **effective rank**: the smallest k whose top-k
  squared singular values explain ``>= rank_threshold`` (default 90 %) of ``||dW||_F^2``, the
  "spectrum explains 90 % of the variance" rank used by Biderman et al. (2024), "LoRA Learns
  Less and Forgets Less". A LoRA update has effective rank <= r by construction; the point is
  how far below r it is, and how high full FT's is.
* **intruder dimensions** (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence"): take the top ``intruder_k`` (default 10) left singular vectors of ``W_ft``;
  one is an intruder when its largest |cosine similarity| with *any* left singular vector of
  ``W_base`` (all of them, not only the top k) is below ``intruder_eps`` (default 0.6), i.e. a
  high-energy direction of the fine-tuned matrix that the pre-trained matrix does not have.

Outputs under ``<out>/weights/``: ``weights_layers.csv`` (one row per task, method, seed,
module), ``summary.csv`` / ``summary.json`` (per task, method, seed: mean relative norm, mean
effective rank, total intruder dimensions) and ``figures/weights_by_layer_<task>.png``.

Cost and precision. The base matrices are identical for every run, so :func:`analyse_weights`
walks module by module: each base matrix is read and decomposed (full SVD, needed for the
intruder test) once, then every run's update for that module is analysed. Decompositions
run in float32 (weights are stored in bf16/fp32, so more digits would be noise; a singular
vector's error ~1e-6 * ||W|| / gap is irrelevant against a 0.6 cosine threshold), except the
top-k singular vectors of ``W_ft``, which come from the float64 Gram matrix (its eigenvalues are
squared singular values, so float32 would lose half the digits). A LoRA update's singular
values come exactly from two QRs of its factors (an r x r SVD), not from the dense matrix.
Matrices up to 1,024 on a side are decomposed with one BLAS/LAPACK thread: at that size a second
thread costs more in synchronisation than it saves, and on a shared 2-core machine OpenBLAS's
spinning threads made the SmolLM2 analysis several times slower (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from safetensors import safe_open
from threadpoolctl import threadpool_limits

from loradrift import layout
from loradrift.io import atomic_path, atomic_write_json, serve_adapter_dir, write_csv
from loradrift.methods import FULL, LORA

__all__ = [
    "PROJECTIONS",
    "effective_rank",
    "intruder_dimensions",
    "delta_stats",
    "lora_scale",
    "load_deltas",
    "load_lora_factors",
    "analyse_weights",
    "run_weight_summary",
]

log = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model.layers.<i>.<self_attn|mlp>.<proj>.weight (any prefix, so other decoder layouts work)
_BLOCK_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.[A-Za-z0-9_]+\.(" + "|".join(PROJECTIONS) + r")\.weight$")
# PEFT keys; older PEFT versions kept the adapter name ("lora_A.default.weight")
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_SEED_DIR = layout.SEED_DIR


# --------------------------------------------------------------------------
# pure functions on tensors
# --------------------------------------------------------------------------


def effective_rank(singular_values: Any, threshold: float = 0.9) -> int:
    """Smallest k with ``sum(s[:k]^2) >= threshold * sum(s^2)`` (0 for an all-zero spectrum).

    ``singular_values`` in any order. The comparison allows 1e-12 of rounding, so that e.g.
    ten equal values at threshold 0.9 give 9 rather than 10 by accident of float addition.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64).ravel() ** 2)[::-1]
    total = s2.sum()
    if total <= 0.0:
        return 0
    frac = np.cumsum(s2) / total
    return int(np.searchsorted(frac, threshold - 1e-12) + 1)


def _small_gram(A: np.ndarray) -> np.ndarray:
    """A A^T or A^T A, whichever is smaller: same non-zero eigenvalues (the squared singular values)."""
    return A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A


def _top_left_singular(W: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors (out x k) and values of W, largest first.

    Eigen-decomposition of the smaller Gram matrix in float64, asking LAPACK only for the
    top k eigenpairs: much cheaper than a full SVD of a 1536 x 576 matrix.
    """
    A = W.detach().to(torch.float64).cpu().numpy()
    m = min(A.shape)
    k = min(k, m)
    evals, vecs = scipy.linalg.eigh(_small_gram(A), subset_by_index=[m - k, m - 1])
    evals, vecs = evals[::-1], vecs[:, ::-1]  # eigh sorts ascending
    s = np.sqrt(np.clip(evals, 0.0, None))
    if A.shape[0] <= A.shape[1]:
        return vecs, s  # eigenvectors of A A^T are the left singular vectors
    U = A @ vecs  # u = A v / s from the right singular vectors v
    U /= np.maximum(np.linalg.norm(U, axis=0), 1e-300)
    return U, s


def intruder_dimensions(
    W_base: torch.Tensor,
    W_ft: torch.Tensor,
    k: int = 10,
    eps: float = 0.6,
    *,
    base_U: torch.Tensor | np.ndarray | None = None,
) -> tuple[int, np.ndarray]:
    """Intruder dimensions of ``W_ft`` relative to ``W_base`` (Shuttleworth et al. 2024).

    Returns ``(count, sims)``: ``sims[i]`` is the largest |cosine| between the i-th left
    singular vector of ``W_ft`` (i < k, largest singular value first) and any left singular
    vector of ``W_base``; ``count`` is how many are below ``eps``. Pass ``base_U`` (all left
    singular vectors of W_base, out x min(out, in)) to reuse a decomposition. Singular vectors
    of W_ft with a (numerically) zero singular value are arbitrary, so they are left out
    (``sims`` is then shorter than k).
    """
    if W_base.shape != W_ft.shape:
        raise ValueError(f"shape mismatch: W_base {tuple(W_base.shape)} vs W_ft {tuple(W_ft.shape)}")
    if base_U is None:
        base_U = torch.linalg.svd(W_base.to(torch.float32), full_matrices=False).U
    Ub = base_U.cpu().numpy() if isinstance(base_U, torch.Tensor) else np.asarray(base_U)
    U, s = _top_left_singular(W_ft, k)
    # Gram eigenvalues carry ~1e-16 * s_max^2 of rounding, so singular values below ~1e-6 * s_max
    # are indistinguishable from 0 (and their vectors arbitrary).
    keep = s > (s[0] if len(s) else 0.0) * 1e-6
    U = U[:, keep]
    # Both bases are orthonormal, so the matrix of cosines is just Ub^T U.
    sims = np.abs(Ub.astype(np.float64).T @ U).max(axis=0) if U.shape[1] else np.zeros(0)
    return int(np.count_nonzero(sims < eps)), sims


def _singular_values(delta: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None) -> np.ndarray:
    if factors is None:
        # Eigenvalues of the float64 Gram matrix: about 2x faster than svdvals on 576 x 1536 and
        # exact enough for what we use (top values and 90 % energy), since only singular values
        # below ~1e-8 * s_max lose accuracy.
        evals = scipy.linalg.eigvalsh(_small_gram(delta.detach().to(torch.float64).cpu().numpy()))
        return np.sqrt(np.clip(evals, 0.0, None))
    # delta = B @ A = Qb (Rb Ra^T) Qa^T with orthonormal Qb, Qa: same singular values as Rb Ra^T.
    B, A = (f.to(torch.float64) for f in factors)
    Rb = torch.linalg.qr(B).R
    Ra = torch.linalg.qr(A.T).R
    return torch.linalg.svdvals(Rb @ Ra.T).numpy()


def delta_stats(
    W_base: torch.Tensor,
    delta: torch.Tensor,
    *,
    top_k: int = 16,
    rank_threshold: float = 0.9,
    intruder_k: int = 10,
    intruder_eps: float = 0.6,
    base_U: torch.Tensor | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Statistics of one update ``delta`` to the matrix ``W_base``.

    ``factors=(B, A)`` with ``delta == B @ A`` (scale folded into B) lets the singular values
    come from the low-rank factors. ``base_U``: see :func:`intruder_dimensions`.
    Returns base_fro, delta_fro, rel_norm, singular_values (top ``top_k``, descending),
    effective_rank, intruders, intruder_sims.
    """
    if W_base.shape != delta.shape:
        raise ValueError(f"shape mismatch: W_base {tuple(W_base.shape)} vs delta {tuple(delta.shape)}")
    W_base = W_base.to(torch.float32)
    delta = delta.to(torch.float32)
    base_fro = float(torch.linalg.vector_norm(W_base, dtype=torch.float64))
    delta_fro = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    s = _singular_values(delta, factors)
    n_intr, sims = intruder_dimensions(W_base, W_base + delta, intruder_k, intruder_eps, base_U=base_U)
    return {
        "base_fro": base_fro,
        "delta_fro": delta_fro,
        "rel_norm": delta_fro / base_fro if base_fro > 0 else float("nan"),
        "singular_values": np.sort(s)[::-1][:top_k],
        "effective_rank": effective_rank(s, rank_threshold),
        "intruders": n_intr,
        "intruder_sims": sims,
    }


@contextmanager
def _blas_threads(n: int | None):
    """Limit numpy's and torch's BLAS/LAPACK thread pools to ``n`` (None: leave them alone)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------
# loading weights
# --------------------------------------------------------------------------


class _SafetensorsFolder:
    """Lazy, key-addressed access to a folder's model.safetensors (single file or sharded)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.exists():
            files = [single]
        elif index.exists():
            shards = json.loads(index.read_text())["weight_map"].values()
            files = [folder / f for f in sorted(set(shards))]
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors (or sharded index) found")
        self.where: dict[str, Any] = {}
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        for h in self._handles:
            for k in h.keys():  # noqa: SIM118 - safetensors handles are not iterable
                self.where[k] = h
        self.folder = folder

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key).to(torch.float32)

    def shape(self, key: str) -> list[int]:
        return self.where[key].get_slice(key).get_shape()


def lora_scale(config: dict, module_name: str, r: int) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA.

    ``alpha_pattern`` overrides ``lora_alpha`` per module the way PEFT matches it; ``r`` is taken
    from the saved A matrix, which already reflects any ``rank_pattern``.
    """
    alpha = config.get("lora_alpha", 8)
    for pattern, a in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            alpha = a
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass
class _Update:
    """The update of one module: ``dense(W_base)`` gives dW; ``factors`` when it is low-rank."""
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale * B, A)
    ft_key: str | None = None


class _RunWeights:
    """Where a run's updates come from: a LoRA adapter or a full fine-tuned model."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        adapter = serve_adapter_dir(self.run_dir)
        self.updates: dict[str, _Update] = {}
        self._ft: _SafetensorsFolder | None = None
        if (adapter / "adapter_model.safetensors").exists():
            self.kind = LORA
            self._read_adapter(adapter)
        elif layout.run_path(self.run_dir, "model").is_dir():
            self.kind = FULL
            self._ft = _SafetensorsFolder(layout.run_path(self.run_dir, "model"))
            for key in self._ft.keys():  # noqa: SIM118 - a folder of safetensors handles, not a dict
                if _BLOCK_KEY.search(key):
                    self.updates[key] = _Update(ft_key=key)
        else:
            raise FileNotFoundError(f"{self.run_dir}: neither serve_adapter/adapter_model.safetensors nor model/")

    def _read_adapter(self, adapter: Path) -> None:
        cfg_path = adapter / "adapter_config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path} is missing (needed for lora_alpha and r)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("use_dora"):
            raise ValueError(f"{cfg_path}: DoRA adapters are not supported (dW is not scale * B @ A)")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safetensors handles are not iterable
                m = _LORA_KEY.match(key)
                if m:
                    pairs.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(key).to(torch.float32)
                else:
                    log.debug("%s: ignoring adapter tensor %s", adapter, key)
        for module, ab in pairs.items():
            base_key = f"{module}.weight"
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{adapter}: {module} has lora_{''.join(ab)} but not both A and B")
            if not _BLOCK_KEY.search(base_key):
                log.debug("%s: skipping non-block module %s", adapter, module)
                continue
            A, B = ab["A"], ab["B"]
            if A.shape[0] != B.shape[1]:
                raise ValueError(f"{adapter}: {module}: lora_A {tuple(A.shape)} and lora_B "
                                 f"{tuple(B.shape)} disagree on r")
            self.updates[base_key] = _Update(factors=(lora_scale(cfg, module, A.shape[0]) * B, A))

    def delta(self, key: str, W_base: torch.Tensor) -> tuple[torch.Tensor, _Update]:
        u = self.updates[key]
        if u.factors is not None:
            B, A = u.factors
            delta = B @ A
        else:
            delta = self._ft.get(u.ft_key) - W_base
        if delta.shape != W_base.shape:
            raise ValueError(f"{self.run_dir}: {key} has shape {tuple(delta.shape)}, "
                             f"base has {tuple(W_base.shape)}")
        return delta, u


def load_deltas(base_model_dir: str | Path, run_dir: str | Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Yield ``(module_name, W_base, delta)`` for every adapted block projection of a run.

    ``module_name`` is the base key without ``.weight`` (``model.layers.3.self_attn.q_proj``);
    tensors are float32. The run is a LoRA run if it has ``serve_adapter/adapter_model.safetensors``,
    else a full-FT run with ``model/``.
    """
    base = _SafetensorsFolder(Path(base_model_dir))
    run = _RunWeights(Path(run_dir))
    for key in _sorted_keys(run.updates):
        if key not in base.where:
            raise ValueError(f"{run.run_dir}: {key} is not in the base model {base.folder}")
        W = base.get(key)
        yield key[: -len(".weight")], W, run.delta(key, W)[0]


def load_lora_factors(run_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module_name: (scale * B, A)}`` of a LoRA run's adapted block projections (float32), so
    that ``dW = (scale * B) @ A``; module names as in :func:`load_deltas`."""
    run = _RunWeights(Path(run_dir))
    if run.kind != LORA:
        raise ValueError(f"{run_dir}: not a LoRA run (no adapter)")
    return {key[: -len(".weight")]: run.updates[key].factors for key in _sorted_keys(run.updates)}


def _sorted_keys(keys: Any) -> list[str]:
    def order(key: str) -> tuple[int, int, str]:
        m = _BLOCK_KEY.search(key)
        return (int(m.group(1)), PROJECTIONS.index(m.group(2)), key) if m else (-1, -1, key)
    return sorted(keys, key=order)


# --------------------------------------------------------------------------
# the study-level analysis
# --------------------------------------------------------------------------


def _discover_runs(out_dir: Path, model: str, tasks: Sequence[str], methods: Sequence[str]
                   ) -> list[tuple[str, str, int, _RunWeights]]:
    found = []
    for task in tasks:
        for method in methods:
            mdir = layout.runs_dir(out_dir, model, task, method)
            seeds = sorted(int(m.group(1)) for p in (mdir.iterdir() if mdir.is_dir() else [])
                           if (m := _SEED_DIR.match(p.name)) and p.is_dir())
            if not seeds:
                log.warning("weights: no %s runs for task %s under %s", method, task, mdir)
            for seed in seeds:
                try:
                    run = _RunWeights(layout.run_dir(out_dir, model, task, method, seed))
                except FileNotFoundError as e:
                    log.warning("weights: skipping %s/seed%d of task %s: %s", method, seed, task, e)
                    continue
                if run.kind != method:
                    log.warning("weights: %s holds %s weights, not %s; analysed as %s",
                                run.run_dir, run.kind, method, run.kind)
                found.append((task, method, seed, run))
    return found


def _summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["seed"]), []).append(r)
    return [{
        "task": t, "method": m, "seed": s, "n_modules": len(g),
        "mean_rel_norm": float(np.mean([r["rel_norm"] for r in g])),
        "mean_effective_rank": float(np.mean([r["effective_rank"] for r in g])),
        "total_intruders": int(sum(r["intruders"] for r in g)),
    } for (t, m, s), g in sorted(groups.items())]


def _plot(task: str, rows: list[dict], fig_path: Path) -> None:
    # Figure (not pyplot) keeps matplotlib's global state and backend out of the library.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_norm, ax_intr = fig.subplots(1, 2)
    for method in sorted({r["method"] for r in rows}):
        sel = [r for r in rows if r["method"] == method]
        layers = sorted({r["layer"] for r in sel})
        seeds = sorted({r["seed"] for r in sel})
        norm = np.full((len(seeds), len(layers)), np.nan)
        intr = np.zeros((len(seeds), len(layers)))
        for si, seed in enumerate(seeds):
            for li, layer in enumerate(layers):
                g = [r for r in sel if r["seed"] == seed and r["layer"] == layer]
                if g:
                    norm[si, li] = np.mean([r["rel_norm"] for r in g])
                    intr[si, li] = sum(r["intruders"] for r in g)
        for ax, arr in ((ax_norm, norm), (ax_intr, intr)):
            line, = ax.plot(layers, np.nanmean(arr, axis=0), marker="o", ms=3,
                            label=f"{method} (n={len(seeds)} seeds)")
            ax.fill_between(layers, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0),
                            color=line.get_color(), alpha=0.25, linewidth=0)
    ax_norm.set(xlabel="layer", ylabel="||dW||_F / ||W||_F (mean over modules)",
                title=f"{task}: relative update norm")
    ax_intr.set(xlabel="layer", ylabel="intruder dimensions (sum over modules)",
                title=f"{task}: intruder dimensions")
    for ax in (ax_norm, ax_intr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, title="band: min-max over seeds", title_fontsize=7)
    with atomic_path(fig_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _analyse_keys(keys: list[str], base: _SafetensorsFolder, runs: list, **stats_kw: Any) -> list[dict]:
    rows: list[dict] = []
    for key in keys:  # module-major: one SVD per base matrix, shared by every run
        W = base.get(key)
        base_U = torch.linalg.svd(W, full_matrices=False).U
        m = _BLOCK_KEY.search(key)
        for task, method, seed, run in runs:
            if key not in run.updates:
                continue
            delta, update = run.delta(key, W)
            st = delta_stats(W, delta, base_U=base_U, factors=update.factors, **stats_kw)
            sims = st["intruder_sims"]
            rows.append({
                "task": task, "method": method, "seed": seed, "layer": int(m.group(1)),
                "module": m.group(2), "name": key[: -len(".weight")],
                "out_features": W.shape[0], "in_features": W.shape[1],
                "base_fro": st["base_fro"], "delta_fro": st["delta_fro"], "rel_norm": st["rel_norm"],
                "effective_rank": st["effective_rank"], "intruders": st["intruders"],
                "intruder_min_sim": float(sims.min()) if len(sims) else float("nan"),
                **{f"sv_{i + 1}": v for i, v in enumerate(st["singular_values"])},
            })
    return rows


def _weight_rows(base_model_dir: Path, runs: list[tuple[str, str, int, _RunWeights]], wanted: set[str],
                 **stats_kw: Any) -> list[dict]:
    base = _SafetensorsFolder(Path(base_model_dir))
    keys = _sorted_keys({k for *_, run in runs for k in run.updates
                         if _BLOCK_KEY.search(k).group(2) in wanted})
    missing = [k for k in keys if k not in base.where]
    if missing:
        raise ValueError(f"{missing[0]} is updated by a run but missing from the base model {base.folder}")
    small = max((min(base.shape(k)) for k in keys), default=0) <= 1024
    with _blas_threads(1 if small else None):
        rows = _analyse_keys(keys, base, runs, **stats_kw)
    rows.sort(key=lambda r: (r["task"], r["method"], r["seed"], r["layer"], PROJECTIONS.index(r["module"])))
    return rows


def run_weight_summary(base_model_dir: str | Path, runs: Sequence[tuple[str, str, int, str | Path]], *,
                       modules: Sequence[str] | None = None, top_k: int = 16, rank_threshold: float = 0.9,
                       intruder_k: int = 10, intruder_eps: float = 0.6) -> tuple[list[dict], list[dict]]:
    """(per-module rows, per-run summary) like :func:`analyse_weights`, for named run folders
    ``(task, label, seed, run_dir)`` outside the study's grid (the rank ablation); writes nothing."""
    wanted = set(modules) if modules else set(PROJECTIONS)
    found = [(t, label, seed, _RunWeights(Path(d))) for t, label, seed, d in runs]
    rows = _weight_rows(Path(base_model_dir), found, wanted, top_k=top_k, rank_threshold=rank_threshold,
                        intruder_k=intruder_k, intruder_eps=intruder_eps)
    return rows, _summarise(rows)


def analyse_weights(
    out_dir: str | Path,
    model: str,
    base_model_dir: str | Path,
    tasks: Sequence[str] | str | None = None,
    methods: Sequence[str] = (FULL, LORA),
    *,
    top_k: int = 16,
    rank_threshold: float = 0.9,
    intruder_k: int = 10,
    intruder_eps: float = 0.6,
    modules: Sequence[str] | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Analyse every run's weight update; write tables and figures under ``<out>/weights``.

    ``tasks``: names, or None / ``"all"`` for every folder under ``<out>/runs/<model>``.
    ``modules``: restrict to these projection names (e.g. LoRA's target modules, to compare
    FT and LoRA on the same matrices); default all of :data:`PROJECTIONS` that a run updates.
    Returns ``{"summary": [rows of summary.csv], "files": [...]}``.
    """
    out_dir = Path(out_dir)
    if tasks is None or tasks == "all":
        runs_root = layout.runs_dir(out_dir, model)
        tasks = sorted(p.name for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []
    elif isinstance(tasks, str):
        tasks = [tasks]
    wanted = set(modules) if modules else set(PROJECTIONS)
    if not wanted <= set(PROJECTIONS):
        raise ValueError(f"modules must be among {PROJECTIONS}, got {sorted(wanted - set(PROJECTIONS))}")
    runs = _discover_runs(out_dir, model, list(tasks), list(methods))
    weights_dir = layout.path(out_dir, "weights")
    if not runs:
        log.warning("weights: no runs found for model %s, tasks %s; nothing written", model, list(tasks))
        return {"summary": [], "files": []}

    rows = _weight_rows(Path(base_model_dir), runs, wanted, top_k=top_k, rank_threshold=rank_threshold,
                        intruder_k=intruder_k, intruder_eps=intruder_eps)

    layer_cols = ["task", "method", "seed", "layer", "module", "name", "out_features", "in_features",
                  "base_fro", "delta_fro", "rel_norm", "effective_rank", "intruders",
                  "intruder_min_sim"] + [f"sv_{i + 1}" for i in range(top_k)]
    summary = _summarise(rows)
    summary_cols = ["task", "method", "seed", "n_modules", "mean_rel_norm", "mean_effective_rank",
                    "total_intruders"]
    write_csv(weights_dir / "weights_layers.csv", layer_cols, rows)
    write_csv(weights_dir / "summary.csv", summary_cols, summary)
    settings = {"model": model, "top_k": top_k, "rank_threshold": rank_threshold,
                "intruder_k": intruder_k, "intruder_eps": intruder_eps, "modules": sorted(wanted)}
    by_task: dict[str, dict[str, dict]] = {}
    for r in summary:  # means over seeds, for the report
        by_task.setdefault(r["task"], {}).setdefault(r["method"], []).append(r)
    by_task = {t: {m: {"n_seeds": len(g), **{k: float(np.mean([r[k] for r in g])) for k in
                                             ("mean_rel_norm", "mean_effective_rank", "total_intruders")}}
                   for m, g in ms.items()} for t, ms in by_task.items()}
    atomic_write_json(weights_dir / "summary.json",
                      {"settings": settings, "summary": summary, "by_task": by_task})
    files = [weights_dir / n for n in ("weights_layers.csv", "summary.csv", "summary.json")]
    if figures:
        for task in sorted({r["task"] for r in rows}):
            path = weights_dir / "figures" / f"weights_by_layer_{task}.png"
            _plot(task, [r for r in rows if r["task"] == task], path)
            files.append(path)
    return {"summary": summary, "files": files}
