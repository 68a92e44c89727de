import json
import shutil
from pathlib import Path

import pytest

from loradrift.config import resolve_config
from loradrift.data import DataError, encode_squad, load_task, probe_examples, summary
from loradrift.models import load_tokenizer, resolve_model_dir

EXPECTED = {  # the data README's counts: train rows, dev rows, dev label balance
    "sst2": (67349, 872, {"0": 428, "1": 444}),
    "mrpc": (3668, 408, {"0": 129, "1": 279}),
    "rte": (2490, 277, {"entailment": 146, "not_entailment": 131}),
    "squad_v2": (4719, 11873, {"answerable": 5928, "unanswerable": 5945}),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_documented_counts(task, data_dir):
    s = summary(load_task(resolve_config(preset="tiny", task=task, overrides=[f"data.data_dir={data_dir}"])))
    assert (s["train_rows"], s["dev_rows"], s["dev_labels"]) == EXPECTED[task]
    assert s["source"].startswith("rule 1: --data-dir")


def test_splits_fixed_disjoint_and_subset_per_seed(data_dir):
    cfg = resolve_config(preset="smollm2", task="rte", seed=1)
    a, b = load_task(cfg), load_task(cfg)
    assert [r["idx"] for r in a.train] == [r["idx"] for r in b.train]
    assert not {r["idx"] for r in a.train} & {r["idx"] for r in a.val}
    other = load_task(resolve_config(preset="smollm2", task="rte", seed=2))
    # Validation and dev do not depend on the run seed (no tuning on a moving target); train subsets do.
    assert [r["idx"] for r in other.val] == [r["idx"] for r in a.val]
    assert [r["idx"] for r in other.dev] == [r["idx"] for r in a.dev]
    assert [r["idx"] for r in other.train] != [r["idx"] for r in a.train]
    assert probe_examples(cfg, a) == probe_examples(cfg, other)


def test_squad_validation_is_carved_by_paragraph(data_dir):
    d = load_task(resolve_config(preset="tiny", task="squad_v2", overrides=["data.max_val_examples=null", "data.max_train_examples=null"]))
    assert not {r["paragraph"] for r in d.train} & {r["paragraph"] for r in d.val}
    assert len(d.train) + len(d.val) == 4719


def test_squad_windows_label_the_answer_span():
    cfg = resolve_config(preset="tiny")
    tok = load_tokenizer(resolve_model_dir(cfg.model), True)
    context = "The quick brown fox jumps over the lazy dog. " * 6 + "Paris is the capital of France."
    start = context.index("Paris")
    row = {"question": "What is the capital?", "context": context, "answers": {"text": ["Paris"], "answer_start": [start]}}
    imp = {"question": "Who?", "context": context, "answers": {"text": [], "answer_start": []}}
    feats = encode_squad(tok, [row, imp], max_length=40, stride=10)
    assert len(feats) > 2  # long context → several windows
    positives = [f for f in feats if f["label"] == 1]
    assert positives and all(f["example"] == 0 for f in positives)
    for f in positives:
        s, e = f["offsets"][f["start"]][0], f["offsets"][f["end"]][1]
        assert context[s:e] == "Paris"
    assert all(f["start"] == -100 and f["label"] == 0 for f in feats if f["example"] == 1)


# ---- bad input -----------------------------------------------------------------------------


def _copy_data(data_dir, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(data_dir, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _cfg(task, d):
    return resolve_config(preset="tiny", task=task, overrides=[f"data.data_dir={d}"])


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such folder"):
        load_task(_cfg("sst2", tmp_path / "nope"))


def test_checksum_mismatch_names_file(data_dir, tmp_path):
    d = _copy_data(data_dir, tmp_path)
    with open(d / "glue/RTE/dev.tsv", "a") as f:
        f.write("999\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"RTE/dev\.tsv: checksum mismatch"):
        load_task(_cfg("rte", d))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.replace("sentence1\tsentence2", "s1\ts2", 1), "header"),
        (lambda t: t.replace("\tentailment\n", "\tmaybe\n", 1), r"dev\.tsv:\d+: field 'label': unknown label 'maybe'"),
        (lambda t: t.replace("\tentailment\n", "\textra\tentailment\n", 1), r"dev\.tsv:\d+: 5 fields, expected 4"),
    ],
)
def test_bad_tsv(data_dir, tmp_path, mutate, message):
    d = _copy_data(data_dir, tmp_path)
    p = d / "glue/RTE/dev.tsv"
    p.write_text(mutate(p.read_text()))
    with pytest.raises(DataError, match=message):
        load_task(resolve_config(preset="tiny", task="rte", overrides=[f"data.data_dir={d}", "data.verify_checksums=false"]))


def test_malformed_squad_json(data_dir, tmp_path):
    d = _copy_data(data_dir, tmp_path)
    (d / "squad_v2/train-v2.0.first10articles.json").write_text(
        '{"version": "v2.0", "data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}'
    )
    with pytest.raises(DataError, match=r"train-v2\.0\.first10articles\.json.*missing 'id'"):
        load_task(resolve_config(preset="tiny", task="squad_v2", overrides=[f"data.data_dir={d}", "data.verify_checksums=false"]))


def _rte_folder(data_dir, tmp_path, train: bytes | None = None):
    """A data folder with RTE only (no SHA256SUMS): train replaced by `train` when given."""
    d = tmp_path / "data"
    (d / "glue/RTE").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (d / "glue/RTE" / name).write_bytes((data_dir / "glue/RTE" / name).read_bytes())
    if train is not None:
        (d / "glue/RTE/train.tsv").write_bytes(train)
    return d


def test_tsv_with_a_header_and_no_rows(data_dir, tmp_path, capsys):
    from loradrift.cli import main

    header = (data_dir / "glue/RTE/train.tsv").read_text().split("\n")[0] + "\n"
    d = _rte_folder(data_dir, tmp_path, header.encode())
    with pytest.raises(DataError, match=r"RTE/train\.tsv: a header but no data rows"):
        load_task(_cfg("rte", d))
    assert main(["data", "check", "--task", "rte", "--data-dir", str(d)]) == 2
    assert main(["train", "--preset", "tiny", "--task", "rte", "--data-dir", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("a header but no data rows") == 2 and "Traceback" not in err


def test_non_utf8_data_names_the_file(data_dir, tmp_path):
    text = (data_dir / "glue/RTE/train.tsv").read_bytes()
    d = _rte_folder(data_dir, tmp_path, text.replace(b"\n", b"\n\xff\xfe", 3))
    with pytest.raises(DataError, match=r"RTE/train\.tsv: not UTF-8 text"):
        load_task(_cfg("rte", d))


@pytest.mark.parametrize(
    "drop, where",
    [
        ("context", r"data\[0\]\.paragraphs\[0\]: missing 'context'"),
        ("question", r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing 'question'"),
    ],
)
def test_squad_json_without_context_or_question(data_dir, tmp_path, drop, where):
    d = tmp_path / "data/squad_v2"
    d.mkdir(parents=True)
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}
    para = {"context": "Ann ran.", "qas": [qa]}
    (qa if drop == "question" else para).pop(drop)
    (d / "train-v2.0.first10articles.json").write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [para]}]}))
    (d / "dev-v2.0.json").write_bytes((data_dir / "squad_v2/dev-v2.0.json").read_bytes())
    with pytest.raises(DataError, match=r"train-v2\.0\.first10articles\.json: " + where):
        load_task(_cfg("squad_v2", tmp_path / "data"))


def test_loradrift_data_pointing_at_a_missing_folder_names_it(tmp_path, monkeypatch, capsys):
    from loradrift.cli import main

    missing = tmp_path / "no-such-data"
    monkeypatch.setenv("LORADRIFT_DATA", str(missing))
    with pytest.raises(DataError, match=f"LORADRIFT_DATA={missing}: no such folder"):
        load_task(resolve_config(preset="tiny", task="sst2"))
    assert main(["data", "check", "--task", "sst2"]) == 2
    assert f"LORADRIFT_DATA={missing}: no such folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# where the data comes from: --data-dir > $LORADRIFT_DATA > loradrift's own copy > the Hub


def _sst2_folder(data_dir, root):
    (root / "glue/SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (root / "glue/SST-2" / name).write_bytes((data_dir / "glue/SST-2" / name).read_bytes())
    return root


def test_resolution_order(data_dir, tmp_path, monkeypatch):
    from loradrift.data import PACKAGED_DATA, locate_data

    flag, env = _sst2_folder(data_dir, tmp_path / "flag"), _sst2_folder(data_dir, tmp_path / "env")
    cfg = lambda *o: resolve_config(preset="tiny", task="sst2", overrides=list(o))  # noqa: E731
    # 3: nothing named, so the package's own copy, inside the repository
    where = locate_data(cfg())
    assert (where.rule, where.path) == (3, PACKAGED_DATA)
    assert Path(__import__("loradrift").__file__).resolve().parent / "taskdata" == PACKAGED_DATA
    assert load_task(cfg()).source == f"rule 3: loradrift's own copy ({PACKAGED_DATA})"
    # 2 beats 3
    monkeypatch.setenv("LORADRIFT_DATA", str(env))
    assert (locate_data(cfg()).rule, locate_data(cfg()).path) == (2, env)
    assert load_task(cfg()).source == f"rule 2: $LORADRIFT_DATA ({env})"
    # 1 beats 2
    assert (locate_data(cfg(f"data.data_dir={flag}")).rule, locate_data(cfg(f"data.data_dir={flag}")).path) == (1, flag)
    assert load_task(cfg(f"data.data_dir={flag}")).source == f"rule 1: --data-dir ({flag})"
    # data.source=hub skips every local folder; a named folder that is missing is an error, not a fall-through
    assert locate_data(cfg(f"data.data_dir={flag}", "data.source=hub")).rule == 4
    with pytest.raises(DataError, match=r"--data-dir \(data.data_dir\)=.*nope: no such folder"):
        locate_data(cfg(f"data.data_dir={tmp_path / 'nope'}"))


def test_hub_only_when_no_local_copy(tmp_path, monkeypatch):
    import loradrift.data as data

    monkeypatch.setattr(data, "PACKAGED_DATA", tmp_path / "stripped")  # an install without its data
    cfg = lambda *o: resolve_config(preset="tiny", task="sst2", overrides=list(o))  # noqa: E731
    assert data.locate_data(cfg()).rule == 4
    with pytest.raises(DataError, match=r"no local task data .*stripped.*data.source=local rules out the Hub\): pass --data-dir"):
        data.locate_data(cfg("data.source=local"))


def test_hub_without_datasets_names_both_ways_out(tmp_path, monkeypatch, capsys):
    import sys

    import loradrift.data as data
    from loradrift.cli import main

    monkeypatch.setattr(data, "PACKAGED_DATA", tmp_path / "stripped")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert main(["data", "check", "--task", "sst2", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'loradrift[hub]'" in err and "--data-dir DIR" in err and "task sst2" in err
    assert "LORADRIFT_DATA not set" in err and "stripped" in err  # the places tried


def _fake_datasets(calls):
    """A stand-in for the `datasets` package: load_dataset returns Hub-shaped rows."""
    import types

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        if path == "rajpurkar/squad_v2":
            ctx = "Paris is the capital of France."
            return [
                {
                    "id": f"{split}-{i}",
                    "title": "France",
                    "context": ctx,
                    "question": f"What is the capital? {i}",
                    "answers": {"text": ["Paris"] if i % 2 else [], "answer_start": [0] if i % 2 else []},
                }
                for i in range(20)
            ]
        return [{"sentence": f"{split} sentence {i}", "label": i % 2, "idx": i} for i in range(30)]

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_hub_fallback_reads_the_declared_splits(tmp_path, monkeypatch, capsys):
    import sys

    import loradrift.data as data
    from loradrift.cli import main

    calls = []
    monkeypatch.setattr(data, "PACKAGED_DATA", tmp_path / "stripped")
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    td = load_task(resolve_config(preset="tiny", task="sst2"))
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
    assert td.source == "rule 4: Hugging Face Hub nyu-mll/glue/sst2"
    assert td.full_train_size == 30 and td.full_dev_size == 30
    assert td.dev[1] == {"idx": 1, "text_a": "validation sentence 1", "text_b": None, "label": 1}
    sq = load_task(resolve_config(preset="tiny", task="squad_v2"))
    assert sq.full_dev_size == 20 and sum(r["is_impossible"] for r in sq.dev) == 10
    # data check says which rule gave each task
    assert main(["data", "check", "--task", "sst2", "--preset", "tiny"]) == 0
    assert "rule 4: Hugging Face Hub" in capsys.readouterr().out


def test_data_check_names_the_rule(capsys):
    from loradrift.cli import main
    from loradrift.data import PACKAGED_DATA

    assert main(["data", "check", "--task", "all", "--preset", "tiny", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("\n[") + 1 :])
    assert [r["task"] for r in rows] == ["mrpc", "sst2", "rte", "squad_v2"]
    assert {r["source"] for r in rows} == {f"rule 3: loradrift's own copy ({PACKAGED_DATA})"}


def test_a_non_editable_install_carries_its_data(data_dir, tmp_path):
    """`pip install .` then run from another folder: the wheel holds every data file, byte for
    byte, and the installed package finds them by rule 3 with no flag or variable."""
    import hashlib
    import os
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(repo / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("loradrift-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    sums = (data_dir / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, sums):
        digest, rel = line.split()
        assert hashlib.sha256((site / "loradrift/taskdata" / rel).read_bytes()).hexdigest() == digest, rel
    assert (site / "loradrift/taskdata/README.md").is_file() and (site / "loradrift/taskdata/SHA256SUMS").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LORADRIFT_DATA"} | {"PYTHONPATH": str(site)}
    code = (
        "import loradrift, json; from loradrift.cli import main; print(loradrift.__file__); "
        "raise SystemExit(main(['data', 'check', '--task', 'sst2,rte', '--preset', 'tiny', '--json']))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(site / "loradrift" / "__init__.py")  # the installed copy, not the checkout
    rows = json.loads(r.stdout[r.stdout.index("\n[") + 1 :])
    assert [x["source"] for x in rows] == [f"rule 3: loradrift's own copy ({site / 'loradrift' / 'taskdata'})"] * 2
    assert [x["dev_rows"] for x in rows] == [872, 277]


def test_duplicate_squad_question_id_is_refused_by_data_check_and_training(data_dir, tmp_path, capsys):
    from loradrift.cli import main

    d = tmp_path / "data/squad_v2"
    d.mkdir(parents=True)
    train = json.loads((data_dir / "squad_v2/train-v2.0.first10articles.json").read_text())
    first = train["data"][0]["paragraphs"][0]["qas"][0]["id"]
    train["data"][2]["paragraphs"][1]["qas"][3]["id"] = first
    (d / "train-v2.0.first10articles.json").write_text(json.dumps(train))
    shutil.copyfile(data_dir / "squad_v2/dev-v2.0.json", d / "dev-v2.0.json")
    where = (
        rf"train-v2\.0\.first10articles\.json: data\[2\]\.paragraphs\[1\]\.qas\[3\]: question id '{first}' "
        rf"is already used at data\[0\]\.paragraphs\[0\]\.qas\[0\]"
    )
    with pytest.raises(DataError, match=where):
        load_task(_cfg("squad_v2", tmp_path / "data"))
    out = tmp_path / "out"
    assert main(["data", "check", "--task", "squad_v2", "--data-dir", str(tmp_path / "data")]) == 2
    assert main(["train", "--preset", "tiny", "--task", "squad_v2", "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"question id '{first}' is already used at data[0].paragraphs[0].qas[0]") == 2 and "Traceback" not in err
