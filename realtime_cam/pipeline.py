"""The loop: frame -> preprocess -> model -> map -> overlay -> sinks, one stage per line, timed."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .model import CamModel, Prediction
from .overlay import OverlayStyle, render
from .progress import Progress
from .sinks import KEY_ESC, Sink, WindowSink
from .sources import Frame

STAGES = ("wait", "preprocess", "inference", "cam", "overlay", "output")
QUIT_KEYS = {ord("q"), ord("Q"), KEY_ESC}


@dataclass(frozen=True)
class RunOptions:
    """What the loop explains and how it draws it.

    Attributes:
        class_id: explain this class on every frame instead of each frame's top-1.
        method: map method (a key of ``realtime_cam.cams.METHODS``).
        topk: how many classes each prediction ranks.
        style: overlay drawing style.
        max_frames: stop after this many frames (None: until the source ends or the user quits).
        show_fps: draw the loop's frame rate on the overlay.
    """

    class_id: int | None = None
    method: str = "cam"
    topk: int = 5
    style: OverlayStyle = OverlayStyle()
    max_frames: int | None = None
    show_fps: bool = False


class StageTimes:
    """Per-stage durations of the most recent frames, in milliseconds."""

    def __init__(self, stages: Sequence[str] = STAGES, keep: int = 10_000) -> None:
        self._ms = {name: collections.deque(maxlen=keep) for name in stages}

    def add(self, stage: str, seconds: float) -> None:
        self._ms[stage].append(seconds * 1000.0)

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {"median_ms": .., "p95_ms": ..}} over the frames kept."""
        out = {}
        for name, values in self._ms.items():
            if values:
                arr = np.fromiter(values, dtype=np.float64)
                out[name] = {"median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95))}
        return out


@dataclass(frozen=True)
class RunResult:
    """How a run went.

    Attributes:
        frames: frames processed.
        fps: (frames - 1) / (time of last frame - time of first frame); 0 for fewer than 2 frames.
        stage_ms: per-stage median and p95 (see :class:`StageTimes`).
        stopped_by: "end", "quit" (q/Esc), "window-closed" or "max-frames".
        last: the last frame's prediction.
    """

    frames: int
    fps: float
    stage_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped_by: str = "end"
    last: Prediction | None = None


def run_loop(
    model: CamModel,
    frames: Iterable[Frame],
    sinks: Sequence[Sink] = (),
    window: WindowSink | None = None,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> RunResult:
    """Explain every frame the iterable yields and send the overlays to the sinks and the window.

    The window (if any) is also a sink; its calls stay on this (the main) thread.
    """
    outputs = [*sinks, *([window] if window is not None else [])]
    times = StageTimes()
    first_at = last_at = 0.0
    done = 0
    fps_shown = 0.0
    stopped_by = "end"
    prediction: Prediction | None = None
    t_prev = time.perf_counter()
    for frame in frames:
        t0 = time.perf_counter()
        batch = model.prepare(frame.image_bgr)
        t1 = time.perf_counter()
        logits, features = model.forward(batch)
        t2 = time.perf_counter()
        prediction = model.explain(
            logits[0], features[0], class_id=options.class_id, method=options.method, topk=options.topk
        )
        t3 = time.perf_counter()
        hud = [f"{fps_shown:.1f} FPS"] if options.show_fps and done > 1 else []
        overlay = render(frame.image_bgr, prediction, options.style, hud)
        t4 = time.perf_counter()
        for out in outputs:
            out.write(overlay)
        t5 = time.perf_counter()
        for stage, start, end in zip(STAGES, (t_prev, t0, t1, t2, t3, t4), (t0, t1, t2, t3, t4, t5)):
            times.add(stage, end - start)
        interval = t5 - t_prev
        t_prev = t5

        done += 1
        if done == 1:
            first_at = t5
        last_at = t5
        if done > 1:  # the HUD's FPS: a smoothed frame-to-frame rate
            fps_now = 1.0 / max(interval, 1e-9)
            fps_shown = fps_now if fps_shown == 0 else 0.9 * fps_shown + 0.1 * fps_now
        if progress is not None:
            progress.update(done, (done - 1) / (last_at - first_at) if done > 1 else 0.0)
        if window is not None:
            if window.last_key in QUIT_KEYS:
                stopped_by = "quit"
                break
            if window.closed:
                stopped_by = "window-closed"
                break
        if options.max_frames is not None and done >= options.max_frames:
            stopped_by = "max-frames"
            break
    fps = (done - 1) / (last_at - first_at) if done > 1 and last_at > first_at else 0.0
    if progress is not None:
        progress.close(done, fps)
    return RunResult(frames=done, fps=fps, stage_ms=times.summary(), stopped_by=stopped_by, last=prediction)


def hold_window(window: WindowSink) -> str:
    """Keep a still image on screen until q/Esc or the window is closed."""
    while True:
        key = window.wait_key(50)
        if key in QUIT_KEYS:
            return "quit"
        if window.closed:
            return "window-closed"
