"""Video files read with FFmpeg's libraries through PyAV: every frame, in order, with its presentation time.

Files go through PyAV rather than OpenCV's capture because PyAV gives what a file holds: each frame's own
timestamp (variable-frame-rate video keeps its timing), the real frame rate where a header's is wrong, the
audio stream (see ``encoders``), and a frame count taken from the packets rather than the header's claim.
Cameras and network streams stay on OpenCV's capture (see ``sources``), which reconnects and reads MJPEG
over HTTP as they need.
"""

from __future__ import annotations

import collections
import logging
import threading
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .errors import SourceError
from .threads import few_cores

log = logging.getLogger("realtime_cam")

# Containers whose frames carry no presentation time of their own: FFmpeg labels their frames with the
# packets' guesses, which B-frames put out of order (vtest.avi's frames come as 0.04, 0.12, 0.16, 0.2, 0.24,
# 0.08 s). Each of their packets holds a slot (its decoding time, one tick per chunk: a dropped frame is an
# empty chunk that still takes its tick), and frames come out of the decoder in display order: the k-th frame
# is shown in the k-th slot. So a capture that dropped frames keeps its gaps, and a header that doubles the
# rate (vtest.avi says 50 FPS, its chunks are 2 ticks of 1/50 s apart) does not double the speed.
NO_PRESENTATION_TIMES = {"avi"}

# FFmpeg's colour conversion with its fast path: the same pixels OpenCV's capture gives, in a fraction of the
# time of PyAV's default (bicubic with accurate rounding: 2.5 ms a 640x360 frame). One converter is kept per
# file: ``frame.reformat`` sets up a new one for every frame (0.2 ms a frame kept, 0.4-1.1 ms anew).
CONVERSION = "FAST_BILINEAR"


# The display matrix's rotation (degrees counter-clockwise) -> the turn that shows the frame upright.
ROTATIONS = {270: cv2.ROTATE_90_CLOCKWISE, 90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180}


def _frame_rate(stream, by_index: bool) -> float:
    """The stream's rate: FFmpeg's average (a variable-frame-rate file's mean), or its guess when there is no
    average; for AVI the lower of the two (a header can double one of them, as vtest.avi's does). 0 when
    unknown."""
    def ok(rate) -> float:
        return float(rate) if rate and 0 < float(rate) < 1000 else 0.0

    average, guessed = ok(stream.average_rate), ok(stream.guessed_rate)
    if by_index and average and guessed:
        return min(average, guessed)
    return average or guessed


def decode_threads() -> int:
    """FFmpeg's decoding threads for a file: one on a machine with few cores (see ``threads.FEW_CORES``: on 2
    cores a 640x360 H.264 frame took 1.46 ms on one thread, 1.86 on two, 2.37 with FFmpeg's choice, all
    together with its conversion), FFmpeg's own choice (0) otherwise."""
    return 1 if few_cores() else 0


def _reason(exc: BaseException) -> str:
    """FFmpeg's reason without the path it names (ours names it once)."""
    return str(getattr(exc, "strerror", None) or exc).strip()


class VideoFileReader:
    """One video file's first video stream, decoded frame by frame.

    Attributes:
        fps: the stream's frame rate (the lower of FFmpeg's average and guessed rates: a header can double
            one of them, as vtest.avi's does), 0 when unknown.
        frame_count: the container's claim, or None; :meth:`count_frames` gives the real count.
        size_wh: (width, height) of the frames.
        damaged: packets that did not decode and were skipped.
    """

    def __init__(self, path: str, threads: int | None = None) -> None:
        import av

        self.path = path
        self.damaged = 0
        try:
            self._container = av.open(path, metadata_errors="ignore")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot open {path} as a video ({_reason(exc)})") from None
        if not self._container.streams.video:
            self._container.close()
            raise SourceError(f"{path} holds no video stream")
        stream = self._container.streams.video[0]
        if stream.codec_context is None:  # PyAV's answer when FFmpeg has no decoder for it
            name = getattr(getattr(stream, "codec", None), "name", None) or "its codec"
            self._container.close()
            raise SourceError(f"cannot open {path} as a video (FFmpeg has no decoder for {name})")
        stream.thread_type = "AUTO"
        stream.thread_count = decode_threads() if threads is None else threads
        self._stream = stream
        self._by_index = self._container.format.name in NO_PRESENTATION_TIMES
        self.fps = _frame_rate(stream, self._by_index)
        self.frame_count = stream.frames or None
        # Times are counted from the container's start, as its audio is (so that a copied audio track stays
        # in step with the video).
        start = self._container.start_time
        self._start_s = start / 1_000_000 if start is not None else 0.0
        self._time_base = stream.time_base or Fraction(1, 1)
        self._frames = self._decode()
        self._converter = av.video.reformatter.VideoReformatter()
        self._index = 0
        self._last_time: float | None = None
        self._slots: collections.deque[int] = collections.deque()  # AVI: the slots not yet given to a frame

    def _decode(self):
        import av

        cut: BaseException | None = None
        try:
            for packet in self._container.demux(self._stream):
                if not packet.size:
                    continue  # the demuxer's end marker (or an empty packet): the decoder is drained below
                if self._by_index and packet.dts is not None:
                    self._slots.append(packet.dts)
                try:
                    frames = packet.decode()
                except av.InvalidDataError:
                    self.damaged += 1  # one bad packet (a damaged file): FFmpeg goes on with the next
                    if self._by_index and packet.dts is not None:
                        self._slots.pop()  # no frame will be shown in its slot
                    continue
                yield from frames
        except av.FFmpegError as exc:
            cut = exc  # the demuxer cannot go further (a file cut short, a download broken off): its end
        try:  # the frames the decoder still holds (reordering, its threads)
            yield from self._stream.codec_context.decode(None)
        except av.FFmpegError:
            pass
        if self.damaged:
            log.warning("%s: %d damaged packet(s) skipped; the frames around them that decoded were explained",
                        self.path, self.damaged)
        if cut is not None:
            stated = self._container.duration
            where = f" at {self._last_time:.1f} s" if self._last_time is not None else ""
            if where and stated:
                where += f" of the {stated / 1e6:.1f} s it states"
            log.warning("%s: the video ends early (%s)%s; the %d frame(s) read were explained", self.path,
                        _reason(cut), where, self._index)

    def read(self) -> tuple[np.ndarray, float | None] | None:
        """The next frame as BGR and its presentation time in seconds; None at the end of the file."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        image = self._converter.reformat(frame, format="bgr24", interpolation=CONVERSION).to_ndarray()
        turn = ROTATIONS.get(round(frame.rotation or 0) % 360)
        if turn is not None:  # a phone's portrait video: shown upright, as players (and OpenCV) show it
            image = cv2.rotate(image, turn)
        time_s = self._time_of(frame)
        self._index += 1
        return image, time_s

    def _time_of(self, frame) -> float | None:
        """The frame's time from the container's start; strictly after the previous frame's."""
        if self._by_index and self._slots:
            time_s = float(self._slots.popleft() * self._time_base) - self._start_s
        elif frame.pts is None or self._by_index:
            if not self.fps:
                return None
            time_s = self._index / self.fps
        else:
            time_s = float(frame.pts * self._time_base) - self._start_s
        if self._last_time is not None and time_s <= self._last_time:  # a damaged or odd file: keep the order
            time_s = self._last_time + (1.0 / self.fps if self.fps else 1e-3)
        self._last_time = time_s
        return time_s

    def release(self) -> None:
        self._frames.close()
        self._container.close()


def count_frames(path: str | Path, stop: threading.Event | None = None) -> int | None:
    """The frames a video file holds, counted from its packets without decoding (a 8 MB file in 5 ms); None
    when it cannot be read, or when ``stop`` is set first. Headers can be wrong: vtest.avi states 682 frames and
    holds 341."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                return None
            count = 0
            for packet in container.demux(container.streams.video[0]):
                if stop is not None and stop.is_set():
                    return None
                count += bool(packet.size)
            return count
    except (av.FFmpegError, OSError):
        return None


class FrameCounter:
    """:func:`count_frames` in a background thread; :attr:`count` is None until it is known. :meth:`stop`
    ends it early (the source closed)."""

    def __init__(self, path: str | Path) -> None:
        self.count: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,), name="count-frames", daemon=True)
        self._thread.start()

    def _run(self, path: str | Path) -> None:
        from .threads import lower_this_threads_priority

        lower_this_threads_priority()
        try:
            self.count = count_frames(path, self._stop)
        except Exception:  # noqa: BLE001 - a count is a nicety: without it the bar shows the header's claim
            self.count = None

    def stop(self) -> None:
        self._stop.set()
