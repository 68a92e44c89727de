"""Progress off a terminal (loradrift.progress): plain "k/N, ETA" lines when an item finishes and
at a steady interval while one runs, driven here by a fake clock; and the lines a real tiny study
phase writes to a captured stderr."""

import io
import json
import re
import threading
import time

import pytest
import torch
from rich.console import Console
from rich.text import Text

from loradrift.progress import Reporter

STAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(interval_s=20.0):
    out, clock = io.StringIO(), FakeClock()
    rep = Reporter(Console(file=out), interval_s=interval_s, clock=clock, heartbeat=False)

    def lines() -> list[str]:
        text, _ = out.getvalue(), out.truncate(0)
        out.seek(0)
        return [STAMP.sub("", x) for x in text.splitlines()]

    return rep, clock, lines


def test_plain_lines_at_each_finished_item_and_every_interval_with_k_of_n_and_eta():
    rep, clock, lines = plain(interval_s=20)
    assert not rep.live  # a StringIO is not a terminal
    with rep, rep.stage("phase 2: final runs", total=4) as st:
        assert lines() == ["phase 2: final runs: 0/4, elapsed 0:00:00, ETA ?"]
        st.start("sst2/lora/seed42")
        st.inner(3, 6)
        clock.now = 19.9
        rep.poll()
        assert lines() == []  # nothing yet: the interval has not passed
        clock.now = 20
        rep.poll()
        # half an item in 20 s: 40 s an item, 3.5 items left
        assert lines() == ["phase 2: final runs: 0/4, elapsed 0:00:20, ETA 0:02:20 (now sst2/lora/seed42: 3/6)"]
        clock.now = 30
        st.advance()
        assert lines() == ["phase 2: final runs: 1/4, elapsed 0:00:30, ETA 0:01:30"]  # at once, not at the interval
        clock.now = 49
        rep.poll()
        assert lines() == []  # the interval counts from the last line printed
        clock.now = 50
        rep.poll()
        assert lines() == ["phase 2: final runs: 1/4, elapsed 0:00:50, ETA 0:02:30"]
        st.advance(cached=True)
        assert lines() == []  # found done: no line of its own, and no time in the ETA
        clock.now = 70
        rep.poll()
        assert lines() == ["phase 2: final runs: 2/4, elapsed 0:01:10, ETA 0:02:20"]
        st.start("search report")
        st.inner(1.25, 5)  # a float count (a trial part done) shows as a share
        clock.now = 90
        rep.poll()
        assert lines() == ["phase 2: final runs: 2/4, elapsed 0:01:30, ETA 0:02:06 (now search report: 25%)"]
    clock.now = 500
    rep.poll()
    assert lines() == []  # a finished stage is silent


def test_a_stage_that_counts_its_items_later_starts_with_the_count():
    rep, clock, lines = plain()
    with rep, rep.stage("phase 3: analyses") as st:
        assert lines() == []  # not "0/?": the phase is about to say how many
        st.update(0, total=5)
        assert lines() == ["phase 3: analyses: 0/5, elapsed 0:00:00, ETA ?"]


def test_the_heartbeat_thread_prints_while_nobody_calls():
    out = io.StringIO()
    rep = Reporter(Console(file=out), interval_s=0.05)
    with rep, rep.stage("phase 0: checks and baselines", total=3) as st:
        st.start("memory sst2/lora")
        deadline = time.monotonic() + 30
        while out.getvalue().count("\n") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker is busy: only the reporter's thread can print
    beats = [STAMP.sub("", x) for x in out.getvalue().splitlines()[1:3]]
    assert len(beats) == 2 and all(re.fullmatch(r"phase 0: checks and baselines: 0/3, elapsed \d:\d\d:\d\d, ETA \? "
                                                 r"\(now memory sst2/lora\)", b) for b in beats), beats
    assert not any(t.name == "loradrift-progress" for t in threading.enumerate())  # stopped with the reporter


def test_on_a_terminal_a_rich_bar_and_one_summary_line():
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, force_terminal=True, width=120)
    rep = Reporter(console, clock=clock)
    assert rep.live
    with rep, rep.stage("phase 1: search", total=2) as st:
        st.advance()
        clock.now = 65
        st.advance()
    text = Text.from_ansi(out.getvalue()).plain
    assert "phase 1: search: 2/2 in 0:01:05" in text
    assert ", ETA" not in text  # no plain lines on a terminal


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_a_tiny_study_phase_prints_progress_to_a_captured_stderr_and_records_its_threads(tmp_path, capsys, keep_torch_threads):
    from loradrift.cli import main

    out = tmp_path / "study"
    assert main(["study", "--preset", "tiny", "--out", str(out), "--task", "sst2", "--phases", "2", "study.search=false",
                 "study.seeds=[42,1337]", "study.methods=[lora]", "runtime.threads=1"]) == 0
    err = capsys.readouterr().err
    progress = [x for x in err.splitlines() if re.match(r"\[\d\d:\d\d:\d\d\] phase 2: final runs: ", x)]
    assert [re.search(r": (\d/2), elapsed", x).group(1) for x in progress] == ["0/2", "1/2", "2/2"], err
    assert all(re.search(r", ETA (\?|\d:\d\d:\d\d)", x) for x in progress)
    # runtime.threads reached torch in the run, and its result says so
    results = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/sst2/lora/seed*/result.json"))]
    assert [r["torch_threads"] for r in results] == [1, 1]
    assert torch.get_num_threads() == 1
