"""Scores of a run's model on a split: classification metrics, or SQuAD v2 answers decoded from
each question's windows. Both methods and every step use this code; it runs the eager model (a
compiled engine serves training only)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from loradrift.context import Context
from loradrift.data import collate, length_sorted_batches, rows_as_squad_json
from loradrift.engine import autocast
from loradrift.metrics import compute_metrics, squad_v2_evaluate


@torch.no_grad()
def predict(ctx: Context, feats: list[dict], reduce: Callable[[dict], dict] | None = None) -> dict[str, np.ndarray | list]:
    """Model outputs for `feats`, one row per feature in their order. `reduce` maps a batch's
    outputs to smaller tensors on the device before they are copied to the host."""
    model = ctx.model
    was = model.training
    model.eval()
    outs: dict[str, list] = {}
    for idx in length_sorted_batches(feats, ctx.cfg.train.eval_batch_size):
        batch = {k: v.to(ctx.device) for k, v in collate([feats[i] for i in idx], ctx.pad_id).items() if k in ("input_ids", "attention_mask")}
        with autocast(ctx):
            out = model(batch)
        if reduce is not None:
            out = reduce(out)
        for k, v in out.items():
            v = v.float().cpu() if v.is_floating_point() else v.cpu()
            slot = outs.setdefault(k, [None] * len(feats))
            for i, row in zip(idx, list(v) if v.dim() > 1 else v.tolist()):
                slot[i] = row
    model.train(was)
    return outs


def _span_topk(n_best: int) -> Callable[[dict], dict]:
    """Top-n_best start and end positions per window, taken on the device (a window's logits
    never leave it); short batches pad with index -1."""

    def reduce(out: dict) -> dict:
        red = {"has_logit": out["has_logit"]}
        for name in ("start", "end"):
            logits = out[f"{name}_logits"]
            k = min(n_best, logits.size(1))
            val, idx = logits.topk(k, dim=-1)
            if k < n_best:
                val = torch.nn.functional.pad(val, (0, n_best - k), value=-math.inf)
                idx = torch.nn.functional.pad(idx, (0, n_best - k), value=-1)
            red[f"{name}_val"], red[f"{name}_idx"] = val, idx
        return red

    return reduce


def best_spans(start_val, start_idx, end_val, end_idx, in_context, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best valid (start, end) per window from its n-best candidates, all windows at once.

    A pair is valid when both tokens are context tokens (`in_context`, windows × tokens), end ≥
    start and the span is at most `max_len` tokens. Ties go to the first pair in (start rank, end
    rank) order. Returns (score, start, end) per window; score −inf where no pair is valid."""
    s_val, e_val = np.asarray(start_val, np.float32), np.asarray(end_val, np.float32)
    s_idx, e_idx = np.asarray(start_idx), np.asarray(end_idx)
    w = np.arange(len(s_idx))[:, None]
    ok_s = (s_idx >= 0) & in_context[w, np.clip(s_idx, 0, None)]
    ok_e = (e_idx >= 0) & in_context[w, np.clip(e_idx, 0, None)]
    span = e_idx[:, None, :] - s_idx[:, :, None]
    valid = ok_s[:, :, None] & ok_e[:, None, :] & (span >= 0) & (span < max_len)
    with np.errstate(over="ignore"):  # masked (padding) logits sum to -inf; they are invalid anyway
        score = np.where(valid, s_val[:, :, None] + e_val[:, None, :], -np.inf).reshape(len(s_idx), -1)
    flat = score.argmax(axis=1)  # the first maximum, as a loop with a strict ">" keeps it
    k = s_idx.shape[1]
    rows = np.arange(len(s_idx))
    return score[rows, flat], s_idx[rows, flat // k], e_idx[rows, flat % k]


def squad_predictions(ctx: Context, rows: list[dict], feats: list[dict]) -> tuple[dict, dict]:
    """Windows → one answer per question: best start/end pair over all windows (n-best per window,
    length ≤ max_answer_length, inside the context), and a no-answer probability
    1 − max_window sigmoid(answerability logit)."""
    out = predict(ctx, feats, reduce=_span_topk(ctx.cfg.data.n_best))
    width = max(len(f["input_ids"]) for f in feats)
    in_context = np.zeros((len(feats), width), dtype=bool)
    for i, f in enumerate(feats):
        in_context[i, : len(f["offsets"])] = [o is not None for o in f["offsets"]]
    score, s_best, e_best = best_spans(torch.stack(out["start_val"]), torch.stack(out["start_idx"]), torch.stack(out["end_val"]),
                                       torch.stack(out["end_idx"]), in_context, ctx.cfg.data.max_answer_length)
    best: dict[int, tuple[float, str]] = {}
    has_prob: dict[int, float] = {}
    for i, (f, has) in enumerate(zip(feats, out["has_logit"])):
        ex = f["example"]
        has_prob[ex] = max(has_prob.get(ex, 0.0), float(torch.sigmoid(torch.tensor(has))))
        # Windows in order, strict ">": the first window with the best score wins.
        if score[i] > -np.inf and (ex not in best or score[i] > best[ex][0]):
            offsets = f["offsets"]
            best[ex] = (float(score[i]), rows[ex]["context"][offsets[s_best[i]][0] : offsets[e_best[i]][1]])
    preds = {r["id"]: best.get(i, (0.0, ""))[1] for i, r in enumerate(rows)}
    na_probs = {r["id"]: 1.0 - has_prob.get(i, 0.0) for i, r in enumerate(rows)}
    return preds, na_probs


def evaluate(ctx: Context, split: str, na_thresh: float | None = None, limit: int | None = None) -> dict:
    """Scores on 'val' or 'dev', by the task kind's `evaluate` handler. SQuAD: the no-answer
    threshold is tuned on val (best F1 there) and then applied unchanged to dev; dev also reports
    the official best_f1 fields. `limit`: only the first N examples (SQuAD: questions, with all
    their windows)."""
    rows, feats = getattr(ctx.data, split), ctx.feats[split]
    if limit is not None and limit < len(rows):
        rows = rows[:limit]
        feats = [f for f in feats if f["example"] < limit] if ctx.spec.task_kind.windowed else feats[:limit]
    return ctx.spec.handler("evaluate")(ctx, rows, feats, na_thresh)


def evaluate_squad(ctx: Context, rows: list[dict], feats: list[dict], na_thresh: float | None) -> dict:
    """SQuAD v2 scores of one question per row from its windows; `na_thresh` None: tuned here
    (best F1). Also "_predictions" (the thresholded answers), "_na_probs" and "na_prob_thresh"."""
    preds, na_probs = squad_predictions(ctx, rows, feats)
    dataset = rows_as_squad_json(rows)
    if na_thresh is None:
        tuned = squad_v2_evaluate(dataset, preds, na_probs)
        na_thresh = float(tuned["best_f1_thresh"])
    scores = dict(squad_v2_evaluate(dataset, preds, na_probs, na_prob_thresh=na_thresh))
    scores["na_prob_thresh"] = na_thresh
    scores["_predictions"] = {q: ("" if na_probs[q] > na_thresh else a) for q, a in preds.items()}
    scores["_na_probs"] = na_probs
    return scores


def evaluate_classification(ctx: Context, rows: list[dict], feats: list[dict], na_thresh: float | None = None) -> dict:
    """The task metric of one feature per row, and "_predictions" (class ids); `na_thresh` is unused."""
    out = predict(ctx, feats)
    logits = torch.stack(out["logits"])
    preds = logits.argmax(-1).tolist()
    return {**compute_metrics(ctx.spec.metric, preds, [f["label"] for f in feats]), "_predictions": preds}


def primary(ctx: Context, scores: dict) -> float:
    return float(scores[ctx.spec.primary])
