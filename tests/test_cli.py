"""The `loradrift` command line itself: every option documented, every command with examples
that parse, and the package's own errors printed as one line, never as a traceback."""

import argparse
import importlib
import inspect
import pkgutil
import shlex

import pytest

import loradrift
from loradrift import cli


def _parsers(parser: argparse.ArgumentParser, words: str = "loradrift"):
    """(command words, parser) for the root and every subcommand below it."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{words} {name}: no one-line help in the command list"
                yield from _parsers(sub, f"{words} {name}")


def test_every_option_has_help_and_every_command_ends_with_examples_that_parse():
    root = cli.build_parser()
    seen = []
    for words, parser in _parsers(root):
        seen.append(words)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{words}: {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        assert text.rstrip().split("\n\n")[-1].startswith("examples:"), f"{words}: --help does not end with examples"
        examples = [line.strip() for line in text.rstrip().split("examples:\n")[-1].splitlines()]
        assert 1 <= len(examples) <= 2, words
        for line in examples:
            assert line.startswith(words + " ") or line == words, f"{words}: example {line!r} is another command's"
            root.parse_args(shlex.split(line)[1:])  # exits (fails the test) if an example does not parse
    assert {"loradrift train", "loradrift data check", "loradrift store repair", "loradrift score"} <= set(seen)


def test_task_is_one_spelling_everywhere_with_tasks_kept_in_study():
    root = cli.build_parser()
    for words, parser in _parsers(root):
        assert "--tasks" not in parser._option_string_actions or words == "loradrift study", words
    assert root.parse_args(["study", "--task", "sst2,rte"]).task == "sst2,rte"
    assert root.parse_args(["study", "--tasks", "sst2,rte"]).task == "sst2,rte"


def _loradrift_errors() -> list[type]:
    found = set()
    for info in pkgutil.walk_packages(loradrift.__path__, "loradrift."):
        if info.name == "loradrift.__main__":
            continue
        module = importlib.import_module(info.name)
        found |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, Exception) and c.__module__ == info.name}
    return sorted(found, key=lambda c: c.__name__)


@pytest.mark.parametrize("error", _loradrift_errors(), ids=lambda c: c.__name__)
def test_the_package_errors_reach_the_user_as_one_line(error, monkeypatch, capsys):
    e = error.__new__(error)
    Exception.__init__(e, f"planted {error.__name__}")

    def fails(args, configs):
        raise e

    monkeypatch.setattr(cli, "cmd_stats", fails)
    assert cli.main(["stats", "--preset", "tiny"]) == 2
    assert capsys.readouterr().err == f"loradrift stats: error: planted {error.__name__}\n"


def test_the_package_errors_include_serve_error():
    from loradrift.serving import ServeError

    assert ServeError in _loradrift_errors()


def test_sigterm_unwinds_the_command_and_a_rerun_resumes(tmp_path):
    """SIGTERM runs every `finally` on the way out (issue 28 item 14: the vLLM engines' processes
    outlived a terminated serve-bench): exit 143, one line and no traceback, and the checkpoint a
    rerun resumes from intact."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    cmd = [sys.executable, "-m", "loradrift", "train", "--preset", "tiny", "--task", "sst2", "--method", "lora",
           "--out", str(tmp_path), "train.max_steps=400", "train.checkpoint_every=5", "train.eval_every=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, step = time.time() + 180, 0
    while time.time() < deadline and proc.poll() is None:
        last = list(tmp_path.glob("runs/*/sst2/lora/seed42/checkpoints/last.pt"))
        try:
            step = torch.load(last[0], weights_only=True)["step"] if last else 0
        except (RuntimeError, EOFError, OSError):  # caught mid-rename
            step = 0
        if step >= 5:
            break
        time.sleep(0.1)
    assert step >= 5 and proc.poll() is None, "the run ended before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted; finished work is kept" in err and "Traceback" not in err
    # the checkpoint a rerun resumes from is whole (a run killed mid-write would leave the previous one)
    last = next(tmp_path.glob("runs/*/sst2/lora/seed42/checkpoints/last.pt"))
    assert torch.load(last, weights_only=True)["step"] >= 5
    assert not list(tmp_path.glob("runs/*/sst2/lora/seed42/result.json"))
