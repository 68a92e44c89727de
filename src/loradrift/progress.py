"""Progress with an ETA for long steps, on a terminal and in a log file.

    with Reporter(console) as rep, rep.stage("phase 2", total=len(grid)) as st:
        for cfg in grid:
            st.start(f"{cfg.task}/{cfg.method.name}/seed{cfg.seed}")
            train_run(cfg, on_step=st.inner)
            st.advance()

On a terminal a stage is a rich progress bar. Anywhere else (stderr redirected to a file or a
pipe, CI, nohup) a bar would be drawn once, at the end, so a stage prints plain lines instead:

    [12:03:10] phase 2: final runs: 3/24, elapsed 0:04:10, ETA 0:29:10 (now sst2/lora/seed1337: 40/120)

one when the stage starts (once it knows its total), one each time an item finishes, and, while
an item runs, one every `interval_s` seconds (20) from a background thread, so a log shows signs
of life even inside a ten-minute item.

ETA: the time per item so far times the items left. Items found already done (a resumed study)
count as free, and the running item's own fraction (steps of a run, trials of a search, rounds of
a benchmark) counts too, so the ETA moves within a long item. It assumes the items left take as
long as those done, which holds for runs and trials and is rough across a phase's unlike steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

INTERVAL_S = 20.0


def hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Stage:
    """A counted step: `total` items (None: not known yet), and the running item's name and
    fraction. Made by :meth:`Reporter.stage`."""

    def __init__(self, label: str, total: int | None, clock: Callable[[], float],
                 changed: Callable[[Stage, bool], None]):
        self.label, self.total, self.clock = label, total, clock
        self.done = self.cached = 0
        self.note = ""
        self.part: tuple[float, float] | None = None  # (done, total) within the running item
        self.t0 = clock()
        self._changed = changed

    def start(self, note: str) -> None:
        """The next item begins; `note` names it in the progress lines."""
        self.note, self.part = note, None
        self._changed(self, False)

    def inner(self, done: float, total: float) -> None:
        """Progress within the running item (steps, trials, rounds; a float `done` counts part of
        one); the signature of `train_run`'s `on_step`."""
        self.part = (done, total) if total else None
        self._changed(self, False)

    @property
    def frac(self) -> float:
        part = self.part  # once: the heartbeat thread reads while the worker writes
        return min(max(part[0] / part[1], 0.0), 1.0) if part else 0.0

    def advance(self, cached: bool = False) -> None:
        """One more item finished; `cached`: it was found already done and took no time."""
        self.update(self.done + 1, cached=cached)

    def update(self, done: int, total: int | None = None, cached: bool = False) -> None:
        """`done` items finished so far (of `total`, where that changes)."""
        finished = done - self.done
        counted = total is not None and self.total is None
        if total is not None:
            self.total = total
        if cached:
            self.cached += finished
        self.done, self.part, self.note = done, None, ""
        self._changed(self, (finished > 0 and not cached) or counted)

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        """Seconds left, None until something has been measured."""
        frac = self.frac
        worked = self.done - self.cached + frac
        if self.total is None or worked <= 0:
            return None
        return self.elapsed() / worked * max(self.total - self.done - frac, 0.0)

    def line(self) -> str:
        eta = self.eta()
        text = (f"{self.label}: {self.done}/{'?' if self.total is None else self.total}, elapsed {hms(self.elapsed())}, "
                f"ETA {'?' if eta is None else hms(eta)}")
        note, part = self.note, self.part
        if note:
            text += f" (now {note}"
            if part:
                done, total = part
                text += f": {int(done)}/{int(total)}" if float(done).is_integer() else f": {min(done / total, 1.0):.0%}"
            text += ")"
        return text


class Reporter:
    """Where stages show: rich bars when `live` (default: the console is a terminal), else plain
    lines on the console's stream. `clock` and `heartbeat=False` (no background thread; call
    :meth:`poll`) let tests drive the timing."""

    def __init__(self, console=None, *, live: bool | None = None, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, heartbeat: bool = True):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.interval_s, self.clock, self.heartbeat = interval_s, clock, heartbeat
        self._stages: dict[Stage, float] = {}  # plain mode: each running stage's last printed line
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bars = None

    def __enter__(self) -> Reporter:
        if self.live:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  EtaColumn(), console=self.console)
            self._bars.start()
        elif self.heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="loradrift-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @contextmanager
    def stage(self, label: str, total: int | None = None) -> Iterator[Stage]:
        st = Stage(label, total, self.clock, self._changed)
        if self._bars is not None:
            st.task_id = self._bars.add_task(label, total=total, stage=st)
        else:
            with self._lock:
                self._stages[st] = st.t0
            if total is not None:  # else its first line comes with the total (Stage.update)
                self._emit(st)
        try:
            yield st
        finally:
            if self._bars is not None:
                # Finished bars would pile up over a study's phases: one summary line stays instead.
                self._bars.remove_task(st.task_id)
                self.console.log(f"{label}: {st.done}/{st.total} in {hms(st.elapsed())}")
            with self._lock:
                self._stages.pop(st, None)

    def poll(self) -> None:
        """A line for every stage that has printed nothing for `interval_s`."""
        now = self.clock()
        with self._lock:
            due = [st for st, last in self._stages.items() if now - last >= self.interval_s]
        for st in due:
            self._emit(st)

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s)):
            self.poll()

    def _changed(self, st: Stage, finished: bool) -> None:
        if self._bars is not None:
            desc = st.label + (f" — {st.note}" if st.note else "")
            self._bars.update(st.task_id, completed=st.done + st.frac, total=st.total, description=desc)
        elif finished:
            self._emit(st)

    def _emit(self, st: Stage) -> None:
        with self._lock:
            if st not in self._stages:  # a heartbeat that lost the race with the stage's end
                return
            self._stages[st] = self.clock()
            # console.file, not console.print: the line is plain text, and "[12:03:10]" is not markup.
            f = self.console.file
            f.write(f"[{datetime.now():%H:%M:%S}] {st.line()}\n")
            f.flush()


class EtaColumn(ProgressColumn):
    """Stage.eta rather than rich's own estimate, which takes items found done for fast work."""

    def render(self, task) -> Text:
        eta = task.fields["stage"].eta()
        return Text(f"ETA {'?' if eta is None else hms(eta)}", style="progress.remaining")
