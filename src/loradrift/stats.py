"""Pre-registered hypothesis tests for the LoRA-vs-full-fine-tuning study.

Pure functions on plain numbers (no torch), so the analysis can be re-run from the
saved result files alone.

Hypotheses (thresholds are the pre-registered defaults):

* **H1 performance** -- relative gap ``(FT - LoRA) / FT * 100`` per seed, per task and
  pooled over tasks.  Supported when the upper bound of the 95% bootstrap CI of the
  mean gap is ``<= 3`` (%).  One-sided one-sample t-test of H0: gap >= 3.
* **H2 drift** -- drift reduction ``(drift_FT - drift_LoRA) / drift_FT * 100`` per seed.
  Supported when the CI's lower bound is ``>= 20`` (%).  t-test H0: reduction <= 20.
* **H3 serving** -- multi-adapter latency overhead vs the merged model in %, one value
  per repeated measurement round, at every batch size; the primary decision is at
  batch 8.  Supported when the CI's upper bound is ``<= 30`` (%).
* **Overall** -- ``H1 AND (H2 OR H3)``, with H1 and H2 decided on their *pooled*
  result and H3 on its primary batch size (see :func:`overall_verdict`).

Conventions and caveats
-----------------------
* Pairing: FT and LoRA values are paired by seed.  Pass either equal-length sequences
  in the same seed order, or two mappings ``{seed: value}`` (aligned by key).
* Decisions follow the pre-registration: they use the two-sided 95% bootstrap CI bound
  (which is a one-sided test at alpha = 0.025), not the t-test p-value.  The t-test,
  its Bonferroni/Holm-corrected p-values (:func:`correct`), Cohen's d and a power
  statement are reported alongside so readers can see how weak the evidence is.
* Bootstrap: ``scipy.stats.bootstrap`` of the mean, BCa by default with
  ``n_resamples=10_000`` and ``seed=0`` (``numpy.random.default_rng(seed)``), so results
  are reproducible.  BCa is undefined when all values are identical and unstable with
  very few distinct values; then the percentile method is used instead and the method
  actually used is recorded in ``ci_method``.
* **Small n.**  With 3 seeds there are only 10 distinct bootstrap resamples of the data
  (``C(2n-1, n)``), so the bootstrap CI is very coarse, can never extend beyond the
  observed min/max, and under-covers.  Every result with ``n < 10`` says so in
  ``notes`` and also gives the (much wider) t-based interval for comparison.
  Power of the t-test at n = 3 is very low: the minimum detectable effect at 80% power
  (one-sided alpha = 0.05) is about d = 2.3.
* Pooled results treat all task x seed values as exchangeable draws around one common
  mean (task heterogeneity is ignored, which makes the pooled CI narrower than a
  hierarchical analysis would).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np
from scipy import stats as _sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

__all__ = [
    "HypothesisResult",
    "relative_gap_pct",
    "drift_reduction_pct",
    "overhead_pct",
    "bootstrap_ci",
    "one_sided_ttest",
    "cohens_d",
    "power_note",
    "h1_performance",
    "h2_drift",
    "h3_serving",
    "correct",
    "combine_verdicts",
    "overall_verdict",
    "DEFAULT_N_RESAMPLES",
    "DEFAULT_SEED",
]

DEFAULT_N_RESAMPLES = 10_000
DEFAULT_SEED = 0
# Below this many values the bootstrap has so few distinct resamples that we warn.
_SMALL_N = 10
_MIN_N = 2

Paired = Union[Sequence[float], np.ndarray, Mapping[Any, float]]


@dataclass
class HypothesisResult:
    """One hypothesis evaluated on one scope (a task, ``'pooled'`` or ``'batch=8'``)."""

    name: str
    scope: str
    estimate: float
    ci_low: float
    ci_high: float
    ci_method: str
    threshold: float
    alternative: str  # 'less' or 'greater', as passed to scipy.stats.ttest_1samp
    p_value: float
    n: int
    supported: bool | None
    effect_size: float | None = None  # Cohen's d = (mean - threshold) / sd
    power: float | None = None  # t-test power at the observed effect, alpha = 0.05
    t_statistic: float | None = None
    primary: bool = False  # the scope that feeds overall_verdict
    p_bonferroni: float | None = None
    p_holm: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: NaN/inf become ``None`` (strict JSON has no NaN)."""
        return {k: _json_safe(v) for k, v in asdict(self).items()}


def _json_safe(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


# ---------------------------------------------------------------------------
# Per-seed quantities
# ---------------------------------------------------------------------------


def _pair(a: Paired, b: Paired, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    where = f" for {label!r}" if label else ""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise TypeError(f"pass both or neither as {{seed: value}} mappings{where}")
        if set(a) != set(b):
            raise ValueError(
                f"seeds differ{where}: only in first {sorted(set(a) - set(b), key=str)}, "
                f"only in second {sorted(set(b) - set(a), key=str)}"
            )
        keys = sorted(a, key=str)
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired arrays differ in length{where}: {x.size} vs {y.size}")
    if x.size == 0:
        raise ValueError(f"no values{where}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"non-finite value (failed run?){where}")
    return x, y


def _relative_pct(base: Paired, other: Paired, what: str, label: str | None) -> np.ndarray:
    x, y = _pair(base, other, label)
    # A non-positive reference would silently flip the sign of the relative change.
    if np.any(x <= 0):
        where = f" for {label!r}" if label else ""
        raise ValueError(f"{what} must be > 0{where}; got {x.tolist()}")
    return (x - y) / x * 100.0


def relative_gap_pct(ft: Paired, lora: Paired, *, label: str | None = None) -> np.ndarray:
    """Per-seed relative performance gap ``(FT - LoRA) / FT * 100``.

    Positive means LoRA is worse.  Raises ``ValueError`` (naming ``label``, e.g. the
    task) when an FT score is <= 0 or a value is missing/non-finite.
    """
    return _relative_pct(ft, lora, "FT score", label)


def drift_reduction_pct(
    ft_drift: Paired, lora_drift: Paired, *, label: str | None = None
) -> np.ndarray:
    """Per-seed drift reduction ``(drift_FT - drift_LoRA) / drift_FT * 100``.

    Positive means LoRA drifts less.  FT drift must be > 0.
    """
    return _relative_pct(ft_drift, lora_drift, "FT drift", label)


def overhead_pct(
    adapter_latencies: Paired, merged_latencies: Paired, *, label: str | None = None
) -> np.ndarray:
    """Per-round latency overhead of multi-adapter serving, ``(adapter - merged) / merged * 100``.

    Values are paired by measurement round (same round, same workload).
    """
    return -_relative_pct(merged_latencies, adapter_latencies, "merged latency", label)


# ---------------------------------------------------------------------------
# Inference primitives
# ---------------------------------------------------------------------------


def _values(values: Iterable[float]) -> np.ndarray:
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    x = x.ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite")
    return x


def bootstrap_ci(
    values: Iterable[float],
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_N_RESAMPLES,
    seed: int = DEFAULT_SEED,
    method: str = "BCa",
) -> tuple[float, float, str]:
    """Two-sided bootstrap CI of the mean: ``(low, high, method_used)``.

    Tries ``method`` (BCa by default) and falls back to ``'percentile'`` when BCa
    is undefined (all values identical, jackknife degenerate) -- scipy then warns and
    returns NaN.  With fewer than 2 values returns ``(nan, nan, 'none')``.

    With n = 3 there are only 10 distinct resamples, so the interval is coarse and
    confined to ``[min, max]`` of the data; see the module docstring.
    """
    x = _values(values)
    if x.size < _MIN_N:
        return math.nan, math.nan, "none"
    methods = [method] if method == "percentile" else [method, "percentile"]
    # BCa's acceleration is 0/0 with zero spread; skip straight to the fallback.
    if np.ptp(x) == 0:
        methods = ["percentile"]
    for m in methods:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = _sps.bootstrap(
                (x,),
                np.mean,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method=m,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        degenerate = any(issubclass(w.category, _sps.DegenerateDataWarning) for w in caught)
        if math.isfinite(lo) and math.isfinite(hi) and not degenerate:
            return lo, hi, m
    # Only reachable for pathological inputs; the percentile interval of constant data
    # is the constant itself.
    return float(x.min()), float(x.max()), "percentile"


def one_sided_ttest(values: Iterable[float], threshold: float, alternative: str) -> tuple[float, float]:
    """One-sample t-test of the mean against ``threshold``: ``(t, p)``.

    ``alternative='less'`` tests H1: mean < threshold (H0: mean >= threshold);
    ``'greater'`` the reverse.  With zero spread the t statistic is +-inf and ``p`` is
    0 or 1 (NaN if the mean equals the threshold), without scipy's precision warning.
    Fewer than 2 values give ``(nan, nan)``.
    """
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    x = _values(values)
    if x.size < _MIN_N:
        return math.nan, math.nan
    diff = float(x.mean()) - threshold
    if np.ptp(x) == 0:
        if diff == 0:
            return math.nan, math.nan
        t = math.copysign(math.inf, diff)
        on_h1_side = (diff < 0) == (alternative == "less")
        return t, 0.0 if on_h1_side else 1.0
    res = _sps.ttest_1samp(x, threshold, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def cohens_d(values: Iterable[float], threshold: float) -> float | None:
    """One-sample Cohen's d, ``(mean - threshold) / sd`` (sd with ddof=1).

    ``None`` when it is undefined (n < 2 or zero spread).
    """
    x = _values(values)
    if x.size < _MIN_N:
        return None
    sd = float(x.std(ddof=1))
    if sd == 0:
        return None
    return (float(x.mean()) - threshold) / sd


def _directional(d: float, alternative: str) -> float:
    # TTestPower's 'larger' wants a positive effect in the direction of H1.
    return -d if alternative == "less" else d


def _power(n: int, d: float | None, alternative: str, alpha: float) -> float | None:
    if d is None or n < _MIN_N:
        return None
    return float(
        TTestPower().power(
            effect_size=_directional(d, alternative), nobs=n, alpha=alpha, alternative="larger"
        )
    )


def _mde(n: int, alpha: float, power: float) -> float:
    return float(
        TTestPower().solve_power(
            effect_size=None, nobs=n, alpha=alpha, power=power, alternative="larger"
        )
    )


def power_note(
    n: int,
    effect: float | None,
    *,
    alternative: str = "less",
    alpha: float = 0.05,
    target_power: float = 0.8,
) -> str:
    """One-sentence power statement for a one-sided one-sample t-test with ``n`` values.

    ``effect`` is Cohen's d as returned by :func:`cohens_d` (signed; the sign that
    supports H1 depends on ``alternative``).  Uses ``statsmodels`` ``TTestPower``.
    """
    if n < _MIN_N:
        return f"n={n}: power cannot be computed (need at least {_MIN_N} values)."
    mde = _mde(n, alpha, target_power)
    head = f"n={n}, one-sided alpha={alpha:g}: "
    tail = f"minimum detectable effect at {target_power:.0%} power is d={mde:.2f}."
    if effect is None:
        return head + "observed effect undefined (zero spread); " + tail
    p = _power(n, effect, alternative, alpha)
    return head + f"power at the observed d={effect:.2f} is {p:.2f}; " + tail


# ---------------------------------------------------------------------------
# Hypotheses
# ---------------------------------------------------------------------------


def _evaluate(
    name: str,
    scope: str,
    values: np.ndarray,
    threshold: float,
    alternative: str,
    *,
    primary: bool,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> HypothesisResult:
    x = _values(values)
    n = int(x.size)
    notes: list[str] = []
    estimate = float(x.mean()) if n else math.nan
    lo, hi, method = bootstrap_ci(x, confidence, n_resamples, seed)
    t, p = one_sided_ttest(x, threshold, alternative)
    d = cohens_d(x, threshold)

    if n < _MIN_N:
        supported = None
        notes.append(f"undecidable: n={n} value(s); need at least {_MIN_N} for a CI or test")
    else:
        bound = hi if alternative == "less" else lo
        ok = bound <= threshold if alternative == "less" else bound >= threshold
        supported = bool(ok) if math.isfinite(bound) else None
        notes.append(
            f"bootstrap {method} CI, {n_resamples} resamples, rng seed {seed}, "
            f"confidence {confidence:g}"
        )
        if method != "BCa":
            notes.append("BCa undefined for these values (too few distinct); used percentile")
        if d is None:
            notes.append("zero spread across values: CI collapses to a point, d undefined")
        if n < _SMALL_N:
            distinct = math.comb(2 * n - 1, n)
            if d is None:
                tlo = thi = estimate
            else:
                tlo, thi = _sps.t.interval(confidence, n - 1, loc=estimate, scale=_sps.sem(x))
            notes.append(
                f"n={n}: only {distinct} distinct bootstrap resamples; the CI is coarse, "
                f"cannot exceed the data range and under-covers "
                f"(t-based {confidence:.0%} CI for comparison: [{tlo:.3g}, {thi:.3g}])"
            )
    notes.append(power_note(n, d, alternative=alternative))

    return HypothesisResult(
        name=name,
        scope=scope,
        estimate=estimate,
        ci_low=lo,
        ci_high=hi,
        ci_method=method,
        threshold=float(threshold),
        alternative=alternative,
        p_value=p,
        n=n,
        supported=supported,
        effect_size=d,
        power=_power(n, d, alternative, 0.05),
        t_statistic=None if math.isnan(t) else t,
        primary=primary,
        notes=notes,
    )


def _paired_hypothesis(
    name: str,
    base_by_task: Mapping[str, Paired],
    other_by_task: Mapping[str, Paired],
    per_seed,
    threshold: float,
    alternative: str,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> list[HypothesisResult]:
    if set(base_by_task) != set(other_by_task):
        raise ValueError(
            f"{name}: task sets differ: {sorted(base_by_task)} vs {sorted(other_by_task)}"
        )
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    out: list[HypothesisResult] = []
    pooled: list[np.ndarray] = []
    for task in sorted(base_by_task):
        v = per_seed(base_by_task[task], other_by_task[task], label=task)
        pooled.append(v)
        out.append(_evaluate(name, task, v, threshold, alternative, primary=False, **kw))
    if not pooled:
        raise ValueError(f"{name}: no tasks given")
    res = _evaluate(
        name, "pooled", np.concatenate(pooled), threshold, alternative, primary=True, **kw
    )
    res.notes.insert(0, "pooled over task x seed values, treated as exchangeable")
    out.append(res)
    return out


def h1_performance(
    ft_scores_by_task: Mapping[str, Paired],
    lora_scores_by_task: Mapping[str, Paired],
    threshold: float = 3.0,
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_N_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[HypothesisResult]:
    """H1: LoRA's relative gap to FT is below ``threshold`` %.

    Inputs: ``{task: per-seed scores}`` for FT and LoRA (same tasks; per task either
    equal-length sequences in seed order or ``{seed: score}`` mappings).  Scores are
    higher-is-better metrics on any scale (the gap is relative).  Returns one result
    per task (sorted by name) followed by the primary ``'pooled'`` result.
    """
    return _paired_hypothesis(
        "H1", ft_scores_by_task, lora_scores_by_task, relative_gap_pct,
        threshold, "less", confidence, n_resamples, seed,
    )


def h2_drift(
    ft_drift_by_task: Mapping[str, Paired],
    lora_drift_by_task: Mapping[str, Paired],
    threshold: float = 20.0,
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_N_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[HypothesisResult]:
    """H2: LoRA reduces representational drift by at least ``threshold`` %.

    Inputs as :func:`h1_performance`, with drift values (>= 0, FT drift > 0).  Returns
    per-task results followed by the primary ``'pooled'`` result.
    """
    return _paired_hypothesis(
        "H2", ft_drift_by_task, lora_drift_by_task, drift_reduction_pct,
        threshold, "greater", confidence, n_resamples, seed,
    )


def h3_serving(
    overhead_by_batch: Mapping[int, Iterable[float]],
    primary_batch: int = 8,
    threshold: float = 30.0,
    *,
    label: str | None = None,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_N_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[HypothesisResult]:
    """H3: multi-adapter serving overhead vs the merged model is below ``threshold`` %.

    Input: ``{batch_size: per-round overhead %}`` (see :func:`overhead_pct`).  One result
    per batch size, ascending, with scope ``'batch=<b>'`` (prefixed ``'<label>/'`` when
    ``label`` is given, e.g. to evaluate several serving configs separately); the one at
    ``primary_batch`` is marked ``primary``.  The CI is over repeated measurement rounds,
    so it reflects run-to-run noise on one machine, not between-machine variation.
    """
    if primary_batch not in overhead_by_batch:
        raise ValueError(
            f"H3: primary batch size {primary_batch} not measured; have {sorted(overhead_by_batch)}"
        )
    kw = dict(confidence=confidence, n_resamples=n_resamples, seed=seed)
    prefix = f"{label}/" if label else ""
    return [
        _evaluate(
            "H3", f"{prefix}batch={b}", _values(overhead_by_batch[b]), threshold, "less",
            primary=(b == primary_batch), **kw,
        )
        for b in sorted(overhead_by_batch)
    ]


# ---------------------------------------------------------------------------
# Family-wise correction and verdict
# ---------------------------------------------------------------------------


def correct(results: Sequence[HypothesisResult]) -> list[HypothesisResult]:
    """Fill ``p_bonferroni`` and ``p_holm`` over the whole family ``results`` (in place).

    The family is exactly what is passed in: pass every reported test (all tasks, pooled
    and batch sizes) for the conservative correction, or only the primary results.
    Results with an undefined p-value (n < 2) are left out of the family and keep
    ``None``.  Uses ``statsmodels.stats.multitest.multipletests``.
    """
    idx = [i for i, r in enumerate(results) if r.p_value is not None and math.isfinite(r.p_value)]
    if idx:
        p = np.array([results[i].p_value for i in idx], dtype=float)
        bonf = multipletests(p, method="bonferroni")[1]
        holm = multipletests(p, method="holm")[1]
        for j, i in enumerate(idx):
            results[i].p_bonferroni = float(bonf[j])
            results[i].p_holm = float(holm[j])
    return list(results)


def _and(a: bool | None, b: bool | None) -> bool | None:
    # Kleene logic: a definite False decides, otherwise unknown propagates.
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def _or(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def combine_verdicts(h1: bool | None, h2: bool | None, h3: bool | None) -> bool | None:
    """``H1 AND (H2 OR H3)`` in three-valued logic (``None`` = undecidable)."""
    return _and(h1, _or(h2, h3))


def _primary(results: HypothesisResult | Sequence[HypothesisResult], name: str) -> HypothesisResult:
    if isinstance(results, HypothesisResult):
        return results
    prim = [r for r in results if r.primary]
    if len(prim) != 1:
        raise ValueError(f"{name}: expected exactly one primary result, found {len(prim)}")
    return prim[0]


def overall_verdict(
    h1: HypothesisResult | Sequence[HypothesisResult],
    h2: HypothesisResult | Sequence[HypothesisResult],
    h3: HypothesisResult | Sequence[HypothesisResult],
) -> dict[str, Any]:
    """Overall decision ``H1 AND (H2 OR H3)``.

    Each argument is the list returned by the corresponding ``h*`` function (or a single
    result).  The decision uses the primary result of each: pooled for H1 and H2, the
    primary batch size for H3.  Per-scope verdicts are reported but do not enter the
    decision.  ``None`` means undecidable and propagates per three-valued logic.
    """
    p1, p2, p3 = _primary(h1, "H1"), _primary(h2, "H2"), _primary(h3, "H3")

    def by_scope(rs) -> dict[str, bool | None]:
        rs = [rs] if isinstance(rs, HypothesisResult) else rs
        return {r.scope: r.supported for r in rs}

    return {
        "rule": "H1 AND (H2 OR H3)",
        "H1": p1.supported,
        "H2": p2.supported,
        "H3": p3.supported,
        "overall": combine_verdicts(p1.supported, p2.supported, p3.supported),
        "primary_scopes": {"H1": p1.scope, "H2": p2.scope, "H3": p3.scope},
        "by_scope": {"H1": by_scope(h1), "H2": by_scope(h2), "H3": by_scope(h3)},
    }
