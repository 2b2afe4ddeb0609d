"""A small progress line on stderr: frames done / total and FPS."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """``frames 120/341 (35%) 96.2 FPS``, redrawn in place on a terminal, a line per 10% otherwise.

    Args:
        total: the expected number of frames, or None when unknown (live sources). A container's
            frame count can be wrong, so it is shown as an estimate ('~') until the end.
        estimate: True when ``total`` comes from a container header.
        recount: called at each update while ``total`` is an estimate: the real total once it is known
            (a file's frames counted in the background), else None.
    """

    def __init__(self, total: int | None, estimate: bool = False, stream: TextIO | None = None,
                 label: str = "frames", recount: Callable[[], int | None] | None = None) -> None:
        self.total = total
        self.estimate = estimate
        self.recount = recount
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_decile = -1
        self._drawn = False

    def _text(self, done: int, fps: float) -> str:
        if self.total:
            mark = "~" if self.estimate else ""
            pct = min(100, int(100 * done / self.total))
            return f"{self.label} {done}/{mark}{self.total} ({pct}%) {fps:.1f} FPS"
        return f"{self.label} {done} {fps:.1f} FPS"

    def update(self, done: int, fps: float) -> None:
        if self.estimate and self.recount is not None:
            counted = self.recount()
            if counted is not None:
                self.total, self.estimate = counted, False
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= 0.1:
                self.stream.write("\r" + self._text(done, fps) + "\x1b[K")
                self.stream.flush()
                self._last_draw = now
                self._drawn = True
        elif self.total:
            decile = min(10, 10 * done // self.total)
            if decile != self._last_decile and decile > 0:
                self._last_decile = decile
                self.stream.write(self._text(done, fps) + "\n")

    def close(self, done: int, fps: float) -> None:
        """Print the final count (the true one, whatever the header claimed)."""
        self.estimate = False
        if self.total is not None and done != self.total:
            self.total = None
        text = self._text(done, fps)
        self.stream.write(("\r" + text + "\x1b[K\n") if self.tty else text + "\n")
        self.stream.flush()
