"""The loop: frame -> preprocess -> model -> map -> overlay -> sinks, one stage per line, timed.

Every scheduler (headless and pipelined, or windowed with keys) runs the same :func:`step` on each frame
after inference: explain -> flicker -> draw -> write. A stream's state is a value passed in and returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .explain import Request, explain
from .localize import cam_box
from .overlay import OverlayStyle, render
from .progress import Progress
from .sinks import Sink, SnapshotSink, WindowSink, signals_held
from .temporal import TemporalOptions, TemporalState, flicker
from .threads import single_threaded_blas, single_threaded_opencv
from .timing import STAGES, Pacer, Rate, StageTimes
from .types import Frame, Prediction
from .view import KEY_HELP, QUIT, RECORD, SNAPSHOT, ViewState, handle_key
from .workers import OrderedWorker, Prefetcher

if TYPE_CHECKING:
    from .model import CamModel, Outputs

# Frames per inference call for a file (RunOptions.batch). On 2 cores ResNet18 inference alone ran 115-121 FPS
# frame by frame, 125-134 at 4 and 132-135 at 8 over several runs, and file to file was no faster at 8 than
# at 4: 4 takes the gain with little memory.
DEFAULT_BATCH = 4
log = logging.getLogger("realtime_cam")


@dataclass(frozen=True)
class RunOptions:
    """What the loop explains and how it draws it.

    Attributes:
        view: the initial view (method, pinned class, top-k, box, alpha); keys change it live.
        temporal: smoothing, label hysteresis and colour scaling over frames.
        colormap: OpenCV colormap for the heatmap.
        box_threshold: the paper's box rule threshold, as a fraction of the map's maximum.
        max_frames: stop after this many frames (None: until the source ends or the user quits).
        show_fps: draw the frame rate and the capture-to-display latency on the overlay.
        snapshot_dir: where ``s`` saves snapshots and ``r`` records.
        record_fps: frame rate written into recordings started with ``r``.
        live_source: the frames come from a camera or stream: the HUD shows capture-to-display latency and
            recordings started with ``r`` are written in real time (see ``VideoFileSink(real_time=True)``).
        pace_fps: with a window, show frames no faster than this (a video file plays at its own speed, and
            after a pause goes on at it); 0 shows them as fast as they are explained. Headless runs never wait.
        batch: frames a headless run on a file sends through the network at once (fewer, larger inference
            calls: more frames per second from the same cores); a model with a fixed batch size takes what
            it can. Live sources and windowed runs go one frame at a time, so that nothing waits for frames.
        key_help: the keys ``h`` lists on the overlay, as (keys, what they do); the mosaic of several streams
            lists its own (``view.MOSAIC_KEY_HELP``).
    """

    view: ViewState = ViewState()
    temporal: TemporalOptions = TemporalOptions()
    colormap: int = cv2.COLORMAP_JET
    box_threshold: float = 0.2
    max_frames: int | None = None
    show_fps: bool = False
    snapshot_dir: Path = Path("realtime-cam-snapshots")
    record_fps: float = 30.0
    pace_fps: float = 0.0
    live_source: bool = False
    batch: int = DEFAULT_BATCH
    key_help: tuple[tuple[str, str], ...] = tuple(KEY_HELP.items())


@dataclass(frozen=True)
class RunResult:
    """How a run went.

    Attributes:
        frames: frames processed.
        fps: frames per second from the first frame's completion to the last one's (see ``timing``); 0
            when there is no interval to measure.
        stage_ms: per-stage median and p95 (see :class:`~realtime_cam.timing.StageTimes`).
        stopped_by: "end", "quit" (q/Esc), "window-closed" or "max-frames".
        last: the last frame's prediction.
        flicker: mean absolute frame-to-frame change of the shown [0, 1] map (None under 2 frames).
        snapshots: files written by ``s`` and ``r``.
    """

    frames: int
    fps: float
    stage_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped_by: str = "end"
    last: Prediction | None = None
    flicker: float | None = None
    snapshots: tuple[Path, ...] = ()


@dataclass(frozen=True, eq=False)
class StreamState:
    """One stream's history across frames: temporal smoothing, the last shown map and prediction, and the
    running sum of the map's frame-to-frame change (flicker)."""

    temporal: TemporalState = TemporalState()
    previous_map: np.ndarray | None = None
    flicker_sum: float = 0.0
    flicker_count: int = 0
    last: Prediction | None = None

    @classmethod
    def start(cls, options: TemporalOptions) -> StreamState:
        return cls(temporal=TemporalState(options=options))

    @property
    def flicker(self) -> float | None:
        return self.flicker_sum / self.flicker_count if self.flicker_count else None


@dataclass(frozen=True, eq=False)
class Shown:
    """What one step put on screen: the overlay, the prediction it shows, the box drawn (or None), and the frame
    it was drawn on (a snapshot's frame index)."""

    overlay: np.ndarray
    prediction: Prediction
    box_xyxy: tuple[float, float, float, float] | None
    frame: Frame | None = None


def explain_frame(model: CamModel, logits: np.ndarray, features_chw: np.ndarray, view: ViewState,
                  temporal: TemporalState | None, gradients=None) -> tuple[Prediction, TemporalState | None]:
    """One frame's prediction as the view asks for it, and the stream's next temporal state (``gradients``:
    see :func:`~realtime_cam.explain.explain`)."""
    request = Request(method=view.method, class_id=view.pinned_class, topk=view.topk, rank=view.rank)
    return explain(logits, features_chw, model.head_weight, model.labels, request, temporal, gradients)


def targets_for(view: ViewState, n: int) -> np.ndarray | None:
    """The class whose gradient a run computes for each of ``n`` frames: the pinned one, else each frame's
    top-1 (None); a frame explained for another class gets a second run (see ``CamModel.gradient_source``)."""
    return None if view.pinned_class is None else np.full(n, view.pinned_class, np.int64)


def step(model: CamModel, frame: Frame, out: Outputs, view: ViewState, options: RunOptions, state: StreamState,
         sinks: Sequence[Sink] = (), hud: Sequence[str] = (),
         times: StageTimes | None = None) -> tuple[Shown, StreamState]:
    """After inference, one frame (``out``: its row of the run's outputs): explain -> flicker -> draw ->
    write to the sinks. Returns what was shown and the stream's next state (a caller that only redraws,
    such as a paused view, keeps the old one)."""
    t0 = time.perf_counter()
    prediction, temporal = explain_frame(model, out.logits, out.features, view, state.temporal,
                                         model.gradient_source(frame.image_bgr, out))
    change = flicker(state.previous_map, prediction.cam)
    t1 = time.perf_counter()
    h, w = frame.image_bgr.shape[:2]
    box = cam_box(prediction.cam, (w, h), options.box_threshold) if view.show_box else None
    help_lines = [f"{k}: {v}" for k, v in options.key_help] if view.show_help else ()
    style = OverlayStyle(alpha=view.alpha, colormap=options.colormap)
    if model.info.random_weights:  # a map from random weights must never pass for an explanation
        hud = [*hud, "random weights"]
    overlay = render(frame.image_bgr, prediction, style, hud, box_xyxy=box, help_lines=help_lines)
    t2 = time.perf_counter()
    for sink in sinks:
        sink.write_frame(overlay, frame)
    t3 = time.perf_counter()
    if times is not None:
        times.add("cam", t1 - t0)
        times.add("overlay", t2 - t1)
        times.add("output", t3 - t2)
    new_state = replace(
        state, temporal=temporal, previous_map=prediction.cam, last=prediction,
        flicker_sum=state.flicker_sum + (change or 0.0), flicker_count=state.flicker_count + (change is not None),
    )
    return Shown(overlay, prediction, box, frame), new_state


def run_loop(
    model: CamModel,
    frames: Iterable[Frame],
    sinks: Sequence[Sink] = (),
    window: WindowSink | None = None,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
    observe: Callable[[Frame, Shown], None] | None = None,
) -> RunResult:
    """Explain every frame the iterable yields and send the overlays to the sinks and the window.

    Headless, the work is pipelined so that inference runs back to back in this thread: a thread
    preprocesses ahead (a file's frames ``options.batch`` at a time), and a render thread runs :func:`step`
    on each frame, in order (the encoder has a thread of its own). With a window, everything after inference
    happens here, one frame at a time, because window calls must stay on the main thread and keys (see
    ``view.KEY_HELP``) change what the next frame shows.

    ``observe``, when given, is called with each frame and what was shown for it, in order, after its overlay
    went to the sinks (in the render thread when headless): per-frame results for a caller that keeps them.
    """
    with single_threaded_blas():  # the maps' small products gain nothing from BLAS threads, inference loses
        if window is None:
            with single_threaded_opencv():  # its pool would compete with inference for the same cores
                result = _run_headless(model, frames, sinks, options, progress, observe)
        else:
            result = _run_windowed(model, frames, sinks, window, options, progress, observe)
    if result.stopped_by == "end":
        for sink in sinks:
            sink.source_ended()
    return result


class _Renderer:
    """The render thread's side of a headless run: :func:`step` on each (frame, logits, features), in order."""

    def __init__(self, model: CamModel, sinks: Sequence[Sink], options: RunOptions, times: StageTimes,
                 observe: Callable[[Frame, Shown], None] | None = None) -> None:
        self._model, self._sinks, self._options, self._times = model, sinks, options, times
        self._observe = observe
        self.state = StreamState.start(options.temporal)

    def __call__(self, item: tuple[Frame, Outputs]) -> None:
        frame, out = item
        shown, self.state = step(self._model, frame, out, self._options.view, self._options, self.state,
                                 sinks=self._sinks, times=self._times)
        if self._observe is not None:
            self._observe(frame, shown)


def _run_headless(model: CamModel, frames: Iterable[Frame], sinks: Sequence[Sink], options: RunOptions,
                  progress: Progress | None, observe: Callable[[Frame, Shown], None] | None = None) -> RunResult:
    times = StageTimes()
    rate = Rate()
    stopped_by = "end"
    # A live source keeps only its newest frame: reading ahead of inference, or waiting to fill a batch,
    # would bring the lag back.
    live = getattr(frames, "live", False)
    batch = 1 if live else model.batch_size(options.batch)
    if options.max_frames is not None:  # at least two batches, so that the run has a rate to report
        batch = min(batch, max(1, options.max_frames // 2))
    # Files: about 8 frames queued on each side of inference (a 4K frame is 25 MB), plus the batch being
    # inferred and the one being gathered.
    depth = 1 if live else max(1, 8 // batch)
    prefetch = Prefetcher(frames, model.prepare_batch, times, batch=batch, queue_size=depth)
    renderer = _Renderer(model, sinks, options, times, observe)
    worker: OrderedWorker = OrderedWorker(renderer, name="render", queue_size=1 if live else 8)
    t_prev = time.perf_counter()
    try:
        for chunk, inputs in prefetch:
            if len(inputs) < batch:  # a file's last frames: keep one input shape for the whole run
                inputs = np.concatenate([inputs, np.zeros((batch - len(inputs), *inputs.shape[1:]), inputs.dtype)])
            t0 = time.perf_counter()
            out = model.run(inputs, targets_for(options.view, len(inputs)))
            t1 = time.perf_counter()
            if options.max_frames is not None:
                chunk = chunk[: options.max_frames - rate.done]
            for i, frame in enumerate(chunk):
                worker.submit((frame, out.row(i)))
            times.add("wait", t0 - t_prev, len(chunk))
            times.add("inference", t1 - t0, len(chunk))
            t_prev = time.perf_counter()
            rate.tick(t_prev, len(chunk))
            if progress is not None:
                progress.update(rate.done, rate.fps)
            if options.max_frames is not None and rate.done >= options.max_frames:
                stopped_by = "max-frames"
                break
        _drain(prefetch, worker)  # in the try: a signal just before it is handled below, draining all the same
    except BaseException as exc:
        # Ctrl-C or an error: still write every frame handed over before the sinks close, and let the
        # first problem be the one reported (a second one from the render thread is only logged).
        try:
            _drain(prefetch, worker)
        except Exception as later:
            if later is not exc:
                log.warning("while stopping: %s", later)
        raise
    if rate.done > 1:
        rate.last_at = time.perf_counter()  # the run ends when the last overlay is written
    if progress is not None:
        progress.close(rate.done, rate.fps)
    return RunResult(frames=rate.done, fps=rate.fps, stage_ms=times.summary(), stopped_by=stopped_by,
                     last=renderer.state.last, flicker=renderer.state.flicker)


def _drain(prefetch: Prefetcher, worker: OrderedWorker) -> None:
    """Stop reading ahead and wait until every frame handed to the render thread is drawn and written.

    A Ctrl-C or SIGTERM that arrives meanwhile is acted on once they are: interrupted here, the sinks would
    close under the render thread and lose the frames already explained. A second one stops waiting (a sink
    that hangs). Calling it again after it returned does nothing more.
    """
    try:
        with signals_held(second_aborts=True):
            prefetch.close()
            worker.finish()
    except BaseException:
        worker.abandon()  # not waited for again, whatever the caller does next
        raise


def _run_windowed(model: CamModel, frames: Iterable[Frame], sinks: Sequence[Sink], window: WindowSink,
                  options: RunOptions, progress: Progress | None,
                  observe: Callable[[Frame, Shown], None] | None = None) -> RunResult:
    times = StageTimes()
    rate = Rate()
    state = StreamState.start(options.temporal)
    view = options.view
    latency_ms = 0.0
    stopped_by = "end"
    shown: Shown | None = None
    pacer = Pacer(options.pace_fps) if options.pace_fps > 0 else None
    t_prev = time.perf_counter()
    with SnapshotSink(options.snapshot_dir, options.record_fps, real_time=options.live_source) as snapshots:
        for frame in frames:
            t0 = time.perf_counter()
            inputs = model.prepare(frame.image_bgr)
            t1 = time.perf_counter()
            out = model.run(inputs, targets_for(view, 1)).row(0)
            t2 = time.perf_counter()
            hud = []
            if options.show_fps and rate.done > 1:
                hud = [f"{rate.shown:.1f} FPS" + (f"  latency {latency_ms:.0f} ms" if options.live_source else "")]
            shown, state = step(model, frame, out, view, options, state,
                                sinks=(*sinks, snapshots, window), hud=hud, times=times)
            if observe is not None:
                observe(frame, shown)
            t5 = time.perf_counter()
            latency_ms = (t5 - frame.captured_at) * 1000.0 if frame.captured_at else 0.0
            for stage, seconds in zip(STAGES, (t0 - t_prev, t1 - t0, t2 - t1)):
                times.add(stage, seconds)
            t_prev = t5
            rate.tick(t5)
            if progress is not None:
                progress.update(rate.done, rate.fps)
            key = window.last_key
            if pacer is not None:  # wait out the frame's slot, serving keys meanwhile
                remaining_ms = int(pacer.wait(time.perf_counter()) * 1000)
                if remaining_ms > 1:
                    waited = window.wait_key(remaining_ms)
                    key = key if waited < 0 else waited
            while True:  # keys; while paused, keep serving them (and redraw what they change)
                new_view, action = handle_key(view, key, shown.prediction.class_id, model.methods)
                if action == QUIT:
                    stopped_by = "quit"
                    break
                if action == SNAPSHOT:
                    snapshots.snapshot(shown.overlay, frame, shown.prediction, shown.box_xyxy)
                elif action == RECORD:
                    snapshots.toggle_recording(frame)
                if new_view != view:
                    view = new_view
                    if view.paused:  # show the change on the held frame; the stream's state does not move
                        shown, _ = step(model, frame, out, view, options, state,
                                        sinks=(window,), hud=[*hud, "paused"])
                if window.closed:
                    stopped_by = "window-closed"
                    break
                if not view.paused:
                    break
                key = window.wait_key(30)
            if stopped_by != "end":
                break
            if options.max_frames is not None and rate.done >= options.max_frames:
                stopped_by = "max-frames"
                break
    if progress is not None:
        progress.close(rate.done, rate.fps)
    return RunResult(
        frames=rate.done, fps=rate.fps, stage_ms=times.summary(), stopped_by=stopped_by,
        last=shown.prediction if shown is not None else None,  # a paused view's last redraw included
        flicker=state.flicker, snapshots=tuple(snapshots.written),
    )


def hold_window(window: WindowSink) -> str:
    """Keep a still image on screen until q/Esc or the window is closed."""
    while True:
        key = window.wait_key(50)
        if handle_key(ViewState(), key, None)[1] == QUIT:
            return "quit"
        if window.closed:
            return "window-closed"
