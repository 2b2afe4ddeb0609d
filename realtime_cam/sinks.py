"""Where overlays go: an OpenCV window, a video file, an image file, or nowhere (benchmarks).

Each sink is a context manager whose cleanup runs on error and on Ctrl-C too: a video file is always
finalised (playable, holding every frame written so far). It is written under a temporary name and
renamed when closed, so a hard crash never leaves a file that looks complete but is not.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from .encoders import ENCODERS, VIDEO_CODECS, VideoSettings, unreadable_end
from .errors import SinkError
from .images import WRITABLE_IMAGE_EXTENSIONS
from .partial import PartialFile
from .threads import HELPER_CPU, lower_this_threads_priority
from .types import Frame, Prediction


class Sink:
    """Base: a context manager that takes frames."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.close()
        except SinkError as error:
            if exc is None:
                raise
            # Something else is already propagating (Ctrl-C, an error): report that one, log this one.
            logging.getLogger("realtime_cam").warning("while closing: %s", error)

    def write(self, image_bgr: np.ndarray) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def write_frame(self, image_bgr: np.ndarray, frame: Frame) -> None:
        """An overlay and the frame it shows: sinks that keep the frame's time override this."""
        self.write(image_bgr)

    def source_ended(self) -> None:
        """The source reached its end (not a stop by the user or --max-frames): called before ``close``."""

    def close(self) -> None:
        pass


class NullSink(Sink):
    """Takes frames and drops them: for benchmarks and dry runs."""

    def write(self, image_bgr: np.ndarray) -> None:
        pass


def check_output_path(path: str | os.PathLike, allowed: set[str] | dict[str, str],
                      inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work is done, an output the run could not write, or one that is also an input."""
    out = Path(path)
    if out.is_dir():
        raise SinkError(f"output path is a directory: {out}")
    if out.suffix.lower() not in allowed:
        raise SinkError(f"cannot write {out.name}: use one of {', '.join(sorted(allowed))}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SinkError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise SinkError(f"output folder is not writable: {parent}")
    check_not_an_input(out, inputs)
    return out


def check_not_an_input(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse an output that is the same file as one of the inputs (by path, link or hard link)."""
    out = Path(path)
    for given in inputs:
        if given is None or not out.exists():
            continue
        try:
            same = os.path.samefile(out, given)
        except (OSError, TypeError, ValueError):  # not a file: a webcam index, a URL, a weights name
            same = False
        if same:
            raise SinkError(f"{out} is also an input ({given}): writing it would destroy it; choose another output")


def write_json(doc: object, path: str | os.PathLike) -> None:
    """Write JSON under a temporary name, then rename it: a partial file never takes the real name."""
    try:
        with PartialFile(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    except OSError as exc:
        raise SinkError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_image(path: str | os.PathLike, image_bgr: np.ndarray, params: Sequence[int] = ()) -> None:
    """An image file written whole under a temporary name, then renamed (OpenCV picks the format by suffix)."""
    with PartialFile(path) as tmp:
        if not cv2.imwrite(str(tmp), image_bgr, list(params)):
            raise SinkError(f"OpenCV cannot write {path}")


class VideoFileSink(Sink):
    """Writes frames to a video file from a background thread (encoding overlaps inference).

    Args:
        path: output file; its extension picks the container and the default codec (VIDEO_CODECS).
        fps: the file's frame rate (the source's): frames without a time of their own are 1/fps apart.
        size_wh: (width, height); frames of another size are resized to it.
        queue_size: frames waiting for the encoder before ``write`` blocks.
        real_time: for live sources, where frames are skipped when explaining is slower than the camera:
            each frame is written as many times as ``fps`` frames fit in the wall-clock time since the
            previous one, so the video plays at real speed. Off, every frame is written once (files).
        settings: codec, quality, hardware encoder, audio to copy (see ``encoders.VideoSettings``).
        encoder: "pyav" (FFmpeg through PyAV) or "opencv" (OpenCV's writer, kept for comparison).
    """

    def __init__(self, path: str | os.PathLike, fps: float, size_wh: tuple[int, int], queue_size: int = 8,
                 real_time: bool = False, settings: VideoSettings = VideoSettings(), encoder: str = "pyav") -> None:
        self.path = check_output_path(path, VIDEO_CODECS)
        self.size_wh = size_wh
        self.fps = fps if fps > 0 else 30.0
        self.frames_written = 0
        self.complete = False  # True once the file has its name, read back whole
        self.real_time = real_time
        self._started_at: float | None = None
        self._slots = 0  # frames handed to the encoder so far (real_time: what the clock says is due)
        self.encode_ms: collections.deque[float] = collections.deque(maxlen=10_000)
        self._partial = PartialFile(self.path)
        try:
            self._writer = ENCODERS[encoder](self._partial.tmp, self.path.suffix.lower(), self.fps, size_wh,
                                             settings, name=str(self.path))
        except BaseException:
            self._partial.discard()
            raise
        self.codec = self._writer.codec
        self._first_time: float | None = None
        self._last_time: float | None = None
        self._queue: queue.Queue[tuple[np.ndarray, float] | None] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._encode_loop, name=f"encode:{self.path.name}", daemon=True)
        self._thread.start()

    def _encode_loop(self) -> None:
        lower_this_threads_priority()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._error is not None:
                    continue  # the first failed write stops the file; keep draining so a blocked write() returns
                image, time_s = item
                try:
                    t0 = time.perf_counter()
                    self._writer.write(image, time_s)
                    self.encode_ms.append((time.perf_counter() - t0) * 1000.0)
                    self.frames_written += 1
                    if self._first_time is None:
                        self._first_time = time_s
                    self._last_time = time_s
                except BaseException as exc:
                    self._error = exc
        finally:
            HELPER_CPU.add_this_thread("encode")

    def write(self, image_bgr: np.ndarray) -> None:
        self._put(image_bgr, None)

    def write_frame(self, image_bgr: np.ndarray, frame: Frame) -> None:
        """Written at the frame's own time in its source, when it has one (a video file's timestamps)."""
        self._put(image_bgr, None if self.real_time else frame.time_s)

    def _put(self, image_bgr: np.ndarray, time_s: float | None) -> None:
        if self._closed:
            raise SinkError(f"{self.path} is already closed")
        if self._error is not None:  # the first failed write stops the run: close now (raises what is left)
            self.close()
        w, h = self.size_wh
        if image_bgr.shape[1] != w or image_bgr.shape[0] != h:
            image_bgr = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_AREA)
        copies = 1
        if self.real_time:
            now = time.perf_counter()
            if self._started_at is None:
                self._started_at = now
            due = int((now - self._started_at) * self.fps) + 1
            copies = max(1, due - self._slots)
        for i in range(copies):
            self._queue.put((image_bgr, time_s if time_s is not None else (self._slots + i) / self.fps))
        self._slots += copies

    def source_ended(self) -> None:
        """The source's audio, when it is copied, goes to its own end (else it stops with the last frame)."""
        self._writer.source_ended()

    def close(self) -> None:
        """Flush, finalise the container, and give the file its real name."""
        if self._closed:
            return  # its error, if any, was raised when it closed
        with signals_held():  # a Ctrl-C (or SIGTERM) now is acted on once the container is finalised
            self._queue.put(None)
            self._thread.join()
            if self._error is None:
                try:
                    self._writer.close()
                except BaseException as exc:  # a full disk when the last frames or the index are written
                    self._error = exc
            if self._error is not None:
                self._writer.abort()
            self._closed = True
        if not self.frames_written:
            self._partial.discard()
            if self._error is not None:  # nothing was written: nothing is left
                raise SinkError(f"writing {self.path} failed: {_reason(self._error)}")
        elif self._error is None:
            self._finalise()
        if self._error is not None:
            if not self._partial.ours():  # the likely cause of the error, and what the user must know
                raise self._partial.gone()
            raise SinkError(f"writing {self.path} failed: {_reason(self._error)}; what was written is left in "
                            f"{self._partial.tmp}")

    @property
    def temporary_path(self) -> Path:
        """Where the frames go until the file is complete."""
        return self._partial.tmp

    def _finalise(self) -> None:
        """Check the finished file, then give it its name (a one-line error, and the file kept under its
        temporary name, when its last frame does not decode)."""
        tmp = self._partial.tmp
        if self._partial.ours():
            # A writer may not report a failed write (OpenCV's only logs it), and a container can state frames
            # it does not hold: the finished file is read back, its last frame must decode.
            span = None if self._first_time is None else self._last_time - self._first_time
            problem = unreadable_end(tmp, self.frames_written, span)
            if problem:
                raise SinkError(f"writing {self.path} failed: the finished file {problem} (is the disk full?); "
                                f"what was written is left in {tmp}")
        self._partial.commit()  # says so when the temporary file vanished or cannot be renamed
        self.complete = True


def _reason(exc: BaseException) -> str:
    """An error's reason without the temporary path FFmpeg's errors repeat."""
    strerror = getattr(exc, "strerror", None)
    if strerror:
        errno = getattr(exc, "errno", None)
        return f"[Errno {errno}] {strerror}" if isinstance(exc, OSError) and errno else str(strerror)
    return str(exc)


@contextlib.contextmanager
def signals_held(second_aborts: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM that arrive during the block are acted on when it ends (by their own handlers).

    Python runs signal handlers in the main thread whichever thread the signal reaches, so the handlers are
    swapped, not the signal mask. Elsewhere than in the main thread, where handlers cannot be set, it does
    nothing.

    Args:
        second_aborts: a second signal during the block is acted on at once (for waits that could hang: a
            user who presses Ctrl-C twice means it).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)

    def act_on(signum: int, handler: object) -> None:
        if callable(handler):
            handler(signum, None)  # Python's own raises KeyboardInterrupt; the CLI's, for SIGTERM, its own
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)
        if second_aborts and len(caught) > 1:
            restore()
            act_on(signum, previous[signum])

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    previous = {signum: signal.signal(signum, hold) for signum in held}
    try:
        yield
    finally:
        restore()
        if len(caught) == 1 or (caught and not second_aborts):
            act_on(caught[0], previous[caught[0]])


class ImageFileSink(Sink):
    """Writes the overlay as an image (the last frame written wins): for image sources."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_output_path(path, WRITABLE_IMAGE_EXTENSIONS)
        self.frames_written = 0
        self.complete = False

    def write(self, image_bgr: np.ndarray) -> None:
        write_image(self.path, image_bgr)
        self.frames_written += 1
        self.complete = True


class SnapshotSink(Sink):
    """What the window's ``s`` and ``r`` write into the snapshot folder: snapshots (overlay PNG, raw map
    ``.npy``, JSON) and recordings, which take every frame written while one is on. A recording may be
    started or stopped in one thread while another writes frames (the mosaic of several streams)."""

    def __init__(self, folder: Path, fps: float, real_time: bool = False) -> None:
        self.folder = folder
        self.fps = fps
        self.real_time = real_time
        self.written: list[Path] = []
        self.video: VideoFileSink | None = None
        self._lock = threading.Lock()

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
        meta = {"frame": frame.index, **prediction.as_dict(), "box_xyxy": list(box) if box is not None else None}
        stem.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        self.written += [stem.with_suffix(e) for e in (".png", ".npy", ".json")]
        return stem.with_suffix(".png")

    def toggle_recording(self, frame: Frame) -> None:
        """Start a recording at this frame's size, or stop (and finalise) the one that runs."""
        if self.video is not None:
            self.close()
            return
        h, w = frame.image_bgr.shape[:2]
        path = self._stem("recording", frame.index).with_suffix(".mp4")
        video = VideoFileSink(path, self.fps, (w, h), real_time=self.real_time)
        with self._lock:
            self.video = video
        self.written.append(path)

    def write(self, image_bgr: np.ndarray) -> None:
        with self._lock:
            if self.video is not None:
                self.video.write(image_bgr)

    def close(self) -> None:
        with self._lock:
            video, self.video = self.video, None
        if video is not None:
            video.close()


def check_display() -> None:
    """A one-line error where opencv-python's Qt (X11 on Linux) has no display to open a window on: Qt aborts
    the whole process there (exit 134, four lines of its own) before OpenCV could report anything."""
    platform = os.environ.get("QT_QPA_PLATFORM", "xcb")
    if sys.platform.startswith("linux") and platform.startswith("xcb") and not os.environ.get("DISPLAY"):
        raise SinkError("no display to open a window on ($DISPLAY is not set): use --no-display to run headless")


class WindowSink(Sink):
    """An OpenCV window showing frames at their own size, without Qt's toolbar. All its calls must stay on the
    main thread.

    ``write`` shows a frame and polls the keyboard; the last key is in :attr:`last_key` (-1 for none).
    :attr:`closed` is True once the user closed the window with its X button.
    """

    def __init__(self, title: str = "realtime-cam") -> None:
        self.title = title
        # opencv-python's Qt ships no fonts and warns about it on every run ("QFontDatabase: Cannot find font
        # directory ..."); the window draws no text of its own. A user's QT_LOGGING_RULES wins.
        os.environ.setdefault("QT_LOGGING_RULES", "default.warning=false")
        check_display()
        try:
            # No Qt toolbar or status bar: they took room from the image, which was shrunk (and blurred) to fit.
            cv2.namedWindow(title, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as exc:
            raise SinkError(
                f"cannot open a window ({str(exc).strip().splitlines()[-1]}); "
                "is there a display? use --no-display to run headless"
            ) from None
        self._shown = False
        self.last_key = -1

    def write(self, image_bgr: np.ndarray) -> None:
        if not self._shown:
            h, w = image_bgr.shape[:2]
            cv2.resizeWindow(self.title, w, h)
            self._shown = True
        cv2.imshow(self.title, image_bgr)
        self.last_key = self.wait_key(1)

    def wait_key(self, delay_ms: int) -> int:
        key = cv2.waitKey(delay_ms)
        return -1 if key < 0 else key & 0xFF

    @property
    def closed(self) -> bool:
        try:
            return cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1
        except cv2.error:
            return True

    def close(self) -> None:
        try:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
        except cv2.error:
            pass


def _video_sink(path: Path, fps: float, size_wh: tuple[int, int], kind: str, live: bool,
                settings: VideoSettings) -> Sink:
    return VideoFileSink(path, fps, size_wh, real_time=live, settings=settings)


def _image_sink(path: Path, fps: float, size_wh: tuple[int, int], kind: str, live: bool,
                settings: VideoSettings) -> Sink:
    if kind != "image":
        raise SinkError(f"{path.name} is an image: use a video extension for a {kind}")
    return ImageFileSink(path)


# Output file suffix -> the sink that writes it, given (path, fps, size_wh, source kind, live source, settings).
FILE_SINKS: dict[str, Callable[[Path, float, tuple[int, int], str, bool, VideoSettings], Sink]] = {
    **dict.fromkeys(VIDEO_CODECS, _video_sink),
    **dict.fromkeys(sorted(WRITABLE_IMAGE_EXTENSIONS), _image_sink),
}


def open_file_sink(path: Path, fps: float, size_wh: tuple[int, int], kind: str, live: bool,
                   settings: VideoSettings = VideoSettings()) -> Sink:
    """The sink for an output file, chosen by its suffix (see FILE_SINKS); ``settings`` apply to videos."""
    factory = FILE_SINKS.get(path.suffix.lower())
    if factory is None:
        raise SinkError(f"cannot write {path.name}: use one of {' '.join(FILE_SINKS)}")
    return factory(path, fps, size_wh, kind, live, settings)
