"""`realtime-cam bench`: frames per second on CPU vs GPU, measured in one run, reported as ratios.

For each model and each device that really runs it: inference alone, the whole loop on frames held in
memory, and file to file (decode thread -> loop -> encode thread), also by codec (OpenCV's mp4v against
PyAV's H.264, see ``codec_bench``); per-stage median/p95; each map method's
CPU time per frame against cam's; and, when torch is installed, the seed approach (PyTorch eager forward +
numpy CAM + OpenCV overlay) as a baseline (the report says when it was left out, and why).
Models after the first are also compared with the first for fidelity (top-1 agreement, map Pearson r).
FPS over N frames is (N - 1) / (t_last - t_first), after a warm-up.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from . import __version__, grad_bench
from .codec_bench import bench_codecs, format_codecs
from .contract import FEATURES, LOGITS
from .errors import CamError, DeviceError
from .fidelity import fidelity
from .model import CamModel
from .pipeline import DEFAULT_BATCH, RunOptions, run_loop
from .providers import CUDA
from .sinks import NullSink, VideoFileSink
from .sources import CaptureSource, Frame, open_source
from .threads import HELPER_CPU, usable_cores
from .timing import fps_of, median_p95
from .view import ViewState

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        models: contract files; the first is the reference for fidelity.
        source: a video file the frames come from (None: a synthetic 640x360 clip made for the run).
        devices: "cpu" and/or "cuda"; a device that cannot run is reported as skipped.
        frames: frames per measurement (after the warm-up).
        warmup: frames run before each measurement and not timed.
        seed_baseline: also time the seed approach (needs torch; left out without it, and the report
            says so).
        batch: frames per inference call in the loop and file measurements, as ``run`` batches a file;
            inference alone is measured both frame by frame and at this batch.
    """

    models: tuple[Path, ...]
    source: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    frames: int = 300
    warmup: int = 20
    seed_baseline: bool = True
    batch: int = DEFAULT_BATCH
    grad_reference: str | None = None  # a torchvision arch: time pytorch-grad-cam's GradCAM on it (grad_bench.py)


def synthetic_video(path: Path, frames: int = 120, size_wh: tuple[int, int] = (640, 360)) -> Path:
    """A small clip of moving shapes, for a benchmark with no --source."""
    w, h = size_wh
    with VideoFileSink(path, 30.0, size_wh) as sink:
        for i in range(frames):
            img = np.full((h, w, 3), 40, np.uint8)
            cv2.circle(img, (int(w * (0.2 + 0.6 * i / frames)), h // 2), h // 5, (30, 160, 230), -1)
            cv2.rectangle(img, (w // 10, h // 10), (w // 10 + h // 4, h // 10 + h // 4), (200, 200, 200), -1)
            sink.write(img)
    return path


def load_frames(source: str, count: int) -> list[np.ndarray]:
    """The first ``count`` frames of a video, looping it when it is shorter."""
    frames: list[np.ndarray] = []
    while len(frames) < count:
        before = len(frames)
        with open_source(source) as src:
            if src.live:
                raise CamError("bench needs a video file as --source (frames are replayed from memory)")
            for frame in src:
                if not frames:
                    check_frames_fit_in_memory(count, frame.image_bgr.nbytes)
                frames.append(frame.image_bgr)
                if len(frames) == count:
                    break
        if len(frames) == before:
            raise CamError(f"no frames in {source}")
    return frames


def available_memory() -> int | None:
    """Bytes of memory available to new allocations: Linux's MemAvailable, or less when a container's
    memory limit (cgroup v2) leaves less; None where neither is known."""
    known = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    known.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            known.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(known) if known else None


def check_frames_fit_in_memory(count: int, frame_bytes: int, available: int | None = None) -> None:
    """bench replays its frames from memory: refuse, in one line, a --frames that would not fit in half of it."""
    available = available_memory() if available is None else available
    needed = count * frame_bytes
    if available is not None and needed > available // 2:
        raise CamError(f"{count} frames (--frames and the warm-up) would take {needed / 2**30:.1f} GiB of memory "
                       f"({available / 2**30:.1f} GiB available); use a smaller --frames")


def check_enough_frames(frames: int, warmup: int, batches: Sequence[int]) -> None:
    """Refuse, in one line, a frame count too small for two timed inference calls at each batch size."""
    needed = max((math.ceil(warmup / b) + 2) * b - warmup for b in batches)
    if frames < needed:
        raise CamError(f"--frames {frames} is too few to time inference {max(batches)} frame(s) per call after a "
                       f"{warmup}-frame warm-up: use --frames {needed} or more")


def cpu_per_frame(process_seconds: float, helpers: dict[str, float], frames: int) -> dict[str, float]:
    """CPU milliseconds per frame: the whole process, each helper thread's role, and the rest.

    The rest ("inference_and_loop") is ONNX Runtime's threads and the loop's own thread.
    """
    per = 1000.0 / max(1, frames)
    out = {"total": process_seconds * per, "inference_and_loop": (process_seconds - sum(helpers.values())) * per}
    out.update({role: seconds * per for role, seconds in sorted(helpers.items())})
    return out


class _CpuMeter:
    """The process's and the helper threads' CPU time over a ``with`` block; ``per_frame(n)`` after it."""

    def __enter__(self) -> _CpuMeter:
        HELPER_CPU.take()  # drop what threads that ended earlier left there
        self._start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._seconds = time.process_time() - self._start
        self._helpers = HELPER_CPU.take()

    @property
    def seconds(self) -> float:
        return self._seconds

    def per_frame(self, frames: int) -> dict[str, float]:
        return cpu_per_frame(self._seconds, self._helpers, frames)


def bench_inference(model: CamModel, frames: list[np.ndarray], warmup: int, batch: int = 1) -> dict:
    """Inference alone on prepared inputs, ``batch`` frames per call: what the hardware and the runtime can do.

    FPS counts frames: (frames after the first call) / (time from the first call's end to the last one's);
    median/p95 are per call; CPU is the process's, per timed frame.
    """
    inputs, calls_warm = _batches(model, frames, warmup, batch)
    for x in inputs[:calls_warm]:
        model.forward(x)
    stamps, durations = [], []
    cpu0 = time.process_time()
    for x in inputs[calls_warm:]:
        t0 = time.perf_counter()
        model.forward(x)
        t1 = time.perf_counter()
        stamps.append(t1)
        durations.append((t1 - t0) * 1000.0)
    cpu_ms = (time.process_time() - cpu0) * 1000.0 / (len(stamps) * batch)
    return {"fps": fps_of(stamps) * batch, "batch": batch, **median_p95(durations), "cpu_ms_per_frame": cpu_ms}


def resident_runner(model: CamModel, batches: Sequence[np.ndarray]) -> Callable[[int], list]:
    """A runner that times the network without the copies in and out that ``CamModel.forward`` makes.

    The prepared batches are copied once onto the device that runs the model; ``run(i)`` then runs
    ``batches[i]`` through ONNX Runtime's IO binding with the outputs left on that device, waits for them
    and returns them (logits, features) as OrtValues there. That is the most IO binding could save over
    ``forward`` here: the map is computed on the host, so the loop itself needs the features copied back
    whatever the binding.
    """
    import onnxruntime as ort

    device = "cuda" if model.provider == CUDA else "cpu"
    on_device = [ort.OrtValue.ortvalue_from_numpy(batch, device, 0) for batch in batches]
    binding = model.session.io_binding()

    def run(index: int) -> list:
        binding.bind_ortvalue_input(model.input_name, on_device[index])
        for name in (LOGITS, FEATURES):  # bound anew: outputs kept from a call keep that call's batch size
            binding.bind_output(name, device, 0)
        model.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()

    return run


def bench_resident(model: CamModel, frames: list[np.ndarray], warmup: int, batch: int = 1) -> dict:
    """Inference with the inputs already on the model's device and the outputs left there (IO binding, see
    :func:`resident_runner`) against plain ``forward`` calls, which copy both ways: the most that
    binding could save.

    The two kinds of call take turns on the same batches, so that a machine that slows down or speeds up
    during the measurement moves both alike; FPS = frames / the calls' summed time, for each.
    """
    inputs, calls_warm = _batches(model, frames, warmup, batch)
    resident = resident_runner(model, inputs)
    plain_ms, resident_ms = [], []
    for index in range(len(inputs)):
        # Which kind goes first alternates too: the second call on a batch may find it in the CPU's cache.
        calls = ((plain_ms, lambda: model.forward(inputs[index])), (resident_ms, lambda: resident(index)))
        for times, call in calls if index % 2 == 0 else calls[::-1]:
            t0 = time.perf_counter()
            call()
            if index >= calls_warm:
                times.append((time.perf_counter() - t0) * 1000.0)
    frames_timed = len(plain_ms) * batch
    return {"fps": frames_timed * 1000.0 / sum(resident_ms), "batch": batch, **median_p95(resident_ms),
            "plain_fps": frames_timed * 1000.0 / sum(plain_ms)}


def _batches(model: CamModel, frames: list[np.ndarray], warmup: int, batch: int) -> tuple[list[np.ndarray], int]:
    """The frames as prepared inputs, ``batch`` per array (a last partial batch is dropped), and how many of
    those calls make up the warm-up; too few frames for two timed calls is a one-line error."""
    check_enough_frames(len(frames) - warmup, warmup, (batch,))
    inputs = [model.prepare_batch(frames[i:i + batch]) for i in range(0, len(frames) - batch + 1, batch)]
    return inputs, math.ceil(warmup / batch)


def bench_pipeline_memory(model: CamModel, frames: list[np.ndarray], warmup: int, options: RunOptions) -> dict:
    """The whole loop (preprocess, inference, CAM, overlay) on frames already in memory, output dropped."""
    run_loop(model, (Frame(i, f, 0.0) for i, f in enumerate(frames[:warmup])), sinks=[NullSink()], options=options)
    with _CpuMeter() as cpu:
        result = run_loop(model, (Frame(i, f, time.perf_counter()) for i, f in enumerate(frames[warmup:])),
                          sinks=[NullSink()], options=options)
    return {"fps": result.fps, "stages": result.stage_ms, "cpu_ms_per_frame": cpu.per_frame(result.frames)}


# The per-method measurement: this many frames for each method, in rounds that take the methods in turn, so
# that a machine that gets busier or quieter meanwhile moves every method alike.
METHOD_FRAMES = 100
METHOD_ROUNDS = 4


def bench_methods(model: CamModel, frames: list[np.ndarray], warmup: int, options: RunOptions) -> dict:
    """The process's CPU milliseconds per frame for each map method the model offers, the loop running on
    frames in memory, and as a ratio of the reference method's (``options.view.method``: cam, or gradcam
    for a head without CAM). At most METHOD_FRAMES frames each, after a short warm-up each."""
    reference = options.view.method
    order = [reference, *[m for m in model.methods if m != reference]]
    views = {m: replace(options, view=replace(options.view, method=m)) for m in order}
    timed = frames[warmup:warmup + METHOD_FRAMES]
    seconds, counted = dict.fromkeys(order, 0.0), dict.fromkeys(order, 0)

    def loop(method: str, images: list[np.ndarray]) -> int:
        frames_in = (Frame(i, image, 0.0) for i, image in enumerate(images))
        return run_loop(model, frames_in, sinks=[NullSink()], options=views[method]).frames

    for method in order:
        loop(method, frames[:min(warmup, 10)])
    size = -(-len(timed) // METHOD_ROUNDS)
    for round_ in range(METHOD_ROUNDS):
        part = timed[round_ * size:(round_ + 1) * size]
        for method in order if round_ % 2 == 0 else order[::-1]:
            if part:
                with _CpuMeter() as cpu:
                    counted[method] += loop(method, part)
                seconds[method] += cpu.seconds
    per_frame = {m: 1000.0 * seconds[m] / max(1, counted[m]) for m in order}
    results = {m: {"cpu_ms_per_frame": per_frame[m], "cpu_ratio": per_frame[m] / per_frame[reference]}
               for m in order}
    return {"reference": reference, "frames": counted[reference], "results": results}


def bench_file_to_file(model: CamModel, source: str, count: int, out_dir: Path, options: RunOptions) -> dict:
    """Source file -> loop -> mp4, as `realtime-cam run --no-display --output` does it.

    From the file's first frame, as a user's run starts (no warm-up: the model is already warm from the
    measurements before); a file shorter than ``count`` frames gives fewer.
    """
    out = out_dir / "bench-output.mp4"
    with _CpuMeter() as cpu, open_source(source) as src, VideoFileSink(out, src.fps, src.size_wh) as sink:
        result = run_loop(model, src, sinks=[sink], options=replace(options, max_frames=count))
        decode = list(src.decode_ms) if isinstance(src, CaptureSource) else []
    stages = dict(result.stage_ms)
    if decode:
        stages["decode"] = median_p95(decode)
    if sink.encode_ms:
        stages["encode"] = median_p95(list(sink.encode_ms))
    out.unlink(missing_ok=True)
    return {"fps": result.fps, "frames": result.frames, "stages": stages,
            "cpu_ms_per_frame": cpu.per_frame(result.frames)}


def seed_left_out() -> str | None:
    """Why the seed approach cannot run here (torch or torchvision missing or broken), or None when it can.

    It lives with the export step (realtime_cam.export.seed_baseline), the only part that uses torch.
    """
    try:
        from .export import seed_baseline  # noqa: F401 - imported to see whether torch imports
    except ImportError as exc:
        return f"{exc.name or 'torch'} is not installed"
    except Exception as exc:  # e.g. a torchvision built for another torch
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        return f"torch/torchvision do not import together ({first})"
    return None


def bench_seed(model: CamModel, frames: list[np.ndarray], device: str, warmup: int) -> dict | None:
    """The seed approach as a baseline (PyTorch), where :func:`seed_left_out` says it can run; None when the
    device is cuda and torch sees no GPU."""
    from .export.seed_baseline import time_seed_approach

    return time_seed_approach(model.info.input_size_hw, model.info.mean, model.info.std, frames, device, warmup)


def source_revision(package_dir: Path | None = None) -> dict | None:
    """The git commit the running code comes from, when it runs from a checkout (an editable install).

    Returns {"commit": sha, "dirty": whether tracked files differ from it (new, untracked files do not
    count)}, or None when the package's own files are not tracked by git (an installed wheel, even inside a
    repository; no git at all).
    """
    where = str(package_dir or Path(__file__).resolve().parent)
    # A GIT_DIR or GIT_WORK_TREE inherited from a hook would point git at another repository than `where`.
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}

    def git(*args: str) -> str:  # --no-optional-locks: `status` must not write the index during a benchmark
        return subprocess.run(["git", "--no-optional-locks", "-C", where, *args], capture_output=True, text=True,
                              timeout=10, check=True, env=env).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def environment() -> dict:
    """Versions, CPU model and thread counts: what a reader needs to compare two benchmark runs."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "realtime_cam": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "opencv": cv2.__version__, "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "opencv_threads": cv2.getNumThreads(), "platform": platform.platform(),
    }
    revision = source_revision()
    if revision is not None:  # which code made these figures
        env["git"] = revision
    if hasattr(os, "getloadavg"):  # other work on the machine when the run began (1, 5, 15 min averages)
        env["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    from importlib import metadata

    try:  # the version only: importing torch here would start its thread pools before ONNX Runtime is timed
        env["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    return env


def run_bench(config: BenchConfig, log: Log = print) -> dict:
    """Measure every (model, device) pair; returns the JSON-ready report."""
    report: dict = {"config": {"models": [str(m) for m in config.models], "source": config.source,
                               "devices": list(config.devices), "frames": config.frames,
                               "warmup": config.warmup, "batch": config.batch},
                    "environment": environment(), "results": [], "skipped": []}
    check_enough_frames(config.frames, config.warmup, (1, config.batch))  # before any work is done
    with tempfile.TemporaryDirectory(prefix="realtime-cam-bench-") as tmp:
        tmp_dir = Path(tmp)
        source = config.source or str(synthetic_video(tmp_dir / "synthetic.mp4", config.frames + config.warmup))
        frames = load_frames(source, config.frames + config.warmup)
        with open_source(source) as src:
            report["config"]["source_size_wh"] = list(src.size_wh)
        reference: CamModel | None = None
        for device in config.devices:
            ran = None
            for index, path in enumerate(config.models):
                try:
                    model = CamModel(path, device=device)
                except DeviceError as exc:
                    report["skipped"].append({"model": str(path), "device": device, "why": str(exc)})
                    log(f"skip {device}: {exc}")
                    break
                if device == "cuda" and model.provider != "CUDAExecutionProvider":
                    report["skipped"].append({"model": str(path), "device": device,
                                              "why": f"runs on {model.provider}"})
                    break
                name = Path(path).name
                log(f"[{device}] {name} on {model.provider}: inference only")
                row = {"model": str(path), "device": device, "provider": model.provider,
                       "source": model.info.source}
                row["inference"] = bench_inference(model, frames, config.warmup)
                batch = model.batch_size(config.batch)
                row["batch"] = batch
                if batch > 1:
                    log(f"[{device}] {name}: inference only, {batch} frames per call")
                    row["inference_batched"] = bench_inference(model, frames, config.warmup, batch)
                log(f"[{device}] {name}: inference only, inputs and outputs kept on the device (IO binding)")
                try:
                    row["inference_resident"] = bench_resident(model, frames, config.warmup, batch)
                except Exception as exc:  # a figure missing from the report, not a failed benchmark
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    row["inference_resident"] = {"error": reason[:300]}
                    log(f"[{device}] {name}: IO binding did not run ({reason[:300]})")
                # What run shows by default: CAM, or Grad-CAM for a model whose head has no CAM.
                method = "cam" if "cam" in model.methods else "gradcam"
                options = RunOptions(batch=batch, view=ViewState(method=method))
                log(f"[{device}] {name}: loop on frames in memory")
                row["pipeline"] = bench_pipeline_memory(model, frames, config.warmup, options)
                log(f"[{device}] {name}: loop on frames in memory with each map method")
                row["methods"] = bench_methods(model, frames, config.warmup, options)
                row["gradient_cost"] = grad_bench.gradient_cost(model, frames, config.warmup)
                if config.grad_reference:
                    row["gradcam_loop"] = grad_bench.gradcam_loop(model, frames, config.warmup, options)
                log(f"[{device}] {name}: file to file")
                row["file_to_file"] = bench_file_to_file(model, source, config.frames, tmp_dir, options)
                log(f"[{device}] {name}: video files: decode, encode and file to file by codec")
                row["codecs"] = bench_codecs(model, source, frames, config.frames, tmp_dir, options)
                row["ratios"] = {"file_to_file_vs_inference": row["file_to_file"]["fps"] / row["inference"]["fps"]}
                if "h264_vs_mp4v" in row["codecs"]:
                    row["ratios"]["file_to_file_h264_vs_mp4v"] = row["codecs"]["h264_vs_mp4v"]
                if batch > 1:
                    row["ratios"]["file_to_file_vs_inference_batched"] = (
                        row["file_to_file"]["fps"] / row["inference_batched"]["fps"])
                resident = row["inference_resident"]
                if "fps" in resident:  # what the copies in and out cost inference at this batch
                    row["ratios"]["inference_vs_resident"] = resident["plain_fps"] / resident["fps"]
                if index == 0:
                    reference = model
                elif reference is not None and reference.provider == model.provider:
                    log(f"[{device}] {name}: fidelity against {Path(config.models[0]).name}")
                    result = fidelity(reference, model, frames[:: max(1, len(frames) // 100)])
                    row["fidelity_vs_first"] = {k: v for k, v in result.items() if k not in ("top1_agree", "map_r")}
                report["results"].append(row)
                ran = model
            # After this device's models: importing torch starts thread pools that would disturb ORT's timings.
            if ran is not None:
                why = seed_left_out() if config.seed_baseline else "--no-seed"
                seed = None
                if why is None:
                    log(f"[{device}] seed approach (PyTorch eager + numpy CAM + OpenCV overlay)")
                    seed = bench_seed(ran, frames, device, config.warmup)
                    why = None if seed is not None else "torch sees no CUDA device"
                if seed is not None:
                    report.setdefault("seed_baseline", {})[device] = seed
                else:
                    report.setdefault("seed_baseline_left_out", {})[device] = why
                    if config.seed_baseline:
                        log(f"[{device}] seed approach left out: {why}")
            if ran is not None and config.grad_reference:
                log(f"[{device}] pytorch-grad-cam GradCAM loop on {config.grad_reference}")
                report.setdefault("grad_reference", {})[device] = grad_bench.grad_reference(
                    config.grad_reference, ran, frames, device, config.warmup)
            reference = None
        for row in report["results"]:
            seed = report.get("seed_baseline", {}).get(row["device"])
            if seed:
                row["ratios"]["pipeline_vs_seed"] = row["pipeline"]["fps"] / seed["fps"]
                row["ratios"]["file_to_file_vs_seed"] = row["file_to_file"]["fps"] / seed["fps"]
    return report


def format_table(report: dict) -> str:
    """A plain-text table of the report: one row per (model, device)."""
    head = ["model", "device", "batch", "infer FPS", "infer@batch", "loop FPS", "file FPS", "file/infer",
            "file/infer@batch", "loop/seed", "fidelity"]
    rows = [head]
    for r in report["results"]:
        fid = r.get("fidelity_vs_first")
        batched = r.get("inference_batched")
        ratios = r["ratios"]
        rows.append([
            Path(r["model"]).name, r["device"], str(r.get("batch", 1)), f"{r['inference']['fps']:.1f}",
            f"{batched['fps']:.1f}" if batched else "-", f"{r['pipeline']['fps']:.1f}",
            f"{r['file_to_file']['fps']:.1f}", f"{ratios['file_to_file_vs_inference']:.2f}",
            f"{ratios['file_to_file_vs_inference_batched']:.2f}" if batched else "-",
            f"{ratios['pipeline_vs_seed']:.2f}" if "pipeline_vs_seed" in ratios else "-",
            f"top1 {fid['top1_agreement_pct']:.0f}% r {fid['map_r_median']:.3f}" if fid else "-",
        ])
    for device, seed in report.get("seed_baseline", {}).items():
        rows.append(["seed (torch eager)", device, "1", "-", "-", f"{seed['fps']:.1f}", "-", "-", "-", "1.00", "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    left_out: dict[str, list[str]] = {}
    for device, why in report.get("seed_baseline_left_out", {}).items():
        left_out.setdefault(why, []).append(device)
    lines += [f"seed baseline left out: {why} ({', '.join(devices)})" for why, devices in left_out.items()]
    stage_lines = []
    for r in report["results"]:
        stages = {**r["pipeline"]["stages"], **{k: v for k, v in r["file_to_file"]["stages"].items()
                                                 if k in ("decode", "encode")}}
        parts = [f"{k} {v['median_ms']:.2f}/{v['p95_ms']:.2f}" for k, v in stages.items() if k != "wait"]
        stage_lines.append(f"  {Path(r['model']).name} [{r['device']}] ms median/p95: " + ", ".join(parts))
        methods = r.get("methods")
        if methods:
            stage_lines.append(
                f"  {Path(r['model']).name} [{r['device']}] CPU ms per frame by method, loop "
                f"(x {methods['reference']}'s): "
                + ", ".join(f"{m} {v['cpu_ms_per_frame']:.2f} ({v['cpu_ratio']:.2f})"
                            for m, v in methods["results"].items()))
        cpu = r["file_to_file"].get("cpu_ms_per_frame")
        if cpu:
            stage_lines.append(f"  {Path(r['model']).name} [{r['device']}] CPU ms per frame, file to file: "
                               + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        if r.get("codecs"):
            stage_lines += format_codecs(Path(r["model"]).name, r["device"], r["codecs"])
        resident = r.get("inference_resident")
        if resident:
            stage_lines.append(
                f"  {Path(r['model']).name} [{r['device']}] inference with inputs and outputs on the device "
                f"(IO binding), {resident.get('batch', r.get('batch', 1))} per call: "
                + (f"{resident['fps']:.1f} FPS, plain calls in turn with them {resident['plain_fps']:.1f} "
                   f"({r['ratios']['inference_vs_resident']:.2f} of it)"
                   if "fps" in resident else f"did not run: {resident['error']}"))
    return "\n".join(lines + ["", "per stage:"] + stage_lines + grad_bench.table_lines(report))


def plot_report(report: dict, path: Path) -> None:
    """A horizontal bar chart of FPS per (model, device, measurement), drawn with OpenCV."""
    bars = []
    for r in report["results"]:
        label = f"{Path(r['model']).stem} [{r['device']}]"
        bars.append((f"{label} inference", r["inference"]["fps"], (200, 120, 40)))
        if "inference_batched" in r:
            bars.append((f"{label} inference, batch {r['batch']}", r["inference_batched"]["fps"], (150, 90, 30)))
        bars += [(f"{label} loop", r["pipeline"]["fps"], (60, 170, 60)),
                 (f"{label} file-to-file", r["file_to_file"]["fps"], (40, 140, 230))]
    for device, seed in report.get("seed_baseline", {}).items():
        bars.append((f"seed torch eager [{device}]", seed["fps"], (120, 120, 120)))
    if not bars:
        raise CamError("nothing was measured: no chart to draw")
    row_h, left, width = 30, 360, 1000
    img = np.full((row_h * len(bars) + 70, width, 3), 255, np.uint8)
    cv2.putText(img, "realtime-cam bench: frames per second", (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2,
                cv2.LINE_AA)
    top = max(v for _, v, _ in bars)
    for i, (label, value, colour) in enumerate(bars):
        y = 50 + i * row_h
        cv2.putText(img, label, (10, y + 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        length = int((width - left - 90) * value / top)
        cv2.rectangle(img, (left, y + 4), (left + length, y + row_h - 4), colour, -1)
        cv2.putText(img, f"{value:.1f}", (left + length + 6, y + 19), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise CamError(f"cannot write the chart {path}")


