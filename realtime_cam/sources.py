"""Frame sources: webcams, streams (RTSP/HTTP), video files and images, each a context manager.

Webcams and streams are read by OpenCV's capture; video files by FFmpeg through PyAV (``video_file``).

Capture runs in a daemon thread per source with an explicit policy:
- ``latest`` for live sources: the newest frame wins, so the view never lags behind the camera;
- ``queue`` for files: every frame, in order, through a bounded queue (the reader waits).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from .errors import SourceError
from .images import is_image_path, read_image
from .preprocess import as_bgr
from .threads import HELPER_CPU, ProcessWideOverride, interruptible, lower_this_threads_priority
from .types import Frame

log = logging.getLogger("realtime_cam")

# What a folder of clips holds (a source given by name is tried as a video whatever its extension).
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"}
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
POLICIES = ("latest", "queue")


# realtime-cam --debug turns this off, so that OpenCV's own reasons show (see opencv_quiet).
QUIET_OPENCV_ON_OPEN = True
_OPENCV_SILENT = ProcessWideOverride(cv2.utils.logging.getLogLevel, cv2.utils.logging.setLogLevel,
                                     cv2.utils.logging.LOG_LEVEL_SILENT)


@contextlib.contextmanager
def opencv_quiet() -> Iterator[None]:
    """OpenCV's own log off for the block (unless OPENCV_LOG_LEVEL is set, or ``--debug`` was given).

    Opening a source that is not there makes every backend OpenCV tries print its failure (a dozen lines for
    a missing webcam); the one line that says what is wrong is ours. The level is the process's: blocks may
    overlap across threads (a stream reconnecting in its capture thread), and the last one to end puts it back.
    """
    if os.environ.get("OPENCV_LOG_LEVEL") or not QUIET_OPENCV_ON_OPEN:
        yield
        return
    with _OPENCV_SILENT.held():
        yield


class FrameBuffer:
    """Hands frames from the capture thread to the loop under a capture policy.

    ``None`` from :meth:`get` is the end of the stream; an error raised in the capture thread is raised
    again in the thread that calls :meth:`get`.
    """

    def __init__(self, policy: str, maxsize: int = 8) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.latest = policy == "latest"
        self.maxsize = 1 if self.latest else maxsize
        self.dropped = 0
        self._items: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._ended = False
        self._closed = False
        self._error: BaseException | None = None

    def put(self, frame: Frame) -> bool:
        """Add a frame (waiting for room under ``queue``); False once the consumer has closed."""
        with self._cond:
            if self.latest:
                self.dropped += len(self._items)
                self._items.clear()
            else:
                while len(self._items) >= self.maxsize and not self._closed:
                    self._cond.wait()
            if self._closed:
                return False
            self._items.append(frame)
            self._cond.notify_all()
            return True

    def finish(self, error: BaseException | None = None) -> None:
        """The producer is done: at end of stream, or with the error that stopped it."""
        with self._cond:
            self._ended = True
            self._error = error
            self._cond.notify_all()

    def get(self) -> Frame | None:
        """The next frame; None at the end of the stream or once the buffer is closed."""
        with self._cond:
            while not self._items and not self._ended and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            if self._items:
                frame = self._items.popleft()
                self._cond.notify_all()
                return frame
            if self._error is not None:
                raise self._error
            return None

    def close(self) -> None:
        """The consumer is gone: release a producer waiting for room."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


class FrameSource:
    """Base of every source: a context manager and an iterator of :class:`Frame`.

    Attributes:
        spec: what the user asked for.
        kind: one of SOURCE_KINDS.
        live: True for webcams and streams (``latest`` policy), False for files (``queue`` policy).
        fps: the source's frame rate (0 when unknown or a still image).
        size_wh: (width, height) of the first frame.
        frame_count: the frames it holds, or None; never trust it for control flow (until
            ``frame_count_exact``, it is a container's claim).
    """

    kind = "?"
    live = False
    frame_count_exact = False

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.fps = 0.0
        self.size_wh = (0, 0)
        self.frame_count: int | None = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - overridden
        raise NotImplementedError


class ImageSource(FrameSource):
    """A still image: one frame."""

    kind = "image"

    def __init__(self, spec: str) -> None:
        super().__init__(spec)
        self._image = interruptible(lambda: read_image(spec), name=f"open:{spec}")  # a FIFO would block
        self.size_wh = (self._image.shape[1], self._image.shape[0])
        self.frame_count = 1
        self.frame_count_exact = True

    def __iter__(self) -> Iterator[Frame]:
        yield Frame(0, self._image, time.perf_counter())


class OpenCvReader:
    """A ``cv2.VideoCapture`` (a webcam, a stream) as a reader: :meth:`read` gives (BGR, None) or None."""

    def __init__(self, target: int | str, describe: str) -> None:
        try:
            with opencv_quiet():
                self._cap = cv2.VideoCapture(target)
        except (cv2.error, OverflowError, SystemError):
            raise SourceError(f"cannot open {describe}") from None
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(f"cannot open {describe}")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and 0 < fps < 1000 else 0.0
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if count > 0 else None

    def read(self) -> tuple[np.ndarray, None] | None:
        ok, image = self._cap.read()
        return (image, None) if ok and image is not None else None

    def release(self) -> None:
        self._cap.release()


class CaptureSource(FrameSource):
    """A reader (OpenCV's capture, or a video file through PyAV) read by a daemon thread into a
    :class:`FrameBuffer`.

    Args:
        open_reader: opens the source; returns an object with ``read() -> (BGR image, time_s | None) | None``
            (None at the end), ``release()``, ``fps`` and ``frame_count``; raises SourceError when it cannot.
        count_frames: for files, counts the real frames in the background (see ``video_file.FrameCounter``).
    """

    def __init__(self, spec: str, open_reader: Callable[[], object], kind: str, live: bool, describe: str,
                 reconnect: int = 0, backoff_s: float = 0.5, count_frames: Callable[[], object] | None = None,
                 ) -> None:
        super().__init__(spec)
        self.kind = kind
        self.live = live
        self.reconnects = 0
        self._open_reader = open_reader
        self._describe = describe
        self._reconnect = reconnect
        self._backoff_s = backoff_s
        # Opening can block without end (a named pipe with no writer, a host that never answers): in a
        # thread of its own, so that Ctrl-C and SIGTERM still end the run.
        self._reader, (first, time_s) = interruptible(self._open_first, name=f"open:{spec}")
        self._first = Frame(0, as_bgr(first), time.perf_counter(), time_s)
        self.size_wh = (self._first.image_bgr.shape[1], self._first.image_bgr.shape[0])
        self.fps = self._reader.fps
        count = self._reader.frame_count
        self._claimed_count = count if count and not self.live else None
        self._count_frames = count_frames if not self.live else None
        self._counter = None  # started when the count is first asked for (the progress bar)
        self._buffer = FrameBuffer("latest" if self.live else "queue")
        self.decode_ms: collections.deque[float] = collections.deque(maxlen=10_000)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _counted(self) -> int | None:
        if self._counter is None and getattr(self, "_count_frames", None) is not None:
            self._counter = self._count_frames()  # the first ask starts the count in the background
        return self._counter.count if self._counter is not None else None

    @property
    def frame_count(self) -> int | None:
        """The frames the file holds once counted, else the container's claim (see ``frame_count_exact``)."""
        counted = self._counted()
        return counted if counted is not None else self._claimed_count

    @frame_count.setter
    def frame_count(self, value: int | None) -> None:  # FrameSource.__init__ sets it
        self._claimed_count = value

    @property
    def frame_count_exact(self) -> bool:
        return self._counted() is not None

    def _open_first(self) -> tuple[object, tuple[np.ndarray, float | None]]:
        """Open the reader and read its first frame: fail fast, a source that opens but yields nothing is an
        error now."""
        reader = self._open_reader()
        first = reader.read()
        if first is None:
            reader.release()
            raise SourceError(f"{self._describe} opened but no frame could be read from it")
        return reader, first

    def _read_loop(self) -> None:
        lower_this_threads_priority()
        error: BaseException | None = None
        index = 1
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                got = self._reader.read()
                if got is None:
                    if not self.live:
                        break  # end of file
                    got = None if self._stop.is_set() else self._reopen()
                    if got is None:
                        if not self._stop.is_set():
                            error = SourceError(
                                f"{self._describe} stopped delivering frames"
                                + (f"; gave up after {self._reconnect} reconnect tries" if self._reconnect else
                                   " (use --reconnect N to retry)"))
                        break
                image = as_bgr(got[0])
                t1 = time.perf_counter()
                self.decode_ms.append((t1 - t0) * 1000.0)
                if not self._buffer.put(Frame(index, image, t1, got[1])):
                    break
                index += 1
        except BaseException as exc:  # surfaces in the main thread through the buffer
            error = exc
        finally:
            # Once started, this thread owns the capture: it alone may release it, after its last read
            # (a stalled network read can outlast close()'s wait).
            self._reader.release()
            HELPER_CPU.add_this_thread("capture")
            self._buffer.finish(error)

    def _reopen(self) -> tuple[np.ndarray, float | None] | None:
        """A live source dropped out: reopen it, waiting 1x, 2x, 4x, ... the backoff between tries.

        Returns the first frame after reconnecting, or None when every try failed (or the source closed).
        """
        delay = self._backoff_s
        for attempt in range(1, self._reconnect + 1):
            if self._stop.wait(delay):  # an Event wait: close() interrupts it at once
                return None
            delay *= 2
            self._reader.release()
            try:
                self._reader = self._open_reader()
            except SourceError:
                self._reader = _Closed()
                continue
            if self._stop.is_set():
                return None  # closed while reconnecting: the finally of the read loop releases the capture
            got = self._reader.read()
            if got is not None:
                self.reconnects += 1
                log.warning("%s: reconnected (try %d of %d)", self._describe, attempt, self._reconnect)
                return got
        return None

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is not None:
            raise RuntimeError("a capture source can be iterated once")
        yield self._first
        self._thread = threading.Thread(target=self._read_loop, name=f"capture:{self.spec}", daemon=True)
        self._thread.start()
        while True:
            frame = self._buffer.get()
            if frame is None:
                return
            yield frame

    @property
    def dropped(self) -> int:
        """Frames the ``latest`` policy skipped because a newer one arrived first."""
        return self._buffer.dropped

    def close(self) -> None:
        self._stop.set()
        self._buffer.close()
        if self._counter is not None:
            self._counter.stop()
        if self._thread is None:
            self._reader.release()  # never started: the capture is still ours to release
            return
        # A file's reader ends at once (the buffer is closed); a stalled stream's read may last until OpenCV's
        # own timeout (30 s): the thread releases the capture itself, so closing need not wait for it.
        self._thread.join(timeout=1.0)
        if self._thread.is_alive():
            log.warning("%s: still blocked in a read; it is released when that read returns", self._describe)


class _Closed:
    """Where a reader that could not be reopened was: reads nothing, releases nothing."""

    fps, frame_count = 0.0, None

    def read(self) -> None:
        return None

    def release(self) -> None:
        pass


def _is_webcam(spec: str) -> bool:
    return spec.strip().isdigit()


def _is_url(spec: str) -> bool:
    return bool(URL_RE.match(spec))


def _open_webcam(spec: str, reconnect: int = 0) -> FrameSource:
    index = int(spec)
    describe = f"webcam {index} (no such camera, or it is busy)"
    return CaptureSource(spec, lambda: OpenCvReader(index, describe), "webcam", True, describe, reconnect=reconnect)


def _open_stream(spec: str, reconnect: int = 0) -> FrameSource:
    describe = f"stream {spec}"
    opened = [interruptible(lambda: OpenCvReader(spec, describe), name=f"open:{spec}")]
    if opened[0].frame_count:
        # A URL whose container states a frame count is a file served by URL (http://host/clip.mp4,
        # file://...): read as a video file (every frame, in order, its times, and its end ends the run), by
        # PyAV, which also tells a download broken off from the end of the file (OpenCV ends it as if complete).
        opened[0].release()
        from .video_file import VideoFileReader

        return CaptureSource(spec, lambda: VideoFileReader(spec), "video", False, f"{spec} as a video")
    # A live stream: this first capture is used, a new one opened on each reconnect.
    return CaptureSource(spec, lambda: opened.pop() if opened else OpenCvReader(spec, describe), "stream", True,
                         describe, reconnect=reconnect)


def _check_file(spec: str) -> None:
    if not spec.strip():
        raise SourceError("--source is empty: give a webcam index, a video or image file, or a URL")
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"source not found: {spec}")
    if path.is_dir():
        raise SourceError(f"source is a directory, not a video or image file: {spec}")
    if not os.access(path, os.R_OK):
        raise SourceError(f"source is not readable: {spec}")
    if path.is_file() and path.stat().st_size == 0:  # a device (/dev/video0) has no size
        raise SourceError(f"source is an empty file: {spec}")


def _open_image(spec: str, reconnect: int = 0) -> FrameSource:
    _check_file(spec)
    return ImageSource(spec)


def _open_video(spec: str, reconnect: int = 0) -> FrameSource:
    from .video_file import FrameCounter, VideoFileReader

    _check_file(spec)
    # Counted only in a regular file: a named pipe read twice would lose the frames the counter took.
    counter = (lambda: FrameCounter(spec)) if Path(spec).is_file() else None
    return CaptureSource(spec, lambda: VideoFileReader(spec), "video", False, f"{spec} as a video",
                         count_frames=counter)


# Tried in order; the first whose test accepts the spec opens it. A new kind is one line here.
SOURCE_KINDS: dict[str, tuple[Callable[[str], bool], Callable[..., FrameSource]]] = {
    "webcam": (_is_webcam, _open_webcam),
    "stream": (_is_url, _open_stream),
    "image": (is_image_path, _open_image),
    "video": (lambda spec: True, _open_video),
}


def is_live_spec(spec: str) -> bool:
    """A webcam index or a URL: a source read live (not a file)."""
    return _kind_of(str(spec)) in ("webcam", "stream")


def read_source_list(path: Path) -> list[str]:
    """The entries of a ``.txt`` list of sources, one a line (blank lines and ``#`` comments skipped): streams'
    specs, or a collection's files, folders and globs. A one-line SourceError when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the source list {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_source(spec: str | int) -> None:
    """What can be told about a source without opening it (a file that is not there, a directory, an empty
    file): a one-line SourceError, so that a typo is reported before a model is loaded or exported."""
    if _kind_of(str(spec)) in ("image", "video"):
        _check_file(str(spec))


def _kind_of(spec: str) -> str:
    """The first kind in SOURCE_KINDS whose test accepts the spec ("video" accepts everything)."""
    return next(name for name, (accepts, _) in SOURCE_KINDS.items() if accepts(spec))


def open_source(spec: str | int, reconnect: int = 0) -> FrameSource:
    """Open a webcam index, a URL OpenCV can read, an image file or a video file.

    Args:
        reconnect: for live sources, how many times to reopen a source that stops delivering frames
            (waiting 0.5 s, 1 s, 2 s, ... between tries) before giving up with an error.

    Raises:
        SourceError: with a one-line message, when it cannot be opened or yields no first frame.
    """
    spec = str(spec)
    return SOURCE_KINDS[_kind_of(spec)][1](spec, reconnect=reconnect)
