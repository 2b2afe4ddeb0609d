#!/usr/bin/env python
"""Endurance check: run the real headless loop over a video looped for N frames and watch for leaks.

It runs ``realtime_cam.pipeline.run_loop`` exactly as ``realtime-cam run --no-display --output F`` does
(render thread, ``VideoFileSink`` with its encoder thread), over a source that re-opens a video file with
``open_source`` each time it ends, and samples the process every ``--every`` frames:

- resident memory (VmRSS from /proc/self/status, MB = 10**6 bytes),
- threads (Python's ``threading.active_count()`` and the OS count, ``Threads:`` in /proc/self/status),
- open file descriptors (entries of /proc/self/fd),
- frames/s over the frames since the previous sample, and the size of the output file so far.

Verdict (exit status 1 when it fails): after the warm-up sample, RSS growth (last sample - warm-up sample)
under ``--max-rss-growth-mb`` (50), and no growth in either thread count or in open fds (last sample -
warm-up sample); Python threads after the run (every source, sink and worker closed) no more than before.
Thread counts read one low at a pass's first frame and in its last few (its capture thread is not running
there); the report names samples that fall there, so that --warmup/--every can be chosen to avoid them.

    python scripts/endurance.py --model M.onnx --source VIDEO [--frames 20000] [--warmup 500]
        [--output out.mp4 | --no-output] [--json report.json]

Linux only (it reads /proc). No torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from realtime_cam.errors import CamError
from realtime_cam.model import CamModel
from realtime_cam.pipeline import RunOptions, run_loop
from realtime_cam.sinks import NullSink, Sink, VideoFileSink
from realtime_cam.sources import Frame, open_source

MB = 1_000_000


# ---------------------------------------------------------------------------------------------- probes


def _proc_status() -> dict[str, str]:
    with open("/proc/self/status", encoding="ascii") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def rss_mb() -> float:
    """Resident memory of this process, MB (VmRSS is in KiB)."""
    return int(_proc_status()["VmRSS"].split()[0]) * 1024 / MB


def os_threads() -> int:
    """Threads of this process as the kernel counts them (ONNX Runtime, OpenCV and FFmpeg pools too)."""
    return int(_proc_status()["Threads"])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------- source


class LoopingVideo:
    """A video file played forever: re-opened with ``open_source`` at its end, frame indices continued.

    A context manager; iterating it is a generator of :class:`Frame` (``index`` counts across loops).
    Each opening is closed (its capture thread joined, its ``VideoCapture`` released) before the next one
    is opened, and :meth:`close` closes the one open now, so breaking out of a loop leaks nothing.

    Attributes:
        spec: the video file.
        opens: how many times the file has been opened.
        loop_frames: frames per pass (known after the first pass ends; None before).
        fps, size_wh: from the first opening.
    """

    def __init__(self, spec: str | os.PathLike) -> None:
        self.spec = str(spec)
        self.opens = 0
        self.loop_frames: int | None = None
        with open_source(self.spec) as probe:  # fail fast, and learn fps and size for the sink
            if probe.kind != "video":
                raise ValueError(f"{spec} is a {probe.kind}, not a video file")
            self.fps = probe.fps
            self.size_wh = probe.size_wh
        self._frames: Iterator[Frame] | None = None

    def __enter__(self) -> LoopingVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        if self._frames is not None:
            raise RuntimeError("a looping video can be iterated once")
        self._frames = self._generate()
        return self._frames

    def _generate(self) -> Iterator[Frame]:
        index = 0
        while True:
            with open_source(self.spec) as source:
                self.opens += 1
                start = index
                for frame in source:
                    yield Frame(index, frame.image_bgr, frame.captured_at)
                    index += 1
            passed = index - start
            if passed == 0:
                raise RuntimeError(f"{self.spec} yielded no frames on opening {self.opens}")
            if self.loop_frames is None:
                self.loop_frames = passed
            elif passed != self.loop_frames:
                raise RuntimeError(
                    f"{self.spec} yielded {passed} frames on opening {self.opens}, {self.loop_frames} before"
                )

    def close(self) -> None:
        """Close the opening in use (GeneratorExit runs the generator's ``with``)."""
        if self._frames is not None:
            self._frames.close()


# -------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    """The process after ``frame`` frames were explained."""

    frame: int
    elapsed_s: float
    rss_mb: float
    py_threads: int
    os_threads: int
    fds: int
    fps: float
    output_mb: float


class Sampler:
    """Takes a :class:`Sample` every ``every`` frames, at ``warmup`` and at frame ``last``.

    It goes where ``run_loop`` takes a progress display (``update(done, fps)`` after every frame, in the
    loop's thread; ``close(done, fps)`` at the end), so sampling needs no change to the pipeline. The last
    sample is taken in ``update`` too: by ``close`` the render worker has already been joined.
    """

    def __init__(self, every: int, warmup: int, last: int, output: Path | None = None, echo: bool = True) -> None:
        self.every = every
        self.warmup = warmup
        self.last = last
        self.output = output
        self.echo = echo
        self.samples: list[Sample] = []
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._last_done = 0

    def _output_mb(self) -> float:
        if self.output is None:
            return 0.0
        partials = self.output.parent.glob(f".{self.output.stem}.*.partial{self.output.suffix}")
        for path in (*partials, self.output):  # written under a temporary name
            with contextlib.suppress(OSError):
                return path.stat().st_size / MB
        return 0.0

    def take(self, done: int) -> Sample:
        now = time.perf_counter()
        frames = done - self._last_done
        fps = frames / (now - self._last_t) if frames > 0 and now > self._last_t else 0.0
        self._last_t, self._last_done = now, done
        sample = Sample(
            frame=done, elapsed_s=now - self._t0, rss_mb=rss_mb(), py_threads=threading.active_count(),
            os_threads=os_threads(), fds=open_fds(), fps=fps, output_mb=self._output_mb(),
        )
        self.samples.append(sample)
        if self.echo:
            print(format_row(sample), flush=True)
        return sample

    def update(self, done: int, fps: float) -> None:
        if done % self.every == 0 or done in (self.warmup, self.last):
            self.take(done)

    def close(self, done: int, fps: float) -> None:
        if not self.samples or self.samples[-1].frame != done:
            self.take(done)


HEADER = f"{'frame':>7} {'time s':>7} {'RSS MB':>8} {'py thr':>6} {'OS thr':>6} {'fds':>5} {'FPS':>7} {'out MB':>8}"


def format_row(s: Sample) -> str:
    return (f"{s.frame:>7} {s.elapsed_s:>7.1f} {s.rss_mb:>8.1f} {s.py_threads:>6} {s.os_threads:>6} "
            f"{s.fds:>5} {s.fps:>7.1f} {s.output_mb:>8.1f}")


# ---------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Report:
    """What a run measured, and whether it passed.

    Growth figures compare the last sample with the sample at the warm-up frame; ``*_max_growth`` the
    largest sample after warm-up with it. ``*_before``/``*_after`` are taken outside the run: before the
    source and sinks were opened, and after everything was closed.
    """

    frames: int
    warmup: int
    fps: float
    opens: int
    loop_frames: int | None
    output_mb: float
    rss_warmup_mb: float
    rss_last_mb: float
    rss_growth_mb: float
    rss_max_growth_mb: float
    py_threads_growth: int
    os_threads_growth: int
    fds_growth: int
    py_threads_max_growth: int
    os_threads_max_growth: int
    fds_max_growth: int
    py_threads_before: int
    py_threads_after: int
    os_threads_before: int
    os_threads_after: int
    fds_before: int
    fds_after: int
    max_rss_growth_mb: float
    failures: tuple[str, ...]
    samples: tuple[Sample, ...] = field(repr=False, default=())

    @property
    def passed(self) -> bool:
        return not self.failures


def summarize(
    samples: list[Sample], warmup: int, max_rss_growth_mb: float, **extra
) -> Report:
    """Growth after the warm-up sample, and the verdict."""
    at_warmup = [s for s in samples if s.frame >= warmup]
    if len(at_warmup) < 2:
        raise ValueError(f"need samples at and after the warm-up frame {warmup}: run more frames than that")
    base, last = at_warmup[0], at_warmup[-1]

    def growth(name: str) -> tuple[float, float]:
        return getattr(last, name) - getattr(base, name), max(getattr(s, name) for s in at_warmup) - getattr(base, name)

    rss_growth, rss_max = growth("rss_mb")
    py_growth, py_max = growth("py_threads")
    os_growth, os_max = growth("os_threads")
    fd_growth, fd_max = growth("fds")
    failures = []
    if rss_growth >= max_rss_growth_mb:
        failures.append(f"RSS grew {rss_growth:.1f} MB after warm-up (limit {max_rss_growth_mb:g} MB)")
    if py_growth > 0 or os_growth > 0:
        failures.append(f"threads grew after warm-up (Python {py_growth:+d}, OS {os_growth:+d})")
    if fd_growth > 0:
        failures.append(f"open file descriptors grew {fd_growth:+d} after warm-up")
    if extra["py_threads_after"] > extra["py_threads_before"]:
        failures.append(
            f"{extra['py_threads_after'] - extra['py_threads_before']} Python thread(s) still alive after the run"
        )
    return Report(
        warmup=base.frame, rss_warmup_mb=base.rss_mb, rss_last_mb=last.rss_mb, rss_growth_mb=rss_growth,
        rss_max_growth_mb=rss_max, py_threads_growth=py_growth, os_threads_growth=os_growth,
        fds_growth=fd_growth, py_threads_max_growth=py_max, os_threads_max_growth=os_max, fds_max_growth=fd_max,
        max_rss_growth_mb=max_rss_growth_mb, failures=tuple(failures), samples=tuple(samples), **extra,
    )


# ------------------------------------------------------------------------------------------------- run


def run_endurance(
    model: CamModel,
    source: str | os.PathLike,
    frames: int = 20_000,
    warmup: int = 500,
    every: int = 500,
    output: Path | None = None,
    max_rss_growth_mb: float = 50.0,
    echo: bool = True,
) -> Report:
    """Explain ``frames`` frames of ``source`` looped, writing overlays to ``output`` (None: a NullSink).

    The run is the CLI's headless run: ``run_loop`` with no window, default options and ``max_frames``.
    """
    if frames <= warmup:
        raise ValueError(f"frames ({frames}) must be more than warmup ({warmup})")
    py_before, os_before, fds_before = threading.active_count(), os_threads(), open_fds()
    sampler = Sampler(every, warmup, frames, output, echo=echo)
    if echo:
        print(HEADER, flush=True)
    with LoopingVideo(source) as video, contextlib.ExitStack() as outputs:
        sink: Sink
        if output is None:
            sink = outputs.enter_context(NullSink())
        else:
            sink = outputs.enter_context(VideoFileSink(output, video.fps, video.size_wh))
        result = run_loop(model, video, sinks=[sink], options=RunOptions(max_frames=frames), progress=sampler)
    if result.frames != frames:
        raise RuntimeError(f"the run stopped after {result.frames} of {frames} frames ({result.stopped_by})")
    output_mb = output.stat().st_size / MB if output is not None else 0.0
    return summarize(
        sampler.samples, warmup, max_rss_growth_mb, frames=result.frames, fps=result.fps, opens=video.opens,
        loop_frames=video.loop_frames, output_mb=output_mb, py_threads_before=py_before,
        py_threads_after=threading.active_count(), os_threads_before=os_before, os_threads_after=os_threads(),
        fds_before=fds_before, fds_after=open_fds(),
    )


# The capture thread of a pass ends once it has read the last frame, while the loop still drains the frames
# queued ahead of it; and a pass's first frame is read when the file is opened, before its capture thread
# starts. Samples taken there see one thread fewer than the steady state.
EDGE_FRAMES = 12


def edge_samples(report: Report) -> tuple[int, ...]:
    """Samples taken near the end or at the start of a pass, whose thread counts can read one low."""
    if not report.loop_frames:
        return ()
    n = report.loop_frames
    return tuple(s.frame for s in report.samples
                 if (s.frame - 1) % n == 0 or (s.frame - 1) % n >= n - EDGE_FRAMES)


def format_report(report: Report) -> str:
    edges = edge_samples(report)
    lines = [
        f"frames {report.frames} ({report.opens} openings of {report.loop_frames} frames), "
        f"{report.fps:.1f} FPS overall, output {report.output_mb:.1f} MB",
        f"RSS at warm-up (frame {report.warmup}) {report.rss_warmup_mb:.1f} MB, at the end {report.rss_last_mb:.1f} MB: "
        f"growth {report.rss_growth_mb:+.1f} MB (max - warm-up {report.rss_max_growth_mb:+.1f} MB; "
        f"limit {report.max_rss_growth_mb:g} MB)",
        f"threads growth: Python {report.py_threads_growth:+d} (max {report.py_threads_max_growth:+d}), "
        f"OS {report.os_threads_growth:+d} (max {report.os_threads_max_growth:+d}); "
        f"fds growth {report.fds_growth:+d} (max {report.fds_max_growth:+d})",
        f"outside the run: Python threads {report.py_threads_before} -> {report.py_threads_after}, "
        f"OS threads {report.os_threads_before} -> {report.os_threads_after}, fds {report.fds_before} -> {report.fds_after}",
        *([f"note: samples at frames {', '.join(map(str, edges))} fall at a pass boundary, where the "
           "capture thread can be briefly gone (one thread fewer); pick --warmup/--every to avoid them"]
          if edges else []),
        "verdict: " + ("PASS" if report.passed else "FAIL: " + "; ".join(report.failures)),
    ]
    return "\n".join(lines)


def report_json(report: Report, argv: list[str]) -> dict:
    out = asdict(report)
    out["samples"] = [asdict(s) for s in report.samples]
    out["failures"] = list(report.failures)
    out["passed"] = report.passed
    out["edge_samples"] = list(edge_samples(report))
    out["command"] = argv
    out["machine"] = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                      "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                      "platform": platform.platform()}
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="endurance.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, required=True, help="a realtime-cam contract .onnx file")
    parser.add_argument("--source", type=Path, required=True, help="a video file, looped until --frames")
    parser.add_argument("--frames", type=_positive, default=20_000, help="frames to explain")
    parser.add_argument("--warmup", type=_positive, default=500, help="growth is measured from this frame")
    parser.add_argument("--every", type=_positive, default=500, help="sample every this many frames")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="as for realtime-cam run")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", type=Path, default=None,
                     help="video file to write; without it, one in a temporary folder, deleted afterwards")
    out.add_argument("--no-output", action="store_true", help="drop the overlays (a NullSink)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="fail at or above this RSS growth")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples and verdict here")
    parser.add_argument("--quiet", action="store_true", help="print the summary only, not each sample")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the endurance check; 0 when it passes, 1 when it fails, 2 when it cannot run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except CamError as exc:  # a bad model, source or output: one line, as the CLI does
        print(f"endurance.py: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    model = CamModel(args.model, device=args.device)
    with contextlib.ExitStack() as stack:
        if args.no_output:
            output = None
        elif args.output is not None:
            output = args.output
        else:
            output = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="endurance-"))) / "endurance.mp4"
        print(f"model {args.model} on {model.provider}; source {args.source}; "
              f"output {output if output is not None else '(none: NullSink)'}", flush=True)
        report = run_endurance(
            model, args.source, frames=args.frames, warmup=args.warmup, every=args.every, output=output,
            max_rss_growth_mb=args.max_rss_growth_mb, echo=not args.quiet,
        )
    print(format_report(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report_json(report, argv), indent=2) + "\n", encoding="utf-8")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
