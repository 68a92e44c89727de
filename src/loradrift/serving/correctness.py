"""Does an adapter served unmerged give what its merged model gives, and does it change anything?

Both checks use greedy tokens and the per-token log-probability of each generated token (from the
raw logits) on the same check prompts. Agreement tolerances are stated per dtype
(:data:`TOLERANCE`); log-probabilities are compared only over the common prefix of two token
sequences, because after the first differing token the two continuations condition on different
text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# dtype -> (max |delta logprob| allowed between an adapter and its merged model, minimum greedy-token
# match rate). fp32 was measured here (CPU: hf and vLLM, unmerged vs merged differ by < 1e-4);
# the half-precision values are stated, not measured on this CPU-only machine: merging rounds
# W + BA once to bf16/fp16 while the unmerged path adds BAx in the activations' precision.
TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (2e-3, 0.95),
    "bfloat16": (0.25, 0.8),
    "float16": (0.1, 0.85),
}


# dtype -> the |delta logprob| by which an adapter must move some token's log-probability to count
# as changing the base model, when no greedy token differs. Its own margin, far below the agreement
# tolerance: the base rows are computed in the same engine and batch as the adapter's, so an adapter
# of zeros reproduces them exactly, while an adapter trained a few steps moves log-probabilities by
# ~1e-3, under the fp32 agreement tolerance. About the dtype's rounding of a log-probability near 1
# (fp32 1.2e-7, fp16 1e-3, bf16 8e-3), with room: stated, not measured.
DIFFERS_MARGIN: dict[str, float] = {"float32": 1e-5, "bfloat16": 0.02, "float16": 0.003}


def tolerance(dtype: str) -> tuple[float, float]:
    if dtype not in TOLERANCE:
        raise ValueError(f"no correctness tolerance for dtype '{dtype}' (have {sorted(TOLERANCE)})")
    return TOLERANCE[dtype]


def match_rate(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Fraction of generated tokens that agree, counting per sequence only the common prefix.

    After the first differing token the two continuations condition on different text, so later
    coincidental agreement is not counted as a match.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference sequences vs {len(other)}")
    total = matched = 0
    for ref, oth in zip(reference, other):
        total += max(len(ref), len(oth))
        matched += _prefix(ref, oth)
    return 1.0 if total == 0 else matched / total


def _prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def max_logprob_diff(ref_tokens: Sequence[Sequence[int]], ref_lp: Sequence[Sequence[float]],
                     tokens: Sequence[Sequence[int]], lp: Sequence[Sequence[float]]) -> float:
    """Largest |logprob difference| of the same generated token, over each row's common prefix
    (0.0 when no row shares even its first token)."""
    worst = 0.0
    for rt, rl, t, l_ in zip(ref_tokens, ref_lp, tokens, lp):
        n = _prefix(rt, t)
        if n:
            worst = max(worst, float(np.max(np.abs(np.asarray(rl[:n]) - np.asarray(l_[:n])))))
    return worst


def compare(ref: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Token match rate, rows that differ at all, and the largest logprob difference, between two
    ``{"tokens": [...], "logprobs": [...]}`` outputs of the same prompts."""
    rt, ot = ref["tokens"], other["tokens"]
    return {"match_rate": match_rate(rt, ot), "rows_differing": sum(a != b for a, b in zip(rt, ot)),
            "max_abs_logprob_diff": max_logprob_diff(rt, ref["logprobs"], ot, other["logprobs"]),
            "n_prompts": len(rt), "n_tokens": sum(len(s) for s in rt)}


def agreement_row(backend: str, config: str, task: str, reference: str, ref: Mapping[str, Any],
                  other: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """An adapter served unmerged (``other``) vs its merged model (``ref``): passes when the token
    match rate and the logprob difference are within the dtype's tolerance."""
    tol_lp, min_match = tolerance(dtype)
    c = compare(ref, other)
    ok = c["match_rate"] >= min_match and c["max_abs_logprob_diff"] <= tol_lp
    return {"check": "adapter vs merged", "backend": backend, "config": config, "task": task,
            "reference": reference, **c, "min_match_rate": min_match, "logprob_tolerance": tol_lp,
            "dtype": dtype, "passed": bool(ok)}


def differs_row(backend: str, config: str, task: str, base: Mapping[str, Any], adapter: Mapping[str, Any],
                dtype: str) -> dict[str, Any]:
    """An adapter's outputs vs the base model's on the same prompts. It passes only when the adapter
    changes something: a token, or a logprob by more than the dtype's :data:`DIFFERS_MARGIN`. An
    adapter of zeros, an adapter that did not learn, or a backend that ignores LoRA, fails: a
    finding about the adapter (:func:`findings`), not an error of the benchmark."""
    tolerance(dtype)
    tol_lp = DIFFERS_MARGIN[dtype]
    c = compare(base, adapter)
    ok = c["rows_differing"] > 0 or c["max_abs_logprob_diff"] > tol_lp
    return {"check": "adapter differs from base", "backend": backend, "config": config, "task": task,
            "reference": f"{backend}:base", **c, "min_match_rate": None, "logprob_tolerance": tol_lp,
            "dtype": dtype, "passed": bool(ok)}


def failures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The failed agreement checks: served outputs that disagree with what they must reproduce, an
    error of the serving path."""
    return [f"{c['backend']}/{c['config']}/{c['task']} vs {c['reference']}: match rate "
            f"{c['match_rate']:.3f} (min {c['min_match_rate']}), max |delta logprob| "
            f"{c['max_abs_logprob_diff']:.2e} (tolerance {c['logprob_tolerance']})"
            for c in rows if not c["passed"] and c["check"] != "adapter differs from base"]


def findings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Adapters whose outputs equal the base model's: the benchmark still measured the cost of
    serving them, but they change nothing (an adapter of runs that did not learn, all zeros, or
    LoRA not applied), which the report flags."""
    return [f"{c['backend']}/{c['config']}/{c['task']}: the adapter's outputs equal the base model's (no token "
            f"differs on {c['n_prompts']} prompts, max |delta logprob| {c['max_abs_logprob_diff']:.2e} <= "
            f"{c['logprob_tolerance']}): did its run learn, is the adapter all zeros, or is LoRA not applied?"
            for c in rows if not c["passed"] and c["check"] == "adapter differs from base"]
