"""Representation similarity between a base model and a fine-tuned model.

Every function compares two sets of features extracted on the *same* probe
examples: ``X`` is ``(n, d1)`` and ``Y`` is ``(n, d2)``; row ``i`` of both comes
from probe example ``i``. Inputs may be numpy arrays or torch tensors of any
real dtype (bfloat16 included); the one-shot functions always compute in
float64 and return Python floats (``cosine_similarity`` returns an array).

Contents
--------
- :func:`linear_cka` -- Kornblith et al. (2019), biased HSIC, linear kernel.
- :func:`debiased_cka` -- same with the unbiased HSIC estimator (Song et al.
  2012), as ``cka(..., debiased=True)`` in Kornblith's reference code.
- :func:`minibatch_cka` -- Nguyen, Raghu & Kornblith (2021).
- :func:`rbf_cka` -- RBF kernel, bandwidth relative to the median distance.
- :func:`jackknife_cka` -- leave-one-out CKA per probe example (the jackknife replicates).
- :func:`cosine_similarity` -- per-example cosine (needs ``d1 == d2``).
- :class:`LinearCKAAccumulator` -- streaming linear CKA, O(d^2) memory.
- :class:`BaseSide`, :func:`cka_against_base`, :func:`linear_cka_layers`,
  :func:`cosine_layers` -- the multi-layer path used by the drift analysis.

Conventions shared by all functions: NaN/inf, 1-D inputs, mismatched ``n`` and
``n < 2`` (``n < 4`` for the debiased estimators) raise ``ValueError``. An
input whose columns are all constant has no variance left after centering, so
CKA is undefined for it; that also raises ``ValueError`` rather than returning
NaN, so a broken layer cannot silently poison an average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "linear_cka",
    "debiased_cka",
    "minibatch_cka",
    "rbf_cka",
    "jackknife_cka",
    "cosine_similarity",
    "LinearCKAAccumulator",
    "BaseSide",
    "cka_against_base",
    "linear_cka_layers",
    "cosine_layers",
]

ArrayLike = Any  # np.ndarray | torch.Tensor; kept loose so array-likes also pass
Method = Literal["auto", "feature", "gram"]

# Intermediate (layers x d x d or layers x n x n) products in the multi-layer
# path are computed this many bytes at a time; bounds peak memory without
# making the batched matmuls too small to use all cores.
_CHUNK_BYTES = 256 * 2**20
# Gram-form base side stores one n x n matrix per layer; beyond this it falls
# back to the feature form even where the Gram form would be fewer FLOPs.
_MAX_GRAM_BYTES = 2 * 2**30


# --------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------


def _as_float64(a: ArrayLike, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise TypeError(f"{name}: complex tensors are not supported")
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        a = np.asarray(a)
        if a.dtype.kind == "c":
            raise TypeError(f"{name}: complex arrays are not supported")
        if a.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
        a = a.astype(np.float64, copy=False)
    return a


def _check_matrix(a: np.ndarray, name: str, min_n: int) -> None:
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_examples, n_features); got shape {tuple(a.shape)}"
        )
    n, d = a.shape
    if n < min_n:
        raise ValueError(f"{name} has n={n} examples; this needs n >= {min_n}")
    if d < 1:
        raise ValueError(f"{name} has no features (shape {tuple(a.shape)})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")


def _pair(X: ArrayLike, Y: ArrayLike, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    X = _as_float64(X, "X")
    Y = _as_float64(Y, "Y")
    _check_matrix(X, "X", min_n)
    _check_matrix(Y, "Y", min_n)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of examples (rows); "
            f"got n={X.shape[0]} and n={Y.shape[0]}"
        )
    return X, Y


def _center_scaled(a: np.ndarray, name: str) -> np.ndarray:
    """Column-centre, then divide by the Frobenius norm.

    CKA is scale invariant, so the rescaling changes nothing mathematically;
    it keeps all later products O(1), which avoids overflow/underflow for
    extreme activations and makes a float32 cast safe in the fast path.
    """
    c = a - a.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(c)
    if norm == 0.0:
        raise ValueError(
            f"{name} has zero variance (every column is constant); CKA is undefined"
        )
    return c / norm


def _check_method(method: str) -> None:
    if method not in ("auto", "feature", "gram"):
        raise ValueError(f"method must be 'auto', 'feature' or 'gram', got {method!r}")


# --------------------------------------------------------------------------
# linear CKA
# --------------------------------------------------------------------------


def _prefer_gram(n: int, d1: int, d2: int) -> bool:
    # Feature form: Yc^T Xc (n*d1*d2) plus two symmetric d x d products
    # (n*d^2/2 each with BLAS syrk). Gram form: two symmetric n x n products
    # (n^2*d/2 each). Equating the two gives the break-even n = d1 + d2.
    return n < d1 + d2


def linear_cka(X: ArrayLike, Y: ArrayLike, *, method: Method = "auto") -> float:
    """Linear CKA (Kornblith et al. 2019), biased HSIC estimator.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred
    ``Xc, Yc``. Invariant to orthogonal transforms, isotropic scaling and
    translation of either input; not invariant to general invertible maps.

    ``method``: ``"feature"`` uses d x d cross products, ``"gram"`` the
    equivalent n x n Gram matrices ``tr(Kc Lc) / (||Kc|| ||Lc||)``; ``"auto"``
    picks whichever needs fewer FLOPs. Both are exact.
    """
    _check_method(method)
    X, Y = _pair(X, Y)
    Xc = _center_scaled(X, "X")
    Yc = _center_scaled(Y, "Y")
    n, d1 = Xc.shape
    d2 = Yc.shape[1]
    use_gram = method == "gram" or (method == "auto" and _prefer_gram(n, d1, d2))
    if use_gram:
        K = Xc @ Xc.T
        L = Yc @ Yc.T
        return float(np.vdot(K, L) / (np.linalg.norm(K) * np.linalg.norm(L)))
    cross = Yc.T @ Xc
    return float(
        np.vdot(cross, cross) / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    )


class LinearCKAAccumulator:
    """Streaming linear CKA: feed batches of paired rows, read the exact value.

    Keeps float64 sums (``n``, column sums, ``X^T X``, ``Y^T Y``, ``Y^T X``), so
    memory is O((d1 + d2)^2) whatever the number of examples, and the result
    equals :func:`linear_cka` on the concatenated rows up to rounding (~1e-12).

    The sums are taken about a reference point (the mean of the first batch)
    rather than about zero. Centered cross products are shift invariant, so
    this changes nothing mathematically, but the textbook ``sum x x^T -
    n mean mean^T`` cancels catastrophically when activations have a large
    common offset (typical of some hidden dimensions in transformers).
    """

    def __init__(self) -> None:
        self.n = 0
        self._x0: np.ndarray | None = None
        self._y0: np.ndarray | None = None

    def update(self, X_batch: ArrayLike, Y_batch: ArrayLike) -> LinearCKAAccumulator:
        X, Y = _pair(X_batch, Y_batch, min_n=1)
        if self._x0 is None:
            self._x0 = X.mean(axis=0)
            self._y0 = Y.mean(axis=0)
            d1, d2 = X.shape[1], Y.shape[1]
            self._sx = np.zeros(d1)
            self._sy = np.zeros(d2)
            self._sxx = np.zeros((d1, d1))
            self._syy = np.zeros((d2, d2))
            self._syx = np.zeros((d2, d1))
        elif X.shape[1] != self._sx.shape[0] or Y.shape[1] != self._sy.shape[0]:
            raise ValueError(
                f"batch feature sizes ({X.shape[1]}, {Y.shape[1]}) differ from the "
                f"first batch ({self._sx.shape[0]}, {self._sy.shape[0]})"
            )
        Xs = X - self._x0
        Ys = Y - self._y0
        self.n += X.shape[0]
        self._sx += Xs.sum(axis=0)
        self._sy += Ys.sum(axis=0)
        self._sxx += Xs.T @ Xs
        self._syy += Ys.T @ Ys
        self._syx += Ys.T @ Xs
        return self

    def value(self) -> float:
        if self.n < 2:
            raise ValueError(f"need at least n=2 examples accumulated, have n={self.n}")
        mx = self._sx / self.n
        my = self._sy / self.n
        cxx = self._sxx - self.n * np.outer(mx, mx)
        cyy = self._syy - self.n * np.outer(my, my)
        cyx = self._syx - self.n * np.outer(my, mx)
        nxx = np.linalg.norm(cxx)
        nyy = np.linalg.norm(cyy)
        if nxx == 0.0 or nyy == 0.0:
            raise ValueError("an input has zero variance (all columns constant); CKA is undefined")
        return float(np.vdot(cyx, cyx) / (nxx * nyy))


# --------------------------------------------------------------------------
# kernel CKA (Kornblith reference-code semantics)
# --------------------------------------------------------------------------


def _center_gram(K: np.ndarray, unbiased: bool) -> np.ndarray:
    """``center_gram`` from Kornblith's reference code (in place on a copy).

    The unbiased branch is the U-statistic form: with diagonals zeroed,
    ``<center(K), center(L)> = n (n - 3) HSIC_1(K, L)`` (Song et al. 2012).
    """
    K = K.copy()
    n = K.shape[0]
    if unbiased:
        np.fill_diagonal(K, 0.0)
        means = K.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        K -= means[:, None]
        K -= means[None, :]
        np.fill_diagonal(K, 0.0)
    else:
        means = K.mean(axis=0)
        means -= means.mean() / 2
        K -= means[:, None]
        K -= means[None, :]
    return K


def _scaled_hsic_terms(K: np.ndarray, L: np.ndarray, unbiased: bool) -> tuple[float, float, float]:
    """``(<Kc, Lc>, ||Kc||^2, ||Lc||^2)`` after (un)biased Gram centering."""
    Kc = _center_gram(K, unbiased)
    Lc = _center_gram(L, unbiased)
    return float(np.vdot(Kc, Lc)), float(np.vdot(Kc, Kc)), float(np.vdot(Lc, Lc))


def _cka_from_grams(K: np.ndarray, L: np.ndarray, unbiased: bool) -> float:
    kl, kk, ll = _scaled_hsic_terms(K, L, unbiased)
    if kk <= 0.0 or ll <= 0.0:
        raise ValueError("a centred Gram matrix is zero (input has no variance); CKA is undefined")
    return kl / math.sqrt(kk * ll)


def _require_n_gt_3(n: int, what: str) -> None:
    if n <= 3:
        raise ValueError(f"{what} needs n > 3 examples (unbiased HSIC divides by n-3); got n={n}")


def debiased_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012).

    Matches ``cka(gram_linear(X), gram_linear(Y), debiased=True)`` from
    Kornblith's reference code. Near 0 for unrelated features and can be
    slightly *negative*; it is deliberately not clipped, because clipping
    would bias averages over layers/seeds upward. Needs n > 3. Builds n x n
    Gram matrices, so memory is O(n^2): meant for probe sets, not for 100k rows
    (use :func:`minibatch_cka` there).
    """
    X, Y = _pair(X, Y)
    _require_n_gt_3(X.shape[0], "debiased_cka")
    # Centring the features first changes nothing (the U-statistic is
    # invariant to adding row/column effects to K), but improves conditioning.
    Xc = _center_scaled(X, "X")
    Yc = _center_scaled(Y, "Y")
    return _cka_from_grams(Xc @ Xc.T, Yc @ Yc.T, unbiased=True)


def _gram_rbf(Xc: np.ndarray, sigma_frac: float) -> np.ndarray:
    # Kornblith's gram_rbf: the median is over the full n x n matrix of squared
    # distances, diagonal zeros included; kept identical for comparability.
    G = Xc @ Xc.T
    sq = np.diag(G)
    D = sq[:, None] + sq[None, :] - 2.0 * G
    np.maximum(D, 0.0, out=D)  # rounding can make tiny distances negative
    np.fill_diagonal(D, 0.0)
    med = float(np.median(D))
    if med <= 0.0:
        raise ValueError(
            "median squared pairwise distance is 0 (most examples identical); "
            "RBF bandwidth is undefined"
        )
    return np.exp(-D / (2.0 * sigma_frac**2 * med))


def rbf_cka(X: ArrayLike, Y: ArrayLike, sigma_frac: float = 1.0, debiased: bool = False) -> float:
    """CKA with an RBF kernel (Kornblith et al. 2019, ``gram_rbf(x, threshold)``).

    Bandwidth ``sigma = sigma_frac * sqrt(median squared distance)``, so the
    value is invariant to orthogonal transforms, translation and isotropic
    scaling of either input. O(n^2) memory: for small probe sets.
    ``debiased=True`` uses the unbiased HSIC estimator (needs n > 3).
    """
    if not (isinstance(sigma_frac, (int, float)) and math.isfinite(sigma_frac) and sigma_frac > 0):
        raise ValueError(f"sigma_frac must be a positive finite number, got {sigma_frac!r}")
    X, Y = _pair(X, Y)
    if debiased:
        _require_n_gt_3(X.shape[0], "rbf_cka(debiased=True)")
    K = _gram_rbf(_center_scaled(X, "X"), sigma_frac)
    L = _gram_rbf(_center_scaled(Y, "Y"), sigma_frac)
    return _cka_from_grams(K, L, unbiased=debiased)


def _loo_terms(K: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, ...]:
    """For every i, the HSIC building blocks of the Gram matrices with row and column i removed:
    sum(K*L), sum_j rowsumK_j rowsumL_j, sum(K), sum(L) over the remaining indices."""
    k, l = K.sum(axis=1), L.sum(axis=1)  # noqa: E741 - l is L's row sums, as k is K's
    kl = (K * L).sum(axis=1)
    dk, dl = np.diag(K), np.diag(L)
    a = (K * L).sum() - 2.0 * kl + dk * dl
    cross = k @ l - K @ l - L @ k + kl - (k - dk) * (l - dl)
    return a, cross, k.sum() - 2.0 * k + dk, l.sum() - 2.0 * l + dl


def _loo_hsic(K: np.ndarray, L: np.ndarray, debiased: bool) -> np.ndarray:
    m = K.shape[0] - 1
    if debiased:  # Song et al. 2012 on the Gram matrices with zeroed diagonals
        K, L = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
        a, cross, sk, sl = _loo_terms(K, L)
        return (a + sk * sl / ((m - 1) * (m - 2)) - 2.0 * cross / (m - 2)) / (m * (m - 3))
    a, cross, sk, sl = _loo_terms(K, L)
    return a - 2.0 * cross / m + sk * sl / m**2


def jackknife_cka(metric: str, base: Sequence[ArrayLike], layers: Sequence[ArrayLike],
                  sigma_frac: float = 1.0) -> np.ndarray:
    """Leave-one-out CKA per probe row and layer, shape (n, n_layers), float64: row i is the CKA
    of base and run layer with probe example i left out of both (the replicates of a delete-one
    jackknife over probe examples). ``metric``: "linear", "debiased" or "rbf" (bandwidth
    ``sigma_frac`` as in :func:`rbf_cka`). Linear and debiased CKA come from the full Gram
    matrices in closed form (O(n^2) per row); RBF, whose bandwidth depends on the rows kept, is
    recomputed row by row; a linear or debiased replicate with no variance left is NaN."""
    n = np.asarray(base[0]).shape[0]
    out = np.empty((n, len(base)))
    for j, (x, y) in enumerate(zip(base, layers)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if metric in ("linear", "debiased"):
            # centring first changes no HSIC (linear kernel) but keeps the sums small
            x, y = x - x.mean(axis=0), y - y.mean(axis=0)
            K, L = x @ x.T, y @ y.T
            deb = metric == "debiased"
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, j] = _loo_hsic(K, L, deb) / np.sqrt(_loo_hsic(K, K, deb) * _loo_hsic(L, L, deb))
            continue
        keep = ~np.eye(n, dtype=bool)
        for i in range(n):
            out[i, j] = rbf_cka(x[keep[i]], y[keep[i]], sigma_frac=sigma_frac)
    return out


def minibatch_cka(
    X: ArrayLike,
    Y: ArrayLike,
    batch_size: int,
    seed: int = 0,
    *,
    debiased: bool = True,
) -> float:
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021).

    Rows are shuffled once with ``np.random.default_rng(seed).permutation(n)``
    and cut into consecutive batches of ``batch_size``. A final batch smaller
    than 4 is dropped (the unbiased HSIC needs m > 3); a final batch of 4 or
    more is kept. For each batch HSIC_1(K,L), HSIC_1(K,K), HSIC_1(L,L) are
    computed (each already divided by m(m-3), so batches of different size
    are on one scale) and summed separately;
    CKA = sum HSIC_KL / sqrt(sum HSIC_KK * sum HSIC_LL). Averages of the
    unbiased estimator converge to population HSIC, which is why the
    estimator does not depend on batch size the way averaging per-batch CKA
    would. Deterministic for a given seed. ``debiased=False`` uses the biased
    HSIC per batch (divided by (m-1)^2) instead.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 4:
        raise ValueError(f"batch_size must be an integer >= 4, got {batch_size!r}")
    X, Y = _pair(X, Y)
    n = X.shape[0]
    _require_n_gt_3(n, "minibatch_cka")
    perm = np.random.default_rng(seed).permutation(n)
    batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches[-1]) < 4:
        batches.pop()
    kl = kk = ll = 0.0
    for idx in batches:
        m = len(idx)
        Xb = X[idx] - X[idx].mean(axis=0)
        Yb = Y[idx] - Y[idx].mean(axis=0)
        tkl, tkk, tll = _scaled_hsic_terms(Xb @ Xb.T, Yb @ Yb.T, unbiased=debiased)
        scale = m * (m - 3) if debiased else (m - 1) ** 2
        kl += tkl / scale
        kk += tkk / scale
        ll += tll / scale
    if kk <= 0.0 or ll <= 0.0:
        raise ValueError("an input has zero variance within every batch; CKA is undefined")
    return kl / math.sqrt(kk * ll)


# --------------------------------------------------------------------------
# cosine
# --------------------------------------------------------------------------


def _rowwise_cosine(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    # Rows are rescaled by their max |entry| first so that the norms neither
    # overflow (1e200) nor underflow (1e-200); cosine is scale invariant.
    sx = np.abs(X).max(axis=-1, keepdims=True)
    sy = np.abs(Y).max(axis=-1, keepdims=True)
    zero = (sx[..., 0] == 0.0) | (sy[..., 0] == 0.0)
    Xn = X / np.where(sx == 0.0, 1.0, sx)
    Yn = Y / np.where(sy == 0.0, 1.0, sy)
    num = np.einsum("...i,...i->...", Xn, Yn)
    den = np.linalg.norm(Xn, axis=-1) * np.linalg.norm(Yn, axis=-1)
    out = num / np.where(zero, 1.0, den)
    out[zero] = 0.0
    return np.clip(out, -1.0, 1.0)


def cosine_similarity(X: ArrayLike, Y: ArrayLike) -> np.ndarray:
    """Per-example cosine similarity, shape ``(n,)``, float64.

    Needs ``d1 == d2`` (the same coordinate system): unlike CKA it is *not*
    invariant to rotations, which is exactly what makes it complementary.
    A zero vector has no direction; such examples get cosine 0.0 (never NaN)
    so summary statistics stay defined. Accepts ``n >= 1``.
    """
    X, Y = _pair(X, Y, min_n=1)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"cosine similarity needs equal feature sizes; got d1={X.shape[1]}, d2={Y.shape[1]}"
        )
    return _rowwise_cosine(X, Y)


# --------------------------------------------------------------------------
# multi-layer path
# --------------------------------------------------------------------------


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = {"float64": torch.float64, "float32": torch.float32}.get(
            np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        )
    if out not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    return out


def _layer_list(layers: ArrayLike | Sequence[ArrayLike], name: str) -> list[ArrayLike]:
    if isinstance(layers, (np.ndarray, torch.Tensor)):
        if layers.ndim != 3:
            raise ValueError(
                f"{name}: a stacked input must be 3-D (layers, n, d); got shape {tuple(layers.shape)}"
            )
        return [layers[i] for i in range(layers.shape[0])]
    out = list(layers)
    if not out:
        raise ValueError(f"{name}: no layers given")
    return out


def _prepared_layer(a: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """Validated, centred, Frobenius-normalised float64 tensor on ``device``."""
    if isinstance(a, torch.Tensor):
        t = a.detach().to(device=device, dtype=torch.float64)
    else:
        t = torch.from_numpy(_as_float64(a, name)).to(device)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d); got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"{name} has n={t.shape[0]} examples; this needs n >= 2")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    t = t - t.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(t)
    if float(norm) == 0.0:
        raise ValueError(f"{name} has zero variance (every column is constant); CKA is undefined")
    return t / norm


def _fro64(t: torch.Tensor) -> torch.Tensor:
    """Per-matrix Frobenius norms of a (b, p, q) batch, accumulated in float64."""
    return torch.linalg.vector_norm(t, dim=(1, 2), dtype=torch.float64)


def _sym_product(Z: torch.Tensor, outer: bool) -> torch.Tensor:
    """``Z Z^T`` (outer) or ``Z^T Z`` for a (b, n, d) batch.

    On CPU in float64 this goes through numpy, whose matmul recognises
    ``z.T @ z`` and calls BLAS syrk (half the FLOPs); torch always runs a
    full gemm. Measured on the 2-core dev box at n=4096, d=2048: ~1.5x faster
    for Z^T Z, ~2x for Z Z^T. In float32 torch's sgemm was faster still.
    """
    if Z.device.type == "cpu" and Z.dtype == torch.float64:
        zs = Z.numpy()
        return torch.from_numpy(np.stack([z @ z.T if outer else z.T @ z for z in zs]))
    return torch.bmm(Z, Z.transpose(1, 2)) if outer else torch.bmm(Z.transpose(1, 2), Z)


def _self_norm(Z: torch.Tensor) -> torch.Tensor:
    """||Z^T Z||_F for a (b, n, d) batch via the smaller of the d x d / n x n forms."""
    return _fro64(_sym_product(Z, outer=Z.shape[1] < Z.shape[2]))


class BaseSide:
    """The base model's half of linear CKA, precomputed once for many layers.

    The drift analysis compares one base model against many fine-tuned
    models; everything that depends only on the base (centring, normalising,
    ``||Xc^T Xc||_F`` or the centred Gram matrix) is done here once.

    ``method``: ``"feature"`` stores the centred features (L x n x d);
    ``"gram"`` stores the centred Gram matrices (L x n x n), after which each
    comparison needs one n x n product ``Yc Yc^T`` instead of the feature
    form's ``Yc^T Xc`` plus a symmetric self product.
    ``"auto"`` takes the Gram form when ``n < 2 d`` (assuming the other side has
    the same width as the base) and it fits in 2 GiB.

    ``dtype``: float64 (default) is exact to ~1e-12. float32 runs the large
    matmuls in float32, with centring done in float64 beforehand and the
    norms accumulated in float64 afterwards; measured max absolute error vs
    float64 over 23 layers at n=4096, d=2048 (bench/bench_cka.py data, CKA
    values 0.5-0.99): 8e-9 feature form, 6e-10 Gram form. Good enough for
    drift curves; use float64 for anything compared at 1e-6 or finer.
    ``device``: any torch device, e.g. ``"cuda"``.
    """

    def __init__(
        self,
        layers: ArrayLike | Sequence[ArrayLike],
        *,
        method: Method = "auto",
        dtype: Any = torch.float64,
        device: str | torch.device | None = None,
    ) -> None:
        _check_method(method)
        self.dtype = _torch_dtype(dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        items = _layer_list(layers, "base")
        self.n_layers = len(items)
        first = _prepared_layer(items[0], "base layer 0", self.device)
        self.n, self.d = first.shape
        if method == "auto":
            gram_bytes = self.n_layers * self.n * self.n * (8 if self.dtype == torch.float64 else 4)
            method = "gram" if (self.n < 2 * self.d and gram_bytes <= _MAX_GRAM_BYTES) else "feature"
        self.method: Literal["feature", "gram"] = method
        width = self.n if method == "gram" else self.d
        self._store = torch.empty(
            (self.n_layers, self.n, width), dtype=self.dtype, device=self.device
        )
        self._norm = torch.empty(self.n_layers, dtype=torch.float64, device=self.device)
        for i, a in enumerate(items):
            x = first if i == 0 else _prepared_layer(a, f"base layer {i}", self.device)
            if tuple(x.shape) != (self.n, self.d):
                raise ValueError(
                    f"base layer {i} has shape {tuple(x.shape)}, expected {(self.n, self.d)} "
                    "like layer 0 (the multi-layer path needs uniform shapes)"
                )
            x = x.to(self.dtype).unsqueeze(0)
            if method == "gram":
                K = _sym_product(x, outer=True)
                self._store[i] = K[0]
                self._norm[i] = _fro64(K)[0]
            else:
                self._store[i] = x[0]
                self._norm[i] = _self_norm(x)[0]
            del x
        del first

    def __repr__(self) -> str:
        return (
            f"BaseSide(n_layers={self.n_layers}, n={self.n}, d={self.d}, "
            f"method={self.method!r}, dtype={self.dtype}, device={self.device})"
        )


def _layers_per_chunk(per_layer_elems: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, per_layer_elems * itemsize))


def cka_against_base(base: BaseSide, other_layers: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Linear CKA of each layer of ``other_layers`` against ``base``: ``(n_layers,)`` float64.

    Layers are processed in chunks with batched matmuls (``torch.bmm``);
    chunk size bounds peak memory at a few hundred MB of intermediates.
    """
    items = _layer_list(other_layers, "other")
    if len(items) != base.n_layers:
        raise ValueError(f"base has {base.n_layers} layers, other has {len(items)}")
    itemsize = 8 if base.dtype == torch.float64 else 4
    out = np.empty(base.n_layers, dtype=np.float64)
    start = 0
    while start < base.n_layers:
        ys = []
        for j in range(start, base.n_layers):
            y = _prepared_layer(items[j], f"other layer {j}", base.device)
            if y.shape[0] != base.n:
                raise ValueError(
                    f"other layer {j} has n={y.shape[0]} examples, base has n={base.n}"
                )
            if ys and y.shape != ys[0].shape:
                raise ValueError(
                    f"other layer {j} has shape {tuple(y.shape)}, expected {tuple(ys[0].shape)}"
                )
            ys.append(y.to(base.dtype))
            d2 = y.shape[1]
            inter = base.n * base.n if base.method == "gram" else d2 * max(base.d, min(base.n, d2))
            if len(ys) >= _layers_per_chunk(inter + base.n * d2, itemsize):
                break
        stop = start + len(ys)
        Y = torch.stack(ys)
        del ys
        if base.method == "gram":
            L = _sym_product(Y, outer=True)
            num = (base._store[start:stop] * L).sum(dim=(1, 2), dtype=torch.float64)
            val = num / (base._norm[start:stop] * _fro64(L))
        else:
            cross = torch.bmm(Y.transpose(1, 2), base._store[start:stop])
            num = _fro64(cross) ** 2
            val = num / (base._norm[start:stop] * _self_norm(Y))
        out[start:stop] = val.cpu().numpy()
        start = stop
    return out


def linear_cka_layers(
    base: ArrayLike | Sequence[ArrayLike],
    other: ArrayLike | Sequence[ArrayLike],
    *,
    method: Method = "auto",
    dtype: Any = torch.float64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Linear CKA per layer, ``(n_layers,)``: ``cka_against_base(BaseSide(base), other)``.

    ``base``/``other``: lists of ``(n, d)`` arrays/tensors (one per layer) or
    stacked ``(layers, n, d)``. Equals :func:`linear_cka` per layer (to ~1e-12
    in float64). Build a :class:`BaseSide` yourself to reuse it across models.
    """
    return cka_against_base(BaseSide(base, method=method, dtype=dtype, device=device), other)


def cosine_layers(
    base: ArrayLike | Sequence[ArrayLike], other: ArrayLike | Sequence[ArrayLike]
) -> np.ndarray:
    """Per-layer, per-example cosine similarity, ``(n_layers, n)`` float64.

    Same zero-vector convention as :func:`cosine_similarity`. O(n d) per
    layer, so it is a plain loop: stacking all layers in float64 would only
    add memory.
    """
    b = _layer_list(base, "base")
    o = _layer_list(other, "other")
    if len(b) != len(o):
        raise ValueError(f"base has {len(b)} layers, other has {len(o)}")
    rows = []
    for i, (x, y) in enumerate(zip(b, o)):
        try:
            rows.append(cosine_similarity(x, y))
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from e
    if len({r.shape[0] for r in rows}) != 1:
        raise ValueError("all layers must have the same number of examples n")
    return np.stack(rows)
