"""``bench --streams 1,2,4,8``: how explaining several live streams at once, their frames batched, scales.

For each stream count N, N streams are fed from frames in memory, each as a camera faster than the model: a
fresh frame (its capture time: now) is ready as soon as the previous one was taken. The streams run through
:class:`~realtime_cam.streams.MultiStream` exactly as ``run`` and ``serve`` run them (batching inference
thread, render thread, one state per stream), and the report gives the total explained frames per second, each
stream's capture-to-overlay latency (median, p95), and the batch sizes the inference calls held.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .bench import environment, load_frames, synthetic_video
from .errors import CamError, DeviceError
from .model import CamModel
from .pipeline import RunOptions
from .sources import FrameSource
from .streams import DEFAULT_BATCH_TIMEOUT_MS, MultiStream, inference_lanes
from .threads import usable_cores
from .timing import median_p95
from .types import Frame
from .view import ViewState

log = logging.getLogger("realtime_cam")
ROUNDS = 3  # each count measured this many times, interleaved with the others; the median round is reported


class DemandFeed(FrameSource):
    """A live source from frames in memory that always has a fresh frame: the next one is made (stamped with
    the time) when the stream's slot has given up the previous one. ``slot`` is set once the stream exists."""

    kind = "stream"
    live = True

    def __init__(self, name: str, frames: Sequence[np.ndarray], offset: int = 0) -> None:
        super().__init__(name)
        self._frames = frames
        self._offset = offset
        self.size_wh = (frames[0].shape[1], frames[0].shape[0])
        self.fps = 0.0
        self.slot = None
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while not self._stop.is_set():
            slot = self.slot
            if slot is not None:
                with slot._cond:
                    while slot.ready and not self._stop.is_set() and not slot.ended:
                        slot._cond.wait(0.05)
            if self._stop.is_set():
                return
            yield Frame(i, self._frames[(i + self._offset) % len(self._frames)], time.perf_counter())
            i += 1

    def close(self) -> None:
        self._stop.set()


def feed_on_demand(feeds: Sequence[DemandFeed], multi: MultiStream) -> None:
    """Each feed makes its next frame once its stream's slot has given up the last one (the slots exist only
    once the loop does)."""
    for feed, stream in zip(feeds, multi.streams):
        feed.slot = stream.slot
        with stream.slot._cond:
            stream.slot._cond.notify_all()


def bench_streams(model: CamModel, frames: Sequence[np.ndarray], count: int, measured: int, warmup: int,
                  batch_timeout_s: float, options: RunOptions, lanes: int | None = None) -> dict:
    """N streams for ``warmup`` + ``measured`` explained frames in all; the figures cover the measured ones.
    ``lanes``: the loop's inference threads (None: what ``run`` and ``serve`` choose)."""
    feeds = [DemandFeed(f"stream {i}", frames, offset=i * 7) for i in range(count)]
    with MultiStream(model, feeds, options=options, batch_timeout_s=batch_timeout_s, lanes=lanes) as multi:
        feed_on_demand(feeds, multi)

        def total() -> int:
            return sum(s.rate.done for s in multi.streams)

        def wait_for(n: int) -> None:
            while total() < n:
                if multi.done:
                    raise CamError(f"the streams ended early: {multi.error}")
                time.sleep(0.005)

        wait_for(warmup)
        done0, t0, cpu0, calls0 = total(), time.perf_counter(), time.process_time(), len(multi.batch_sizes)
        per_stream0 = [s.rate.done for s in multi.streams]
        lat0 = [len(s.latency_ms) for s in multi.streams]
        wait_for(done0 + measured)
        done1, t1, cpu1 = total(), time.perf_counter(), time.process_time()
        sizes = list(multi.batch_sizes)[calls0:]
        latencies = [list(s.latency_ms)[n:] for s, n in zip(multi.streams, lat0)]
        per_stream = [s.rate.done - n for s, n in zip(multi.streams, per_stream0)]
    pooled = [v for values in latencies for v in values]
    return {
        "streams": count,
        "fps_total": (done1 - done0) / (t1 - t0),
        "fps_per_stream": [n / (t1 - t0) for n in per_stream],
        "latency_ms": median_p95(pooled),
        "latency_ms_per_stream": [median_p95(v) if v else {} for v in latencies],
        # CPU time of the whole process per explained frame: what batching saves, whatever else the machine runs
        "cpu_ms_per_frame": (cpu1 - cpu0) * 1000.0 / max(1, done1 - done0),
        "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "inference_threads": len(multi.lanes),
        "batch_sizes": {str(k): v for k, v in sorted(Counter(sizes).items())},
        "seconds": t1 - t0,
    }


def run_streams_bench(model_path: Path, counts: Sequence[int], devices: Sequence[str], source: str | None,
                      frames: int, warmup: int, batch_timeout_s: float, rounds: int = ROUNDS) -> dict:
    report: dict = {"config": {"model": str(model_path), "streams": list(counts), "devices": list(devices),
                               "source": source, "frames": frames, "warmup": warmup, "rounds": rounds,
                               "batch_timeout_ms": batch_timeout_s * 1000},
                    "environment": environment(), "results": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="realtime-cam-bench-") as tmp:
        clip = source or str(synthetic_video(Path(tmp) / "synthetic.mp4", 60))
        images = load_frames(clip, 60)
    for device in devices:
        try:
            model = CamModel(model_path, device=device)
        except DeviceError as exc:
            report["skipped"].append({"device": device, "why": str(exc)})
            log.info("skip %s: %s", device, exc)
            continue
        if device == "cuda" and model.provider != "CUDAExecutionProvider":
            report["skipped"].append({"device": device, "why": f"runs on {model.provider}"})
            continue
        method = "cam" if "cam" in model.methods else "gradcam"
        options = RunOptions(view=ViewState(method=method), live_source=True)
        for n in counts:
            model.batch_size(n)  # the runtime readied for this batch shape before timing
        # Where the loop runs several inference threads, the same count with one is measured too: the gain of
        # the lanes, in the same run.
        cases = [(n, None) for n in counts]
        cases += [(n, 1) for n in counts if inference_lanes(n, usable_cores(), model.provider) > 1]
        runs: dict[tuple, list[dict]] = {case: [] for case in cases}
        for r in range(rounds):  # the cases taken in turn, round after round: a busy spell hits them all
            for n, lanes in cases:
                log.info("[%s] round %d of %d: %d stream%s%s", device, r + 1, rounds, n, "s" * (n > 1),
                         "" if lanes is None else ", one inference thread")
                runs[n, lanes].append(bench_streams(model, images, n, frames, warmup, batch_timeout_s, options,
                                                    lanes))
        for case in sorted(cases, key=lambda c: (c[0], c[1] is not None)):
            report["results"].append(combine_rounds(runs[case], device, model.provider))
        base = next((r for r in report["results"] if r["device"] == device and r["streams"] == 1), None)
        for row in report["results"]:
            if row["device"] == device and base:
                row["vs_one_stream"] = row["fps_total"] / base["fps_total"]
                row["vs_one_stream_per_round"] = [a / b for a, b in zip(row["fps_total_per_round"],
                                                                         base["fps_total_per_round"])]
    return report


def combine_rounds(runs: Sequence[dict], device: str, provider: str) -> dict:
    """One count's rounds: the median round's figures (by total FPS), with every round's total kept."""
    ordered = sorted(runs, key=lambda r: r["fps_total"])
    row = dict(ordered[len(ordered) // 2])
    row.update(device=device, provider=provider, rounds=len(runs),
               fps_total_per_round=[r["fps_total"] for r in runs])
    return row


def format_streams_table(report: dict) -> str:
    lines = [f"{'device':6} {'streams':>7} {'threads':>7} {'total FPS':>9} {'per stream':>10} {'x 1 stream (rounds)':>22} "
             f"{'CPU ms/frame':>12} {'mean batch':>10} {'latency ms (median / p95)':>26}"]
    for r in report["results"]:
        lat = r["latency_ms"]
        ratio = f"{r['vs_one_stream']:.2f}" if "vs_one_stream" in r else "-"
        spread = r.get("vs_one_stream_per_round", [])
        if len(spread) > 1:
            ratio += f" ({min(spread):.2f}-{max(spread):.2f})"
        lines.append(f"{r['device']:6} {r['streams']:7d} {r['inference_threads']:7d} {r['fps_total']:9.1f} {r['fps_total'] / r['streams']:10.1f} "
                     f"{ratio:>22} {r['cpu_ms_per_frame']:12.2f} {r['mean_batch']:10.2f} {lat['median_ms']:17.1f} / {lat['p95_ms']:6.1f}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['device']}: {s['why']}")
    return "\n".join(lines)


def cmd_bench_streams(args: argparse.Namespace) -> int:
    from .paths import default_model_path
    from .sinks import check_output_path, write_json

    if args.json is not None:
        check_output_path(args.json, {".json"})
    model = (args.model or [default_model_path()])[0]
    if not Path(model).exists():
        raise CamError(f"model file not found: {model} (make one with `realtime-cam export`)")
    report = run_streams_bench(Path(model), args.streams, args.device, args.source, args.frames, args.warmup,
                               DEFAULT_BATCH_TIMEOUT_MS / 1000.0)
    print(format_streams_table(report))
    if args.json is not None:
        write_json(report, args.json)
        log.info("wrote %s", args.json)
    return 0
