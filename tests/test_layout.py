"""layout.py against docs/layout.md: every path in the docs' tree is a layout entry and every
layout entry sits in that tree; the helpers build the paths the tree shows."""

import re
from pathlib import Path

import pytest

from loradrift import layout

DOC = Path(__file__).resolve().parents[1] / "docs" / "layout.md"
# The docs' placeholders, as the layout's template fields are filled for the comparison.
SAMPLE = {"model": "<model>", "task": "<task>", "method": "<method>", "seed": "<S>", "step": 0, "variant": "<variant>",
          "rank": "<R>", "suffix": "", "time": "<UTC time>", "group": "<group>", "run": "<run>"}
DESCRIPTION_COLUMN = 30  # a tree line indented further than this continues a description
DESCRIPTION_AT = 40  # the column where the descriptions start


def doc_paths() -> set[str]:
    """The paths of the tree block in docs/layout.md, relative to <out> (folders end in "/")."""
    text = DOC.read_text()
    block = re.search(r"^```\n(<out>/.*?)^```$", text, re.S | re.M)
    assert block, f"{DOC}: no tree block starting with <out>/"
    paths, parent = set(), ""
    for line in block.group(1).splitlines()[1:]:  # the first line is <out>/ itself
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent > DESCRIPTION_COLUMN:
            continue
        # The descriptions start in column 40; a longer path ends at two spaces (or the line's end).
        if len(line) > DESCRIPTION_AT and line[DESCRIPTION_AT - 1] == " " and line[DESCRIPTION_AT] != " ":
            entry = line[:DESCRIPTION_AT].strip()
        else:
            entry = re.split(r" {2,}", line.strip())[0]
        items = [i.strip() for i in entry.split(", ")]
        prefix = items[0].rstrip("/").rpartition("/")[0]
        items = items[:1] + [f"{prefix}/{i}" if prefix else i for i in items[1:]]
        if indent == 2:
            parent = items[0]
            paths.update(items)
        elif indent == 4:
            assert parent.endswith("/"), f"{line!r}: indented under a file"
            paths.update(parent + i for i in items)
        else:
            raise AssertionError(f"{DOC}: unexpected indentation in the tree: {line!r}")
    return paths


def layout_paths() -> set[str]:
    run = layout.PATHS["run"].format(**SAMPLE)
    return ({t.format(**SAMPLE) for t in layout.PATHS.values()}
            | {run + t.format(**SAMPLE) for t in layout.RUN_PATHS.values()})


def test_the_docs_tree_is_parsed():
    docs = doc_paths()
    assert "results.sqlite" in docs and "runs/<model>/<task>/<method>/seed<S>/result.json" in docs
    assert "study/timings.json" in docs and "wandb/" in docs and "tensorboard/<group>/<run>/" in docs


def test_every_documented_path_is_a_layout_entry():
    missing = sorted(doc_paths() - layout_paths())
    assert not missing, f"docs/layout.md names paths that loradrift.layout does not declare: {missing}"


def test_every_layout_entry_is_in_the_documented_tree():
    docs = doc_paths()
    folders = {d for d in docs if d.endswith("/")}

    def placed(p: str) -> bool:
        return (p in docs or any(p.startswith(f) for f in folders)  # documented, or inside a documented folder
                or (p.endswith("/") and any(d.startswith(p) for d in docs)))  # or a folder above one
    stray = sorted(p for p in layout_paths() if not placed(p))
    assert not stray, f"loradrift.layout declares paths outside the tree of docs/layout.md: {stray}"


def test_docs_name_layout_py_as_their_code_twin():
    assert "src/loradrift/layout.py" in DOC.read_text()


def test_run_paths(tmp_path):
    rd = layout.run_dir(tmp_path, "tiny-1", "sst2", "lora", 42)
    assert rd == tmp_path / "runs" / "tiny-1" / "sst2" / "lora" / "seed42"
    assert layout.run_path(rd, "result") == rd / "result.json"
    assert layout.run_path(rd, "snapshot", step=12) == rd / "snapshots" / "step_000012.safetensors"
    assert layout.base_file(tmp_path, "m", "rte") == tmp_path / "base" / "m" / "rte.safetensors"
    assert layout.results_db(tmp_path) == tmp_path / "results.sqlite"
    assert layout.runs_dir(tmp_path, "m", "rte") == tmp_path / "runs" / "m" / "rte"
    assert layout.best_config_for(tmp_path, "m", "rte", "full") == tmp_path / "configs" / "best" / "m" / "rte_full.yaml"
    assert layout.best_config_for(tmp_path, "m", "rte", "lora", tune_rank=True).name == "rte_lora_rank.yaml"
    with pytest.raises(ValueError, match="unknown layout path 'nope'"):
        layout.path(tmp_path, "nope")
    with pytest.raises(ValueError, match="needs the field 'seed'"):
        layout.path(tmp_path, "run", model="m", task="t", method="full")


def test_run_dir_for(tiny_cfg):
    from loradrift.layout import model_key

    cfg = tiny_cfg(task="rte", method="full", seed=7)
    assert layout.run_dir_for(cfg) == Path(cfg.out_dir) / "runs" / model_key(cfg.model) / "rte" / "full" / "seed7"
    assert model_key is layout.model_key


def test_iter_runs(tmp_path):
    for model, task, method, seed in [("m", "sst2", "lora", "seed42"), ("m", "rte", "full", "seed1"), ("n", "rte", "full", "seedX")]:
        (tmp_path / "runs" / model / task / method / seed).mkdir(parents=True)
    (tmp_path / "runs" / "m" / "rte" / "full" / "seed9").write_text("a file, not a run folder")
    runs = list(layout.iter_runs(tmp_path))
    assert [(r.model, r.task, r.method, r.seed) for r in runs] == [("m", "rte", "full", 1), ("m", "sst2", "lora", 42),
                                                                   ("n", "rte", "full", None)]
    assert runs[0].path == tmp_path / "runs" / "m" / "rte" / "full" / "seed1"
    assert [r.task for r in layout.iter_runs(tmp_path, model="m", method="lora")] == ["sst2"]
    assert list(layout.iter_runs(tmp_path / "absent")) == []


def test_the_declarations_are_import_light():
    import subprocess
    import sys

    code = ("import sys, loradrift.layout, loradrift.tasks, loradrift.methods; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_registry_model_keeps_its_name_as_its_key():
    from loradrift.config import ModelConfig
    from loradrift.models import MODELS

    for name in MODELS:
        if name != "tiny":  # the tiny model's key is the hash of its shape
            assert layout.model_key(ModelConfig(name=name)) == name
