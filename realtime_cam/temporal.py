"""Temporal stability on video: smoothing of maps and probabilities, label hysteresis, colour scaling.

One :class:`TemporalFilter` lives as long as a run; its state is the history it smooths over, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cams import normalize_map

SCALES = ("frame", "running")


@dataclass(frozen=True)
class TemporalOptions:
    """How maps and labels are stabilised over frames.

    Attributes:
        smooth: weight of the history in an exponential moving average of the map and the probabilities:
            shown = smooth * previous + (1 - smooth) * new. 0 turns smoothing off; 0.6 is a good start.
            The map's average restarts when the explained class or method changes.
        hysteresis: the shown top-1 changes only after another class has led for this many frames in a row
            (1: no hysteresis).
        scale: "frame" normalises each map to its own min..max; "running" divides by a running
            max that decays slowly, so the colours stop 'breathing' when the evidence is steady.
        running_decay: per-frame decay of the running max (only for scale="running").
    """

    smooth: float = 0.0
    hysteresis: int = 3
    scale: str = "frame"
    running_decay: float = 0.98

    def __post_init__(self) -> None:
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError("smooth must be in [0, 1)")
        if self.hysteresis < 1:
            raise ValueError("hysteresis must be at least 1")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}")


class TemporalFilter:
    """Stabilises one stream's predictions over time (see :class:`TemporalOptions`)."""

    def __init__(self, options: TemporalOptions = TemporalOptions()) -> None:
        self.options = options
        self._probs: np.ndarray | None = None
        self._leader: int | None = None
        self._challenger: int | None = None
        self._challenger_frames = 0
        self._map: np.ndarray | None = None
        self._map_key: tuple | None = None
        self._running_max = 0.0

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        """The moving average of the class probabilities (still sums to 1)."""
        a = self.options.smooth
        if self._probs is None or a == 0.0 or self._probs.shape != probs.shape:
            self._probs = probs.astype(np.float32, copy=True)
        else:
            self._probs = a * self._probs + (1.0 - a) * probs
        return self._probs

    def leader(self, probs: np.ndarray) -> int:
        """The shown top-1: it changes only when another class has led for ``hysteresis`` frames running."""
        top = int(np.argmax(probs))
        if self._leader is None or self.options.hysteresis <= 1 or top == self._leader:
            self._leader = top
            self._challenger, self._challenger_frames = None, 0
            return top
        if top == self._challenger:
            self._challenger_frames += 1
        else:
            self._challenger, self._challenger_frames = top, 1
        if self._challenger_frames >= self.options.hysteresis:
            self._leader = top
            self._challenger, self._challenger_frames = None, 0
        return self._leader

    def map(self, raw: np.ndarray, key: tuple) -> np.ndarray:
        """The shown [0, 1] map: the moving average of raw maps for ``key`` (class, method), then scaled.

        A new key (another class or method) restarts the average and the running max: averaging maps of
        different classes would show neither.
        """
        a = self.options.smooth
        if key != self._map_key or self._map is None or self._map.shape != raw.shape:
            self._map = raw.astype(np.float32, copy=True)
            self._map_key = key
            self._running_max = 0.0
        elif a == 0.0:
            self._map = raw.astype(np.float32, copy=True)
        else:
            self._map = a * self._map + (1.0 - a) * raw
        if self.options.scale == "frame":
            return normalize_map(self._map)
        lo = float(self._map.min())
        span = float(self._map.max()) - lo
        self._running_max = max(span, self._running_max * self.options.running_decay)
        if self._running_max <= 1e-12:
            return np.zeros_like(self._map, dtype=np.float32)
        return np.clip((self._map - lo) / self._running_max, 0.0, 1.0).astype(np.float32)


def flicker(previous: np.ndarray | None, current: np.ndarray) -> float | None:
    """Mean absolute change between two consecutive shown maps (None for the first frame)."""
    if previous is None or previous.shape != current.shape:
        return None
    return float(np.abs(current - previous).mean())
