"""Tests for loradrift.metrics.

Every expected value below is worked out by hand (the working is in the comments),
never obtained by running the code under test.
"""

from __future__ import annotations

import json

import pytest

from loradrift.metrics import (
    METRICS,
    accuracy,
    binary_f1,
    compute_exact,
    compute_f1,
    compute_metrics,
    find_best_thresh,
    load_squad_json,
    normalize_answer,
    score_squad_v2_files,
    squad_v2_evaluate,
)

approx = pytest.approx


# ----------------------------------------------------------------- GLUE


def test_accuracy_counts_matches():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy([0, 1, 2], [0, 1, 2]) == 1.0


def test_accuracy_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_binary_f1_by_hand():
    # preds  1 1 0 0 1
    # labels 1 0 1 0 1   -> tp=2, fp=1, fn=1: P=2/3, R=2/3, F1=2/3
    assert binary_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == approx(2 / 3)
    # tp=1, fp=0, fn=2: P=1, R=1/3, F1 = 2*(1/3)/(4/3) = 1/2
    assert binary_f1([1, 0, 0], [1, 1, 1]) == approx(0.5)


def test_binary_f1_edge_cases():
    assert binary_f1([0, 0, 0], [1, 0, 1]) == 0.0  # nothing predicted positive
    assert binary_f1([1, 1], [0, 0]) == 0.0  # only false positives
    assert binary_f1([0, 0], [0, 0]) == 0.0  # no positives anywhere: still no tp
    assert binary_f1([1, 0, 1], [1, 0, 1]) == 1.0


def test_binary_f1_other_positive_label():
    # With positive=0: tp=1 (index 1), fp=1 (index 2), fn=0 -> F1 = 2/(2+1) = 2/3
    assert binary_f1([1, 0, 0], [1, 0, 1], positive=0) == approx(2 / 3)


def test_registry_accuracy():
    assert METRICS["accuracy"]([1, 0], [1, 1]) == {"accuracy": 0.5}


def test_registry_mrpc_combined_score():
    # preds 1 1 0 1, labels 1 0 0 1: accuracy 3/4; tp=2, fp=1, fn=0 -> F1 = 4/5
    # combined = (0.75 + 0.8) / 2 = 0.775
    out = compute_metrics("accuracy_f1", [1, 1, 0, 1], [1, 0, 0, 1])
    assert list(out) == ["accuracy", "f1", "combined_score"]
    assert out["accuracy"] == approx(0.75)
    assert out["f1"] == approx(0.8)
    assert out["combined_score"] == approx(0.775)


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="unknown metric set 'bleu'"):
        compute_metrics("bleu", [1], [1])


# ----------------------------------------------------------------- SQuAD v2 pieces


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat!", "cat"),  # case, leading article, punctuation
        ("  Hello,   World.  ", "hello world"),  # whitespace collapsed
        ("a\tb\nc", "b c"),  # tabs/newlines are whitespace; "a" is an article
        ("banana an apple", "banana apple"),  # "an" inside "banana" untouched
        ("Theater", "theater"),  # "the" inside a word untouched
        ("the-end", "theend"),  # punctuation goes first, so no article is left
        ("don't", "dont"),
        ("An the a", ""),
        ("Café", "café"),  # non-ASCII letters kept
        ("\u201cHi\u201d", "\u201chi\u201d"),  # curly quotes are not in string.punctuation
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_and_f1_with_empty_answers():
    assert compute_exact("", "") == 1 and compute_f1("", "") == 1
    assert compute_exact("", "cat") == 0 and compute_f1("", "cat") == 0
    assert compute_exact("cat", "") == 0 and compute_f1("cat", "") == 0
    # "the" normalises to nothing, so it agrees with an empty prediction.
    assert compute_f1("the", "") == 1


def test_f1_partial_by_hand():
    # gold "the cat sat on the mat" -> [cat, sat, on, mat]; pred [cat, sat]
    # common 2: P = 2/2 = 1, R = 2/4 = 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert compute_f1("the cat sat on the mat", "cat sat") == approx(2 / 3)
    assert compute_exact("the cat sat on the mat", "Cat sat on mat.") == 1
    assert compute_f1("red fox", "blue whale") == 0


def test_f1_duplicate_tokens_use_counter_intersection():
    # gold [x, y, y, z], pred [y, y, y]: "y" counted min(2, 3) = 2 times
    # P = 2/3, R = 2/4 = 1/2, F1 = 2 * (1/3) / (7/6) = 4/7
    assert compute_f1("x y y z", "y y y") == approx(4 / 7)


def _qa(qid, *answers):
    answer_list = [{"text": t, "answer_start": 0} for t in answers]
    return {"id": qid, "question": "?", "answers": answer_list}


def _dataset(*qas):
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": list(qas)}]}]


def test_multiple_golds_take_the_max():
    # Gold 1 "blue whale" vs "whale": P=1, R=1/2 -> 2/3. Gold 2 "the whale" -> [whale]: EM 1.
    data = _dataset(_qa("q", "blue whale", "the whale"))
    out = squad_v2_evaluate(data, {"q": "whale"})
    assert out["exact"] == 100.0 and out["f1"] == 100.0


# ----------------------------------------------------------------- SQuAD v2 end to end
#
# Shared example. na_probs are sorted so the threshold walk is easy to follow.
#   qid  has_ans  gold        pred     na_prob  EM  F1
#   q1   yes      cat         cat      0.1      1   1
#   q3   yes      red fox     fox      0.5      0   2/3  (P=1, R=1/2)
#   q2   no       -           dog      0.6      0   0
#   q4   no       -           ""       0.7      1   1
#   q5   yes      blue whale  shark    0.9      0   0

DATA = _dataset(
    _qa("q1", "cat"), _qa("q2"), _qa("q3", "red fox"), _qa("q4"), _qa("q5", "blue whale")
)
PREDS = {"q1": "cat", "q2": "dog", "q3": "fox", "q4": "", "q5": "shark"}
NA_PROBS = {"q1": 0.1, "q2": 0.6, "q3": 0.5, "q4": 0.7, "q5": 0.9}


def test_breakdown_without_na_probs():
    out = squad_v2_evaluate(DATA, PREDS)
    # No na_probs -> no best_* keys, exactly like the official script without --na-prob-file.
    assert list(out) == [
        "exact", "f1", "total",
        "HasAns_exact", "HasAns_f1", "HasAns_total",
        "NoAns_exact", "NoAns_f1", "NoAns_total",
    ]  # fmt: skip
    # EM 1+0+0+1+0 = 2 of 5 -> 40; F1 1+2/3+0+1+0 = 8/3 of 5 -> 53.33
    assert out["exact"] == approx(40.0)
    assert out["f1"] == approx(100 * (8 / 3) / 5)
    assert out["total"] == 5
    # HasAns q1,q3,q5: EM 1/3; F1 (1 + 2/3)/3 = 5/9
    assert out["HasAns_exact"] == approx(100 / 3)
    assert out["HasAns_f1"] == approx(500 / 9)
    assert out["HasAns_total"] == 3
    # NoAns q2,q4: 1 of 2
    assert out["NoAns_exact"] == 50.0 and out["NoAns_f1"] == 50.0 and out["NoAns_total"] == 2


def test_na_prob_thresh_is_applied():
    # Threshold 0.5: na_prob > 0.5 forces "no answer" for q2 (0.6), q4 (0.7), q5 (0.9).
    # q2 and q4 are unanswerable -> 1; q5 is answerable -> 0. q1 and q3 keep their scores.
    # EM 1+0+1+1+0 = 3 -> 60; F1 1+2/3+1+1+0 = 11/3 -> 73.33
    out = squad_v2_evaluate(DATA, PREDS, na_probs=NA_PROBS, na_prob_thresh=0.5)
    assert out["exact"] == approx(60.0)
    assert out["f1"] == approx(100 * (11 / 3) / 5)
    assert out["NoAns_exact"] == 100.0
    assert out["HasAns_exact"] == approx(100 / 3)  # q1 only
    # 0.5 itself is not "greater than": q3 keeps its answer.
    assert out["HasAns_f1"] == approx(100 * (5 / 3) / 3)


def test_best_thresh_by_hand():
    # Official find_best_thresh: start as if answering nothing: score = #NoAns = 2, thresh 0.0.
    # Walk qids by na_prob; HasAns adds its raw score, NoAns adds -1 if pred non-empty else 0.
    #   EM: q1 +1 -> 3 (best, 0.1); q3 +0 -> 3 (not better); q2 -1 -> 2; q4 0; q5 0
    #       best_exact = 100*3/5 = 60 at 0.1
    #   F1: q1 +1 -> 3 (best, 0.1); q3 +2/3 -> 11/3 (best, 0.5); q2 -1 -> 8/3; q4, q5 +0
    #       best_f1 = 100*(11/3)/5 = 73.33 at 0.5 -- strictly between the lowest and
    #       highest na_prob, and equal to the F1 of the 0.5 run in the test above.
    out = squad_v2_evaluate(DATA, PREDS, na_probs=NA_PROBS)
    assert list(out)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert out["best_exact"] == approx(60.0)
    assert out["best_exact_thresh"] == 0.1
    assert out["best_f1"] == approx(100 * (11 / 3) / 5)
    assert out["best_f1_thresh"] == 0.5
    # Default threshold 1.0 leaves the main scores as in the run without na_probs.
    assert out["exact"] == approx(40.0)


def test_best_thresh_stays_zero_when_answering_never_helps():
    # One NoAns question answered wrongly: starting score 1 is never beaten.
    exact = {"n": 0}
    assert find_best_thresh({"n": "x"}, exact, {"n": 0.3}, {"n": False}) == (100.0, 0.0)


def test_has_ans_question_whose_answers_normalise_to_nothing():
    # The answer list is non-empty (HasAns) but "the" normalises to "", so the gold
    # becomes "" and an empty prediction scores 1 -- a quirk of the official script.
    out = squad_v2_evaluate(_dataset(_qa("q", "The")), {"q": ""})
    assert out["HasAns_exact"] == 100.0 and "NoAns_total" not in out


def test_missing_predictions_are_left_out_with_a_warning():
    preds = {k: v for k, v in PREDS.items() if k != "q5"}
    with pytest.warns(UserWarning, match="1 of 5 questions have no prediction"):
        out = squad_v2_evaluate(DATA, preds)
    # Scored: q1..q4. EM 2/4 -> 50; HasAns q1,q3 -> 1/2
    assert out["total"] == 4 and out["exact"] == 50.0
    assert out["HasAns_total"] == 2 and out["HasAns_exact"] == 50.0
    assert out["missing"] == 1


def test_complete_predictions_have_no_missing_key(recwarn):
    out = squad_v2_evaluate(DATA, PREDS)
    assert "missing" not in out
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_extra_predictions_are_ignored():
    out = squad_v2_evaluate(DATA, {**PREDS, "not-a-question": "x"})
    assert out["total"] == 5


def test_no_matching_prediction_is_an_error():
    with pytest.raises(ValueError, match="no prediction matches"):
        squad_v2_evaluate(DATA, {"zzz": "x"})


def test_na_probs_must_cover_predictions():
    with pytest.raises(ValueError, match="first: 'q5'"):
        squad_v2_evaluate(DATA, PREDS, na_probs={k: 0.1 for k in ["q1", "q2", "q3", "q4"]})


# ----------------------------------------------------------------- files


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_score_files_round_trip(tmp_path):
    data = _write(tmp_path, "data.json", {"version": "v2.0", "data": DATA})
    preds = _write(tmp_path, "preds.json", PREDS)
    na = _write(tmp_path, "na.json", NA_PROBS)
    out = score_squad_v2_files(data, preds, na_prob_file=na, na_prob_thresh=0.5)
    assert out["exact"] == approx(60.0)  # same as test_na_prob_thresh_is_applied
    assert out["best_f1_thresh"] == 0.5


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][2].pop("id"),
         r"data\[0\]\.paragraphs\[0\]\.qas\[2\]: missing 'id'"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers="cat"),
         r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers: expected an array, got string"),
        (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("text"),
         r"qas\[0\]\.answers\[0\]: missing 'text'"),
        (lambda d: d["data"][0].pop("paragraphs"), r"data\[0\]: missing 'paragraphs'"),
        (lambda d: d.pop("data"), r"missing 'data'"),
    ],
)  # fmt: skip
def test_malformed_data_file_names_the_field(tmp_path, mutate, message):
    obj = {"version": "v2.0", "data": json.loads(json.dumps(DATA))}
    mutate(obj)
    path = _write(tmp_path, "bad.json", obj)
    with pytest.raises(ValueError, match=message) as info:
        load_squad_json(path)
    assert str(path) in str(info.value)


def test_data_file_not_json(tmp_path):
    path = _write(tmp_path, "bad.json", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_squad_json(path)


def test_malformed_preds_file(tmp_path):
    data = _write(tmp_path, "data.json", {"data": DATA})
    as_list = _write(tmp_path, "list.json", ["cat"])
    with pytest.raises(ValueError, match=r"list\.json: expected an object"):
        score_squad_v2_files(data, as_list)
    non_string = _write(tmp_path, "num.json", {**PREDS, "q3": 7})
    with pytest.raises(ValueError, match=r"num\.json: prediction for 'q3' must be a string"):
        score_squad_v2_files(data, non_string)


def test_malformed_na_prob_file(tmp_path):
    data = _write(tmp_path, "data.json", {"data": DATA})
    preds = _write(tmp_path, "preds.json", PREDS)
    bad = _write(tmp_path, "na.json", {**NA_PROBS, "q2": "high"})
    with pytest.raises(ValueError, match=r"na\.json: no-answer probability for 'q2'"):
        score_squad_v2_files(data, preds, na_prob_file=bad)
    partial = _write(tmp_path, "na2.json", {"q1": 0.1})
    with pytest.raises(ValueError, match=r"na2\.json: no no-answer probability"):
        score_squad_v2_files(data, preds, na_prob_file=partial)


def test_real_dev_set_always_empty_system(data_dir):
    dataset = load_squad_json(data_dir / "squad_v2" / "dev-v2.0.json")
    qids = [qa["id"] for a in dataset for p in a["paragraphs"] for qa in p["qas"]]
    out = squad_v2_evaluate(dataset, {qid: "" for qid in qids})
    # 11,873 questions, 5,945 unanswerable: an empty answer is right exactly on those.
    assert out["total"] == 11873 and out["NoAns_total"] == 5945 and out["HasAns_total"] == 5928
    assert out["exact"] == approx(100 * 5945 / 11873)
    assert out["f1"] == approx(100 * 5945 / 11873)
    assert out["HasAns_exact"] == 0.0 and out["HasAns_f1"] == 0.0
    assert out["NoAns_exact"] == 100.0 and out["NoAns_f1"] == 100.0


def test_score_files_refuse_missing_predictions_unless_allowed(tmp_path, capsys):
    from loradrift.cli import main

    data = _write(tmp_path, "data.json", {"version": "v2.0", "data": DATA})
    half = _write(tmp_path, "half.json", {k: PREDS[k] for k in ("q1", "q2")})
    with pytest.raises(ValueError, match=r"half\.json: no prediction for 3 of 5 questions .*--allow-missing"):
        score_squad_v2_files(data, half)
    assert main(["score", "squad_v2", str(data), str(half)]) == 2
    assert "no prediction for 3 of 5 questions" in capsys.readouterr().err
    # q1 cat/cat EM 1, q2 no-answer predicted "dog" EM 0: 50 over the 2 scored, on request only.
    with pytest.warns(UserWarning, match="3 of 5 questions have no prediction"):
        out = score_squad_v2_files(data, half, allow_missing=True)
    assert out["total"] == 2 and out["exact"] == 50.0 and out["missing"] == 3
    with pytest.warns(UserWarning):
        assert main(["score", "squad_v2", str(data), str(half), "--allow-missing"]) == 0


def test_duplicate_question_id_is_refused_naming_both_places(tmp_path, capsys):
    from loradrift.cli import main

    # Two questions "q1" (upstream would key both scores by "q1": total 5 instead of 6).
    dup = _dataset(_qa("q1", "cat"))
    data = _write(tmp_path, "data.json", {"version": "v2.0", "data": DATA + dup})
    where = r"data\[1\]\.paragraphs\[0\]\.qas\[0\]: question id 'q1' is already used at data\[0\]\.paragraphs\[0\]\.qas\[0\]"
    with pytest.raises(ValueError, match=where) as info:
        load_squad_json(data)
    assert str(data) in str(info.value)
    with pytest.raises(ValueError, match=where.replace("data", "dataset")):
        squad_v2_evaluate(DATA + dup, PREDS)
    preds = _write(tmp_path, "preds.json", PREDS)
    assert main(["score", "squad_v2", str(data), str(preds)]) == 2
    err = capsys.readouterr().err
    assert "question id 'q1' is already used" in err and "Traceback" not in err


def test_score_files_refuse_predictions_for_unknown_ids_unless_allowed(tmp_path, capsys):
    from loradrift.cli import main

    data = _write(tmp_path, "data.json", {"version": "v2.0", "data": DATA})
    more = _write(tmp_path, "more.json", {**PREDS, "zz1": "x", "zz2": ""})
    with pytest.raises(ValueError, match=r"more\.json: 2 of 7 predictions are for question ids that are not in .*"
                                         r"data\.json \(first: 'zz1'\).*--allow-extra"):
        score_squad_v2_files(data, more)
    assert main(["score", "squad_v2", str(data), str(more)]) == 2
    assert "2 of 7 predictions are for question ids that are not in" in capsys.readouterr().err
    # Allowed: the official script's scores (as with PREDS alone), the count in a warning and in "extra".
    with pytest.warns(UserWarning, match="2 of 7 predictions have ids not in"):
        out = score_squad_v2_files(data, more, allow_extra=True)
    assert out["total"] == 5 and out["exact"] == approx(40.0) and out["extra"] == 2
    with pytest.warns(UserWarning):
        assert main(["score", "squad_v2", str(data), str(more), "--allow-extra"]) == 0
    assert json.loads(capsys.readouterr().out)["extra"] == 2


@pytest.mark.parametrize("bad", [7.0, -0.1, float("nan"), float("inf")])
def test_no_answer_probability_outside_0_1_or_not_finite_names_the_id(tmp_path, capsys, bad):
    from loradrift.cli import main

    data = _write(tmp_path, "data.json", {"data": DATA})
    preds = _write(tmp_path, "preds.json", PREDS)
    na = _write(tmp_path, "na.json", json.dumps({**NA_PROBS, "q3": bad}))  # json writes NaN / Infinity as Python reads them
    with pytest.raises(ValueError, match=r"na\.json: no-answer probability for 'q3' must be a finite number in \[0, 1\]"):
        score_squad_v2_files(data, preds, na_prob_file=na)
    assert main(["score", "squad_v2", str(data), str(preds), "--na-prob-file", str(na)]) == 2
    err = capsys.readouterr().err
    assert "no-answer probability for 'q3'" in err and "Traceback" not in err
    # The bounds themselves are probabilities.
    ok = _write(tmp_path, "ok.json", {**NA_PROBS, "q1": 0, "q3": 1.0})
    assert score_squad_v2_files(data, preds, na_prob_file=ok)["total"] == 5
