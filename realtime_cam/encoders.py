"""Video encoders behind ``sinks.VideoFileSink``: FFmpeg through PyAV (the default), or OpenCV's writer.

An encoder writes one file: ``write(image_bgr, time_s)`` for each frame, ``close()`` to finalise it. PyAV
writes H.264 into ``.mp4/.m4v/.mov/.mkv`` (yuv420p, ``+faststart``: it plays in a browser), VP9 into
``.webm`` and MJPEG into ``.avi``; it keeps each frame's presentation time and copies the source's audio
without re-encoding where the container can hold it. OpenCV's writer (mp4v/MJPG) stays for comparison
(``bench``).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .errors import SinkError
from .threads import few_cores
from .video_file import CONVERSION

log = logging.getLogger("realtime_cam")

# Output suffix -> (FFmpeg muxer, default encoder).
CONTAINERS = {
    ".mp4": ("mp4", "libx264"), ".m4v": ("mp4", "libx264"), ".mov": ("mov", "libx264"),
    ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9"), ".avi": ("avi", "mjpeg"),
}
VIDEO_CODECS = {suffix: codec for suffix, (_, codec) in CONTAINERS.items()}
# Where `--device cuda` asks for it and the encoder opens, the GPU's encoder instead of the CPU's.
HARDWARE_ENCODERS = {"libx264": "h264_nvenc"}

# Per encoder: its options and what --crf sets. libx264's ultrafast preset: on 2 cores 2.3 ms a 640x360
# frame (superfast 3.8, veryfast 4.5, OpenCV's mp4v 1.6) and smaller files than mp4v at crf 23 (263 KB
# against 318 KB for 200 frames); inference needs the cores more than the file needs the bytes.
ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "ultrafast"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "row-mt": "1", "b": "0"},
    "h264_nvenc": {"preset": "p1", "tune": "ll", "rc": "vbr"},
}
QUALITY_OPTION = {"libx264": "crf", "libx265": "crf", "libvpx-vp9": "crf", "libsvtav1": "crf", "h264_nvenc": "cq",
                  "hevc_nvenc": "cq"}
DEFAULT_QUALITY = {"libx264": 23, "libx265": 28, "libvpx-vp9": 32, "libsvtav1": 35, "h264_nvenc": 23,
                   "hevc_nvenc": 28}
PIXEL_FORMATS = {"mjpeg": "yuvj420p"}  # others: yuv420p, what browsers and players decode
# Container option: the index (moov) before the data, so that a browser plays the file while it loads.
CONTAINER_OPTIONS = {"mp4": {"movflags": "+faststart"}, "mov": {"movflags": "+faststart"}}
# Time bases of the frames' timestamps: fine enough for any source's (MPEG's 90 kHz); AVI counts frames.
TIME_BASES = {"matroska": Fraction(1, 1000), "webm": Fraction(1, 1000)}
DEFAULT_TIME_BASE = Fraction(1, 90_000)
FINE_CLOCKS = {"libx264", "libx265", "h264_nvenc", "hevc_nvenc"}  # take it; others are tried first


@dataclass(frozen=True)
class VideoSettings:
    """How a video output is encoded.

    Attributes:
        codec: an FFmpeg encoder name (None: the container's default, see VIDEO_CODECS).
        crf: its quality setting (lower is better and larger; None: the encoder's default here).
        hardware: use the GPU's encoder (NVENC) when it opens (``--device cuda``).
        audio_from: a file whose first audio stream is copied into the output, when the container can hold it.
        announce: say which encoder writes the file (off for a collection's files after its first).
    """

    codec: str | None = None
    crf: int | None = None
    hardware: bool = False
    audio_from: str | None = None
    announce: bool = True


def check_codec(name: str) -> str:
    """An FFmpeg video encoder this PyAV build has, or a one-line SinkError naming some that it has."""
    import av

    try:
        codec = av.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        codec = None
    if codec is None or codec.type != "video":
        some = ", ".join(c for c in ("libx264", "libx265", "libvpx-vp9", "libsvtav1", "mpeg4", "mjpeg",
                                     "h264_nvenc") if c in av.codecs_available)
        raise SinkError(f"--codec {name}: not a video encoder FFmpeg has here (some that are: {some})")
    return name


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(30)


def _why_not_opens(codec: str, size_wh: tuple[int, int], time_base: Fraction, pixel_format: str = "yuv420p",
                   ) -> str | None:
    """None when the encoder opens for this size and time base; else FFmpeg's reason."""
    import av

    try:
        ctx = av.CodecContext.create(codec, "w")
        ctx.width, ctx.height = size_wh
        ctx.pix_fmt = pixel_format
        ctx.time_base = time_base
        ctx.open()  # released with the object (PyAV's contexts have no close)
        return None
    except (av.FFmpegError, ValueError) as exc:
        return str(getattr(exc, "strerror", None) or exc)


def _container_takes(muxer: str, stream) -> bool:
    """Whether FFmpeg's muxer accepts this stream as it is (its header is written to memory to find out)."""
    import av

    try:
        with av.open(io.BytesIO(), "w", format=muxer) as probe:
            probe.add_stream_from_template(stream)
            probe.start_encoding()
        return True
    except (av.FFmpegError, ValueError):
        return False


class PyAvEncoder:
    """One output file written with FFmpeg through PyAV (see the module's docstring)."""

    def __init__(self, path: Path, suffix: str, fps: float, size_wh: tuple[int, int],
                 settings: VideoSettings = VideoSettings(), name: str | None = None) -> None:
        import av

        muxer, default_codec = CONTAINERS[suffix]
        name = name or str(path)
        codec = settings.codec or default_codec
        if settings.hardware and settings.codec is None and codec in HARDWARE_ENCODERS:  # a named codec is kept
            w, h = size_wh
            why_not = _why_not_opens(HARDWARE_ENCODERS[codec], (w + w % 2, h + h % 2), 1 / _rate(fps))
            if why_not is None:
                codec = HARDWARE_ENCODERS[codec]
            else:
                log.info("%s: %s did not open (%s); encoding on the CPU", name, HARDWARE_ENCODERS[codec], why_not)
        self.codec = codec
        self.fps = fps if fps > 0 else 30.0
        self.pixel_format = PIXEL_FORMATS.get(codec, "yuv420p")
        w, h = size_wh
        self.size_wh = size_wh
        # 4:2:0 holds colour per 2x2 pixels: an odd side is padded (black), never cropped.
        self.padded_wh = (w + w % 2, h + h % 2) if self.pixel_format.endswith("420p") else (w, h)
        options = dict(ENCODER_OPTIONS.get(codec, {}))
        quality = settings.crf if settings.crf is not None else DEFAULT_QUALITY.get(codec)
        if quality is not None and codec in QUALITY_OPTION:
            options[QUALITY_OPTION[codec]] = str(quality)
        elif settings.crf is not None:
            raise SinkError(f"--crf: {codec} has no constant-quality setting realtime-cam knows")
        self.time_base = TIME_BASES.get(muxer, 1 / _rate(self.fps) if muxer == "avi" else DEFAULT_TIME_BASE)
        if self.time_base == DEFAULT_TIME_BASE and codec not in FINE_CLOCKS and _why_not_opens(
                codec, self.padded_wh, DEFAULT_TIME_BASE, self.pixel_format) is not None:
            self.time_base = Fraction(1, 1000)  # MPEG-4 Part 2 and others count time in 16 bits: milliseconds
        try:
            self._container = av.open(str(path), "w", format=muxer, options=CONTAINER_OPTIONS.get(muxer, {}))
        except (av.FFmpegError, OSError) as exc:
            raise SinkError(f"cannot write {name}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            stream = self._container.add_stream(codec, rate=_rate(self.fps), options=options)
            stream.width, stream.height = self.padded_wh
            stream.pix_fmt = self.pixel_format
            stream.codec_context.time_base = self.time_base
            if self.pixel_format == "yuv420p":  # what write() converts to, said in the stream for players
                stream.codec_context.colorspace = 6  # SMPTE 170M, i.e. BT.601
                stream.codec_context.color_range = 1  # MPEG: limited range
            stream.codec_context.thread_count = 1 if few_cores() else 0
            if codec.startswith("libx26"):
                stream.codec_context.thread_type = "SLICE" if few_cores() else "AUTO"
            stream.codec_context.open()  # fails now, not at the first frame, on settings the encoder refuses
        except (av.FFmpegError, ValueError) as exc:
            self._container.close()
            raise SinkError(f"cannot encode {name} with {codec}: {getattr(exc, 'strerror', None) or exc}") from None
        self._stream = stream
        self._converter = av.video.reformatter.VideoReformatter()
        self._last_pts: int | None = None
        self._origin: float | None = None  # the first frame's time: kept when audio is copied (in step with it)
        self._audio = _AudioCopy.open(settings.audio_from, self._container, muxer, suffix, name)
        self._to_source_end = False  # see source_ended
        try:
            # FFmpeg opens the file (by name) and writes the header now: from here on it writes the file this
            # run created, whatever is put at that name later.
            self._container.start_encoding()
        except (av.FFmpegError, OSError) as exc:
            self.abort()
            raise SinkError(f"cannot write {name}: {getattr(exc, 'strerror', None) or exc}") from None
        log.log(logging.INFO if settings.announce else logging.DEBUG, "writing %s with %s (%s%s)", name, codec,
                self.pixel_format, f", the source's {self._audio.codec} audio copied" if self._audio else "")
        if self.padded_wh != size_wh:
            log.info("%s: %dx%d padded to %dx%d with black (%s needs even sides; nothing is cropped)", name, w, h,
                     *self.padded_wh, self.pixel_format)

    def write(self, image_bgr: np.ndarray, time_s: float) -> None:
        import av

        w, h = self.padded_wh
        if image_bgr.shape[1] != w or image_bgr.shape[0] != h:
            image_bgr = cv2.copyMakeBorder(image_bgr, 0, h - image_bgr.shape[0], 0, w - image_bgr.shape[1],
                                           cv2.BORDER_CONSTANT, value=(0, 0, 0))
        if self.pixel_format == "yuv420p":
            # OpenCV's conversion: 0.8 ms a 640x360 frame against 3.6 ms through FFmpeg's bgr24 -> yuv420p
            # (BT.601, limited range, as the stream is tagged and as FFmpeg reads it back).
            frame = av.VideoFrame.from_ndarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
        else:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image_bgr), format="bgr24")
            frame = self._converter.reformat(frame, format=self.pixel_format, interpolation=CONVERSION)
        if self._origin is None:
            self._origin = 0.0 if self._audio else time_s
        if self._audio:
            self._audio.copy_until(time_s)
        pts = round((time_s - self._origin) / self.time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        frame.pts, frame.time_base = pts, self.time_base
        self._last_pts = pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def source_ended(self) -> None:
        """Every frame of the source was written: the audio is copied to its own end on close."""
        self._to_source_end = True

    def close(self) -> None:
        """Flush the encoder, copy the audio up to the end of the last frame (to its own end when the source
        ended), write the trailer (and, for MP4, move the index to the front)."""
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            if self._audio and self._last_pts is not None:  # (with audio, the origin is 0)
                end = math.inf if self._to_source_end else float(self._last_pts * self.time_base) + 1.0 / self.fps
                self._audio.copy_until(end)
        finally:
            try:
                if self._audio:
                    self._audio.close()
            finally:
                self._container.close()

    def abort(self) -> None:
        """Close after a failed write, keeping what FFmpeg can still finalise; never raises."""
        for step in ((self._audio.close if self._audio else None), self._container.close):
            try:
                if step is not None:
                    step()
            except Exception:  # noqa: BLE001 - the write's own error is the one reported
                pass


class _AudioCopy:
    """The source's first audio stream, copied packet by packet into the output as its video is written."""

    def __init__(self, source, in_stream, out_stream, codec: str, name: str) -> None:
        self._source, self._in, self._out = source, in_stream, out_stream
        self.codec, self._name = codec, name
        self._last_dts: int | None = None
        self._stopped = False
        start = source.start_time
        self._start_ticks = round((start / 1_000_000 if start is not None else 0.0) / in_stream.time_base)
        self._packets = source.demux(in_stream)
        self._pending = None

    @classmethod
    def open(cls, audio_from: str | None, container, muxer: str, suffix: str, name: str) -> _AudioCopy | None:
        if audio_from is None:
            return None
        import av

        try:
            source = av.open(audio_from, metadata_errors="ignore")
        except (av.FFmpegError, OSError):
            return None  # the video reader reports an unreadable source
        if not source.streams.audio:
            source.close()
            return None
        in_stream = source.streams.audio[0]
        codec = getattr(in_stream.codec_context, "name", None) or "of a codec FFmpeg cannot decode"
        if not _container_takes(muxer, in_stream):
            log.info("%s: the source's audio (%s) is not copied: a %s file cannot hold it without re-encoding "
                     "(.mkv holds any)", name, codec, suffix)
            source.close()
            return None
        try:
            out_stream = container.add_stream_from_template(in_stream)
        except (av.FFmpegError, ValueError, AttributeError) as exc:
            log.info("%s: the source's audio (%s) is not copied (%s)", name, codec, exc)
            source.close()
            return None
        return cls(source, in_stream, out_stream, codec, name)

    def copy_until(self, time_s: float) -> None:
        """Mux the audio packets that start before ``time_s`` (seconds from the source's start). A source whose
        audio cannot be copied on (a damaged stream, timestamps that jump back) stops the audio, said once;
        the video goes on."""
        import av

        if self._stopped:
            return
        try:
            self._copy_until(time_s)
        except av.FFmpegError as exc:
            self._stopped = True
            log.warning("%s: copying the source's audio stopped at %.2f s (%s); the video goes on", self._name,
                        time_s, getattr(exc, "strerror", None) or exc)

    def _copy_until(self, time_s: float) -> None:
        while True:
            packet = self._pending if self._pending is not None else next(self._packets, None)
            self._pending = None
            if packet is None:
                return
            if packet.dts is None or not packet.size:
                continue
            if packet.pts is not None and float((packet.pts - self._start_ticks) * self._in.time_base) >= time_s:
                self._pending = packet
                return
            if self._last_dts is not None and packet.dts <= self._last_dts:
                continue  # a timestamp that goes back (joined files): the muxer would refuse the whole file
            self._last_dts = packet.dts
            if packet.pts is not None:
                packet.pts -= self._start_ticks
            packet.dts -= self._start_ticks
            packet.stream = self._out
            self._out.container.mux(packet)

    def close(self) -> None:
        self._packets.close()
        self._source.close()


class OpenCvEncoder:
    """OpenCV's writer (mp4v in MP4, MJPG in AVI/MKV): one timestamp per frame at the given rate, no audio."""

    FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}

    def __init__(self, path: Path, suffix: str, fps: float, size_wh: tuple[int, int],
                 settings: VideoSettings = VideoSettings(), name: str | None = None) -> None:
        from .sources import opencv_quiet

        if suffix not in self.FOURCC:
            raise SinkError(f"OpenCV's writer cannot write {suffix} here (use one of {' '.join(self.FOURCC)})")
        self.codec = self.FOURCC[suffix]
        self.size_wh = self.padded_wh = size_wh
        self._quiet = opencv_quiet
        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*self.codec), fps if fps > 0 else 30.0,
                                       size_wh)
        if not self._writer.isOpened():
            self._writer.release()
            raise SinkError(f"OpenCV cannot write {name or path} (codec {self.codec})")

    def write(self, image_bgr: np.ndarray, time_s: float) -> None:
        with self._quiet():  # a failed write (a full disk) is logged per frame; the read-back says it once
            self._writer.write(image_bgr)

    def source_ended(self) -> None:
        """No audio to finish: nothing to do."""

    def close(self) -> None:
        self._writer.release()

    abort = close


ENCODERS = {"pyav": PyAvEncoder, "opencv": OpenCvEncoder}


def unreadable_end(path: Path, frames: int, last_time_s: float | None = None) -> str | None:
    """Why a video file written with ``frames`` frames does not hold them all (None when it does): it does
    not open, or its last frame does not decode (a container can state frames it does not hold). It seeks
    to the last frame's time (``last_time_s``, else ``frames - 1`` frames at the stream's rate), so a long
    file costs what a short one does."""
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError):
        return "is no readable video"
    with container:
        if not container.streams.video:
            return "is no readable video"
        stream = container.streams.video[0]
        rate = float(stream.guessed_rate or stream.average_rate or 0) or 30.0
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if last_time_s is None:
            last_time_s = (frames - 1) / rate
        target = start + max(0.0, last_time_s - 0.5 / rate)  # within half a frame: muxers round to their clock
        try:
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time >= target:
                    return None
        except av.FFmpegError:
            pass
        return f"does not decode up to its frame {frames}"
