"""Temporal stability on video: smoothing of maps and probabilities, label hysteresis, colour scaling.

Pure functions over a frozen :class:`TemporalState`: each takes the state and returns a new one, so a
caller that wants to look without moving on (a paused view redrawn with another method) keeps the old one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


@dataclass(frozen=True, eq=False)
class TemporalState:
    """One stream's history: the options it runs under and what it smooths over. Arrays are never changed
    in place, so an old state stays valid after newer ones were made from it."""

    options: TemporalOptions = TemporalOptions()
    probs: np.ndarray | None = None
    leader: int | None = None
    challenger: int | None = None
    challenger_frames: int = 0
    map: np.ndarray | None = None
    map_key: tuple | None = None
    running_max: float = 0.0


def smooth_probabilities(state: TemporalState, probs: np.ndarray) -> tuple[np.ndarray, TemporalState]:
    """The moving average of the class probabilities (still sums to 1), and the new state."""
    a = state.options.smooth
    if state.probs is None or a == 0.0 or state.probs.shape != probs.shape:
        smoothed = probs.astype(np.float32, copy=True)
    else:
        smoothed = a * state.probs + (1.0 - a) * probs
    return smoothed, replace(state, probs=smoothed)


def hold_leader(state: TemporalState, probs: np.ndarray) -> tuple[int, TemporalState]:
    """The shown top-1: it changes only when another class has led for ``hysteresis`` frames running."""
    top = int(np.argmax(probs))
    if state.leader is None or state.options.hysteresis <= 1 or top == state.leader:
        return top, replace(state, leader=top, challenger=None, challenger_frames=0)
    frames = state.challenger_frames + 1 if top == state.challenger else 1
    if frames >= state.options.hysteresis:
        return top, replace(state, leader=top, challenger=None, challenger_frames=0)
    return state.leader, replace(state, challenger=top, challenger_frames=frames)


def smooth_map(state: TemporalState, raw: np.ndarray, key: tuple) -> tuple[np.ndarray, TemporalState]:
    """The shown [0, 1] map: the moving average of raw maps for ``key`` (class, method), then scaled.

    A new key (another class or method) restarts the average and the running max: averaging maps of
    different classes would show neither.
    """
    options = state.options
    a = options.smooth
    running_max = state.running_max
    if key != state.map_key or state.map is None or state.map.shape != raw.shape:
        averaged = raw.astype(np.float32, copy=True)
        running_max = 0.0
    elif a == 0.0:
        averaged = raw.astype(np.float32, copy=True)
    else:
        averaged = a * state.map + (1.0 - a) * raw
    if options.scale == "frame":
        return normalize_map(averaged), replace(state, map=averaged, map_key=key, running_max=running_max)
    lo = float(averaged.min())
    span = float(averaged.max()) - lo
    running_max = max(span, running_max * options.running_decay)
    new_state = replace(state, map=averaged, map_key=key, running_max=running_max)
    if running_max <= 1e-12:
        return np.zeros_like(averaged, dtype=np.float32), new_state
    return np.clip((averaged - lo) / running_max, 0.0, 1.0).astype(np.float32), new_state


def flicker(previous: np.ndarray | None, current: np.ndarray) -> float | None:
    """Mean absolute change between two consecutive shown maps (None for the first frame)."""
    if previous is None or previous.shape != current.shape:
        return None
    return float(np.abs(current - previous).mean())
