"""Video files read with FFmpeg's libraries through PyAV: every frame, in order, with its presentation time.

Files go through PyAV rather than OpenCV's capture because PyAV gives what a file holds: each frame's own
timestamp (variable-frame-rate video keeps its timing), the real frame rate where a header's is wrong, the
audio stream (see ``encoders``), and a frame count taken from the packets rather than the header's claim.
Cameras and network streams stay on OpenCV's capture (see ``sources``), which reconnects and reads MJPEG
over HTTP as they need.
"""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import SourceError
from .threads import few_cores

# Containers whose frames carry no presentation time of their own: FFmpeg labels their frames with the
# packets' guesses, which B-frames put out of order (vtest.avi's frames come as 0.04, 0.12, 0.16, 0.2, 0.24,
# 0.08 s). Their frames are timed by their index, as the format intends (one frame per tick).
NO_PRESENTATION_TIMES = {"avi"}

# FFmpeg's colour conversion with its fast path: the same pixels OpenCV's capture gives, in a fraction of the
# time of PyAV's default (bicubic with accurate rounding: 2.5 ms a 640x360 frame). One converter is kept per
# file: ``frame.reformat`` sets up a new one for every frame (0.2 ms a frame kept, 0.4-1.1 ms anew).
CONVERSION = "FAST_BILINEAR"


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
        stream.thread_type = "AUTO"
        stream.thread_count = decode_threads() if threads is None else threads
        self._stream = stream
        rates = [float(r) for r in (stream.average_rate, stream.guessed_rate) if r and 0 < float(r) < 1000]
        self.fps = min(rates) if rates else 0.0
        self.frame_count = stream.frames or None
        self.size_wh = (stream.codec_context.width, stream.codec_context.height)
        # Times are counted from the container's start, as its audio is (so that a copied audio track stays
        # in step with the video).
        start = self._container.start_time
        self._start_s = start / 1_000_000 if start is not None else 0.0
        self._time_base = stream.time_base or Fraction(1, 1)
        self._by_index = self._container.format.name in NO_PRESENTATION_TIMES
        self._frames = self._decode()
        self._converter = av.video.reformatter.VideoReformatter()
        self._index = 0
        self._last_time: float | None = None

    def _decode(self):
        import av

        try:
            for packet in self._container.demux(self._stream):
                try:
                    frames = packet.decode()
                except av.InvalidDataError:
                    self.damaged += 1  # one bad packet (a damaged file): FFmpeg goes on with the next
                    continue
                yield from frames
        except av.FFmpegError:
            self.damaged += 1  # the demuxer cannot go further (a file cut short): its end

    def read(self) -> tuple[np.ndarray, float | None] | None:
        """The next frame as BGR and its presentation time in seconds; None at the end of the file."""
        frame = next(self._frames, None)
        if frame is None:
            return None
        image = self._converter.reformat(frame, format="bgr24", interpolation=CONVERSION).to_ndarray()
        time_s = self._time_of(frame)
        self._index += 1
        return image, time_s

    def _time_of(self, frame) -> float | None:
        """The frame's time from the container's start; strictly after the previous frame's."""
        if frame.pts is None or self._by_index:
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


def count_frames(path: str | Path) -> int | None:
    """The frames a video file holds, counted from its packets without decoding (a 8 MB file in 5 ms); None
    when it cannot be read. Headers can be wrong: vtest.avi states 682 frames and holds 341."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError):
        return None


class FrameCounter:
    """:func:`count_frames` in a background thread; :attr:`count` is None until it is known."""

    def __init__(self, path: str | Path) -> None:
        self.count: int | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="count-frames", daemon=True)
        self._thread.start()

    def _run(self, path: str | Path) -> None:
        from .threads import lower_this_threads_priority

        lower_this_threads_priority()
        self.count = count_frames(path)
