"""Measuring the loop: per-stage durations and frames per second, with one FPS formula for everything.

FPS over N frames = (N - n0) / (t_last - t_first), where the first n0 frames completed together at
t_first: frame by frame that is (N - 1) / (t_last - t_first); batched, n0 is the first batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import numpy as np

STAGES = ("wait", "preprocess", "inference", "cam", "overlay", "output")


def rate(done: int, first_count: int, first_at: float, last_at: float) -> float:
    """Frames per second after the first completion: (done - first_count) / (last_at - first_at); 0 when
    there is no interval to measure."""
    if done <= first_count or last_at <= first_at:
        return 0.0
    return (done - first_count) / (last_at - first_at)


def fps_of(stamps: Sequence[float]) -> float:
    """The rate between the first and the last of N completions, one frame each."""
    return rate(len(stamps), 1, stamps[0], stamps[-1]) if stamps else 0.0


def median_p95(values_ms: Iterable[float]) -> dict[str, float]:
    """{"median_ms", "p95_ms"} of durations in milliseconds."""
    arr = np.fromiter(values_ms, dtype=np.float64)
    return {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95))}


class StageTimes:
    """Per-stage durations of the most recent frames, in milliseconds."""

    def __init__(self, stages: Sequence[str] = STAGES, keep: int = 10_000) -> None:
        self._ms = {name: collections.deque(maxlen=keep) for name in stages}

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        """Time spent on ``count`` frames at once (a batch): each frame gets an equal share."""
        self._ms[stage].extend([seconds * 1000.0 / count] * count)

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {"median_ms": .., "p95_ms": ..}} over the frames kept."""
        return {name: median_p95(values) for name, values in self._ms.items() if values}


class Rate:
    """Frames per second over a run (see the module's formula), and a smoothed rate for the HUD."""

    def __init__(self) -> None:
        self.done = 0
        self._first_count = 0
        self.first_at = self.last_at = 0.0
        self.shown = 0.0

    def tick(self, now: float, count: int = 1) -> None:
        """``count`` frames completed at ``now``."""
        if self.done and now > self.last_at:  # the HUD's FPS: a smoothed frame-to-frame rate
            instant = count / (now - self.last_at)
            self.shown = instant if self.shown == 0 else 0.9 * self.shown + 0.1 * instant
        if self.done == 0:
            self.first_at, self._first_count = now, count
        self.done += count
        self.last_at = now

    @property
    def fps(self) -> float:
        return rate(self.done, self._first_count, self.first_at, self.last_at)


class Pacer:
    """Slots at a video file's own frame rate, for showing it in a window at its speed.

    A frame shown more than a slot after its own (after a pause, or a slow stretch) starts the slots again
    from itself: the video goes on at its own rate instead of playing fast until it has caught up.
    """

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self._due: float | None = None

    def wait(self, now: float) -> float:
        """Seconds to wait, a frame having been shown at ``now``, before the next one is read."""
        self._due = now if self._due is None else self._due + self.interval
        if now - self._due > self.interval:
            self._due = now
        return max(0.0, self._due - now)
