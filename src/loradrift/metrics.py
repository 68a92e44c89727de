"""Evaluation metrics: GLUE classification scores and the official SQuAD v2 scorer.

Two families live here, and they use different scales on purpose:

* GLUE metrics (``accuracy``, ``binary_f1`` and the ``METRICS`` registry) return
  fractions in [0, 1], as the Hugging Face ``evaluate`` GLUE metric does.
* SQuAD v2 (``squad_v2_evaluate`` and friends) returns percentages in [0, 100],
  because that is what the official ``evaluate-v2.0.py`` script prints and what
  papers report. Thresholds (``*_thresh``) are no-answer probabilities, not percents.

The SQuAD v2 part reproduces the official script (Rajpurkar et al., 2018) function by
function and keeps its names, so the two can be read side by side. Arithmetic is done
in the same order as the official code, so results match it to the last bit. The only
deliberate departures are described in ``squad_v2_evaluate``.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS",
    "accuracy",
    "accuracy_f1_metrics",
    "accuracy_metrics",
    "apply_no_ans_threshold",
    "binary_f1",
    "compute_exact",
    "compute_f1",
    "compute_metrics",
    "find_all_best_thresh",
    "find_best_thresh",
    "get_raw_scores",
    "get_tokens",
    "load_squad_json",
    "make_eval_dict",
    "make_qid_to_has_ans",
    "merge_eval",
    "normalize_answer",
    "score_squad_v2_files",
    "squad_v2_evaluate",
]


# --------------------------------------------------------------------------- GLUE


def _paired(preds: Sequence, labels: Sequence) -> tuple[list, list]:
    # list() lets callers pass numpy arrays or tensors' .tolist() alike.
    preds, labels = list(preds), list(labels)
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} predictions but {len(labels)} labels")
    if not preds:
        # A score over zero examples is undefined; returning 0 or 1 would hide a bug upstream.
        raise ValueError("cannot score an empty set of predictions")
    return preds, labels


def accuracy(preds: Sequence, labels: Sequence) -> float:
    """Fraction of predictions equal to their label, in [0, 1]."""
    preds, labels = _paired(preds, labels)
    return sum(p == y for p, y in zip(preds, labels)) / len(preds)


def binary_f1(preds: Sequence, labels: Sequence, positive: Any = 1) -> float:
    """F1 of the ``positive`` class, in [0, 1]; same definition as sklearn's binary F1.

    Every value other than ``positive`` counts as negative. When there are no true
    positives F1 is 0.0 (sklearn's ``zero_division`` default), including the case
    where neither predictions nor labels contain the positive class.
    """
    preds, labels = _paired(preds, labels)
    tp = sum(p == positive and y == positive for p, y in zip(preds, labels))
    fp = sum(p == positive and y != positive for p, y in zip(preds, labels))
    fn = sum(p != positive and y == positive for p, y in zip(preds, labels))
    if tp == 0:
        return 0.0
    # 2PR/(P+R) simplifies to this, and it avoids dividing by a zero precision or recall.
    return 2 * tp / (2 * tp + fp + fn)


def accuracy_metrics(preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Registry entry ``"accuracy"``: ``{"accuracy": ...}``."""
    return {"accuracy": accuracy(preds, labels)}


def accuracy_f1_metrics(preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Registry entry ``"accuracy_f1"`` (MRPC): accuracy, F1 and their mean.

    ``combined_score`` is the plain mean of the two, which is how Hugging Face's
    ``run_glue.py`` reports it when a task has more than one metric.
    """
    acc = accuracy(preds, labels)
    f1 = binary_f1(preds, labels)
    return {"accuracy": acc, "f1": f1, "combined_score": (acc + f1) / 2}


#: Tasks name their metric set with one of these keys. Every function takes
#: ``(preds, labels)`` and returns a dict of floats in [0, 1].
METRICS: dict[str, Callable[[Sequence, Sequence], dict[str, float]]] = {
    "accuracy": accuracy_metrics,
    "accuracy_f1": accuracy_f1_metrics,
}


def compute_metrics(name: str, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Look up metric set ``name`` in ``METRICS`` and apply it."""
    try:
        fn = METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric set {name!r}; known: {sorted(METRICS)}") from None
    return fn(preds, labels)


# ------------------------------------------------------------ SQuAD v2 (official)
# Everything from here to find_all_best_thresh mirrors evaluate-v2.0.py. Keep the
# expressions as they are: changing e.g. the order of a sum changes the last digits.


def make_qid_to_has_ans(dataset: list[dict]) -> dict[str, bool]:
    qid_to_has_ans = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                # Note: a question whose answers all normalise to "" still counts as
                # HasAns here, even though get_raw_scores then treats its gold as "".
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    return qid_to_has_ans


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)  # ASCII only: curly quotes etc. are kept, as upstream.


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    # The order matters: punctuation goes before articles, so "the-end" -> "theend" survives.
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(_ARTICLES, " ", text)
    return " ".join(text.split())


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    # Counter intersection: a repeated token only counts as often as it occurs in both.
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise.
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def get_raw_scores(dataset: list[dict], preds: Mapping[str, str]) -> tuple[dict, dict]:
    """Per-question EM and F1 (0/1 and [0, 1]); questions without a prediction are skipped."""
    exact_scores = {}
    f1_scores = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])]
                if not gold_answers:
                    # For unanswerable questions, the only correct answer is the empty string.
                    gold_answers = [""]
                if qid not in preds:
                    # Upstream prints "Missing prediction for <qid>" here; the caller
                    # (squad_v2_evaluate) reports missing predictions once, as a count.
                    continue
                a_pred = preds[qid]
                # Take max over all gold answers.
                exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
                f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def apply_no_ans_threshold(
    scores: dict[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
    na_prob_thresh: float,
) -> dict[str, float]:
    """Replace a score by the no-answer outcome when the model's na_prob exceeds the threshold."""
    new_scores = {}
    for qid, s in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def make_eval_dict(
    exact_scores: dict[str, float],
    f1_scores: dict[str, float],
    qid_list: list[str] | None = None,
) -> collections.OrderedDict:
    """``exact``, ``f1`` (percent) and ``total`` over ``qid_list``, or over every scored qid."""
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores.values()) / total),
                ("f1", 100.0 * sum(f1_scores.values()) / total),
                ("total", total),
            ]
        )
    total = len(qid_list)
    return collections.OrderedDict(
        [
            ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
            ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
            ("total", total),
        ]
    )


def merge_eval(main_eval: dict, new_eval: Mapping, prefix: str) -> None:
    for k in new_eval:
        main_eval["%s_%s" % (prefix, k)] = new_eval[k]  # noqa: UP031 - verbatim from the official evaluate-v2.0.py


def find_best_thresh(
    preds: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> tuple[float, float]:
    """Best total score (percent) over all na_prob thresholds, and the threshold giving it.

    Start from "answer nothing" (every NoAns question right, every HasAns wrong), then
    walk the questions from least to most likely unanswerable, switching each one to
    "answer it": a HasAns question gains its score, a NoAns question loses 1 if the
    model answered something. The best running total wins; ties keep the earlier one.
    """
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            if preds[qid]:
                diff = -1
            else:
                diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def find_all_best_thresh(
    main_eval: dict,
    preds: Mapping[str, str],
    exact_raw: Mapping[str, float],
    f1_raw: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> None:
    best_exact, exact_thresh = find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
    best_f1, f1_thresh = find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
    main_eval["best_exact"] = best_exact
    main_eval["best_exact_thresh"] = exact_thresh
    main_eval["best_f1"] = best_f1
    main_eval["best_f1_thresh"] = f1_thresh


# ------------------------------------------------------------ SQuAD v2 (driver)


def squad_v2_evaluate(
    dataset: list[dict],
    preds: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> collections.OrderedDict:
    """Score SQuAD v2 predictions exactly as the official ``evaluate-v2.0.py`` does.

    ``dataset`` is the ``"data"`` list of the official JSON, ``preds`` maps question id
    to answer text ("" means "no answer"), ``na_probs`` maps question id to the model's
    probability that the question is unanswerable. A question is forced to "no answer"
    when its na_prob is strictly greater than ``na_prob_thresh``.

    Returns, in this order: ``exact, f1, total``, then ``HasAns_*`` and ``NoAns_*``
    (each only if the set has questions), then ``best_exact, best_exact_thresh,
    best_f1, best_f1_thresh`` only when ``na_probs`` is given, as upstream does when
    ``--na-prob-file`` is passed. Scores are percentages; nothing is rounded.

    Departures from upstream, all in cases where upstream crashes:

    * Questions without a prediction are left out of every total (upstream leaves them
      out of the overall total, then raises KeyError in the HasAns/NoAns breakdown).
      One warning gives their count, and the result gains a final ``missing`` key;
      with complete predictions the keys are exactly upstream's.
    * Bad input raises ``ValueError`` instead of KeyError/AttributeError: a
      non-string prediction, no prediction for any question, or ``na_probs``
      without an entry for a predicted question.

    Departures where upstream gives a wrong score without a word: two questions with one
    id (upstream keeps one, and ``total`` comes out short) and a no-answer probability
    outside [0, 1] or not finite raise ``ValueError``.
    """
    _check_squad_data(dataset, "dataset")
    _check_preds(preds, "preds")
    if na_probs is not None:
        _check_na_probs(na_probs, "na_probs")

    qid_to_has_ans = make_qid_to_has_ans(dataset)
    missing = [qid for qid in qid_to_has_ans if qid not in preds]
    if len(missing) == len(qid_to_has_ans):
        raise ValueError("no prediction matches any question id in the dataset")
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(qid_to_has_ans)} questions have no prediction and are "
            f"left out of all totals (first: {missing[:3]})",
            stacklevel=2,
        )
        # Scoring only the predicted questions keeps every total consistent, including
        # find_best_thresh's starting point (it counts NoAns questions in qid_to_has_ans).
        qid_to_has_ans = {k: v for k, v in qid_to_has_ans.items() if k in preds}

    has_na_probs = na_probs is not None
    if na_probs is None:
        na_probs = {k: 0.0 for k in preds}
    else:
        _check_na_probs_cover(na_probs, qid_to_has_ans, "na_probs")

    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(dataset, preds)
    exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        has_ans_eval = make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids)
        merge_eval(out_eval, has_ans_eval, "HasAns")
    if no_ans_qids:
        no_ans_eval = make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids)
        merge_eval(out_eval, no_ans_eval, "NoAns")
    if has_na_probs:
        find_all_best_thresh(out_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans)
    if missing:
        out_eval["missing"] = len(missing)
    return out_eval


def load_squad_json(path: str | Path) -> list[dict]:
    """Read an official SQuAD JSON file and return its ``"data"`` list.

    Checks every field the scorer reads, so a malformed file fails here with a message
    such as ``dev.json: data[3].paragraphs[0].qas[2]: missing 'id'`` rather than with
    a KeyError deep inside scoring; a question id used twice names both places.
    """
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {_kind(obj)}")
    if "data" not in obj:
        raise ValueError(f"{path}: missing 'data'")
    _check_squad_data(obj["data"], f"{path}: data")
    return obj["data"]


def score_squad_v2_files(
    data_path: str | Path,
    preds_path: str | Path,
    na_prob_file: str | Path | None = None,
    na_prob_thresh: float = 1.0,
    allow_missing: bool = False,
    allow_extra: bool = False,
) -> collections.OrderedDict:
    """File-level entry point behind ``loradrift score squad_v2``; see ``squad_v2_evaluate``.

    A predictions file that leaves out questions is an error naming how many, because a
    score over the predicted subset alone looks like a score over the whole set. With
    ``allow_missing`` the official script's subset behaviour applies (and the result's
    ``missing`` key gives the count).

    Likewise a prediction whose id is in no question of the data is an error: the official
    script ignores it without a word, and ids that do not match almost always mean the
    predictions were made on another file (train vs dev, another version). With
    ``allow_extra`` they are ignored as upstream does, with a warning and an ``extra`` key
    giving their count (for predictions on a superset, e.g. scored against a subset)."""
    dataset = load_squad_json(data_path)
    preds = _read_json(preds_path)
    _check_preds(preds, str(preds_path))
    qids = make_qid_to_has_ans(dataset)
    if not allow_missing:
        missing = [q for q in qids if q not in preds]
        if missing:
            raise ValueError(f"{preds_path}: no prediction for {len(missing)} of {len(qids)} questions in {data_path} "
                             f"(first: {missing[0]!r}); pass --allow-missing to score only the predicted ones")
    extra = [q for q in preds if q not in qids]
    if extra and not allow_extra:
        raise ValueError(f"{preds_path}: {len(extra)} of {len(preds)} predictions are for question ids that are not in "
                         f"{data_path} (first: {extra[0]!r}); predictions for another file? Pass --allow-extra "
                         f"to ignore them, as the official script does")
    if extra:
        warnings.warn(f"{len(extra)} of {len(preds)} predictions have ids not in {data_path} and are ignored "
                      f"(first: {extra[:3]})", stacklevel=2)
    na_probs = None
    if na_prob_file is not None:
        na_probs = _read_json(na_prob_file)
        _check_na_probs(na_probs, str(na_prob_file))
        # Checked here too so the error names the file rather than "na_probs".
        predicted = [k for k in qids if k in preds]
        _check_na_probs_cover(na_probs, predicted, str(na_prob_file))
    out = squad_v2_evaluate(dataset, preds, na_probs=na_probs, na_prob_thresh=na_prob_thresh)
    if extra:
        out["extra"] = len(extra)
    return out


# ------------------------------------------------------------ input checks


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def _check_squad_data(data: Any, where: str) -> None:
    """Raise ValueError naming the first field the scorer would trip over."""

    def need(obj: Any, key: str, kind: type, at: str) -> Any:
        if not isinstance(obj, dict):
            raise ValueError(f"{at}: expected an object, got {_kind(obj)}")
        if key not in obj:
            raise ValueError(f"{at}: missing {key!r}")
        value = obj[key]
        if not isinstance(value, kind):
            expected = "an array" if kind is list else "a string"
            raise ValueError(f"{at}.{key}: expected {expected}, got {_kind(value)}")
        return value

    if not isinstance(data, list):
        raise ValueError(f"{where}: expected an array, got {_kind(data)}")
    # Scores, predictions and no-answer probabilities are keyed by question id: a second question
    # with the same id would silently replace the first and the totals would come out one short.
    first_at: dict[str, str] = {}
    name = where.rsplit(": ", 1)[-1]  # "data" without the file name that prefixes it
    for i, article in enumerate(data):
        at_a = f"{where}[{i}]"
        for j, paragraph in enumerate(need(article, "paragraphs", list, at_a)):
            at_p = f"{at_a}.paragraphs[{j}]"
            for k, qa in enumerate(need(paragraph, "qas", list, at_p)):
                at_q = f"{at_p}.qas[{k}]"
                qid = need(qa, "id", str, at_q)
                if qid in first_at:
                    raise ValueError(f"{at_q}: question id {qid!r} is already used at {first_at[qid]}; "
                                     f"question ids must be unique (scores are keyed by id)")
                first_at[qid] = f"{name}[{i}].paragraphs[{j}].qas[{k}]"
                for m, answer in enumerate(need(qa, "answers", list, at_q)):
                    need(answer, "text", str, f"{at_q}.answers[{m}]")


def _check_preds(preds: Any, source: str) -> None:
    if not isinstance(preds, Mapping):
        raise ValueError(
            f"{source}: expected an object mapping question id to answer, got {_kind(preds)}"
        )
    for qid, answer in preds.items():
        if not isinstance(answer, str):
            raise ValueError(
                f"{source}: prediction for {qid!r} must be a string, got {_kind(answer)}"
            )


def _check_na_probs(na_probs: Any, source: str) -> None:
    if not isinstance(na_probs, Mapping):
        raise ValueError(
            f"{source}: expected an object mapping question id to probability, "
            f"got {_kind(na_probs)}"
        )
    for qid, p in na_probs.items():
        # bool is an int subclass but True/False as a probability is almost surely a bug;
        # NaN would make the sort in find_best_thresh meaningless. A value outside [0, 1] is a
        # logit or a score, not a probability: thresholds tuned on it mean nothing.
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
            raise ValueError(
                f"{source}: no-answer probability for {qid!r} must be a finite number in [0, 1], got {p!r}"
            )


def _check_na_probs_cover(na_probs: Mapping, qids: Any, source: str) -> None:
    lacking = [qid for qid in qids if qid not in na_probs]
    if lacking:
        raise ValueError(
            f"{source}: no no-answer probability for {len(lacking)} predicted question(s), "
            f"first: {lacking[0]!r}"
        )
