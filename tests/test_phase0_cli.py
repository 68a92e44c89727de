"""Phase 0 commands and the CLI's handling of bad input, through the real `loradrift` entry point."""

import json
import os
import subprocess
import sys

import pytest

from loradrift.cli import main
from loradrift.io import ResultsStore


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "loradrift", *args], capture_output=True, text=True)


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "sanity", "baselines", "extract-base", "memory", "score", "data", "model"):
        assert cmd in r.stdout


def test_baselines_rows_are_correct(tmp_path, capsys):
    assert main(["baselines", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    rows = ResultsStore(tmp_path / "results.sqlite").rows("baseline")
    by = {(r["task"], r["method"]): r["metrics"] for r in rows}
    assert len(by) == 8
    # Always-no-answer on SQuAD v2 scores exactly the unanswerable share, by definition.
    no_ans = by[("squad_v2", "no_answer")]
    assert no_ans["f1"] == pytest.approx(100 * no_ans["NoAns_total"] / no_ans["total"])
    assert no_ans["HasAns_f1"] == 0
    for task in ("mrpc", "sst2", "rte"):
        maj = by[(task, "majority")]
        assert 0 <= maj["accuracy"] <= 1 and maj["chance_accuracy"] == 0.5
        # two labels: the train-majority class scores the dev-majority rate or its complement
        assert maj["dev_majority_accuracy"] == pytest.approx(max(maj["accuracy"], 1 - maj["accuracy"]))
    assert "Baselines on dev" in capsys.readouterr().out


def test_sanity_classification_passes_on_tiny(tmp_path, capsys):
    assert main(["sanity", "--preset", "tiny", "--task", "sst2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sst2" in out and "True" in out


def test_sanity_fails_loudly_when_it_cannot_overfit(tmp_path, capsys):
    # A learning rate this small cannot overfit in 10 steps: the command must say so and exit 1.
    code = main(["sanity", "--preset", "tiny", "--task", "rte", "--method", "lora", "--out", str(tmp_path),
                 "sanity.lr_lora=1e-9", "sanity.max_steps=10"])
    assert code == 1
    assert "sanity check failed for: rte/lora" in capsys.readouterr().err


def test_memory_profile(tmp_path):
    assert main(["memory", "--preset", "tiny", "--task", "sst2", "--method", "lora", "--out", str(tmp_path)]) == 0
    (row,) = ResultsStore(tmp_path / "results.sqlite").rows("memory")
    assert row["metrics"]["peak_memory_mb"] > 10


def test_memory_profiles_are_isolated_from_each_other(tmp_path):
    """Each profile is its own process: a small batch after a large one reports its own, lower
    peak, not the high-water mark the large one left behind."""
    from loradrift.config import resolve_config
    from loradrift.phase0 import memory_profile_isolated

    def peak(bs):
        cfg = resolve_config(preset="tiny", task="sst2", out_dir=str(tmp_path),
                             overrides=["method.name=full", f"train.batch_size={bs}", "model.max_length=128"])
        return memory_profile_isolated(cfg)

    big, small = peak(64), peak(1)
    assert small["peak_memory_mb"] < big["peak_memory_mb"]
    assert not big["peak_is_whole_process"] and not small["peak_is_whole_process"]  # Linux resets VmHWM


def test_score_squad_matches_hand_values(tmp_path, capsys):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is big.", "qas": [
        {"id": "a", "question": "q", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "q", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps({"a": "the Paris", "b": "x"}))
    assert main(["score", "squad_v2", str(tmp_path / "d.json"), str(tmp_path / "p.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact"] == 50.0 and out["HasAns_exact"] == 100.0 and out["NoAns_exact"] == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "tiny", "--task", "cola"], "unknown task 'cola'"),
        (["train", "--preset", "nope", "--task", "sst2"], "unknown preset 'nope'"),
        (["train", "--preset", "tiny", "--task", "sst2", "train.lrr=1"], "train.lrr: unknown config key"),
        (["train", "--preset", "tiny", "--task", "sst2", "model.name=/no/such/model"], "/no/such/model"),
        (["data", "check", "--preset", "tiny", "--data-dir", "/no/such/dir"], "--data-dir (data.data_dir)=/no/such/dir: no such folder"),
        (["baselines", "--preset", "tiny", "--task", "sst2,foo"], "unknown task 'foo'"),
        (["score", "squad_v2", "/no/data.json", "/no/preds.json"], "/no/data.json"),
    ],
)
def test_bad_input_gives_one_clear_message_and_exit_2(args, message, tmp_path, capsys):
    # In-process: the message and the exit status come from cli.main, which is what a user's shell
    # sees (the process-level path is checked once below).
    code = main([*args, *(["--out", str(tmp_path)] if args[0] not in ("score", "data") else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


def test_bad_input_exits_2_from_the_real_entry_point(tmp_path):
    r = run_cli("train", "--preset", "tiny", "--task", "cola", "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "unknown task 'cola'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["out is a file", "out is read-only", "store is a folder", "out inside a file"])
def test_unusable_output_paths_give_one_clear_message(tmp_path, case, monkeypatch, capsys):
    out = tmp_path / "out"
    expect = str(out)
    if case == "out is a file":
        out.write_text("not a folder")
    elif case == "out inside a file":
        out.write_text("not a folder")
        out = out / "sub"
    elif case == "out is read-only":
        out.mkdir()
        out.chmod(0o555)
        expect = f"output folder {out}: not writable"
        if os.geteuid() == 0:
            # root ignores permission bits (and this venv's python lives under /root, so the
            # command cannot run as another user): answer as the kernel would for that user.
            import loradrift.io

            real = os.access
            monkeypatch.setattr(loradrift.io.os, "access", lambda p, mode: False if str(p) == str(out) else real(p, mode))
    else:
        (out / "results.sqlite").mkdir(parents=True)
        expect = f"results store {out / 'results.sqlite'}: is a folder"
    assert main(["train", "--preset", "tiny", "--task", "sst2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err
    if case in ("store is a folder", "out is read-only"):
        assert not list(out.glob("runs/*")), "nothing is started before the output is known to work"
