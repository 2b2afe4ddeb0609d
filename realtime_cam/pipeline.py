"""The loop: frame -> preprocess -> model -> map -> overlay -> sinks, one stage per line, timed."""

from __future__ import annotations

import collections
import queue
import threading
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


class _RenderWorker:
    """Draws overlays and hands them to the sinks in a thread of its own (headless runs).

    Frames keep their order (one worker, one FIFO queue). An error in the worker stops the run: it is
    raised again in the loop's thread at the next frame or at :meth:`finish`.
    """

    def __init__(self, sinks: Sequence[Sink], style: OverlayStyle, times: StageTimes, queue_size: int = 4) -> None:
        self._sinks = sinks
        self._style = style
        self._times = times
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="render", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain, so that a producer blocked on put() is released
            try:
                frame, prediction, hud = item
                t0 = time.perf_counter()
                overlay = render(frame.image_bgr, prediction, self._style, hud)
                t1 = time.perf_counter()
                for sink in self._sinks:
                    sink.write(overlay)
                t2 = time.perf_counter()
                self._times.add("overlay", t1 - t0)
                self._times.add("output", t2 - t1)
            except BaseException as exc:  # surfaces in the loop's thread
                self._error = exc

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, frame: Frame, prediction: Prediction, hud: list[str]) -> None:
        self.check()
        self._queue.put((frame, prediction, hud))

    def finish(self) -> None:
        """Wait for every submitted frame to be drawn and written; raise the worker's error, if any."""
        self._queue.put(None)
        self._thread.join()
        self.check()


def run_loop(
    model: CamModel,
    frames: Iterable[Frame],
    sinks: Sequence[Sink] = (),
    window: WindowSink | None = None,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> RunResult:
    """Explain every frame the iterable yields and send the overlays to the sinks and the window.

    Inference runs back to back in this thread. With a window, overlays are drawn and shown here too
    (window calls must stay on the main thread); headless, a render thread draws and writes them, so
    that drawing and encoding overlap inference.
    """
    times = StageTimes()
    worker = _RenderWorker(sinks, options.style, times) if window is None else None
    outputs = [*sinks, *([window] if window is not None else [])]
    first_at = last_at = 0.0
    done = 0
    fps_shown = 0.0
    stopped_by = "end"
    prediction: Prediction | None = None
    t_prev = time.perf_counter()
    try:
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
            if worker is not None:
                worker.submit(frame, prediction, hud)
                t5 = time.perf_counter()
            else:
                overlay = render(frame.image_bgr, prediction, options.style, hud)
                t4 = time.perf_counter()
                for out in outputs:
                    out.write(overlay)
                t5 = time.perf_counter()
                times.add("overlay", t4 - t3)
                times.add("output", t5 - t4)
            times.add("wait", t0 - t_prev)
            times.add("preprocess", t1 - t0)
            times.add("inference", t2 - t1)
            times.add("cam", t3 - t2)
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
    finally:
        if worker is not None:
            worker.finish()  # on Ctrl-C too: every frame handed over is written before the sinks close
            last_at = time.perf_counter() if done > 1 else last_at
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
