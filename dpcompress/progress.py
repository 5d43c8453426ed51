"""Progress of long work (profile, importance, fine-tuning, the closed loop) on stderr.

Stage functions report through a plain ``Callable[[str], None]``; a line that knows how far the
work is comes as :class:`Counted` (a ``str`` carrying ``done`` and ``total``), so any callback
that takes lines still works. :class:`ProgressBar` turns counted lines into a tqdm bar with the
time left on a terminal, and into plain lines where stderr is a log (a file, a pipe, CI): one per
item of a short task, else one every few seconds, so logs stay readable. Nothing goes to stdout, where ``--json`` output goes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO


FEW_ITEMS = 20


class Counted(str):
    """A progress line that also says how far ``task`` is: ``done`` of ``total``."""

    done: int
    total: int
    task: str

    def __new__(cls, text: str, done: int, total: int, task: str) -> "Counted":
        line = super().__new__(cls, text)
        line.done, line.total, line.task = done, total, task
        return line


def profile_lines(say: Callable[[str], None]) -> Callable[[Any], None]:
    """A ``profile_table`` progress callback that reports to ``say`` as counted lines."""
    def report(p: Any) -> None:
        say(Counted(f"{p.shapes_done}/{p.shapes_total} shapes", p.done_blocks, p.total_blocks, "profile"))

    return report


class ProgressBar:
    """Callable with progress lines: counted ones move the bar, others are written above it."""

    def __init__(self, *, quiet: bool = False, stream: Optional[TextIO] = None, interval_s: float = 10.0) -> None:
        self.quiet, self.interval_s = quiet, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._task: Optional[str] = None
        self._started = time.monotonic()
        self._first_done = 0
        self._last_line = 0.0
        self._last_call = time.monotonic()  # a new task began no later than the line before its first count

    def __call__(self, line: str) -> None:
        if self.quiet:
            return
        previous_call, self._last_call = self._last_call, time.monotonic()
        if isinstance(line, Counted):
            self._advance(line, previous_call)
        elif self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _advance(self, line: Counted, previous_call: float) -> None:
        from tqdm import tqdm

        if line.task != self._task:  # a new task: a new bar and rate
            self.close()
            self._task, self._started, self._last_line = line.task, previous_call, 0.0
            self._first_done = line.done - 1  # work resumed from an earlier run does not count towards the rate
        note = str(line)
        if self.interactive:
            if self._bar is None:
                self._bar = tqdm(total=line.total, initial=self._first_done, desc=line.task, file=self.stream,
                                 dynamic_ncols=True, leave=True)
            self._bar.total = line.total
            self._bar.update(line.done - self._bar.n)
            self._bar.set_postfix_str(note[:60], refresh=True)
            return
        now = time.monotonic()
        # A log gets every line of a short task (a few candidates, epochs), else one every interval_s.
        if line.total <= FEW_ITEMS or line.done >= line.total or now - self._last_line >= self.interval_s:
            self._last_line = now
            meter = tqdm.format_meter(line.done - self._first_done, line.total - self._first_done,
                                      now - self._started, prefix=line.task, ncols=0)
            print(f"{meter} {note}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._task = None
