"""`bench`'s video-file rows: decoding and encoding milliseconds per frame, and file to file, for OpenCV's
capture and writer (mp4v: how files were read and written before PyAV) against FFmpeg through PyAV (H.264,
and NVENC where it opens), measured in one run, taking turns so that a machine that gets busier moves all
alike."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .encoders import ENCODERS, VideoSettings
from .model import CamModel
from .pipeline import RunOptions, run_loop
from .providers import CUDA
from .sinks import VideoFileSink
from .sources import CaptureSource, OpenCvReader, open_source
from .timing import median_p95
from .video_file import VideoFileReader

ROUNDS = 2  # each variant runs this many times, in alternating order


def _opencv_file(spec: str) -> CaptureSource:
    """A video file read by OpenCV's capture, as files were before PyAV (for comparison only)."""
    return CaptureSource(spec, lambda: OpenCvReader(spec, f"{spec} as a video"), "video", False, f"{spec} as a video")


READERS = {"opencv": _opencv_file, "pyav": open_source}


def encoder_variants(hardware: bool) -> dict[str, tuple[str, str, VideoSettings]]:
    """name -> (reader, encoder backend, settings): today's default, the old one, and NVENC when asked for."""
    variants = {"opencv mp4v": ("opencv", "opencv", VideoSettings()),
                "pyav libx264": ("pyav", "pyav", VideoSettings())}
    if hardware:
        variants["pyav h264_nvenc"] = ("pyav", "pyav", VideoSettings(codec="h264_nvenc"))
    return variants


def bench_decode(source: str, count: int) -> dict:
    """Milliseconds per frame to decode the source into BGR, OpenCV's capture against PyAV, in turns."""
    import cv2

    def opencv(n: int) -> list[float]:
        cap = cv2.VideoCapture(source)
        try:
            return _timed(lambda: cap.read()[0], n)
        finally:
            cap.release()

    def pyav(n: int) -> list[float]:
        reader = VideoFileReader(source)
        try:
            return _timed(lambda: reader.read() is not None, n)
        finally:
            reader.release()

    times: dict[str, list[float]] = {"opencv": [], "pyav": []}
    for round_ in range(ROUNDS):
        for name, decode in (("opencv", opencv), ("pyav", pyav))[:: 1 if round_ % 2 == 0 else -1]:
            times[name] += decode(count)
    return {name: median_p95(ms) for name, ms in times.items() if ms}


def _timed(step, n: int) -> list[float]:
    """Call ``step`` up to ``n`` times (until it returns False); the milliseconds of each call that did."""
    ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        if not step():
            break
        ms.append((time.perf_counter() - t0) * 1000.0)
    return ms


def bench_encode(frames: list[np.ndarray], fps: float, out_dir: Path, hardware: bool) -> dict:
    """Milliseconds per frame each encoder takes for the same frames (called in this thread, one by one)."""
    results = {}
    h, w = frames[0].shape[:2]
    for name, (_, backend, settings) in encoder_variants(hardware).items():
        path = out_dir / f"encode-{name.replace(' ', '-')}.mp4"
        try:
            encoder = ENCODERS[backend](path, ".mp4", fps, (w, h), settings)
        except Exception as exc:  # noqa: BLE001 - NVENC that does not open is reported, not fatal
            results[name] = {"error": str(exc).splitlines()[0][:200]}
            continue
        ms = []
        for i, image in enumerate(frames):
            t0 = time.perf_counter()
            encoder.write(image, i / fps)
            ms.append((time.perf_counter() - t0) * 1000.0)
        t0 = time.perf_counter()
        encoder.close()  # the frames the encoder held back are encoded now: their time counts too
        flush_ms = (time.perf_counter() - t0) * 1000.0
        results[name] = {**median_p95(ms), "mean_ms": (sum(ms) + flush_ms) / len(ms), "codec": encoder.codec,
                         "bytes": path.stat().st_size}
        path.unlink(missing_ok=True)
    return results


def bench_file_to_file_codecs(model: CamModel, source: str, count: int, out_dir: Path, options: RunOptions) -> dict:
    """File to file with each (reader, encoder) variant, ``count`` frames from the file's start, in turns."""
    variants = encoder_variants(model.provider == CUDA)
    frames: dict[str, int] = dict.fromkeys(variants, 0)
    seconds: dict[str, float] = dict.fromkeys(variants, 0.0)
    codecs: dict[str, str] = {}
    for round_ in range(ROUNDS):
        for name in list(variants)[:: 1 if round_ % 2 == 0 else -1]:
            reader, backend, settings = variants[name]
            out = out_dir / "codec-bench.mp4"
            try:
                with READERS[reader](source) as src, VideoFileSink(out, src.fps, src.size_wh, settings=settings,
                                                                   encoder=backend) as sink:
                    result = run_loop(model, src, sinks=[sink], options=replace(options, max_frames=count))
                    codecs[name] = sink.codec
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported as such
                codecs[name] = f"error: {str(exc).splitlines()[0][:200]}"
                continue
            finally:
                out.unlink(missing_ok=True)
            if result.frames > 1 and result.fps > 0:
                frames[name] += result.frames - 1
                seconds[name] += (result.frames - 1) / result.fps
    return {name: ({"fps": frames[name] / seconds[name], "codec": codecs.get(name)} if seconds[name] else
                   {"error": codecs.get(name, "did not run")}) for name in variants}


def bench_codecs(model: CamModel, source: str, frames: list[np.ndarray], count: int, out_dir: Path,
                 options: RunOptions) -> dict:
    """The video-file rows of one (model, device): decode, encode and file to file per codec."""
    with open_source(source) as src:
        fps = src.fps or 30.0
    report = {
        "decode_ms": bench_decode(source, min(count, 300)),
        "encode_ms": bench_encode(frames[:min(count, 300)], fps, out_dir, model.provider == CUDA),
        "file_to_file": bench_file_to_file_codecs(model, source, count, out_dir, options),
    }
    f2f = report["file_to_file"]
    if "fps" in f2f.get("opencv mp4v", {}) and "fps" in f2f.get("pyav libx264", {}):
        report["h264_vs_mp4v"] = f2f["pyav libx264"]["fps"] / f2f["opencv mp4v"]["fps"]
    return report


def format_codecs(name: str, device: str, codecs: dict) -> list[str]:
    """The table lines for one row's codec measurements."""
    decode = ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in codecs["decode_ms"].items())
    encode = ", ".join(f"{k} {v['mean_ms']:.2f} ({v['bytes'] // 1024} KB)" if "mean_ms" in v else f"{k} {v['error']}"
                       for k, v in codecs["encode_ms"].items())
    f2f = ", ".join(f"{k} {v['fps']:.1f}" if "fps" in v else f"{k} {v['error']}"
                    for k, v in codecs["file_to_file"].items())
    ratio = f" (H.264 / mp4v {codecs['h264_vs_mp4v']:.2f})" if "h264_vs_mp4v" in codecs else ""
    return [f"  {name} [{device}] decode ms per frame: {decode}",
            f"  {name} [{device}] encode ms per frame: {encode}",
            f"  {name} [{device}] file to file FPS by reader and encoder: {f2f}{ratio}"]
