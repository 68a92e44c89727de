"""Scoring a run's model (loradrift.evaluate): predictions in the input order, validation on a
subset, and SQuAD v2's span decoding, vectorised over windows."""

import numpy as np
import pytest
import torch

from loradrift.context import setup
from loradrift.evaluate import _span_topk, best_spans, evaluate, predict


def test_predict_batches_by_length_but_keeps_the_input_order(tiny_cfg):
    ctx = setup(tiny_cfg("mrpc", "lora"))
    feats = ctx.feats["dev"][:12]
    assert len({len(f["input_ids"]) for f in feats}) > 1  # lengths differ, so sorting reorders
    whole = predict(ctx, feats)["logits"]
    one_by_one = [predict(ctx, [f])["logits"][0] for f in feats]
    for a, b in zip(whole, one_by_one):
        assert torch.allclose(a, b, atol=1e-5)


def test_mid_run_validation_can_use_a_subset(tiny_cfg):
    for task, key in (("sst2", "accuracy"), ("squad_v2", "f1")):
        ctx = setup(tiny_cfg(task, "lora"))
        full, sub = evaluate(ctx, "val"), evaluate(ctx, "val", limit=5)
        assert key in sub and key in full
        if task == "sst2":
            labels = [f["label"] for f in ctx.feats["val"][:5]]
            assert sub["accuracy"] * 5 == pytest.approx(round(sub["accuracy"] * 5)) and len(labels) == 5
        else:
            assert sub["total"] == 5 and full["total"] == len(ctx.data.val)


def _loop_best(start, end, s_idx, e_idx, offsets, max_len):
    """The per-window candidate loop that best_spans replaces (first strict maximum wins)."""
    best = None
    for s in s_idx:
        for e in e_idx:
            if s < 0 or e < 0 or offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_len:
                continue
            score = float(start[s] + end[e])
            if best is None or score > best[0]:
                best = (score, s, e)
    return best


def test_vectorised_span_search_matches_the_candidate_loop():
    rng = np.random.default_rng(1)
    W, T, n_best, max_len = 40, 30, 5, 6
    # Integer logits make ties common: the tie-breaking must match too.
    start = torch.tensor(rng.integers(-4, 5, size=(W, T)), dtype=torch.float32)
    end = torch.tensor(rng.integers(-4, 5, size=(W, T)), dtype=torch.float32)
    lengths = rng.integers(3, T + 1, size=W)
    offsets = [[None if rng.random() < 0.3 else (j, j + 1) for j in range(n)] + [None] * (T - n) for n in lengths]
    for i, n in enumerate(lengths):  # padding positions carry the head's masking value
        start[i, n:] = end[i, n:] = torch.finfo(torch.float32).min
    red = _span_topk(n_best)({"start_logits": start, "end_logits": end, "has_logit": torch.zeros(W)})
    in_ctx = np.array([[x is not None for x in o] for o in offsets])
    score, s_best, e_best = best_spans(red["start_val"], red["start_idx"], red["end_val"], red["end_idx"], in_ctx, max_len)
    for i in range(W):
        n = int(lengths[i])
        # The candidates are each window's n-best (which of several tied logits is taken is
        # torch.topk's choice, as before) ...
        k = min(n_best, n)
        assert red["start_val"][i][:k].tolist() == torch.topk(start[i, :n], k).values.tolist()
        # ... and among them the vectorised search picks exactly what the loop picks.
        ref = _loop_best(start[i], end[i], red["start_idx"][i].tolist(), red["end_idx"][i].tolist(), offsets[i], max_len)
        if ref is None:
            assert score[i] == -np.inf
        else:
            assert (float(score[i]), int(s_best[i]), int(e_best[i])) == ref, i
