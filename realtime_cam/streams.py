"""Many live streams in one process: one capture thread per source, one inference thread that batches them.

Each stream keeps only its newest frame (a :class:`Slot`). The inference thread takes the newest frame of every
stream that has one, waiting at most ``batch_timeout_s`` after the first for the others, so that a slow or dead
stream never stalls the rest; one ``model.run`` explains the batch, and a render thread runs
:func:`~realtime_cam.pipeline.step` for each stream with its own state and view (pin, method, box, alpha, pause)
while the next batch is inferred. A stream that fails for good is reported once and the others go on.

On a CPU with four streams or more, the streams are shared among several inference threads ("lanes", see
:func:`inference_lanes`), each batching its own streams on its own share of the cores: small networks use two
cores better as two batches run side by side than as one batch split over both.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import sources
from .errors import SourceError
from .pipeline import RunOptions, Shown, StreamState, step
from .providers import CPU
from .sinks import Sink
from .sources import FrameBuffer, FrameSource, is_live_spec, open_source
from .threads import HELPER_CPU, lower_this_threads_priority, single_threaded_blas, single_threaded_opencv, usable_cores
from .timing import Rate, median_p95
from .types import Frame
from .view import ViewState

if TYPE_CHECKING:
    from .model import CamModel, Outputs

log = logging.getLogger("realtime_cam")

DEFAULT_BATCH_TIMEOUT_MS = 15.0
LIVE_FILE_DEFAULT_FPS = 25.0


# ----------------------------------------------------------------------------- sources
class LiveFile(FrameSource):
    """A video file played live at its own frame rate: a thread reads it in real time into a newest-frame-wins
    buffer, so that a consumer slower than the file skips frames as it would a camera's.

    Args:
        source: an opened file source (``queue`` policy); it is closed with this one.
        loop: play the file again from the start when it ends (it is reopened with ``reopen``).
    """

    kind = "video"
    live = True

    def __init__(self, source: FrameSource, loop: bool = False,
                 reopen: Callable[[], FrameSource] | None = None) -> None:
        super().__init__(source.spec)
        self._source = source
        self.fps = source.fps or LIVE_FILE_DEFAULT_FPS
        self.size_wh = source.size_wh
        self._loop = loop
        self._reopen = reopen
        self._buffer = FrameBuffer("latest")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _play(self) -> None:
        lower_this_threads_priority()
        error: BaseException | None = None
        index = 0
        try:
            while not self._stop.is_set():
                start = time.perf_counter()
                for i, frame in enumerate(self._source):
                    due = start + i / self.fps
                    if self._stop.wait(max(0.0, due - time.perf_counter())):
                        return
                    if not self._buffer.put(Frame(index, frame.image_bgr, time.perf_counter(), frame.time_s)):
                        return
                    index += 1
                if not self._loop or self._reopen is None or self._stop.is_set():
                    return  # closed: the file is not opened again just to be closed
                self._source.close()
                self._source = self._reopen()
                if self._stop.is_set():  # closed while it reopened: close() closed the previous one
                    self._source.close()
                    return
        except BaseException as exc:  # surfaces in the consumer through the buffer
            error = exc
        finally:
            HELPER_CPU.add_this_thread("capture")
            self._buffer.finish(error)

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is not None:
            raise RuntimeError("a live file can be iterated once")
        self._thread = threading.Thread(target=self._play, name=f"play:{self.spec}", daemon=True)
        self._thread.start()
        while True:
            frame = self._buffer.get()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        self._stop.set()
        self._buffer.close()
        self._source.close()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def open_live(spec: str, reconnect: int = 0, loop: bool = False) -> FrameSource:
    """A source for the multi-stream loop: webcams and URLs as ``open_source`` opens them (newest frame wins,
    reconnect with backoff), a video file played live at its own rate (see :class:`LiveFile`)."""
    source = open_source(spec, reconnect=reconnect)
    if source.live:
        return source
    if source.kind == "image":
        source.close()
        raise SourceError(f"{spec} is an image: a stream source is a webcam, a URL or a video file")
    return LiveFile(source, loop=loop, reopen=lambda: open_source(spec))


def read_source_list(path: Path) -> list[str]:
    """The sources a ``.txt`` file lists (see ``sources.read_source_list``); a one-line SourceError when it
    lists none."""
    specs = sources.read_source_list(path)
    if not specs:
        raise SourceError(f"the source list {path} names no source")
    return specs


def stream_name(spec: str, taken: Iterable[str] = ()) -> str:
    """A short label for a source (a file's name, a webcam's index, a URL's host and path), unique among
    ``taken``."""
    if is_live_spec(spec):
        name = f"webcam {spec.strip()}" if spec.strip().isdigit() else spec.split("://", 1)[-1].split("?", 1)[0]
    else:
        name = Path(spec).name
    taken = set(taken)
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name} ({n})", n + 1
    return unique


# ----------------------------------------------------------------------------- per-stream state
class Slot:
    """One stream's newest frame, taken by the inference thread; a newer frame replaces one not yet taken.

    All slots of a loop share one condition, so that the inference thread wakes when any stream has a frame.
    """

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._frame: Frame | None = None
        self.ended = False
        self.error: str | None = None
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            self.dropped += self._frame is not None
            self._frame = frame
            self._cond.notify_all()

    def take(self) -> Frame | None:
        """The newest frame not yet taken (call with the condition held), or None. A source fed on demand
        waits on the condition for its frame to be taken."""
        frame, self._frame = self._frame, None
        if frame is not None:
            self._cond.notify_all()
        return frame

    @property
    def ready(self) -> bool:
        return self._frame is not None

    def finish(self, error: str | None = None) -> None:
        with self._cond:
            self.ended, self.error = True, error
            self._cond.notify_all()


@dataclass(frozen=True)
class StreamInfo:
    """What one stream shows now, for the page and the JSON endpoint (a snapshot of it)."""

    id: int
    name: str
    spec: str
    kind: str
    live: bool
    frames: int
    fps: float
    ended: bool
    error: str | None
    view: ViewState
    prediction: dict | None


class Stream:
    """One source's side of the loop: its slot, its capture thread, its view and temporal state, its sinks,
    and what it showed last.

    ``on_overlay`` callbacks get each overlay (BGR) as it is drawn (the web server's broadcasts); they run in the
    render thread and must be quick.
    """

    def __init__(self, index: int, name: str, source: FrameSource, cond: threading.Condition, view: ViewState,
                 options: RunOptions, sinks: Sequence[Sink] = ()) -> None:
        self.id = index
        self.name = name
        self.source = source
        self.slot = Slot(cond)
        self.view = view
        self.state = StreamState.start(options.temporal)
        self.sinks = list(sinks)
        self.rate = Rate()
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=10_000)
        self.shown: Shown | None = None
        self.held: tuple[Frame, Outputs] | None = None  # the last frame and its outputs (redrawn while paused)
        self.on_overlay: list[Callable[[np.ndarray], None]] = []
        self._redraw = False
        self._cond = cond  # the loop's: a view change wakes the inference thread
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._capture, name=f"stream:{self.name}", daemon=True)
        self._thread.start()

    def _capture(self) -> None:
        """The capture thread: every frame the source gives goes into the slot (the newest wins)."""
        error = None
        try:
            for frame in self.source:
                if self.slot.ended:
                    return
                self.slot.put(frame)
        except SourceError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure ends this stream only
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if not self.slot.ended:
                self.slot.finish(error)

    def set_view(self, **changes: object) -> ViewState:
        """Change this stream's view (from another thread); a paused stream redraws its held frame with it."""
        with self._cond:
            self.view = replace(self.view, **changes)
            self._redraw = True
            self._cond.notify_all()
            return self.view

    @property
    def redraw_pending(self) -> bool:
        return self._redraw and self.view.paused and self.held is not None

    def take_redraw(self) -> bool:
        with self._cond:
            redraw, self._redraw = self._redraw, False
            return redraw

    def info(self) -> StreamInfo:
        shown = self.shown
        return StreamInfo(
            id=self.id, name=self.name, spec=self.source.spec, kind=self.source.kind, live=self.source.live,
            frames=self.rate.done, fps=self.rate.shown, ended=self.slot.ended, error=self.slot.error,
            view=self.view, prediction=shown.prediction.as_dict() if shown is not None else None)


# ----------------------------------------------------------------------------- inference lanes
# Each lane holds the model in a session of its own: at most this many copies in memory, besides the one the
# loop was given (the render thread's, for a second run when a pinned class needs its gradient).
MAX_LANES = 4


def inference_lanes(streams: int, cores: int, provider: str) -> int:
    """How many inference threads ("lanes") a loop of ``streams`` streams runs, each batching its own streams.

    One on a GPU (one batch keeps it busy) and for fewer than four streams. On a CPU, one lane per core (at most
    MAX_LANES), each holding at least two streams, so that every batch still holds frames of several streams.
    On 2 cores, 4 streams of MobileNetV2 int8 gave 1.46-1.70x one stream's total in two lanes against
    1.36-1.44x in one, over three runs (docs/streams.md).
    """
    if provider != CPU or streams < 4 or cores < 2:
        return 1
    return min(cores, streams // 2, MAX_LANES)


@dataclass
class Lane:
    """One inference thread's share of the loop: its streams, the model it runs them on (one ONNX Runtime
    session per lane, with the lane's share of the cores), the largest batch it sends, and the stream a
    one-frame model takes first."""

    model: CamModel
    streams: list[Stream]
    max_batch: int
    next: int = 0


# ----------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class StreamsResult:
    """How a multi-stream run went: per stream (name -> frames, fps, latency median/p95 ms, error) and the
    batch sizes used (how many streams each inference call held)."""

    streams: dict[str, dict]
    batch_sizes: tuple[int, ...]
    stopped_by: str


class MultiStream:
    """N streams, batching inference thread(s) and one render thread. A context manager: leaving it stops
    the threads and closes every source.

    Args:
        model: the model all streams share.
        sources: opened sources (see :func:`open_live`), in order; ``names`` labels them.
        options: what every stream starts with (its view, temporal options, colormap, box threshold,
            ``max_frames`` per stream).
        sinks: per stream, where its overlays go besides the callbacks.
        batch_timeout_s: after the first stream has a frame, how long to wait for the others.
        lanes: inference threads, the streams dealt among them in turn (None: :func:`inference_lanes`). With
            more than one, each lane loads the model file again into a session with its share of the cores.
    """

    def __init__(self, model: CamModel, sources: Sequence[FrameSource], names: Sequence[str] | None = None,
                 options: RunOptions = RunOptions(), sinks: Sequence[Sequence[Sink]] | None = None,
                 batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_MS / 1000, lanes: int | None = None) -> None:
        self.model = model
        self.options = options
        self.batch_timeout_s = batch_timeout_s
        self._cond = threading.Condition()
        names = list(names) if names is not None else []
        for source in sources[len(names):]:
            names.append(stream_name(source.spec, names))
        self.streams = [Stream(i, names[i], source, self._cond, options.view, options,
                               sinks[i] if sinks is not None else ())
                        for i, source in enumerate(sources)]
        self.lanes = self._make_lanes(lanes)
        self.max_batch = max(lane.max_batch for lane in self.lanes)  # 1 when the model takes one frame at a time
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=100_000)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._render_queue: queue.Queue = queue.Queue(maxsize=len(self.lanes))
        self._lanes_running = len(self.lanes)
        self._threads: list[threading.Thread] = []
        self._reported: set[int] = set()

    def _make_lanes(self, lanes: int | None) -> list[Lane]:
        cores = usable_cores()
        n = inference_lanes(len(self.streams), cores, self.model.provider) if lanes is None else lanes
        n = max(1, min(n, len(self.streams)))
        if n == 1:
            return [Lane(self.model, self.streams, self.model.batch_size(len(self.streams)))]
        made = []
        for j in range(n):
            model = self.model.copy(threads=max(1, cores // n))
            streams = self.streams[j::n]
            made.append(Lane(model, streams, model.batch_size(len(streams))))
        return made

    # -- lifecycle
    def __enter__(self) -> MultiStream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for stream in self.streams:
            stream.start()
        self._threads = [threading.Thread(target=self._infer_loop, args=(lane,), name=f"streams:inference:{j}",
                                          daemon=True) for j, lane in enumerate(self.lanes)]
        self._threads.append(threading.Thread(target=self._render_loop, name="streams:render", daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5.0)
        for stream in self.streams:
            if not stream.slot.ended:
                stream.slot.finish()
            stream.source.close()

    def describe(self) -> str:
        """How the streams are batched, for the log."""
        text = f"batched (at most {self.max_batch} per inference call)"
        if len(self.lanes) > 1:
            text += f" in {len(self.lanes)} inference threads side by side"
        return text

    @property
    def done(self) -> bool:
        """Every stream has ended (or the loop failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every stream has ended (True) or ``timeout`` passes (False)."""
        return self._done.wait(timeout)

    def result(self, stopped_by: str = "end") -> StreamsResult:
        per_stream = {}
        for s in self.streams:
            latency = median_p95(s.latency_ms) if s.latency_ms else {}
            per_stream[s.name] = {"frames": s.rate.done, "fps": s.rate.fps, "latency_ms": latency, "error": s.slot.error,
                                  "dropped": s.slot.dropped}
        return StreamsResult(per_stream, tuple(self.batch_sizes), stopped_by)

    # -- the inference thread
    def _gather(self, lane: Lane) -> list[tuple[Stream, Frame]] | None:
        """The newest frame of every stream of the lane that has one, waiting up to the batch timeout for the
        others once one has; None when every stream of the lane has ended or the loop stops. A model that takes
        one frame at a time gets the streams in turn."""
        with self._cond:
            while True:
                if self._stop.is_set():
                    return None
                active = [s for s in lane.streams if not s.slot.ended or s.slot.ready]
                if not active:
                    return None
                if any(s.slot.ready or s.redraw_pending for s in active):
                    break
                self._cond.wait(0.1)
            deadline = time.perf_counter() + self.batch_timeout_s
            while not self._stop.is_set():
                waiting = [s for s in lane.streams if not s.slot.ended and not s.slot.ready and not s.view.paused]
                left = deadline - time.perf_counter()
                if not waiting or left <= 0:
                    break
                self._cond.wait(left)
            n = len(lane.streams)
            taken: list[tuple[Stream, Frame]] = []
            for k in range(n):
                s = lane.streams[(lane.next + k) % n]
                if s.view.paused:
                    s.slot.take()  # a paused stream holds its frame: newer ones are dropped
                elif s.slot.ready and len(taken) < lane.max_batch:
                    taken.append((s, s.slot.take()))
            lane.next = (lane.next + 1) % n
            return taken

    def _infer_loop(self, lane: Lane) -> None:
        try:
            with single_threaded_blas(), single_threaded_opencv():
                while True:
                    batch = self._gather(lane)
                    if batch is None:
                        break
                    self._redraw_paused(lane)
                    if not batch:
                        continue
                    inputs = lane.model.prepare_batch([frame.image_bgr for _, frame in batch])
                    targets = np.array([-1 if s.view.pinned_class is None else s.view.pinned_class for s, _ in batch],
                                       np.int64)
                    out = lane.model.run(inputs, targets)
                    self.batch_sizes.append(len(batch))
                    self._render_queue.put([(s, frame, out.row(i)) for i, (s, frame) in enumerate(batch)])
        except BaseException as exc:  # the loop's own failure (the model): every stream ends with it
            self.error = exc
            log.error("streams: inference failed: %s", exc)
            self._stop.set()  # the other lanes stop too
            with self._cond:
                self._cond.notify_all()
        finally:
            with self._cond:
                self._lanes_running -= 1
                last = self._lanes_running == 0
            if last:  # the render thread ends after every lane's batches
                self._render_queue.put(None)

    def _redraw_paused(self, lane: Lane) -> None:
        """Paused streams whose view changed are redrawn on their held frame (their state does not move)."""
        for s in lane.streams:
            if s.view.paused and s.held is not None and s.take_redraw():
                self._render_queue.put([(s, None, None)])

    # -- the render thread
    def _render_loop(self) -> None:
        # At normal priority (unlike the single stream's render thread): drawing N streams is a large share of
        # the work, and a lowered thread would only run while inference sleeps, which serialises the two.
        try:
            with single_threaded_opencv():
                while True:
                    items = self._render_queue.get()
                    if items is None:
                        return
                    for stream, frame, out in items:
                        if stream.slot.error is not None or self._reached_max(stream):
                            continue  # failed, or done: a frame taken meanwhile is not drawn
                        try:
                            self._render(stream, frame, out)
                        except Exception as exc:  # noqa: BLE001 - this stream ends; the others go on
                            stream.slot.finish(f"{type(exc).__name__}: {exc}")
                        self._report(stream)
        finally:
            for stream in self.streams:
                if not stream.slot.ended:
                    stream.slot.finish(None if self.error is None else str(self.error))
                self._report(stream)
            self._done.set()

    def _render(self, stream: Stream, frame: Frame | None, out: Outputs | None) -> None:
        model, options = self.model, self.options
        if frame is None:  # a redraw of the held frame with a new view
            frame, out = stream.held
            stream.shown, _ = step(model, frame, out, stream.view, options, stream.state, hud=["paused"])
        else:
            stream.take_redraw()
            stream.shown, stream.state = step(model, frame, out, stream.view, options, stream.state,
                                              sinks=stream.sinks)
            stream.held = (frame, out)
            now = time.perf_counter()
            stream.latency_ms.append((now - frame.captured_at) * 1000.0)
            stream.rate.tick(now)
            if self._reached_max(stream):
                stream.slot.finish()
        for callback in stream.on_overlay:
            callback(stream.shown.overlay)

    def _reached_max(self, stream: Stream) -> bool:
        return self.options.max_frames is not None and stream.rate.done >= self.options.max_frames

    def _report(self, stream: Stream) -> None:
        """Say once that a stream ended with an error (the others go on)."""
        if stream.slot.ended and stream.slot.error and stream.id not in self._reported:
            self._reported.add(stream.id)
            others = sum(not s.slot.ended for s in self.streams)
            log.warning("stream %s ended: %s%s", stream.name, stream.slot.error,
                        f" ({others} other streams go on)" if others else "")
