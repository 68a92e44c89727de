"""The task registry: each task declared once, as data, and each task kind with its handlers.

Adding a task: add one `TaskSpec` to `TASKS` (local files, header, label names, metric, H1
metric, baselines, Hub fallback, prompt template). Everything else (loading, splits,
preprocessing, metrics, evaluation, probes, serving prompts) reads the declaration; no code
branches on task names.

Adding a kind of task (classification and extractive QA today): add one `TaskKind` to `KINDS`.
A kind names its handlers, one per role (`HANDLER_ROLES`), as "module:function" strings that
are imported only when used (`TaskKind.handler`), so this module stays import-light (no torch):
reading files and Hub rows, building features, label counts, the probe inputs, the model head,
Phase 0 baselines, H1's baseline bar and a split's scores. No code branches on a kind's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

#: The roles a kind's handlers play, with the signature each handler has.
HANDLER_ROLES: dict[str, str] = {
    "read": "(path, spec) -> rows: a local task file's examples (loradrift.data)",
    "hub_row": "(example, index, spec) -> row: one Hugging Face datasets example as a row (loradrift.data)",
    "encode": "(tokenizer, rows, cfg) -> features: training and evaluation features (loradrift.data)",
    "balance": "(spec, rows) -> {name: count}: the label balance of rows (loradrift.data)",
    "probe_encode": "(tokenizer, rows, max_length) -> features: one sequence per probe example (loradrift.representations)",
    "head": "(hidden_size, spec, decoder) -> nn.Module: the task head (loradrift.models)",
    "baselines": "(spec, data, rng) -> rows: the Phase 0 baseline rows, named as spec.baselines (loradrift.phase0)",
    "bar": "(spec, latest) -> (parts, reason): the values H1's baseline bar is the largest of (loradrift.learning)",
    "evaluate": "(ctx, rows, feats, na_thresh) -> scores: a split's metrics, its \"_predictions\" and, with na_probs, "
                "\"_na_probs\" and \"na_prob_thresh\" (loradrift.evaluate)",
}


@cache
def resolve(ref: str) -> Callable:
    """The function a "module:function" reference names, imported on first use."""
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"handler reference {ref!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"handler reference {ref!r} does not resolve: {e}") from None
    if not callable(fn):
        raise TypeError(f"handler reference {ref!r} names a {type(fn).__name__}, not a function")
    return fn


@dataclass(frozen=True)
class TaskKind:
    """A kind of task: its handlers (HANDLER_ROLES, "module:function") and the facts that differ
    between kinds. The handlers are resolved lazily by `handler(role)`."""

    name: str
    read: str
    hub_row: str
    encode: str
    balance: str
    probe_encode: str
    head: str
    baselines: str
    bar: str
    evaluate: str
    split_group: str | None = None  # the row field the validation slice is carved by (no field shared)
    sanity_threshold: str = "min_accuracy"  # the `sanity` setting the overfit check must reach
    peft_task_type: str | None = None  # the PEFT task type of a decoder's head with last-token pooling
    auto_class: str | None = None  # the transformers auto class of that head
    pipeline_tag: str = ""  # the Hub pipeline tag of a trained model
    windowed: bool = False  # an example may give several features (each names its "example")
    na_probs: bool = False  # dev predictions come with no-answer probabilities (dev_na_probs.json)
    file_scorer: str | None = None  # "module:function": the official scorer over data and prediction files
    baseline_columns: tuple[str, ...] = ()  # the report's columns of the Phase 0 baseline rows (none: every column)

    def handler(self, role: str) -> Callable:
        if role not in HANDLER_ROLES:
            raise ValueError(f"unknown handler role {role!r} (known: {', '.join(HANDLER_ROLES)})")
        return resolve(getattr(self, role))


KINDS: dict[str, TaskKind] = {
    k.name: k
    for k in [
        TaskKind(
            name="classification",
            read="loradrift.data:read_classification_tsv",
            hub_row="loradrift.data:hub_classification_row",
            encode="loradrift.data:classification_features",
            balance="loradrift.data:classification_balance",
            probe_encode="loradrift.representations:probe_text_features",
            head="loradrift.models:classification_head",
            baselines="loradrift.phase0:classification_baselines",
            bar="loradrift.learning:classification_bar",
            evaluate="loradrift.evaluate:evaluate_classification",
            peft_task_type="SEQ_CLS",
            auto_class="AutoModelForSequenceClassification",
            pipeline_tag="text-classification",
            baseline_columns=("baseline", "task", "predicts", "dev_examples", "accuracy", "f1", "combined_score"),
        ),
        TaskKind(
            name="extractive_qa",
            read="loradrift.data:read_squad_task",
            hub_row="loradrift.data:hub_squad_row",
            encode="loradrift.data:squad_features",
            balance="loradrift.data:squad_balance",
            probe_encode="loradrift.representations:probe_squad_features",
            head="loradrift.models:span_head",
            baselines="loradrift.phase0:squad_baselines",
            bar="loradrift.learning:no_answer_bar",
            evaluate="loradrift.evaluate:evaluate_squad",
            split_group="paragraph",
            sanity_threshold="min_squad_f1",
            pipeline_tag="question-answering",
            windowed=True,
            na_probs=True,
            file_scorer="loradrift.metrics:score_squad_v2_files",
            baseline_columns=("baseline", "task", "dev_examples", "exact", "f1", "HasAns_exact", "HasAns_f1",
                              "NoAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"),
        ),
    ]
}


def get_kind(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r} (known: {', '.join(KINDS)})") from None


@dataclass(frozen=True)
class HubSource:
    """Where the same splits live on the Hugging Face Hub (used when no local folder exists)."""

    path: str
    name: str | None
    train_split: str = "train"
    dev_split: str = "validation"
    columns: dict[str, str] = field(default_factory=dict)  # our field -> hub column


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # a name in KINDS: "classification" | "extractive_qa"
    train_file: str  # relative to the data folder
    dev_file: str
    metric: str  # name in loradrift.metrics
    primary: str  # the metric field that search, early stopping and the report's score tables use
    h1_metric: str  # the dev metric field H1, the learning gate and the sanity check use
    baselines: tuple[str, ...]  # the Phase 0 baseline rows (the kind's `baselines` handler makes them)
    header: tuple[str, ...] = ()  # classification TSVs: expected header
    text_fields: tuple[str, ...] = ()  # header columns that hold text_a (and text_b)
    label_field: str = ""
    labels: tuple[str, ...] = ()  # label strings in file order of class ids
    hub: HubSource | None = None
    prompt: str = "{text_a}"  # serving prompt template over an example's fields
    description: str = ""
    serve_pair: bool = False  # one of the pair of tasks the serving benchmark's multi-adapter rows serve
    heldout_text: bool = False  # its dev contexts outside the train articles are the forgetting text
    caveat: str = ""  # a limitation the report states about the task ({train_file} filled in)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def task_kind(self) -> TaskKind:
        return get_kind(self.kind)

    def handler(self, role: str) -> Callable:
        """The kind's handler for `role` (HANDLER_ROLES)."""
        return self.task_kind.handler(role)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            name="mrpc",
            kind="classification",
            train_file="glue/MRPC/train.tsv",
            dev_file="glue/MRPC/dev.tsv",
            header=("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            text_fields=("#1 String", "#2 String"),
            label_field="Quality",
            labels=("0", "1"),  # 1 = paraphrase, the positive class of MRPC's F1
            metric="accuracy_f1",
            primary="combined_score",
            h1_metric="accuracy",  # MRPC's F1 is reported beside it
            baselines=("majority", "random"),
            hub=HubSource("nyu-mll/glue", "mrpc", columns={"text_a": "sentence1", "text_b": "sentence2", "label": "label"}),
            prompt="Are these two sentences paraphrases?\nSentence 1: {text_a}\nSentence 2: {text_b}\nAnswer:",
            description="GLUE MRPC paraphrase detection (sentence pairs)",
        ),
        TaskSpec(
            name="sst2",
            kind="classification",
            train_file="glue/SST-2/train.tsv",
            dev_file="glue/SST-2/dev.tsv",
            header=("sentence", "label"),
            text_fields=("sentence",),
            label_field="label",
            labels=("0", "1"),
            metric="accuracy",
            primary="accuracy",
            h1_metric="accuracy",
            baselines=("majority", "random"),
            hub=HubSource("nyu-mll/glue", "sst2", columns={"text_a": "sentence", "label": "label"}),
            prompt="Is the sentiment of this review positive or negative?\nReview: {text_a}\nAnswer:",
            description="GLUE SST-2 binary sentiment (single sentences)",
            serve_pair=True,  # the short-input task of the serving pair
        ),
        TaskSpec(
            name="rte",
            kind="classification",
            train_file="glue/RTE/train.tsv",
            dev_file="glue/RTE/dev.tsv",
            header=("index", "sentence1", "sentence2", "label"),
            text_fields=("sentence1", "sentence2"),
            label_field="label",
            labels=("entailment", "not_entailment"),  # GLUE/HF class ids 0, 1
            metric="accuracy",
            primary="accuracy",
            h1_metric="accuracy",
            baselines=("majority", "random"),
            hub=HubSource("nyu-mll/glue", "rte", columns={"text_a": "sentence1", "text_b": "sentence2", "label": "label"}),
            prompt="Does the premise entail the hypothesis?\nPremise: {text_a}\nHypothesis: {text_b}\nAnswer:",
            description="GLUE RTE textual entailment (sentence pairs)",
        ),
        TaskSpec(
            name="squad_v2",
            kind="extractive_qa",
            train_file="squad_v2/train-v2.0.first10articles.json",
            dev_file="squad_v2/dev-v2.0.json",
            metric="squad_v2",
            primary="f1",
            h1_metric="f1",
            baselines=("no_answer", "random_span"),
            hub=HubSource("rajpurkar/squad_v2", None),
            prompt="Context: {context}\nQuestion: {question}\nAnswer:",
            description="SQuAD v2.0 extractive QA with unanswerable questions",
            serve_pair=True,  # the long-input task of the serving pair
            heldout_text=True,
            caveat="SQuAD v2 trains on a subset of only 10 articles ({train_file}), so its scores are far below "
                   "full-data SQuAD and dominated by the no-answer decision.",
        ),
    ]
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)}, or 'all')") from None


def expand_tasks(names: str | list[str]) -> list[str]:
    """'all', 'sst2,rte' or a list → validated task names in registry order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or names == ["all"]:
        return list(TASKS)
    for n in names:
        get_task(n)
    return [t for t in TASKS if t in names]


def serve_pair() -> tuple[str, ...]:
    """The tasks (registry order) the serving benchmark's multi-adapter rows serve by default:
    one short-input and one long-input task, as the study plan names them."""
    return tuple(t.name for t in TASKS.values() if t.serve_pair)


def heldout_text_task() -> TaskSpec:
    """The task whose held-out dev contexts are the forgetting analysis's general text."""
    found = [t for t in TASKS.values() if t.heldout_text]
    if len(found) != 1:
        raise ValueError(f"exactly one task must declare heldout_text=True, not {len(found)}")
    return found[0]


def file_scorer_tasks() -> list[str]:
    """The tasks whose kind has an official scorer over data and prediction files."""
    return [t.name for t in TASKS.values() if t.task_kind.file_scorer]
