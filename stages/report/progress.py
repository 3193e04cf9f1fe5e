"""Progress of long work: a live bar on a terminal, plain status lines anywhere else.

On a terminal the open bars share one rich display, so a bar opened inside another (validation inside
training) is a second line of it, not a clash. Without a terminal (DVC's logs, CI, a pipe) a live bar is
escape codes or nothing, so a bar prints a line such as `train: 40/200 steps (20%), loss 4.49, 0:01:10,
~0:04:40 left` whenever PLAIN_EVERY_S seconds pass without one, and a last line when it ends if it
printed any: quick work stays silent. A ticker thread prints too, so work that cannot report steps (a
codec compressing) is still seen to be alive.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

PLAIN_EVERY_S = 10.0  # without a terminal: at most one status line per bar this often

_shared: dict[str, Any] = {"live": None, "open": 0}  # the rich display the open terminal bars share


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _terminal(out: TextIO):
    """A rich console for `out` if it is a terminal that redraws lines, else None. A real tty is required:
    FORCE_COLOR (set in many CI systems for coloured logs) does not make a log file redraw a bar."""
    from rich.console import Console

    try:
        tty = bool(getattr(out, "isatty", None) and out.isatty())
    except ValueError:  # a closed stream
        tty = False
    console = Console(file=out)
    return console if tty and console.is_interactive else None


class Bar:
    """One task's progress; `with Bar(...) as bar:` then `advance`/`update`, and `print` for lines that stay.

    total None: a count with no end (a spinner on a terminal). enabled False (other ranks): nothing at all.
    `update(..., done=f)` says the fraction done where the count does not (training under a wall-clock cap
    ends at the cap, long before its step count): the percentage and the time left then follow f.
    """

    def __init__(self, label: str, total: int | None, unit: str = "", enabled: bool = True,
                 file: TextIO | None = None):
        self.label, self.total, self.unit, self.enabled, self.file = label, total, unit, enabled, file
        self.completed, self.status = 0, ""
        self.done: float | None = None  # the fraction done, when the count is not the measure
        self.done_at_start: float | None = None  # the first such fraction (a resumed run starts part-way)
        self.live = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> "Bar":
        if not self.enabled:
            return self
        out = self.file or sys.stdout  # looked up now, so that redirected output is followed
        self.t0 = self.last = time.monotonic()
        self.lines = 0
        console = _terminal(out)
        if console is not None:
            self._open_live(console)
        else:
            self.out = out
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.remove_task(self.task)
            _shared["open"] -= 1
            if not _shared["open"]:
                self.live.stop()
                _shared["live"] = None
            return
        self._stop.set()
        self._ticker.join()
        if self.lines and exc_type is None:
            count, took = self._count(), _clock(time.monotonic() - self.t0)
            # done: the count reached its total, or (a capped run) the time ran out first
            finished = self.total is None or self.completed >= self.total or (self.done or 0.0) >= 1.0
            ended = "done" if finished else "stopped"  # e.g. suspended
            self._write(f"{self.label}: {ended}{', ' + count if count else ''} in {took}")

    def _open_live(self, console) -> None:
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        if _shared["live"] is None:
            _shared["live"] = Progress(SpinnerColumn(), TextColumn("{task.fields[label]}"), BarColumn(),
                                       TextColumn("{task.fields[count]}"), TextColumn("{task.fields[status]}"),
                                       TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
            _shared["live"].start()
        _shared["open"] += 1
        self.live = _shared["live"]
        self.task = self.live.add_task("", total=self.total, label=self.label, count=self._count(), status="")

    def update(self, completed: int, status: str | None = None, done: float | None = None) -> None:
        """Set how much is done (and the status text shown after it; `done`: the fraction of the work done,
        where `completed` of `total` is not it)."""
        if not self.enabled:
            return
        with self._lock:
            self.completed = completed
            if status is not None:
                self.status = status
            if done is not None:
                self.done = min(max(done, 0.0), 1.0)
                if self.done_at_start is None:
                    self.done_at_start = self.done
        if self.live is not None:
            position = {"total": 1.0, "completed": self.done} if self.done is not None else {"completed": completed}
            self.live.update(self.task, **position, count=self._count(), status=self.status)
        else:
            self._maybe_line()

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.update(self.completed + n, status)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """The items, advancing the bar by one as each is done with."""
        for item in items:
            yield item
            self.advance()

    def print(self, text: str) -> None:
        """A line that stays (above a live bar); without a terminal it also restarts the quiet time."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            with self._lock:
                self.last = time.monotonic()
            print(text, file=self.out, flush=True)

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None or self.done is not None:  # no end, or an end the count does not say
            return f"{self.completed:,}{unit}" if unit or self.done is not None else ""  # else time alone
        return f"{self.completed:,}/{self.total:,}{unit}"

    def _line(self, now: float) -> str:
        elapsed = now - self.t0
        if self.done is not None:
            fraction, since_start = self.done, self.done - self.done_at_start
            left = elapsed / since_start * (1.0 - self.done) if since_start > 0 and self.done < 1.0 else None
        else:
            fraction = self.completed / self.total if self.total else None
            left = elapsed / self.completed * (self.total - self.completed) \
                if self.total and 0 < self.completed < self.total else None
        parts = [self._count() + (f" ({100 * fraction:.0f}%)" if fraction is not None else "")]
        if self.status:
            parts.append(self.status)
        parts.append(_clock(elapsed))
        if left is not None:
            parts.append(f"~{_clock(left)} left")
        return f"{self.label}: " + ", ".join(p for p in parts if p)

    def _maybe_line(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self.last < PLAIN_EVERY_S:
                return
            self.last = now
            self.lines += 1
            line = self._line(now)
        self._write(line)

    def _write(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, max(PLAIN_EVERY_S / 2, 0.05))):
            self._maybe_line()
