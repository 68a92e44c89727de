"""The task registry: each task declared once, as data.

Adding a task: add one `TaskSpec` to `TASKS` (local files, header, label names, metric, Hub
fallback, prompt template). Everything else (loading, splits, preprocessing, metrics, probes,
serving prompts) reads the declaration; no code branches on task names.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    kind: str  # "classification" | "extractive_qa"
    train_file: str  # relative to the data folder
    dev_file: str
    metric: str  # name in loradrift.metrics
    primary: str  # the metric field that search, H1 and the report use
    header: tuple[str, ...] = ()  # classification TSVs: expected header
    text_fields: tuple[str, ...] = ()  # header columns that hold text_a (and text_b)
    label_field: str = ""
    labels: tuple[str, ...] = ()  # label strings in file order of class ids
    hub: HubSource | None = None
    prompt: str = "{text_a}"  # serving prompt template over an example's fields
    description: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.labels)


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
            hub=HubSource("nyu-mll/glue", "sst2", columns={"text_a": "sentence", "label": "label"}),
            prompt="Is the sentiment of this review positive or negative?\nReview: {text_a}\nAnswer:",
            description="GLUE SST-2 binary sentiment (single sentences)",
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
            hub=HubSource("rajpurkar/squad_v2", None),
            prompt="Context: {context}\nQuestion: {question}\nAnswer:",
            description="SQuAD v2.0 extractive QA with unanswerable questions",
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
