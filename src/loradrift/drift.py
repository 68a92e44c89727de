"""Phase 3a: representational drift of fine-tuned models relative to the base model.

Inputs (see docs/layout.md): the base representations ``<out>/base/<model>/<task>.safetensors``
and, per run, the snapshots ``<out>/runs/<model>/<task>/<method>/seed<S>/snapshots/``. Every
file holds one ``(n_probe, hidden)`` tensor per layer (``layer.0`` = embeddings), rows in
probe order, so row i of a snapshot and row i of the base come from the same probe example.

Drift of one layer is measured two ways, because they answer different questions:

* **CKA drift** ``1 - CKA(base, run)``: has the *geometry* of the representation changed?
  CKA ignores rotations and isotropic scaling, so a model that re-expresses the same
  information in a rotated basis shows no CKA drift.
* **Cosine drift** ``1 - mean_i cos(base_i, run_i)``: has each example's vector moved in the
  fixed coordinate system? It does see rotations (a later layer that reads the old
  coordinates would be surprised by them). ``cos_std`` is its spread over examples.

Outputs under ``<out>/drift/``:

* ``drift_layers.csv`` -- long table, one row per (task, method, seed, step, layer), at every
  snapshot step (temporal evolution) with ``is_final`` marking the run's last step. ``cka`` is
  always linear CKA (cheap enough for every step); at the final step ``drift_primary`` holds
  the drift under the chosen ``metric`` (linear, debiased or rbf CKA).
* ``comparison.csv`` / ``comparison.json`` -- per task, LoRA vs full FT at the final step:
  per-seed drift (the *aggregate*: mean over the transformer block outputs ``layer.1 ..
  layer.L-1``; see below), means over seeds, the drift reduction
  ``(mean FT drift - mean LoRA drift) / mean FT drift * 100`` (means over seeds, the one
  definition H2 uses), the embedding layer and the last layer shown separately, the noise floor,
  and the uncertainty statements below. A layer whose base vectors are constant over the probe
  set has undefined CKA, is NaN in ``drift_layers.csv`` and listed in ``cka_undefined_layers``.
  ``comparison.json`` maps task -> dict; ``loradrift.hypotheses`` feeds it to ``stats.h2_drift``.
* ``over_training.csv`` -- drift over training (:func:`training_curves`): per task, method and
  snapshot step, each seed's drift averaged over H2's layers, and its mean, min and max over seeds.
* ``figures/heatmap_<task>.png`` (layer x step drift, mean over seeds, per method),
  ``figures/over_training_<task>.png`` (``over_training.csv`` as lines with min-max bands) and
  ``figures/final_by_layer_<task>.png`` (final drift per layer, LoRA vs FT, min-max band
  over seeds).

Which layers enter the aggregate: ``layer.0`` is the embedding output, which LoRA on the block
projections cannot change but full FT does; the last entry of ``output_hidden_states`` is, for
decoders, the output *after the final norm*, whose gain full FT trains and LoRA cannot. Both would
favour LoRA by construction, so the aggregate is the mean over ``layer.1 .. layer.L-1`` (the
outputs of blocks 1 .. L-1) and the two ends are reported separately (``drift_layer0_*``,
``drift_last_*``).

Uncertainty:

* **Permutation test over seeds** (``perm_p``, secondary): is the FT-vs-LoRA difference larger
  than the run-to-run variation between training seeds? Every relabelling of the per-seed
  drifts is enumerated (3 + 3 seeds: C(6, 3) = 20), so **with 3 seeds per method the smallest
  attainable p is 1/20 = 0.05**. Larger designs use 100 000 random relabellings (seeded).
* **Probe-example jackknife** (``probe_var_log_ratio``, ``probe_ci``): how much does the result
  depend on which probe examples were drawn? Delete-one jackknife over probe rows (the same row
  left out of every run of the task), recomputing the configured CKA estimator, in float64; the
  variance of ``log(mean LoRA drift / mean FT drift)`` is added to the seed variance in H2's
  interval. Why not a bootstrap: resampling with replacement duplicates rows, and the debiased
  estimator (a U-statistic over distinct pairs) and the RBF bandwidth are not defined for
  duplicated rows; the jackknife is, for every estimator. A leave-one-out replicate whose drift
  ratio is undefined is not dropped: the variance is then NaN and ``probe_note`` says why.
* **Noise floor** (``noise_floor``): Phase 0 extracts the base model twice with different batch
  compositions (``base/<model>/<task>.floor.safetensors``); the aggregate drift between the two
  is the floor below which a drift is numerical noise. H2 is undetermined on a task whose full-FT
  drift is not well above it.

Speed: each snapshot file is read once (all layers together), the base side of CKA
(:class:`loradrift.similarity.BaseSide`) is built once per task.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from loradrift import layout
from loradrift.io import atomic_path, atomic_write_json, json_safe, write_csv
from loradrift.methods import FULL, LORA
from loradrift.representations import floor_path
from loradrift.similarity import BaseSide, cka_against_base, cosine_layers, debiased_cka, jackknife_cka, linear_cka, rbf_cka
from loradrift.stats import jackknife_variance, permutation_test, reduction_interval

__all__ = [
    "FULL",
    "LORA",
    "METRICS",
    "LAYER_COLUMNS",
    "COMPARISON_COLUMNS",
    "analyse_drift",
    "load_layers",
    "run_final_drift",
]

log = logging.getLogger(__name__)

METRICS = ("linear", "debiased", "rbf")

LAYER_COLUMNS = [
    "task",
    "method",
    "seed",
    "step",
    "is_final",
    "layer",
    "cka",
    "drift_cka",
    "cos_mean",
    "cos_std",
    "drift_cos",
    "drift_primary",
]
COMPARISON_COLUMNS = [
    "task",
    "primary_metric",
    "aggregate_layers",
    "n_seeds_full",
    "n_seeds_lora",
    "drift_full",
    "drift_full_sd",
    "drift_lora",
    "drift_lora_sd",
    "reduction_pct",
    "noise_floor",
    "probe_var_log_ratio",
    "probe_ci_lo",
    "probe_ci_hi",
    "perm_p",
    "perm_n_relabellings",
    "drift_layer0_full",
    "drift_layer0_lora",
    "drift_last_full",
    "drift_last_lora",
    "cos_drift_full",
    "cos_drift_lora",
    "cos_reduction_pct",
    "cka_undefined_layers",
]

# Exact enumeration of relabellings up to this many (C(16, 8) = 12870); beyond, Monte Carlo.
_SEED_DIR = layout.SEED_DIR
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
_LAYER_KEY = re.compile(r"^layer\.(\d+)$")


# --------------------------------------------------------------------------
# reading the on-disk layout
# --------------------------------------------------------------------------


def load_layers(path: Path) -> list[np.ndarray]:
    """All layers of a representation file as float32 arrays, in layer order.

    Read through torch so bfloat16/float16 files work too. Raises ValueError (naming the file)
    when the keys are not exactly ``layer.0 .. layer.L``.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        idx = {}
        for k in keys:
            m = _LAYER_KEY.match(k)
            if not m:
                raise ValueError(f"{path}: unexpected tensor {k!r} (expected only layer.<i> keys)")
            idx[int(m.group(1))] = k
        if sorted(idx) != list(range(len(idx))) or not idx:
            raise ValueError(f"{path}: layer keys are not layer.0..layer.L: {sorted(idx)}")
        layers = []
        for i in range(len(idx)):
            t = f.get_tensor(idx[i])
            if t.ndim != 2:
                raise ValueError(f"{path}: layer.{i} must be 2-D (n, hidden), got {tuple(t.shape)}")
            layers.append(t.to(torch.float32).numpy())
    return layers


def _check_like_base(layers: list[np.ndarray], base: list[np.ndarray], path: Path, base_path: Path) -> None:
    if len(layers) != len(base):
        raise ValueError(f"{path}: has {len(layers)} layers but base {base_path} has {len(base)}")
    for i, (a, b) in enumerate(zip(layers, base)):
        if a.shape != b.shape:
            raise ValueError(
                f"{path}: layer.{i} has shape {a.shape} (n, d) but base {base_path} has {b.shape}; "
                "was it extracted with a different probe set or model?"
            )


@dataclass(frozen=True)
class _Run:
    method: str
    seed: int
    path: Path
    snapshots: tuple[tuple[int, Path], ...]  # (step, file), ascending step

    @property
    def final_step(self) -> int:
        return self.snapshots[-1][0]


def _list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) pairs. index.json is the authority; missing files are warned about."""
    snap_dir = layout.run_path(run_dir, "snapshots")
    on_disk = {}
    if snap_dir.is_dir():
        for p in snap_dir.iterdir():
            m = _STEP_FILE.match(p.name)
            if m:
                on_disk[int(m.group(1))] = p
    index = layout.run_path(run_dir, "snapshot_index")
    if not index.exists():
        if on_disk:
            log.warning("%s: no index.json; using the %d snapshot files found", snap_dir, len(on_disk))
        return sorted(on_disk.items())
    steps = [int(s) for s in json.loads(index.read_text()).get("steps", [])]
    missing = [s for s in steps if s not in on_disk]
    if missing:
        log.warning("%s: snapshot files missing for steps %s; skipping them", snap_dir, missing)
    return sorted((s, on_disk[s]) for s in set(steps) if s in on_disk)


def _find_runs(task_dir: Path, methods: Sequence[str]) -> list[_Run]:
    runs = []
    seeds_seen: set[int] = set()
    per_method: dict[str, set[int]] = {m: set() for m in methods}
    for method in methods:
        mdir = task_dir / method
        if not mdir.is_dir():
            continue
        for sdir in sorted(mdir.iterdir()):
            m = _SEED_DIR.match(sdir.name)
            if not (m and sdir.is_dir()):
                continue
            seed = int(m.group(1))
            seeds_seen.add(seed)
            snaps = _list_snapshots(sdir)
            if not snaps:
                log.warning("%s: no snapshots; skipping this run", sdir)
                continue
            if not layout.run_path(sdir, "result").exists():
                log.warning("%s: no result.json (unfinished run?); its last snapshot, step %d, is treated as final", sdir, snaps[-1][0])
            per_method[method].add(seed)
            runs.append(_Run(method, seed, sdir, tuple(snaps)))
    missing = [f"{m}/seed{s}" for m in methods for s in sorted(seeds_seen) if s not in per_method[m]]
    if missing:
        log.warning("%s: missing or empty runs: %s", task_dir, ", ".join(missing))
    return sorted(runs, key=lambda r: (methods.index(r.method), r.seed))


def _discover_tasks(out_dir: Path, model: str) -> list[str]:
    names = {p.stem for p in layout.base_file(out_dir, model, "*").parent.glob("*.safetensors") if not p.name.endswith(layout.FLOOR_SUFFIX)}
    runs_dir = layout.runs_dir(out_dir, model)
    if runs_dir.is_dir():
        names |= {p.name for p in runs_dir.iterdir() if p.is_dir()}
    return sorted(names)


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------


def _reduction_pct(ft: float, lora: float) -> float:
    # Undefined (not +-inf) when FT did not drift at all.
    return float(100.0 * (ft - lora) / ft) if ft > 0 else float("nan")


# --------------------------------------------------------------------------
# per-task analysis
# --------------------------------------------------------------------------


def _primary_drift(metric: str, base: list[np.ndarray], layers: list[np.ndarray], cka: np.ndarray, sigma_frac: float) -> np.ndarray:
    if metric == "linear":
        return 1.0 - cka
    fn = debiased_cka if metric == "debiased" else (lambda x, y: rbf_cka(x, y, sigma_frac=sigma_frac))

    def drift(x: np.ndarray, y: np.ndarray) -> float:
        # A tuned layer with almost no spread over the probe set (full FT's embedding output under
        # last-token pooling, where nearly every probe ends with the same token) can have a
        # non-positive unbiased HSIC: CKA is undefined there, as it is for such a base layer.
        try:
            return 1.0 - fn(x, y)
        except ValueError as e:
            log.warning("drift: %s; that layer's drift is left undefined (NaN)", e)
            return float("nan")

    return np.array([drift(x, y) for x, y in zip(base, layers)])


def aggregate_layers(n_layers: int) -> list[int]:
    """The layers H2's aggregate averages: the block outputs ``1 .. L-1`` of ``layer.0 .. layer.L``
    (module docstring). Models with fewer than 3 entries have no such layer: all are used."""
    return list(range(1, n_layers - 1)) if n_layers >= 3 else list(range(n_layers))


def _defined_layers(base: list[np.ndarray], base_path: Path, task: str) -> tuple[list[int], list[int]]:
    """(layers where CKA is defined, the layers of H2's aggregate among them).

    A layer whose base vectors are identical for every probe example has no variance, and CKA
    against it is undefined (0/0). It happens at the embedding layer with last-token pooling
    when every probe input ends with the same token (RTE's hypotheses all end in "."). Such
    layers get NaN CKA and are left out of every drift mean, for all runs alike."""
    defined = [i for i, x in enumerate(base) if not np.all(x == x[:1])]
    if not defined:
        raise ValueError(
            f"task {task}: every layer of {base_path} is constant over the probe set; CKA is undefined (check the probe inputs and model.pooling)"
        )
    agg = [i for i in aggregate_layers(len(base)) if i in defined]
    if not agg:
        raise ValueError(f"task {task}: every block-output layer of {base_path} is constant over the probe set")
    return defined, agg


def run_final_drift(base_path: Path, run_dir: Path, metric: str = "debiased", sigma_frac: float = 1.0, task: str = "") -> dict[str, Any]:
    """The final-step drift of one run against the base file, as :func:`analyse_drift` computes it
    for H2: ``per_layer`` (``1 - CKA`` under ``metric``, NaN where CKA is undefined), ``aggregate``
    (the mean over the same layers H2 averages) and the final ``step``. For runs outside the
    study's grid (the rank ablation), which ``analyse_drift`` does not walk."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    snaps = _list_snapshots(Path(run_dir))
    if not snaps:
        raise FileNotFoundError(f"{run_dir}: no representation snapshots (was the run trained with probe.enabled?)")
    step, path = snaps[-1]
    base = load_layers(base_path)
    layers = load_layers(path)
    _check_like_base(layers, base, path, Path(base_path))
    defined, agg = _defined_layers(base, Path(base_path), task or str(run_dir))
    base_d, layers_d = [base[i] for i in defined], [layers[i] for i in defined]
    per_layer = np.full(len(base), np.nan)
    per_layer[defined] = _primary_drift(metric, base_d, layers_d, cka_against_base(BaseSide(base_d), layers_d), sigma_frac)
    return {"step": step, "per_layer": [float(v) for v in per_layer], "aggregate": float(per_layer[agg].mean()), "aggregate_layers": agg}


def _analyse_task(
    out_dir: Path, model: str, task: str, methods: Sequence[str], metric: str, sigma_frac: float, ci: float, jackknife: bool
) -> tuple[list[dict], dict | None]:
    runs = _find_runs(layout.runs_dir(out_dir, model, task), methods)
    if not runs:
        log.warning("task %s: no runs with snapshots under %s; skipping", task, layout.runs_dir(out_dir, model, task))
        return [], None
    base_path = layout.base_file(out_dir, model, task)
    if not base_path.exists():
        raise ValueError(f"task {task}: base representation file {base_path} is missing but there are {len(runs)} runs to compare against it")
    base = load_layers(base_path)
    defined, agg = _defined_layers(base, base_path, task)
    undefined = [i for i in range(len(base)) if i not in defined]
    if undefined:
        log.warning(
            "task %s: layer(s) %s are constant over the probe set in the base model; CKA is undefined there, so they are left out of the drift means",
            task,
            undefined,
        )
    base_d = [base[i] for i in defined]
    base_side = BaseSide(base_d)
    compare = {r.method for r in runs} >= {FULL, LORA}
    base_agg = [base[i] for i in agg]

    rows: list[dict] = []
    final: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        for step, path in run.snapshots:
            layers = load_layers(path)
            _check_like_base(layers, base, path, base_path)
            layers_d = [layers[i] for i in defined]
            cka_d = cka_against_base(base_side, layers_d)
            cka = np.full(len(base), np.nan)
            cka[defined] = cka_d
            cos = cosine_layers(base, layers)
            is_final = step == run.final_step
            if is_final:
                primary = np.full(len(base), np.nan)
                primary[defined] = _primary_drift(metric, base_d, layers_d, cka_d, sigma_frac)
            for i in range(len(base)):
                rows.append(
                    {
                        "task": task,
                        "method": run.method,
                        "seed": run.seed,
                        "step": step,
                        "is_final": int(is_final),
                        "layer": i,
                        "cka": cka[i],
                        "drift_cka": 1.0 - cka[i],
                        "cos_mean": cos[i].mean(),
                        "cos_std": cos[i].std(),
                        "drift_cos": 1.0 - cos[i].mean(),
                        "drift_primary": primary[i] if is_final else "",
                    }
                )
            if is_final:
                final[(run.method, run.seed)] = {
                    "step": step,
                    "drift": float(primary[agg].mean()),
                    "layer0": float(primary[0]),
                    "last": float(primary[-1]),
                    "drift_cos": float(1.0 - cos[agg].mean(axis=1).mean()),
                    "jack": (
                        (1.0 - jackknife_cka(metric, base_agg, [layers[i] for i in agg], sigma_frac)).mean(axis=1) if compare and jackknife else None
                    ),
                }
    if not compare:
        log.warning("task %s: needs both %r and %r runs for the comparison; have %s", task, FULL, LORA, sorted({r.method for r in runs}))
        return rows, None
    comp = _compare(task, metric, final, ci, model)
    comp["aggregate_layers"] = f"{agg[0]}..{agg[-1]}" if agg == list(range(agg[0], agg[-1] + 1)) else " ".join(map(str, agg))
    comp["cka_undefined_layers"] = undefined
    fpath = floor_path(base_path)
    if fpath.exists():
        again = load_layers(fpath)
        _check_like_base(again, base, fpath, base_path)
        # |.|: the debiased estimator can put two equal representations a hair above CKA = 1
        comp["noise_floor"] = float(
            np.abs(
                _primary_drift(
                    metric, base_agg, [again[i] for i in agg], np.array([linear_cka(x, again[i]) for x, i in zip(base_agg, agg)]), sigma_frac
                )
            ).mean()
        )
    else:
        comp["noise_floor"] = None
        log.warning("task %s: no noise-floor extraction %s (rerun extract-base); H2 will be undetermined", task, fpath)
    return rows, comp


def _compare(task: str, metric: str, final: dict, ci: float, model: str) -> dict:
    by = {m: {s: v for (mm, s), v in sorted(final.items()) if mm == m} for m in (FULL, LORA)}
    d_ft = {str(s): v["drift"] for s, v in by[FULL].items()}
    d_lo = {str(s): v["drift"] for s, v in by[LORA].items()}
    ft_mean, lo_mean = float(np.mean(list(d_ft.values()))), float(np.mean(list(d_lo.values())))
    cos_ft = float(np.mean([v["drift_cos"] for v in by[FULL].values()]))
    cos_lo = float(np.mean([v["drift_cos"] for v in by[LORA].values()]))
    p, n_rel, kind = permutation_test(list(d_ft.values()), list(d_lo.values()))
    mean_of = lambda m, k: float(np.mean([v[k] for v in by[m].values()]))  # noqa: E731
    res: dict[str, Any] = {
        "model": model,
        "primary_metric": metric,
        "final_step_full_by_seed": {str(s): v["step"] for s, v in by[FULL].items()},
        "final_step_lora_by_seed": {str(s): v["step"] for s, v in by[LORA].items()},
        "drift_full_by_seed": d_ft,
        "drift_lora_by_seed": d_lo,
        "drift_full": ft_mean,
        "drift_full_sd": float(np.std(list(d_ft.values()), ddof=1)) if len(d_ft) > 1 else float("nan"),
        "drift_lora": lo_mean,
        "drift_lora_sd": float(np.std(list(d_lo.values()), ddof=1)) if len(d_lo) > 1 else float("nan"),
        "reduction_pct": _reduction_pct(ft_mean, lo_mean),
        "drift_layer0_full": mean_of(FULL, "layer0"),
        "drift_layer0_lora": mean_of(LORA, "layer0"),
        "drift_last_full": mean_of(FULL, "last"),
        "drift_last_lora": mean_of(LORA, "last"),
        "perm_p": p,
        "perm_n_relabellings": n_rel,
        "perm_kind": kind,
        "perm_min_p": 1.0 / n_rel if kind == "exact" else 1.0 / (n_rel + 1),
        "probe_var_log_ratio": None,
        "probe_ci": [None, None],
        "probe_metric": metric,
        "ci_level": ci,
        "cos_drift_full": cos_ft,
        "cos_drift_lora": cos_lo,
        "cos_reduction_pct": _reduction_pct(cos_ft, cos_lo),
    }
    jf = [v["jack"] for v in by[FULL].values()]
    jl = [v["jack"] for v in by[LORA].values()]
    if all(j is not None for j in jf + jl):
        mf, ml = np.mean(jf, axis=0), np.mean(jl, axis=0)  # per left-out row, mean over seeds
        if np.all(mf > 0) and np.all(ml > 0):
            var = jackknife_variance(np.log(ml / mf))
            res["probe_var_log_ratio"] = var
            if ft_mean > 0 and lo_mean > 0:
                res["probe_ci"] = reduction_interval(ft_mean, lo_mean, var, ci)
        else:
            res["probe_note"] = (
                "a leave-one-out mean drift is <= 0, so the log ratio is undefined there; "
                "the probe variance is not computed (no replicate is dropped)"
            )
    return res


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _comparison_row(task: str, c: dict) -> dict:
    return {
        "task": task,
        "primary_metric": c["primary_metric"],
        "n_seeds_full": len(c["drift_full_by_seed"]),
        "n_seeds_lora": len(c["drift_lora_by_seed"]),
        "probe_ci_lo": c["probe_ci"][0],
        "probe_ci_hi": c["probe_ci"][1],
        **{k: c[k] for k in COMPARISON_COLUMNS if k in c},
        "cka_undefined_layers": " ".join(str(i) for i in c.get("cka_undefined_layers", [])),
    }


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


CURVE_DRIFTS = [("drift_cka", "1 - linear CKA"), ("drift_cos", "1 - mean cosine")]
CURVE_COLUMNS = ["task", "method", "drift", "step", "mean", "min", "max", "n_seeds"]


def training_curves(rows: list[dict]) -> list[dict]:
    """Drift over training: per task, method, drift (linear CKA and cosine, the two computed at
    every snapshot; the primary estimator is computed at the final step only) and step, the drift
    of each seed averaged over H2's layers (the block outputs, `aggregate_layers`; undefined
    layers left out), then its mean, min and max over the seeds that have that step."""
    n_layers: dict[str, int] = {}
    for r in rows:
        n_layers[r["task"]] = max(n_layers.get(r["task"], 0), r["layer"] + 1)
    agg = {t: set(aggregate_layers(n)) for t, n in n_layers.items()}
    per: dict[tuple, dict[int, list[float]]] = {}  # (task, method, drift, step) -> seed -> layer drifts
    for r in rows:
        if r["layer"] not in agg[r["task"]]:
            continue
        for col, _ in CURVE_DRIFTS:
            v = r[col]
            if v is not None and np.isfinite(v):
                per.setdefault((r["task"], r["method"], col, r["step"]), {}).setdefault(r["seed"], []).append(float(v))
    out = []
    for (task, method, col, step), by_seed in sorted(per.items()):
        runs = [float(np.mean(v)) for v in by_seed.values()]
        out.append(
            {
                "task": task,
                "method": method,
                "drift": col,
                "step": step,
                "mean": float(np.mean(runs)),
                "min": min(runs),
                "max": max(runs),
                "n_seeds": len(runs),
            }
        )
    return out


def _plot_task(task: str, rows: list[dict], curves: list[dict], methods: Sequence[str], metric: str, fig_dir: Path) -> list[Path]:
    # Figure (not pyplot) keeps matplotlib's global state and backend out of the library.
    from matplotlib.figure import Figure

    present = [m for m in methods if any(r["method"] == m for r in rows)]
    layers = sorted({r["layer"] for r in rows})
    paths = []

    fig = Figure(figsize=(4.5 * len(present), 7), layout="constrained")
    axes = fig.subplots(2, len(present), squeeze=False)
    for row, (col, label) in enumerate([("drift_cka", "1 - linear CKA"), ("drift_cos", "1 - mean cosine")]):
        grids = {}
        for m in present:
            steps = sorted({r["step"] for r in rows if r["method"] == m})
            acc = np.zeros((len(layers), len(steps)))
            cnt = np.zeros_like(acc)
            for r in rows:
                if r["method"] == m:
                    j = steps.index(r["step"])
                    acc[r["layer"], j] += r[col]
                    cnt[r["layer"], j] += 1
            with np.errstate(invalid="ignore"):
                grids[m] = (steps, acc / cnt)  # mean over seeds; NaN where no seed has that step
        vmax = max(float(np.nanmax(g)) for _, g in grids.values()) or 1.0
        for k, m in enumerate(present):
            steps, g = grids[m]
            ax = axes[row][k]
            im = ax.imshow(g, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
            ax.set_xlabel("step")
            ax.set_ylabel("layer")
            ax.set_title(f"{task} / {m}: {label}", fontsize=9)
        fig.colorbar(im, ax=list(axes[row]), shrink=0.8, label=label)
    paths.append(fig_dir / f"heatmap_{task}.png")
    _save_figure(fig, paths[-1])

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for m in present:
        per_seed = {}
        for r in rows:
            if r["method"] == m and r["is_final"]:
                per_seed.setdefault(r["seed"], np.full(len(layers), np.nan))[r["layer"]] = r["drift_primary"]
        arr = np.array(list(per_seed.values()))
        (line,) = ax.plot(layers, arr.mean(axis=0), marker="o", ms=3, label=f"{m} (n={len(arr)} seeds)")
        ax.fill_between(layers, arr.min(axis=0), arr.max(axis=0), color=line.get_color(), alpha=0.25, linewidth=0)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"final drift (1 - {metric} CKA)")
    ax.set_title(f"{task}: final drift by layer (band = min-max over seeds)", fontsize=9)
    ax.legend()
    paths.append(fig_dir / f"final_by_layer_{task}.png")
    _save_figure(fig, paths[-1])

    # Drift over training (`curves`, from training_curves): line = mean over seeds, band = min-max.
    fig = Figure(figsize=(4.5 * 2, 3.6), layout="constrained")
    for ax, (col, label) in zip(fig.subplots(1, 2), CURVE_DRIFTS):
        for m in present:
            c = [r for r in curves if r["method"] == m and r["drift"] == col]
            (line,) = ax.plot(
                [r["step"] for r in c], [r["mean"] for r in c], marker="o", ms=3, label=f"{m} (n={max((r['n_seeds'] for r in c), default=0)} seeds)"
            )
            ax.fill_between([r["step"] for r in c], [r["min"] for r in c], [r["max"] for r in c], color=line.get_color(), alpha=0.25, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{label}, mean over block outputs")
        ax.set_title(f"{task}: {label} over training", fontsize=9)
        ax.legend(fontsize=8)
    paths.append(fig_dir / f"over_training_{task}.png")
    _save_figure(fig, paths[-1])
    return paths


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def analyse_drift(
    out_dir: str | Path,
    model: str,
    tasks: Sequence[str] | str | None = None,
    methods: Sequence[str] = (FULL, LORA),
    *,
    metric: str = "debiased",
    rbf_sigma_frac: float = 1.0,
    jackknife: bool = True,
    ci: float = 0.95,
    figures: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Compute drift tables, the LoRA-vs-FT comparison and figures; write them under ``<out>/drift``.

    ``tasks``: names, or None / ``"all"`` for every task with a base file or runs.
    ``metric``: CKA variant for the final-step (primary) drift: ``"linear"``, ``"debiased"``
    or ``"rbf"`` (bandwidth ``rbf_sigma_frac`` x median distance). ``jackknife=False`` skips the
    probe-example jackknife (``probe_var_log_ratio`` is then null). ``progress(tasks_done, tasks)``
    after each task. Returns ``{"comparison": {task: {...}}, "files": [...]}``.

    Raises ValueError when a task has runs but no base file, or a snapshot's layers do not
    match the base's shapes; missing runs/snapshots are skipped with a warning.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    out_dir = Path(out_dir)
    methods = list(methods)
    if tasks is None or tasks == "all":
        tasks = _discover_tasks(out_dir, model)
    elif isinstance(tasks, str):
        tasks = [tasks]
    drift_dir = layout.path(out_dir, "drift")

    all_rows: list[dict] = []
    all_curves: list[dict] = []
    comparison: dict[str, dict] = {}
    files: list[Path] = []
    for i, task in enumerate(tasks, 1):
        rows, comp = _analyse_task(out_dir, model, task, methods, metric, rbf_sigma_frac, ci, jackknife)
        curves = training_curves(rows)
        all_rows.extend(rows)
        all_curves.extend(curves)
        if comp is not None:
            comparison[task] = comp
        if rows and figures:
            files.extend(_plot_task(task, rows, curves, methods, metric, drift_dir / "figures"))
        if progress:
            progress(i, len(tasks))
    if not all_rows:
        log.warning("no drift rows for model %s, tasks %s; nothing written", model, list(tasks))
        return {"comparison": comparison, "files": files}

    write_csv(drift_dir / "drift_layers.csv", LAYER_COLUMNS, all_rows)
    write_csv(drift_dir / "over_training.csv", CURVE_COLUMNS, all_curves)
    write_csv(drift_dir / "comparison.csv", COMPARISON_COLUMNS, [_comparison_row(t, c) for t, c in comparison.items()])
    atomic_write_json(drift_dir / "comparison.json", json_safe(comparison))
    files = [drift_dir / "drift_layers.csv", drift_dir / "over_training.csv", drift_dir / "comparison.csv", drift_dir / "comparison.json", *files]
    return {"comparison": comparison, "files": files}
