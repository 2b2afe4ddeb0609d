"""The loop: frame -> preprocess -> model -> map -> overlay -> sinks, one stage per line, timed."""

from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
import time
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from .errors import SinkError
from .localize import cam_box
from .model import CamModel, Prediction
from .overlay import OverlayStyle, render
from .progress import Progress
from .sinks import Sink, VideoFileSink, WindowSink
from .sources import Frame
from .temporal import TemporalFilter, TemporalOptions, flicker
from .threads import HELPER_CPU, lower_this_threads_priority, single_threaded_opencv
from .view import KEY_HELP, QUIT, RECORD, SNAPSHOT, ViewState, handle_key

STAGES = ("wait", "preprocess", "inference", "cam", "overlay", "output")
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
        pace_fps: with a window, show frames no faster than this (a video file plays at its own speed);
            0 shows them as fast as they are explained. Headless runs never wait.
        batch: frames a headless run on a file sends through the network at once (fewer, larger inference
            calls: more frames per second from the same cores); a model with a fixed batch size takes what
            it can. Live sources and windowed runs go one frame at a time, so that nothing waits for frames.
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


@dataclass(frozen=True)
class RunResult:
    """How a run went.

    Attributes:
        frames: frames processed.
        fps: frames per second from the first frame's completion to the last one's (see ``_Rate``); 0
            when there is no interval to measure.
        stage_ms: per-stage median and p95 (see :class:`StageTimes`).
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


def explain_frame(
    model: CamModel, logits: np.ndarray, features_chw: np.ndarray, view: ViewState, temporal: TemporalFilter
) -> Prediction:
    """One frame's prediction as the view asks for it, stabilised over time by ``temporal``."""
    return model.explain(logits, features_chw, class_id=view.pinned_class, method=view.method, topk=view.topk,
                         rank=view.rank, temporal=temporal)


def draw(frame: Frame, prediction: Prediction, view: ViewState, options: RunOptions, hud: Sequence[str]) -> np.ndarray:
    """The overlay for one frame: map, labels, the paper's box when asked for, HUD and help."""
    h, w = frame.image_bgr.shape[:2]
    box = cam_box(prediction.cam, (w, h), options.box_threshold) if view.show_box else None
    help_lines = [f"{k}: {v}" for k, v in KEY_HELP.items()] if view.show_help else ()
    style = OverlayStyle(alpha=view.alpha, colormap=options.colormap)
    return render(frame.image_bgr, prediction, style, hud, box_xyxy=box, help_lines=help_lines)


class _FlickerMeter:
    """Mean absolute change of the shown map between consecutive frames."""

    def __init__(self) -> None:
        self._previous: np.ndarray | None = None
        self._sum, self._n = 0.0, 0

    def add(self, shown: np.ndarray) -> None:
        change = flicker(self._previous, shown)
        if change is not None:
            self._sum, self._n = self._sum + change, self._n + 1
        self._previous = shown

    @property
    def value(self) -> float | None:
        return self._sum / self._n if self._n else None


class _Prefetcher:
    """Preprocesses frames in a thread of its own, ahead of inference (headless runs), ``batch`` at a time.

    Yields (frames, inputs) in order, ``inputs`` being [len(frames), 3, H, W]; the last batch of a file can
    be shorter. An error in the thread (or in the source) is raised in the consumer.
    """

    def __init__(self, frames: Iterable[Frame], prepare: Callable[[Sequence[np.ndarray]], np.ndarray],
                 times: StageTimes, batch: int = 1, queue_size: int = 4) -> None:
        self._frames = frames
        self._prepare = prepare
        self._times = times
        self._batch = batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="preprocess", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Hand an item over (waiting for room); False once the consumer has closed."""
        if self._stop.is_set():
            return False
        self._queue.put(item)
        return not self._stop.is_set()

    def _hand_over(self, frames: list[Frame]) -> bool:
        """Preprocess a batch and queue it; False once the consumer has closed."""
        t0 = time.perf_counter()
        inputs = self._prepare([frame.image_bgr for frame in frames])
        self._times.add("preprocess", time.perf_counter() - t0, len(frames))
        return self._put((frames, inputs))

    def _loop(self) -> None:
        lower_this_threads_priority()
        pending: list[Frame] = []
        try:
            for frame in self._frames:
                pending.append(frame)
                if len(pending) == self._batch:
                    if not self._hand_over(pending):
                        return
                    pending = []
            if pending and not self._hand_over(pending):
                return
            self._put(None)
        except BaseException as exc:  # surfaces in the consumer, after the frames read before it
            if pending:
                try:
                    self._hand_over(pending)
                except BaseException:  # noqa: BLE001 - the first error is the one to report
                    pass
            self._put(exc)
        finally:
            HELPER_CPU.add_this_thread("preprocess")

    def __iter__(self) -> Iterator[tuple[list[Frame], np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        # Emptying the queue releases a put() that waits for room; the thread then sees the stop flag.
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5.0)


class _RenderWorker:
    """Explains, draws and writes frames in a thread of its own (headless runs).

    Frames keep their order (one worker, one FIFO queue), so the temporal filter sees them in sequence.
    An error in the worker stops the run: it is raised again in the loop's thread at the next frame or at
    :meth:`finish`.
    """

    def __init__(self, model: CamModel, sinks: Sequence[Sink], options: RunOptions, times: StageTimes,
                 queue_size: int = 4) -> None:
        self._model = model
        self._sinks = sinks
        self._options = options
        self._times = times
        self._temporal = TemporalFilter(options.temporal)
        self.flicker = _FlickerMeter()
        self.last: Prediction | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="render", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        lower_this_threads_priority()
        try:
            self._drain()
        finally:
            HELPER_CPU.add_this_thread("render")

    def _drain(self) -> None:
        view = self._options.view
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain, so that a producer blocked on put() is released
            try:
                frame, logits, features = item
                t0 = time.perf_counter()
                prediction = explain_frame(self._model, logits, features, view, self._temporal)
                self.flicker.add(prediction.cam)
                t1 = time.perf_counter()
                overlay = draw(frame, prediction, view, self._options, ())
                t2 = time.perf_counter()
                for sink in self._sinks:
                    sink.write(overlay)
                t3 = time.perf_counter()
                self.last = prediction
                self._times.add("cam", t1 - t0)
                self._times.add("overlay", t2 - t1)
                self._times.add("output", t3 - t2)
            except BaseException as exc:  # surfaces in the loop's thread
                self._error = exc

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, frame: Frame, logits: np.ndarray, features: np.ndarray) -> None:
        self.check()
        self._queue.put((frame, logits, features))

    def finish(self) -> None:
        """Wait for every submitted frame to be drawn and written; raise the worker's error, if any."""
        self._queue.put(None)
        self._thread.join()
        self.check()


class _Recorder:
    """What ``s`` and ``r`` write: snapshots and recordings in the snapshot folder."""

    def __init__(self, folder: Path, fps: float, real_time: bool = False) -> None:
        self.folder = folder
        self.fps = fps
        self.real_time = real_time
        self.written: list[Path] = []
        self.video: VideoFileSink | None = None

    def _stem(self, kind: str, index: int) -> Path:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot use --snapshot-dir {self.folder}: {exc.strerror or exc}") from None
        return self.folder / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{index:06d}"

    def snapshot(self, overlay: np.ndarray, frame: Frame, prediction: Prediction, box) -> Path:
        stem = self._stem("snapshot", frame.index)
        if not cv2.imwrite(str(stem.with_suffix(".png")), overlay):
            raise SinkError(f"cannot write a snapshot into {self.folder}")
        np.save(stem.with_suffix(".npy"), prediction.cam)
        meta = {"frame": frame.index, "class_id": prediction.class_id, "label": prediction.label,
                "probability": prediction.probability, "pinned": prediction.pinned, "method": prediction.method,
                "topk": [{"class_id": c, "label": l, "probability": p} for c, l, p in prediction.topk],
                "box_xyxy": list(box) if box is not None else None}
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        self.written += [stem.with_suffix(e) for e in (".png", ".npy", ".json")]
        return stem.with_suffix(".png")

    def toggle(self, frame: Frame) -> VideoFileSink | None:
        if self.video is not None:
            self.stop()
            return None
        h, w = frame.image_bgr.shape[:2]
        path = self._stem("recording", frame.index).with_suffix(".mp4")
        self.video = VideoFileSink(path, self.fps, (w, h), real_time=self.real_time)
        self.written.append(path)
        return self.video

    def stop(self) -> None:
        if self.video is not None:
            video, self.video = self.video, None
            video.close()


def run_loop(
    model: CamModel,
    frames: Iterable[Frame],
    sinks: Sequence[Sink] = (),
    window: WindowSink | None = None,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
) -> RunResult:
    """Explain every frame the iterable yields and send the overlays to the sinks and the window.

    Headless, the work is pipelined so that inference runs back to back in this thread: a thread
    preprocesses ahead (a file's frames ``options.batch`` at a time), and a render thread explains, draws
    and hands overlays to the sinks, in order (the encoder has a thread of its own). With a window,
    everything after inference happens here, one frame at a time, because window calls must stay on the
    main thread and keys (see ``view.KEY_HELP``) change what the next frame shows.
    """
    if window is None:
        with single_threaded_opencv():  # its pool would compete with inference for the same cores
            return _run_headless(model, frames, sinks, options, progress)
    return _run_windowed(model, frames, sinks, window, options, progress)


class _Rate:
    """Frames per second over a run, and a smoothed rate for the HUD.

    FPS over N frames = (N - n0) / (t_last - t_first), where the first n0 frames completed together at
    t_first: frame by frame that is (N - 1) / (t_last - t_first); batched, n0 is the first batch.
    """

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
        if self.done <= self._first_count or self.last_at <= self.first_at:
            return 0.0
        return (self.done - self._first_count) / (self.last_at - self.first_at)


def _run_headless(model: CamModel, frames: Iterable[Frame], sinks: Sequence[Sink], options: RunOptions,
                  progress: Progress | None) -> RunResult:
    times = StageTimes()
    rate = _Rate()
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
    prefetch = _Prefetcher(frames, model.prepare_batch, times, batch=batch, queue_size=depth)
    worker = _RenderWorker(model, sinks, options, times, queue_size=1 if live else 8)
    t_prev = time.perf_counter()
    try:
        for chunk, inputs in prefetch:
            if len(inputs) < batch:  # a file's last frames: keep one input shape for the whole run
                inputs = np.concatenate([inputs, np.zeros((batch - len(inputs), *inputs.shape[1:]), inputs.dtype)])
            t0 = time.perf_counter()
            logits, features = model.forward(inputs)
            t1 = time.perf_counter()
            if options.max_frames is not None:
                chunk = chunk[: options.max_frames - rate.done]
            for i, frame in enumerate(chunk):
                worker.submit(frame, logits[i], features[i])
            times.add("wait", t0 - t_prev, len(chunk))
            times.add("inference", t1 - t0, len(chunk))
            t_prev = time.perf_counter()
            rate.tick(t_prev, len(chunk))
            if progress is not None:
                progress.update(rate.done, rate.fps)
            if options.max_frames is not None and rate.done >= options.max_frames:
                stopped_by = "max-frames"
                break
    except BaseException as exc:
        # Ctrl-C or an error: still write every frame handed over before the sinks close, and let the
        # first problem be the one reported (a second one from the render thread is only logged).
        prefetch.close()
        try:
            worker.finish()
        except Exception as later:
            if later is not exc:
                log.warning("while stopping: %s", later)
        raise
    prefetch.close()
    worker.finish()
    if rate.done > 1:
        rate.last_at = time.perf_counter()  # the run ends when the last overlay is written
    if progress is not None:
        progress.close(rate.done, rate.fps)
    return RunResult(frames=rate.done, fps=rate.fps, stage_ms=times.summary(), stopped_by=stopped_by,
                     last=worker.last, flicker=worker.flicker.value)


def _run_windowed(model: CamModel, frames: Iterable[Frame], sinks: Sequence[Sink], window: WindowSink,
                  options: RunOptions, progress: Progress | None) -> RunResult:
    times = StageTimes()
    rate = _Rate()
    temporal = TemporalFilter(options.temporal)
    meter = _FlickerMeter()
    view = options.view
    recorder = _Recorder(options.snapshot_dir, options.record_fps, real_time=options.live_source)
    latency_ms = 0.0
    stopped_by = "end"
    prediction: Prediction | None = None
    t_prev = time.perf_counter()
    try:
        for frame in frames:
            t0 = time.perf_counter()
            inputs = model.prepare(frame.image_bgr)
            t1 = time.perf_counter()
            logits, features = model.forward(inputs)
            t2 = time.perf_counter()
            prediction = explain_frame(model, logits[0], features[0], view, temporal)
            meter.add(prediction.cam)
            t3 = time.perf_counter()
            hud = []
            if options.show_fps and rate.done > 1:
                hud = [f"{rate.shown:.1f} FPS" + (f"  latency {latency_ms:.0f} ms" if options.live_source else "")]
            overlay = draw(frame, prediction, view, options, hud)
            t4 = time.perf_counter()
            for out in (*sinks, *([recorder.video] if recorder.video else []), window):
                out.write(overlay)
            t5 = time.perf_counter()
            latency_ms = (t5 - frame.captured_at) * 1000.0 if frame.captured_at else 0.0
            for stage, seconds in zip(STAGES, (t0 - t_prev, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times.add(stage, seconds)
            t_prev = t5
            rate.tick(t5)
            if progress is not None:
                progress.update(rate.done, rate.fps)
            key = window.last_key
            if options.pace_fps > 0:  # wait out the frame's slot, serving keys meanwhile
                remaining_ms = int((rate.first_at + (rate.done - 1) / options.pace_fps - time.perf_counter()) * 1000)
                if remaining_ms > 1:
                    waited = window.wait_key(remaining_ms)
                    key = key if waited < 0 else waited
            while True:  # keys; while paused, keep serving them (and redraw what they change)
                new_view, action = handle_key(view, key, prediction.class_id)
                if action == QUIT:
                    stopped_by = "quit"
                    break
                if action == SNAPSHOT:
                    box = cam_box(prediction.cam, frame.image_bgr.shape[1::-1], options.box_threshold) \
                        if view.show_box else None
                    recorder.snapshot(overlay, frame, prediction, box)
                elif action == RECORD:
                    recorder.toggle(frame)
                if new_view != view:
                    view = new_view
                    if view.paused:  # show the change on the held frame, without counting it as a new frame
                        prediction = explain_frame(model, logits[0], features[0], view, copy.deepcopy(temporal))
                        overlay = draw(frame, prediction, view, options, hud + ["paused"])
                        window.write(overlay)
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
    finally:
        recorder.stop()
    if progress is not None:
        progress.close(rate.done, rate.fps)
    return RunResult(
        frames=rate.done, fps=rate.fps, stage_ms=times.summary(), stopped_by=stopped_by, last=prediction,
        flicker=meter.value, snapshots=tuple(recorder.written),
    )


def hold_window(window: WindowSink) -> str:
    """Keep a still image on screen until q/Esc or the window is closed."""
    while True:
        key = window.wait_key(50)
        if handle_key(ViewState(), key, None)[1] == QUIT:
            return "quit"
        if window.closed:
            return "window-closed"
