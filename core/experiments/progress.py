"""A one-line progress display: redrawn in place on a terminal, a line now and then elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Shows ``label  done/total  text  ETA``.

    On a terminal the line is redrawn in place (at most every ``interval`` seconds);
    otherwise a plain line is printed every tenth of the way, so that logs stay short.
    :meth:`write` prints a message above the line.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None,
                 interval: float = 0.2) -> None:
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.interval = interval
        self.began = time.perf_counter()
        self.start_done: int | None = None
        self.drawn = 0.0
        self.last_tenth = -1
        self.line = ""

    def update(self, done: int, text: str = "", *, force: bool = False) -> None:
        now = time.perf_counter()
        if self.start_done is None:
            self.start_done, self.began = done, now
        rate = (done - self.start_done) / (now - self.began) if now > self.began else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.line = f"{self.label}  {done}/{self.total}  {text}  ETA {duration(eta)}".rstrip()
        if self.live:
            if force or now - self.drawn >= self.interval:
                self.drawn = now
                self.stream.write("\r\x1b[2K" + self.line)
                self.stream.flush()
            return
        tenth = done * 10 // max(self.total, 1)
        if force or tenth > self.last_tenth:
            self.last_tenth = tenth
            self.stream.write(self.line + "\n")
            self.stream.flush()

    def write(self, message: str) -> None:
        """Print *message* on its own line, keeping the progress line below it."""
        if self.live:
            self.stream.write("\r\x1b[2K" + message + "\n" + self.line)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""
