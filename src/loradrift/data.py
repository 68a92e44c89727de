"""Task data: files (or the Hub) → validated examples → train / validation / dev splits → tokens.

Splits: the official dev set is the final test set. Validation (for search, early stopping and the
SQuAD no-answer threshold) is a fixed slice of train carved with `data.split_seed`, identical for
every run; for SQuAD the slice is carved by paragraph so no context is shared between splits.
The train subset (`data.max_train_examples`) is drawn with the run seed, so a seed fixes it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loradrift.config import RunConfig
from loradrift.tasks import TaskSpec


class DataError(ValueError):
    """Bad or missing task data; the message names the file and field."""


# ---------------------------------------------------------------------------------------------
# locating and checking the data folder


# The task files ship inside the package (src/loradrift/taskdata, docs/data.md): a clone, an editable
# install and a plain `pip install .` all find them without a flag, and nothing is read from
# outside the project unless the user names it.
PACKAGED_DATA = Path(__file__).resolve().parent / "taskdata"


@dataclass(frozen=True)
class DataLocation:
    """Where a task's files come from, and which rule of the resolution order chose it:
    1 `--data-dir` / `data.data_dir`, 2 `$LORADRIFT_DATA`, 3 the package's own copy, 4 the Hub."""

    rule: int
    path: Path | None  # None: the Hugging Face Hub
    tried: str = ""  # rule 4: the local places that were looked at first, for its error message

    def describe(self) -> str:
        what = {1: "--data-dir", 2: "$LORADRIFT_DATA", 3: "loradrift's own copy", 4: "Hugging Face Hub"}[self.rule]
        return f"rule {self.rule}: {what}" + (f" ({self.path})" if self.path is not None else "")


def _must_be_dir(path: Path, how: str) -> Path:
    # Named on purpose, so a wrong path is an error naming it, never a silent fall-back to another
    # folder or the Hub.
    if not path.is_dir():
        raise DataError(f"{how}={path}: no such folder (fix it, or drop it to use loradrift's own copy of the data)")
    return path


def locate_data(cfg: RunConfig) -> DataLocation:
    """The resolution order: `--data-dir` > `$LORADRIFT_DATA` > the package's own copy > the Hub.

    `data.source=hub` goes to the Hub directly; `data.source=local` never does."""
    if cfg.data.source == "hub":
        return DataLocation(4, None)
    if cfg.data.data_dir is not None:
        return DataLocation(1, _must_be_dir(Path(cfg.data.data_dir), "--data-dir (data.data_dir)"))
    env = os.environ.get("LORADRIFT_DATA")
    if env:
        return DataLocation(2, _must_be_dir(Path(env), "LORADRIFT_DATA"))
    if (PACKAGED_DATA / "SHA256SUMS").is_file():
        return DataLocation(3, PACKAGED_DATA)
    tried = f"--data-dir not given, LORADRIFT_DATA not set, no package copy at {PACKAGED_DATA}"
    if cfg.data.source == "local":
        raise DataError(f"no local task data ({tried}; data.source=local rules out the Hub): pass --data-dir DIR")
    return DataLocation(4, None, tried)


def resolve_data_dir(cfg: RunConfig) -> Path | None:
    """The local folder to read, or None when the Hub is to be used."""
    return locate_data(cfg).path


_CHECKED: set[tuple[str, str]] = set()


def verify_checksum(data_dir: Path, rel: str) -> None:
    """Check one file against data_dir/SHA256SUMS when that list exists and names the file."""
    sums = data_dir / "SHA256SUMS"
    if (str(data_dir), rel) in _CHECKED or not sums.exists():
        return
    expected = None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == rel:
            expected = parts[0].lower()
    if expected is None:
        return
    h = hashlib.sha256()
    with open(data_dir / rel, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise DataError(f"{data_dir / rel}: checksum mismatch (SHA256SUMS expects {expected[:12]}…, file has {h.hexdigest()[:12]}…)")
    _CHECKED.add((str(data_dir), rel))


# ---------------------------------------------------------------------------------------------
# readers


def read_classification_tsv(path: Path, spec: TaskSpec) -> list[dict]:
    """GLUE TSVs contain bare quote characters, so split on tabs instead of using csv quoting."""
    if not path.exists():
        raise DataError(f"{path}: file not found (task {spec.name})")
    # utf-8-sig drops MRPC's byte-order mark from the header.
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty file")
    header = tuple(lines[0].split("\t"))
    if header != spec.header:
        raise DataError(f"{path}: header {list(header)} does not match the expected {list(spec.header)}")
    col = {name: i for i, name in enumerate(header)}
    label_id = {s: i for i, s in enumerate(spec.labels)}
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{lineno}: {len(fields)} fields, expected {len(header)}")
        raw_label = fields[col[spec.label_field]].strip()
        if raw_label not in label_id:
            raise DataError(f"{path}:{lineno}: field {spec.label_field!r}: unknown label {raw_label!r} (expected one of {list(spec.labels)})")
        texts = [fields[col[f]].strip() for f in spec.text_fields]
        rows.append({"idx": len(rows), "text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label_id[raw_label]})
    if not rows:
        raise DataError(f"{path}: a header but no data rows (task {spec.name})")
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_squad_json(path: Path) -> list[dict]:
    from loradrift.metrics import load_squad_json

    if not path.exists():
        raise DataError(f"{path}: file not found (task squad_v2)")
    try:
        articles = load_squad_json(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    rows = []
    for a_i, article in enumerate(articles):
        for p_i, para in enumerate(article["paragraphs"]):
            at_p = f"{path}: data[{a_i}].paragraphs[{p_i}]"
            context = _need_str(para, "context", at_p)
            for q_i, qa in enumerate(para["qas"]):
                question = _need_str(qa, "question", f"{at_p}.qas[{q_i}]")
                answers = qa.get("answers", [])
                for ans in answers:
                    start = ans.get("answer_start")
                    if not isinstance(start, int) or context[start : start + len(ans["text"])] != ans["text"]:
                        raise DataError(f"{path}: question {qa['id']}: answer {ans.get('text')!r} not found at answer_start {start}")
                rows.append(
                    {
                        "id": qa["id"],
                        "title": article.get("title", ""),
                        "paragraph": f"{a_i}:{p_i}",
                        "context": context,
                        "question": question,
                        "answers": {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]},
                        "is_impossible": bool(qa.get("is_impossible", not answers)),
                    }
                )
    if not rows:
        raise DataError(f"{path}: no questions (task squad_v2)")
    return rows


def _need_str(obj: dict, key: str, at: str) -> str:
    """The official scorer does not read contexts or questions, so load_squad_json leaves them
    unchecked; training does read them."""
    if key not in obj:
        raise DataError(f"{at}: missing {key!r}")
    if not isinstance(obj[key], str):
        raise DataError(f"{at}.{key}: expected a string, got {type(obj[key]).__name__}")
    return obj[key]


def read_squad_task(path: Path, spec: TaskSpec) -> list[dict]:
    """The extractive-QA kind's reader (`TaskKind.read`): a SQuAD-format JSON file."""
    return read_squad_json(path)


def hub_classification_row(ex: dict, i: int, spec: TaskSpec) -> dict:
    c = spec.hub.columns
    return {"idx": i, "text_a": ex[c["text_a"]], "text_b": ex[c["text_b"]] if "text_b" in c else None, "label": int(ex[c["label"]])}


def hub_squad_row(ex: dict, i: int, spec: TaskSpec) -> dict:
    return {
        "id": ex["id"], "title": ex["title"], "paragraph": ex["context"], "context": ex["context"],
        "question": ex["question"], "answers": {"text": list(ex["answers"]["text"]), "answer_start": list(ex["answers"]["answer_start"])},
        "is_impossible": len(ex["answers"]["text"]) == 0,
    }


def _read_hub(spec: TaskSpec, split: str, tried: str = "") -> list[dict]:
    try:
        import datasets  # noqa: F401  (optional: pip install 'loradrift[hub]')
    except ImportError:
        raise DataError(f"task {spec.name}: no local data folder{f' ({tried})' if tried else ''}, and reading it from "
                        "the Hugging Face Hub needs the 'datasets' package. Either pip install 'loradrift[hub]', or "
                        "pass --data-dir DIR (a folder laid out as docs/data.md describes)") from None
    from datasets import load_dataset

    hub = spec.hub
    ds = load_dataset(hub.path, hub.name, split=hub.train_split if split == "train" else hub.dev_split)
    row = spec.handler("hub_row")
    return [row(ex, i, spec) for i, ex in enumerate(ds)]


# ---------------------------------------------------------------------------------------------
# splits


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[dict]
    val: list[dict]
    dev: list[dict]
    source: str
    full_train_size: int
    full_dev_size: int
    full_dev_balance: dict = field(default_factory=dict)


def _carve(rows: list[dict], cfg: RunConfig, group_key: str | None) -> tuple[list[dict], list[dict]]:
    """Split train into (train, val) with the fixed split seed; grouped when group_key is set."""
    rng = np.random.default_rng(cfg.data.split_seed)
    if group_key:
        groups = sorted({r[group_key] for r in rows})
        order = rng.permutation(len(groups))
        n_val_groups = max(1, round(cfg.data.val_fraction * len(groups)))
        val_groups = {groups[i] for i in order[:n_val_groups]}
        val = [r for r in rows if r[group_key] in val_groups]
        train = [r for r in rows if r[group_key] not in val_groups]
    else:
        order = rng.permutation(len(rows))
        n_val = max(1, round(cfg.data.val_fraction * len(rows)))
        val = [rows[i] for i in sorted(order[:n_val])]
        train = [rows[i] for i in sorted(order[n_val:])]
    if cfg.data.max_val_examples and len(val) > cfg.data.max_val_examples:
        keep = np.random.default_rng(cfg.data.split_seed + 1).permutation(len(val))[: cfg.data.max_val_examples]
        val = [val[i] for i in sorted(keep)]
    return train, val


def _subset(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or len(rows) <= n:
        return rows
    keep = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(keep)]


def load_task(cfg: RunConfig, spec: TaskSpec | None = None) -> TaskData:
    from loradrift.tasks import get_task

    spec = spec or get_task(cfg.task)
    where = locate_data(cfg)
    data_dir = where.path
    if data_dir is not None:
        for rel in (spec.train_file, spec.dev_file):
            if not (data_dir / rel).exists():
                raise DataError(f"{data_dir / rel}: file not found (task {spec.name}; data folder {data_dir})")
            if cfg.data.verify_checksums:
                verify_checksum(data_dir, rel)
        read = spec.handler("read")
        train_all = read(data_dir / spec.train_file, spec)
        dev_all = read(data_dir / spec.dev_file, spec)
    else:
        train_all, dev_all = _read_hub(spec, "train", where.tried), _read_hub(spec, "dev", where.tried)
    source = where.describe()
    if data_dir is None:
        source += f" {spec.hub.path}" + (f"/{spec.hub.name}" if spec.hub.name else "")
    train, val = _carve(train_all, cfg, spec.task_kind.split_group)
    train = _subset(train, cfg.data.max_train_examples, cfg.seed)
    dev = _subset(dev_all, cfg.data.max_dev_examples, cfg.data.split_seed + 2)
    return TaskData(spec, train, val, dev, source, len(train_all), len(dev_all), label_balance(spec, dev_all))


def probe_examples(cfg: RunConfig, data: TaskData) -> list[dict]:
    """The probe set: a fixed sample of the official dev set (the same for every run and seed)."""
    n = min(cfg.probe.size, len(data.dev))
    keep = np.random.default_rng(cfg.probe.seed).permutation(len(data.dev))[:n]
    return [data.dev[i] for i in sorted(keep)]


# ---------------------------------------------------------------------------------------------
# tokenisation


def prepare_tokenizer(tokenizer, is_decoder: bool):
    """Decoders often ship without a pad token; pooling reads the attention mask, so any id works.
    Right padding keeps positions identical with and without padding for a causal model."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def encode_classification(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    a = [r["text_a"] for r in rows]
    b = [r["text_b"] for r in rows] if rows and rows[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": r["label"]} for ids, r in zip(enc["input_ids"], rows)]


def squad_windows(tokenizer, questions: list[str], contexts: list[str], max_length: int, stride: int) -> list[dict]:
    """Sliding windows over each context, question first: what `tokenizer(..., truncation="only_second",
    stride=..., return_overflowing_tokens=True)` returns, built here from one untruncated pair
    encoding per example.

    Each window is the pair's tokens before the context (special tokens, question, separators), a
    run of context tokens, and the tokens after it; consecutive runs overlap by `stride` tokens and
    the last one ends at the context's end, so every context token is in some window. Doing it here
    instead of relying on the tokenizer's overflow: tokenizers 0.23.2 (on the lent GPU image) stops
    after two windows, which silently dropped the rest of long contexts and with it their answers.
    Returns, per window: input_ids, offsets (None outside the context), example index."""
    enc = tokenizer(questions, contexts, truncation=False, return_offsets_mapping=True, verbose=False)
    windows = []
    for ex_i, ids in enumerate(enc["input_ids"]):
        seq = enc.sequence_ids(ex_i)
        offs = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][ex_i], seq)]
        ctx = [t for t, sid in enumerate(seq) if sid == 1]
        if not ctx:  # an empty context: one window, nothing to answer from
            windows.append({"input_ids": ids[:max_length], "offsets": offs[:max_length], "example": ex_i})
            continue
        c0, c1 = ctx[0], ctx[-1] + 1
        room = max_length - c0 - (len(ids) - c1)
        if room <= stride:
            raise DataError(f"SQuAD: question {ex_i} ({c0} tokens with its special tokens) leaves {max(room, 0)} context tokens per "
                            f"window of model.max_length={max_length}, not more than data.doc_stride={stride}: raise max_length or lower doc_stride")
        start = c0
        while True:
            end = min(start + room, c1)
            windows.append({"input_ids": ids[:c0] + ids[start:end] + ids[c1:], "offsets": offs[:c0] + offs[start:end] + offs[c1:],
                            "example": ex_i})
            if end == c1:
                break
            start = end - stride
    return windows


def encode_squad(tokenizer, rows: list[dict], max_length: int, stride: int) -> list[dict]:
    """Question first, then a context window: a causal model's context tokens must see the question.

    Each window ("feature") gets start/end token labels when the answer lies inside it and an
    answerability label (1 = the answer is in this window); other windows train only the
    answerability head (span labels -100).
    """
    feats = []
    for w in squad_windows(tokenizer, [r["question"].lstrip() for r in rows], [r["context"] for r in rows], max_length, stride):
        ex_i, offsets = w["example"], w["offsets"]
        row = rows[ex_i]
        ctx_tokens = [t for t, o in enumerate(offsets) if o is not None]
        start_pos = end_pos = -100
        has = 0
        if row["answers"]["text"] and ctx_tokens:
            a_start = row["answers"]["answer_start"][0]
            a_end = a_start + len(row["answers"]["text"][0])
            first, last = ctx_tokens[0], ctx_tokens[-1]
            if offsets[first][0] <= a_start and offsets[last][1] >= a_end:
                s = first
                while s <= last and offsets[s][1] <= a_start:
                    s += 1
                e = last
                while e >= first and offsets[e][0] >= a_end:
                    e -= 1
                if s <= e:
                    start_pos, end_pos, has = s, e, 1
        feats.append(
            {"input_ids": w["input_ids"], "start": start_pos, "end": end_pos, "label": has, "example": ex_i, "offsets": offsets}
        )
    if not feats:
        raise DataError("SQuAD: no features produced (is max_length too small for the questions?)")
    return feats


def length_sorted_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Inference batches of similar lengths (indices into `features`), so little of each padded
    batch is padding; callers put outputs back in the original order with the indices."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}
    if "start" in features[0]:
        batch["start_positions"] = torch.tensor([f["start"] for f in features])
        batch["end_positions"] = torch.tensor([f["end"] for f in features])
    return batch


def encode(spec: TaskSpec, tokenizer, rows: list[dict], cfg: RunConfig) -> list[dict]:
    return spec.handler("encode")(tokenizer, rows, cfg)


def classification_features(tokenizer, rows: list[dict], cfg: RunConfig) -> list[dict]:
    return encode_classification(tokenizer, rows, cfg.model.max_length)


def squad_features(tokenizer, rows: list[dict], cfg: RunConfig) -> list[dict]:
    return encode_squad(tokenizer, rows, cfg.model.max_length, cfg.data.doc_stride)


def rows_as_squad_json(rows: list[dict]) -> list[dict]:
    """Rows in the official SQuAD JSON shape, for the official-equivalent scorer."""
    paragraphs: dict[str, dict] = {}
    for r in rows:
        p = paragraphs.setdefault(r["paragraph"], {"context": r["context"], "qas": []})
        p["qas"].append({"id": r["id"], "question": r["question"],
                         "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]})
    return [{"title": "", "paragraphs": list(paragraphs.values())}]


def label_balance(spec: TaskSpec, rows: list[dict]) -> dict[str, int]:
    return spec.handler("balance")(spec, rows)


def classification_balance(spec: TaskSpec, rows: list[dict]) -> dict[str, int]:
    counts = np.bincount([r["label"] for r in rows], minlength=spec.num_labels)
    return {name: int(c) for name, c in zip(spec.labels, counts)}


def squad_balance(spec: TaskSpec, rows: list[dict]) -> dict[str, int]:
    n_imp = sum(r["is_impossible"] for r in rows)
    return {"answerable": len(rows) - n_imp, "unanswerable": n_imp}


def summary(data: TaskData) -> dict:
    return {
        "task": data.spec.name,
        "source": data.source,
        "train_rows": data.full_train_size,
        "dev_rows": data.full_dev_size,
        "dev_labels": data.full_dev_balance,
        "train_used": len(data.train),
        "val_used": len(data.val),
        "dev_used": len(data.dev),
        "train_used_labels": label_balance(data.spec, data.train),
    }

