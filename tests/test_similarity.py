"""Tests for loradrift.similarity.

Every reference value here is computed by code written in this file from the
textbook definitions (explicit centring matrix H, naive loops for the unbiased
HSIC, exact rational arithmetic for a hand-sized case), never by calling back
into the implementation under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import ortho_group

from loradrift.similarity import (
    BaseSide,
    LinearCKAAccumulator,
    cka_against_base,
    cosine_layers,
    cosine_similarity,
    debiased_cka,
    jackknife_cka,
    linear_cka,
    linear_cka_layers,
    minibatch_cka,
    rbf_cka,
)

# ---------------------------------------------------------------- references


def ref_hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def ref_cka_from_grams(K, L):
    return ref_hsic_biased(K, L) / math.sqrt(ref_hsic_biased(K, K) * ref_hsic_biased(L, L))


def ref_linear_cka(X, Y):
    return ref_cka_from_grams(X @ X.T, Y @ Y.T)


def ref_hsic1(K, L):
    """Song et al. (2012) unbiased HSIC, written as loops over the formula.

    HSIC_1 = 1/(n(n-3)) [tr(Kt Lt) + (1'Kt1)(1'Lt1)/((n-1)(n-2)) - 2/(n-2) 1'Kt Lt 1]
    with Kt, Lt the kernels with zeroed diagonals. Works on floats or Fractions.
    """
    n = len(K)
    Kt = [[K[i][j] if i != j else 0 for j in range(n)] for i in range(n)]
    Lt = [[L[i][j] if i != j else 0 for j in range(n)] for i in range(n)]
    tr = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sk = sum(Kt[i][j] for i in range(n) for j in range(n))
    sl = sum(Lt[i][j] for i in range(n) for j in range(n))
    # 1' Kt Lt 1 = sum_i (sum_j Kt_ij) (sum_k Lt_ik) using symmetry of Kt
    rk = [sum(Kt[i][j] for j in range(n)) for i in range(n)]
    rl = [sum(Lt[i][j] for j in range(n)) for i in range(n)]
    cross = sum(rk[i] * rl[i] for i in range(n))
    return (tr + sk * sl / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def ref_debiased_cka_from_grams(K, L):
    return ref_hsic1(K, L) / math.sqrt(ref_hsic1(K, K) * ref_hsic1(L, L))


def ref_debiased_linear_cka(X, Y):
    return ref_debiased_cka_from_grams((X @ X.T).tolist(), (Y @ Y.T).tolist())


def ref_rbf_gram(X, sigma_frac):
    D = cdist(X, X, "sqeuclidean")
    med = np.median(D)  # full matrix incl. diagonal, as Kornblith's gram_rbf
    return np.exp(-D / (2 * sigma_frac**2 * med))


def rng(seed):
    return np.random.default_rng(seed)


def rand_orthogonal(d, seed):
    return ortho_group.rvs(d, random_state=seed)


# ---------------------------------------------------------------- self-similarity


@pytest.mark.parametrize("shape", [(40, 10), (10, 40), (100, 3)])
def test_every_variant_is_one_on_identical_inputs(shape):
    X = rng(0).standard_normal(shape)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X, method="feature") == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X, method="gram") == pytest.approx(1.0, abs=1e-12)
    assert debiased_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert minibatch_cka(X, X, batch_size=8) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka_layers([X, X], [X, X]) == pytest.approx([1.0, 1.0], abs=1e-12)
    acc = LinearCKAAccumulator().update(X, X)
    assert acc.value() == pytest.approx(1.0, abs=1e-12)


def test_return_types_are_python_floats():
    X = rng(1).standard_normal((20, 5))
    Y = rng(2).standard_normal((20, 7))
    for v in (
        linear_cka(X, Y),
        debiased_cka(X, Y),
        rbf_cka(X, Y),
        minibatch_cka(X, Y, 8),
        LinearCKAAccumulator().update(X, Y).value(),
    ):
        assert type(v) is float


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("n,d", [(60, 12), (12, 60)])
def test_linear_cka_invariances(n, d):
    X = rng(3).standard_normal((n, d))
    Q = rand_orthogonal(d, seed=4)
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 7.5 * X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, 1e-6 * X) == pytest.approx(1.0, abs=1e-12)
    b = rng(5).standard_normal(d) * 100
    assert linear_cka(X, X + b) == pytest.approx(1.0, abs=1e-12)
    Y = rng(6).standard_normal((n, d + 3))
    base = ref_linear_cka(X, Y)
    Q2 = rand_orthogonal(d + 3, seed=7)
    assert linear_cka(X @ Q, 3.0 * (Y @ Q2) - 2.0) == pytest.approx(base, abs=1e-12)


def test_linear_cka_not_invariant_to_general_invertible_map():
    d = 16
    X = rng(8).standard_normal((500, d))
    U = rand_orthogonal(d, seed=9)
    V = rand_orthogonal(d, seed=10)
    s = np.linspace(0.2, 5.0, d)  # distinct, condition number 25
    A = U @ np.diag(s) @ V.T
    assert np.linalg.matrix_rank(A) == d
    v = linear_cka(X, X @ A)
    assert v == pytest.approx(ref_linear_cka(X, X @ A), abs=1e-10)
    assert v < 0.9


# ---------------------------------------------------------------- agreement with the textbook form


@pytest.mark.parametrize("n,d1,d2", [(30, 7, 11), (8, 50, 20), (200, 5, 9), (25, 25, 25)])
@pytest.mark.parametrize("method", ["auto", "feature", "gram"])
def test_linear_cka_matches_gram_reference(n, d1, d2, method):
    r = rng(n + d1 + d2)
    X = r.standard_normal((n, d1)) + 3.0
    Y = X[:, :1] * r.standard_normal((1, d2)) + r.standard_normal((n, d2))
    assert linear_cka(X, Y, method=method) == pytest.approx(ref_linear_cka(X, Y), abs=1e-10)


def test_linear_cka_in_unit_interval_on_many_random_pairs():
    r = rng(11)
    for _ in range(200):
        n = int(r.integers(2, 60))
        d1, d2 = (int(v) for v in r.integers(1, 40, size=2))
        X = r.standard_normal((n, d1)) * r.exponential(size=d1)
        mix = r.uniform()
        Y = mix * X[:, : min(d1, d2)].repeat(1 + d2 // d1, axis=1)[:, :d2] + r.standard_normal((n, d2))
        if n > 1 and (np.ptp(X, axis=0).max() == 0 or np.ptp(Y, axis=0).max() == 0):
            continue
        v = linear_cka(X, Y)
        assert -1e-12 <= v <= 1 + 1e-12


def test_gram_and_feature_forms_agree():
    r = rng(12)
    for n, d in [(10, 300), (300, 10), (64, 64)]:
        X = r.standard_normal((n, d))
        Y = np.tanh(X @ r.standard_normal((d, d))) + 0.1 * r.standard_normal((n, d))
        assert linear_cka(X, Y, method="feature") == pytest.approx(
            linear_cka(X, Y, method="gram"), abs=1e-12
        )


# ---------------------------------------------------------------- debiased


def test_debiased_exact_small_case_n5():
    X = np.array([[1, 0], [0, 2], [1, 1], [3, -1], [0, 0]], dtype=np.float64)
    Y = np.array([[2], [1], [0], [1], [-1]], dtype=np.float64)
    Kf = [[Fraction(int(v)) for v in row] for row in (X @ X.T)]
    Lf = [[Fraction(int(v)) for v in row] for row in (Y @ Y.T)]
    kl, kk, ll = ref_hsic1(Kf, Lf), ref_hsic1(Kf, Kf), ref_hsic1(Lf, Lf)
    assert isinstance(kl, Fraction)
    expected = float(kl) / math.sqrt(float(kk) * float(ll))
    assert debiased_cka(X, Y) == pytest.approx(expected, abs=1e-12)
    # also float torch input of another dtype
    assert debiased_cka(torch.tensor(X, dtype=torch.float32), Y) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n,d1,d2", [(6, 3, 4), (20, 8, 5), (35, 50, 12)])
def test_debiased_matches_naive_loop(n, d1, d2):
    r = rng(100 + n)
    X = r.standard_normal((n, d1)) + 5.0
    Y = X[:, :1] + r.standard_normal((n, d2))
    assert debiased_cka(X, Y) == pytest.approx(ref_debiased_linear_cka(X, Y), abs=1e-10)


def test_debiased_near_zero_and_negative_values_unclipped():
    n = 30
    values = []
    negative = None
    for seed in range(60):
        r = rng(1000 + seed)
        X, Y = r.standard_normal((n, 10)), r.standard_normal((n, 10))
        ref = ref_debiased_linear_cka(X, Y)
        got = debiased_cka(X, Y)
        assert got == pytest.approx(ref, abs=1e-10)
        values.append(got)
        if ref < -1e-4 and negative is None:
            negative = (got, ref)
    assert negative is not None, "expected at least one negative estimate among 60 seeds"
    assert negative[0] < 0
    # biased CKA of independent features is far from 0 at this n; debiased is not
    assert abs(np.mean(values)) < 0.05
    assert np.mean([linear_cka(rng(1000 + s).standard_normal((n, 10)),
                               rng(5000 + s).standard_normal((n, 10))) for s in range(10)]) > 0.2


def test_debiased_needs_n_greater_than_3():
    X = rng(13).standard_normal((3, 4))
    with pytest.raises(ValueError, match="n=3"):
        debiased_cka(X, X)
    with pytest.raises(ValueError, match="n=3"):
        rbf_cka(X, X, debiased=True)


# ---------------------------------------------------------------- minibatch


def ref_minibatch(X, Y, batch_size, seed):
    n = X.shape[0]
    perm = np.random.default_rng(seed).permutation(n)  # documented contract
    kl = kk = ll = 0.0
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) < 4:
            continue
        K = (X[idx] @ X[idx].T).tolist()
        L = (Y[idx] @ Y[idx].T).tolist()
        kl += ref_hsic1(K, L)
        kk += ref_hsic1(K, K)
        ll += ref_hsic1(L, L)
    return kl / math.sqrt(kk * ll)


@pytest.mark.parametrize("n,bs", [(40, 8), (35, 8), (37, 8), (23, 5)])
def test_minibatch_matches_reference(n, bs):
    # 35 = 4*8 + 3: the 3-row remainder is dropped; 37 = 4*8 + 5: kept.
    r = rng(n)
    X = r.standard_normal((n, 6))
    Y = X @ r.standard_normal((6, 9)) + r.standard_normal((n, 9))
    for seed in (0, 1):
        assert minibatch_cka(X, Y, bs, seed=seed) == pytest.approx(ref_minibatch(X, Y, bs, seed), abs=1e-10)


def test_minibatch_remainder_dropping_matters():
    r = rng(14)
    X = r.standard_normal((35, 6))
    Y = X + r.standard_normal((35, 6))
    perm = np.random.default_rng(0).permutation(35)
    # the value depends only on the first 32 shuffled rows: wrecking the
    # 3 dropped rows changes nothing, wrecking a kept row does
    X2 = X.copy()
    X2[perm[32:]] += 100 * r.standard_normal((3, 6))
    assert minibatch_cka(X2, Y, 8) == pytest.approx(minibatch_cka(X, Y, 8), abs=1e-12)
    X3 = X.copy()
    X3[perm[0]] += 100
    assert abs(minibatch_cka(X3, Y, 8) - minibatch_cka(X, Y, 8)) > 1e-3


def test_minibatch_single_batch_equals_debiased_and_is_deterministic():
    r = rng(15)
    X = r.standard_normal((50, 10))
    Y = np.sin(X) + 0.3 * r.standard_normal((50, 10))
    assert minibatch_cka(X, Y, 50) == pytest.approx(ref_debiased_linear_cka(X, Y), abs=1e-10)
    assert minibatch_cka(X, Y, 1000) == pytest.approx(ref_debiased_linear_cka(X, Y), abs=1e-10)
    a = minibatch_cka(X, Y, 10, seed=3)
    assert minibatch_cka(X, Y, 10, seed=3) == a
    assert minibatch_cka(X, Y, 10, seed=4) != a


def test_minibatch_converges_towards_full_value():
    r = rng(16)
    n = 4000
    X = r.standard_normal((n, 8))
    Y = X @ r.standard_normal((8, 8)) + 2 * r.standard_normal((n, 8))
    full = linear_cka(X, Y)
    assert minibatch_cka(X, Y, 256) == pytest.approx(full, abs=0.03)


def test_minibatch_rejects_small_batch():
    X = rng(17).standard_normal((20, 3))
    with pytest.raises(ValueError, match="batch_size"):
        minibatch_cka(X, X, 3)


# ---------------------------------------------------------------- rbf


# ---------------------------------------------------------------- leave-one-out (jackknife)


@pytest.mark.parametrize("metric", ["linear", "debiased", "rbf"])
def test_jackknife_replicate_is_cka_without_that_row(metric):
    """Row i of jackknife_cka is CKA computed from scratch (the references above) on the probe
    examples but i; the closed form for linear and debiased CKA never recomputes it."""
    r = rng(5)
    n = 24
    base = [r.standard_normal((n, 6)) for _ in range(3)]
    other = [x @ r.standard_normal((6, 5)) + 0.5 * r.standard_normal((n, 5)) for x in base]
    got = jackknife_cka(metric, base, other)
    assert got.shape == (n, 3) and got.dtype == np.float64
    ref = {"linear": ref_linear_cka, "debiased": ref_debiased_linear_cka,
           "rbf": lambda x, y: ref_cka_from_grams(ref_rbf_gram(x, 1.0), ref_rbf_gram(y, 1.0))}[metric]
    for i in range(n):
        keep = np.arange(n) != i
        want = [ref(x[keep], y[keep]) for x, y in zip(base, other)]
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)


def test_jackknife_hand_sized_case():
    """Four examples, one feature each: leaving out row 0 leaves x = (1, 2, 3) and y = (1, 3, 2),
    whose linear CKA is the squared Pearson correlation, 0.5**2."""
    x = np.array([[5.0], [1.0], [2.0], [3.0]])
    y = np.array([[-4.0], [1.0], [3.0], [2.0]])
    assert jackknife_cka("linear", [x], [y])[0, 0] == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("sigma_frac", [0.5, 1.0, 2.0])
def test_rbf_matches_direct_implementation(sigma_frac):
    r = rng(18)
    X = r.standard_normal((40, 6))
    Y = np.tanh(X[:, :3] * 2) + 0.2 * r.standard_normal((40, 3))
    expected = ref_cka_from_grams(ref_rbf_gram(X, sigma_frac), ref_rbf_gram(Y, sigma_frac))
    assert rbf_cka(X, Y, sigma_frac=sigma_frac) == pytest.approx(expected, abs=1e-10)
    expected_u = ref_debiased_cka_from_grams(
        ref_rbf_gram(X, sigma_frac).tolist(), ref_rbf_gram(Y, sigma_frac).tolist()
    )
    assert rbf_cka(X, Y, sigma_frac=sigma_frac, debiased=True) == pytest.approx(expected_u, abs=1e-10)


def test_rbf_invariances():
    r = rng(19)
    X = r.standard_normal((50, 8))
    Y = X**2 + r.standard_normal((50, 8))
    v = rbf_cka(X, Y)
    Q = rand_orthogonal(8, seed=20)
    assert rbf_cka(X @ Q, Y) == pytest.approx(v, abs=1e-10)
    assert rbf_cka(X, 13.0 * Y) == pytest.approx(v, abs=1e-10)
    assert rbf_cka(X + 4.0, Y) == pytest.approx(v, abs=1e-10)
    assert rbf_cka(X, X @ Q * 0.01) == pytest.approx(1.0, abs=1e-10)


def test_rbf_rejects_bad_sigma():
    X = rng(21).standard_normal((10, 3))
    with pytest.raises(ValueError, match="sigma_frac"):
        rbf_cka(X, X, sigma_frac=0.0)


# ---------------------------------------------------------------- cosine


def test_cosine_hand_values():
    X = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    Y = np.array([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    out = cosine_similarity(X, Y)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (4,)
    np.testing.assert_allclose(out, [0.0, 1.0, -1.0, 24 / 25], atol=1e-15)


def test_cosine_accepts_torch_and_float32():
    X = np.array([[1.0, 0.0], [1.0, 1.0]])
    Y = np.array([[0.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(cosine_similarity(torch.tensor(X), torch.tensor(Y)), [0, 1], atol=1e-15)
    np.testing.assert_allclose(
        cosine_similarity(X.astype(np.float32), torch.tensor(Y, dtype=torch.bfloat16)), [0, 1], atol=1e-7
    )
    t = torch.tensor(X, requires_grad=True)
    np.testing.assert_allclose(cosine_similarity(t, Y), [0, 1], atol=1e-15)


def test_cosine_zero_vectors_and_extreme_scales():
    X = np.array([[0.0, 0.0], [1.0, 2.0], [1e-200, 1e-200], [1e200, 0.0]])
    Y = np.array([[1.0, 2.0], [0.0, 0.0], [1e-200, 1e-200], [1e200, 1e200]])
    out = cosine_similarity(X, Y)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, [0.0, 0.0, 1.0, 1 / math.sqrt(2)], atol=1e-15)


def test_cosine_needs_equal_width():
    with pytest.raises(ValueError, match="d1=3, d2=4"):
        cosine_similarity(np.ones((5, 3)), np.ones((5, 4)))


def test_cosine_matches_reference_random():
    r = rng(22)
    X, Y = r.standard_normal((30, 17)), r.standard_normal((30, 17))
    ref = [x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(X, Y)]
    np.testing.assert_allclose(cosine_similarity(X, Y), ref, atol=1e-14)


def test_rotation_planted_case_cka_one_cosine_not():
    # The drift phase relies on this: a pure rotation of the representation
    # is invisible to CKA but shows up in per-example cosine.
    X = rng(23).standard_normal((300, 64)) + 0.5
    Q = rand_orthogonal(64, seed=24)
    Z = X @ Q
    assert linear_cka(X, Z) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka_layers([X], [Z])[0] == pytest.approx(1.0, abs=1e-12)
    cos = cosine_similarity(X, Z)
    assert cos.mean() < 0.7
    assert cos.max() < 0.99
    assert cosine_layers([X, X], [Z, X]).shape == (2, 300)
    np.testing.assert_allclose(cosine_layers([X, X], [Z, X])[1], 1.0, atol=1e-12)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("splits", [[60], [1] * 60, [7] * 8 + [4], [1, 2, 3, 54], [30, 1, 29]])
def test_accumulator_equals_one_shot(splits):
    r = rng(25)
    X = r.standard_normal((60, 9)) + 1e3  # large common offset: cancellation trap
    Y = np.tanh(X - 1e3) @ r.standard_normal((9, 5)) + 0.1 * r.standard_normal((60, 5)) - 50
    expected = ref_linear_cka(X - X.mean(0), Y - Y.mean(0))
    acc = LinearCKAAccumulator()
    i = 0
    for s in splits:
        acc.update(X[i : i + s], Y[i : i + s])
        i += s
    assert i == 60 and acc.n == 60
    assert acc.value() == pytest.approx(expected, abs=1e-10)
    assert acc.value() == pytest.approx(linear_cka(X, Y), abs=1e-10)


def test_accumulator_torch_batches_and_errors():
    r = rng(26)
    X, Y = r.standard_normal((20, 4)), r.standard_normal((20, 6))
    acc = LinearCKAAccumulator()
    with pytest.raises(ValueError, match="n=0"):
        acc.value()
    acc.update(torch.tensor(X[:10]), torch.tensor(Y[:10]))
    acc.update(X[10:], Y[10:])
    assert acc.value() == pytest.approx(ref_linear_cka(X, Y), abs=1e-10)
    with pytest.raises(ValueError, match="feature sizes"):
        acc.update(X[:3, :3], Y[:3])


# ---------------------------------------------------------------- multi-layer path


@pytest.mark.parametrize("n,d", [(50, 12), (12, 50), (30, 30)])
@pytest.mark.parametrize("method", ["auto", "feature", "gram"])
def test_layers_equal_per_layer_linear_cka(n, d, method):
    r = rng(27)
    base = [r.standard_normal((n, d)) + i for i in range(5)]
    other = [b @ r.standard_normal((d, d)) * 0.3 + b + r.standard_normal((n, d)) for b in base]
    expected = [ref_linear_cka(b, o) for b, o in zip(base, other)]
    got = linear_cka_layers(base, other, method=method)
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-10, rtol=0)
    # stacked arrays and torch tensors are accepted too
    got_t = linear_cka_layers(torch.tensor(np.stack(base)), [torch.tensor(o, dtype=torch.float64) for o in other],
                              method=method)
    np.testing.assert_allclose(got_t, expected, atol=1e-10, rtol=0)


def test_base_side_reuse_and_float32_path():
    r = rng(28)
    n, d = 64, 24
    base = np.stack([r.standard_normal((n, d)) for _ in range(4)])
    others = [base + s * r.standard_normal(base.shape) for s in (0.1, 1.0)]
    for method in ("feature", "gram"):
        bs = BaseSide(base, method=method)
        assert bs.method == method and bs.n_layers == 4
        for o in others:
            expected = [ref_linear_cka(b, x) for b, x in zip(base, o)]
            np.testing.assert_allclose(cka_against_base(bs, o), expected, atol=1e-10, rtol=0)
        b32 = BaseSide(base.astype(np.float32), method=method, dtype=torch.float32)
        for o in others:
            expected = [ref_linear_cka(b, x) for b, x in zip(base.astype(np.float32).astype(np.float64), o)]
            np.testing.assert_allclose(cka_against_base(b32, o), expected, atol=1e-5, rtol=0)


def test_layers_auto_choice_follows_shape():
    r = rng(29)
    assert BaseSide([r.standard_normal((8, 40))]).method == "gram"
    assert BaseSide([r.standard_normal((200, 10))]).method == "feature"


def test_layers_errors():
    r = rng(30)
    base = [r.standard_normal((10, 4)) for _ in range(3)]
    with pytest.raises(ValueError, match="3 layers"):
        linear_cka_layers(base, base[:2])
    with pytest.raises(ValueError, match="n=9"):
        linear_cka_layers(base, [b[:9] for b in base])
    bad = [b.copy() for b in base]
    bad[2][0, 0] = np.nan
    with pytest.raises(ValueError, match="layer 2.*NaN"):
        linear_cka_layers(base, bad)
    with pytest.raises(ValueError, match="uniform"):
        BaseSide([base[0], r.standard_normal((10, 5))])
    with pytest.raises(ValueError, match="method"):
        linear_cka_layers(base, base, method="svd")
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka_layers(base, [np.ones((10, 4))] * 3)


# ---------------------------------------------------------------- validation


ALL_CKA = [
    linear_cka,
    debiased_cka,
    rbf_cka,
    lambda X, Y: minibatch_cka(X, Y, 4),
    lambda X, Y: LinearCKAAccumulator().update(X, Y).value(),
]


@pytest.mark.parametrize("fn", ALL_CKA + [cosine_similarity])
def test_rejects_nan_inf(fn):
    X = rng(31).standard_normal((10, 3))
    for bad in (np.nan, np.inf, -np.inf):
        Xb = X.copy()
        Xb[4, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(Xb, X)
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(X, torch.tensor(Xb))


@pytest.mark.parametrize("fn", ALL_CKA + [cosine_similarity])
def test_rejects_mismatched_n_and_1d(fn):
    X = rng(32).standard_normal((10, 3))
    with pytest.raises(ValueError, match="n=10 and n=9"):
        fn(X, X[:9])
    with pytest.raises(ValueError, match="2-D"):
        fn(X[:, 0], X[:, 0])


@pytest.mark.parametrize("fn", [linear_cka, lambda X, Y: LinearCKAAccumulator().update(X, Y).value()])
def test_rejects_single_example(fn):
    X = np.ones((1, 3))
    with pytest.raises(ValueError, match="n=1"):
        fn(X, X)


def test_rejects_constant_input():
    X = rng(33).standard_normal((10, 3))
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(X, np.full((10, 2), 4.0))


def test_any_float_dtype_and_torch_inputs():
    r = rng(34)
    X = r.standard_normal((30, 5))
    Y = X @ r.standard_normal((5, 4)) + r.standard_normal((30, 4))
    ref = ref_linear_cka(X, Y)
    assert linear_cka(X.astype(np.float32), Y.astype(np.float16)) == pytest.approx(ref, abs=1e-2)
    assert linear_cka(torch.tensor(X), torch.tensor(Y)) == pytest.approx(ref, abs=1e-12)
    assert linear_cka(torch.tensor(X, dtype=torch.bfloat16), Y) == pytest.approx(ref, abs=3e-2)
