import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from loradrift import stats as S

TASKS = ["mrpc", "sst2", "rte", "squad_v2"]


def _scores(gap_frac, noise_sd, seed):
    rng = np.random.default_rng(seed)
    ft = {t: 0.90 + rng.normal(0, noise_sd, 3) for t in TASKS}
    lora = {t: ft[t] * (1 - gap_frac) + rng.normal(0, noise_sd, 3) for t in TASKS}
    return ft, lora


def _pooled(results):
    (p,) = [r for r in results if r.primary]
    assert p.scope == "pooled"
    return p


# --- per-seed quantities ----------------------------------------------------


def test_relative_quantities():
    np.testing.assert_allclose(S.relative_gap_pct([0.9, 0.8], [0.81, 0.8]), [10.0, 0.0])
    np.testing.assert_allclose(S.drift_reduction_pct([2.0], [1.0]), [50.0])
    np.testing.assert_allclose(S.overhead_pct([1.2, 1.5], [1.0, 1.0]), [20.0, 50.0])


def test_pairing_by_seed_mapping():
    ft = {0: 0.9, 1: 0.8, 2: 1.0}
    lora = {2: 0.9, 0: 0.9, 1: 0.8}  # different insertion order on purpose
    np.testing.assert_allclose(S.relative_gap_pct(ft, lora), [0.0, 0.0, 10.0])
    with pytest.raises(ValueError, match="seeds differ"):
        S.relative_gap_pct({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0})


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="length"):
        S.relative_gap_pct([0.9, 0.9], [0.9])


def test_zero_ft_score_names_task():
    ft = {"mrpc": [0.9, 0.9, 0.9], "rte": [0.7, 0.0, 0.7]}
    lora = {"mrpc": [0.9, 0.9, 0.9], "rte": [0.7, 0.7, 0.7]}
    with pytest.raises(ValueError, match="rte"):
        S.h1_performance(ft, lora)


def test_nan_score_names_task():
    with pytest.raises(ValueError, match="sst2"):
        S.h1_performance({"sst2": [0.9, np.nan]}, {"sst2": [0.9, 0.9]})


# --- primitives -------------------------------------------------------------


def test_ttest_matches_hand_computation():
    x = np.array([1.0, 2.0, 4.0])
    thr = 3.0
    t_hand = (x.mean() - thr) / (x.std(ddof=1) / math.sqrt(3))
    t, p = S.one_sided_ttest(x, thr, "less")
    assert t == pytest.approx(t_hand)
    assert p == pytest.approx(sps.t.cdf(t_hand, df=2))
    t, p = S.one_sided_ttest(x, thr, "greater")
    assert p == pytest.approx(1 - sps.t.cdf(t_hand, df=2))


def test_ttest_zero_spread():
    assert S.one_sided_ttest([10.0] * 3, 3.0, "less") == (math.inf, 1.0)
    assert S.one_sided_ttest([1.0] * 3, 3.0, "less") == (-math.inf, 0.0)
    assert all(math.isnan(v) for v in S.one_sided_ttest([5.0], 3.0, "less"))


def test_cohens_d():
    assert S.cohens_d([1.0, 2.0, 3.0], 0.0) == pytest.approx(2.0)
    assert S.cohens_d([1.0, 1.0], 0.0) is None


def test_bootstrap_identical_values_falls_back_to_percentile():
    assert S.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, "percentile")


def test_bootstrap_bca_and_reproducible():
    x = [1.0, 2.5, 3.0, 4.2, 5.1]
    a = S.bootstrap_ci(x, seed=7)
    assert a == S.bootstrap_ci(x, seed=7)
    assert a[2] == "BCa"
    assert a[0] < np.mean(x) < a[1]


def test_bootstrap_n1():
    lo, hi, m = S.bootstrap_ci([1.0])
    assert math.isnan(lo) and math.isnan(hi) and m == "none"


def test_bootstrap_coverage():
    # 400 datasets, n=30, 2000 resamples: nominal 95%, allow Monte-Carlo slack.
    rng = np.random.default_rng(123)
    true_mean = 5.0
    hits = 0
    n_sets = 400
    for i in range(n_sets):
        x = rng.normal(true_mean, 2.0, 30)
        lo, hi, _ = S.bootstrap_ci(x, n_resamples=2000, seed=i)
        hits += lo <= true_mean <= hi
    assert 0.90 <= hits / n_sets <= 0.99


def test_power_note():
    note = S.power_note(3, -1.0, alternative="less")
    assert "n=3" in note and "d=2.30" in note
    assert "undefined" in S.power_note(3, None)
    assert "cannot" in S.power_note(1, None)


# --- H1 ---------------------------------------------------------------------


def test_h1_planted_10pct_gap_not_supported():
    ft, lora = _scores(0.10, 0.001, seed=1)
    res = S.h1_performance(ft, lora)
    assert [r.scope for r in res] == sorted(TASKS) + ["pooled"]
    assert all(r.supported is False for r in res)
    p = _pooled(res)
    assert p.estimate == pytest.approx(10.0, abs=0.5)
    assert p.n == 12
    assert p.p_value > 0.5


def test_h1_planted_exact_10pct_gap_zero_noise():
    ft = {t: [0.90, 0.90, 0.90] for t in TASKS}
    lora = {t: [0.81, 0.81, 0.81] for t in TASKS}
    res = S.h1_performance(ft, lora)
    assert all(r.supported is False for r in res)
    assert all(r.ci_method == "percentile" for r in res)


def test_h1_planted_1pct_gap_supported():
    # sd of 0.1 %-points on the gap: scores in [0, 100] with noise 0.1 on LoRA only.
    rng = np.random.default_rng(2)
    ft = {t: np.full(3, 90.0) for t in TASKS}
    lora = {t: 90.0 * 0.99 + rng.normal(0, 0.1, 3) for t in TASKS}
    res = S.h1_performance(ft, lora)
    p = _pooled(res)
    assert p.supported is True
    assert p.ci_high <= 3.0
    assert p.estimate == pytest.approx(1.0, abs=0.2)
    assert p.p_value < 0.001
    assert p.effect_size < 0
    assert any("exchangeable" in n for n in p.notes)
    task = res[0]
    assert any("10 distinct bootstrap resamples" in n for n in task.notes)


def test_h1_task_sets_must_match():
    with pytest.raises(ValueError, match="task sets differ"):
        S.h1_performance({"mrpc": [1.0, 1.0]}, {"rte": [1.0, 1.0]})


def test_h1_single_seed_undecidable():
    res = S.h1_performance({"mrpc": [0.9]}, {"mrpc": [0.89]})
    assert all(r.supported is None for r in res)
    assert any("undecidable" in n for n in res[0].notes)
    d = res[0].to_dict()
    json.dumps(d, allow_nan=False)
    assert d["p_value"] is None and d["ci_low"] is None


# --- H2 / H3 ----------------------------------------------------------------


def test_h2_planted():
    rng = np.random.default_rng(3)
    ft = {t: np.full(3, 0.4) for t in TASKS}
    lora50 = {t: 0.4 * 0.5 * (1 + rng.normal(0, 0.02, 3)) for t in TASKS}
    lora5 = {t: 0.4 * 0.95 * (1 + rng.normal(0, 0.002, 3)) for t in TASKS}
    good = S.h2_drift(ft, lora50)
    bad = S.h2_drift(ft, lora5)
    assert all(r.supported is True for r in good)
    assert _pooled(good).estimate == pytest.approx(50.0, abs=2)
    assert _pooled(good).alternative == "greater"
    assert all(r.supported is False for r in bad)


def test_h3_planted():
    rng = np.random.default_rng(4)
    low = {b: 10.0 + rng.normal(0, 1.0, 5) for b in (1, 8, 32)}
    high = {1: 10.0 + rng.normal(0, 1.0, 5), 8: 50.0 + rng.normal(0, 1.0, 5)}
    r_low = S.h3_serving(low)
    assert [r.scope for r in r_low] == ["batch=1", "batch=8", "batch=32"]
    assert [r.primary for r in r_low] == [False, True, False]
    assert all(r.supported is True for r in r_low)
    r_high = S.h3_serving(high, label="vllm")
    assert r_high[1].scope == "vllm/batch=8" and r_high[1].supported is False
    assert r_high[0].supported is True
    with pytest.raises(ValueError, match="primary batch"):
        S.h3_serving({1: [1.0, 2.0]})


def test_h3_from_latencies():
    merged = np.array([10.0, 11.0, 10.5, 9.8])
    adapter = merged * np.array([1.10, 1.12, 1.09, 1.11])
    res = S.h3_serving({8: S.overhead_pct(adapter, merged)})
    assert res[0].estimate == pytest.approx(10.5)
    assert res[0].supported is True


# --- corrections ------------------------------------------------------------


def _fake(p, supported=True, primary=False, name="H1"):
    return S.HypothesisResult(
        name=name, scope="x", estimate=0.0, ci_low=0.0, ci_high=0.0, ci_method="BCa",
        threshold=0.0, alternative="less", p_value=p, n=3, supported=supported,
        primary=primary,
    )


def test_holm_hand_example():
    res = S.correct([_fake(p) for p in [0.01, 0.04, 0.03, 0.005]])
    # sorted: 0.005*4=.02, 0.01*3=.03, 0.03*2=.06, 0.04*1=.04 -> max(.06,.04)=.06
    np.testing.assert_allclose([r.p_holm for r in res], [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose([r.p_bonferroni for r in res], [0.04, 0.16, 0.12, 0.02])


def test_corrections_match_statsmodels():
    p = [0.001, 0.2, 0.049, 0.8, 0.012, 0.3, 0.0004]
    res = S.correct([_fake(x) for x in p])
    np.testing.assert_allclose([r.p_holm for r in res], multipletests(p, method="holm")[1])
    np.testing.assert_allclose(
        [r.p_bonferroni for r in res], multipletests(p, method="bonferroni")[1]
    )


def test_correction_skips_undefined_p():
    res = S.correct([_fake(0.01), _fake(math.nan), _fake(0.02)])
    assert res[1].p_holm is None and res[1].p_bonferroni is None
    assert res[0].p_bonferroni == pytest.approx(0.02)


# --- verdict ----------------------------------------------------------------


@pytest.mark.parametrize(
    "h1,h2,h3,expected",
    [
        (True, True, True, True),
        (True, True, False, True),
        (True, False, True, True),
        (True, False, False, False),
        (False, True, True, False),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, False),
        (None, True, True, None),
        (None, False, False, False),
        (False, None, None, False),
        (True, None, True, True),
        (True, None, False, None),
    ],
)
def test_combine_truth_table(h1, h2, h3, expected):
    assert S.combine_verdicts(h1, h2, h3) is expected


def test_overall_verdict_uses_primary_results():
    h1 = [_fake(0.5, supported=False), _fake(0.01, supported=True, primary=True)]
    h2 = [_fake(0.5, supported=False, primary=True, name="H2")]
    h3 = [_fake(0.01, supported=True, primary=True, name="H3")]
    v = S.overall_verdict(h1, h2, h3)
    assert v["overall"] is True
    assert (v["H1"], v["H2"], v["H3"]) == (True, False, True)
    v = S.overall_verdict(h1, h2, [_fake(0.5, supported=False, primary=True, name="H3")])
    assert v["overall"] is False
    with pytest.raises(ValueError, match="primary"):
        S.overall_verdict([_fake(0.1)], h2, h3)


def test_end_to_end_json():
    ft, lora = _scores(0.01, 0.0005, seed=5)
    h1 = S.h1_performance(ft, lora)
    h2 = S.h2_drift({t: [1.0, 1.1, 0.9] for t in TASKS}, {t: [0.5, 0.6, 0.4] for t in TASKS})
    h3 = S.h3_serving({1: [5.0, 6.0, 5.5], 8: [12.0, 11.0, 13.0]})
    S.correct(h1 + h2 + h3)
    assert all(r.p_holm is not None for r in h1 + h2 + h3)
    v = S.overall_verdict(h1, h2, h3)
    json.dumps([r.to_dict() for r in h1 + h2 + h3] + [v], allow_nan=False)
    assert v["by_scope"]["H1"].keys() == set(TASKS) | {"pooled"}
