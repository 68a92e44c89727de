"""The task and kind registries: every task resolves its kind's handlers, an unknown kind or a
broken handler reference is a clear error, and the per-task declarations hold together."""

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from loradrift import tasks
from loradrift.tasks import HANDLER_ROLES, KINDS, TASKS, TaskKind, get_kind, resolve


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_resolves_its_handlers(name):
    spec = TASKS[name]
    assert spec.task_kind is KINDS[spec.kind]
    for role in HANDLER_ROLES:
        assert callable(spec.handler(role)), f"{name}: {role}"
    from loradrift import evaluate

    assert spec.handler("evaluate") in (evaluate.evaluate_classification, evaluate.evaluate_squad)
    if spec.task_kind.file_scorer:
        assert callable(resolve(spec.task_kind.file_scorer))


def test_every_kind_names_a_handler_for_every_role():
    for kind in KINDS.values():
        for role in HANDLER_ROLES:
            assert ":" in getattr(kind, role), f"{kind.name}.{role}"
    assert "evaluate" in HANDLER_ROLES
    assert KINDS["classification"].evaluate == "loradrift.evaluate:evaluate_classification"
    assert KINDS["extractive_qa"].evaluate == "loradrift.evaluate:evaluate_squad"


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown task kind 'regression' \(known: classification, extractive_qa\)"):
        get_kind("regression")
    spec = replace(TASKS["sst2"], kind="regression")
    with pytest.raises(ValueError, match="unknown task kind 'regression'"):
        spec.handler("encode")


def test_broken_handler_references_are_clear_errors():
    with pytest.raises(ValueError, match="expected 'module:function'"):
        resolve("loradrift.data.encode")
    with pytest.raises(ValueError, match="does not resolve"):
        resolve("loradrift.data:no_such_function")
    with pytest.raises(ValueError, match="does not resolve"):
        resolve("loradrift.no_such_module:f")
    kind = replace(KINDS["classification"], head="loradrift.models:no_such_head")
    with pytest.raises(ValueError, match="no_such_head"):
        kind.handler("head")
    with pytest.raises(ValueError, match="unknown handler role 'nope'"):
        KINDS["classification"].handler("nope")
    assert isinstance(KINDS["classification"], TaskKind)


def test_task_declarations():
    for spec in TASKS.values():
        assert spec.h1_metric and spec.primary and spec.baselines
    assert {t: s.h1_metric for t, s in TASKS.items()} == {"mrpc": "accuracy", "sst2": "accuracy", "rte": "accuracy", "squad_v2": "f1"}
    assert tasks.serve_pair() == ("sst2", "squad_v2")
    assert tasks.heldout_text_task().name == "squad_v2"
    assert tasks.file_scorer_tasks() == ["squad_v2"]


def test_serving_pair_comes_from_the_registry():
    from loradrift.serving import PAIR_TASKS

    assert tasks.serve_pair() == PAIR_TASKS


def test_baselines_handlers_make_the_declared_rows():
    cls = SimpleNamespace(train=[{"label": 1}, {"label": 1}, {"label": 0}], dev=[{"label": 0}, {"label": 1}, {"label": 1}])
    squad_rows = [{"id": "q1", "question": "Who?", "paragraph": "p", "context": "Ann met Bob there.", "is_impossible": False,
                   "answers": {"text": ["Bob"], "answer_start": [8]}},
                  {"id": "q2", "question": "Why?", "paragraph": "p", "context": "Ann met Bob there.", "is_impossible": True,
                   "answers": {"text": [], "answer_start": []}}]
    for name, data in (("sst2", cls), ("mrpc", cls), ("squad_v2", SimpleNamespace(train=squad_rows, dev=squad_rows))):
        spec = TASKS[name]
        rows = spec.handler("baselines")(spec, data, random.Random(0))
        assert tuple(r["baseline"] for r in rows) == spec.baselines
        assert all(spec.h1_metric in r for r in rows)


def test_kind_facts():
    assert KINDS["extractive_qa"].split_group == "paragraph" and KINDS["classification"].split_group is None
    from loradrift.config import SanityConfig

    for kind in KINDS.values():
        assert kind.sanity_threshold in SanityConfig.model_fields


def test_baseline_columns_show_each_tasks_baseline_scores():
    for kind in KINDS.values():
        assert kind.baseline_columns[:2] == ("baseline", "task"), kind.name
    for spec in TASKS.values():
        cols = spec.task_kind.baseline_columns
        assert spec.h1_metric in cols and spec.primary in cols, spec.name


def test_caveats_format_with_the_train_file():
    stated = {t.name: t.caveat.format(train_file=t.train_file) for t in TASKS.values() if t.caveat}
    assert list(stated) == ["squad_v2"]
    assert TASKS["squad_v2"].train_file in stated["squad_v2"]
