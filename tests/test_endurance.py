"""scripts/endurance.py: the looping source re-opens exactly, and a short run leaks no threads, fds or memory.

The full 20,000-frame run is documented in docs/reliability-endurance.md; this is its short version.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, needs_shared, shared

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the script reads /proc (Linux)")


def _load_script():
    name = "realtime_cam_endurance_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "endurance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


endurance = _load_script()


def _small_clip(path: Path, frames: int, size_wh: tuple[int, int] = (160, 90)) -> Path:
    """The first ``frames`` frames of the shared bottle video, shrunk, as an .mp4."""
    cap = cv2.VideoCapture(str(shared("videos", "bottle-detection.mp4")))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size_wh)
    try:
        for _ in range(frames):
            ok, image = cap.read()
            assert ok
            writer.write(cv2.resize(image, size_wh, interpolation=cv2.INTER_AREA))
    finally:
        writer.release()
        cap.release()
    return path


def _count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        n = 0
        while cap.read()[0]:
            n += 1
        return n
    finally:
        cap.release()


@needs_shared
def test_looping_video_reopens_with_exact_count(tmp_path):
    clip = _small_clip(tmp_path / "clip.mp4", 30)
    loop = _count_frames(clip)
    assert loop == 30
    threads_before, fds_before = threading.active_count(), endurance.open_fds()
    wanted = 3 * loop + 7
    images = []
    with endurance.LoopingVideo(clip) as video:
        assert video.size_wh == (160, 90)
        for frame in video:
            images.append(frame.image_bgr)
            assert frame.index == len(images) - 1  # indices run on across openings
            if len(images) == wanted:
                break
        assert video.opens == 4
        assert video.loop_frames == loop
    assert len(images) == wanted
    for k in range(wanted - loop):  # each pass starts again from the first frame, decoded identically
        np.testing.assert_array_equal(images[k], images[k + loop])
    assert not np.array_equal(images[0], images[loop - 1])
    # breaking out closed the opening in use: its capture thread is joined and its file released
    assert threading.active_count() == threads_before
    assert endurance.open_fds() == fds_before


@needs_shared
def test_short_endurance_run_leaks_nothing(mnv2_int8_onnx, tmp_path):
    # 260-frame passes: no sample (every 300 frames) falls in a pass's last frames, where the capture
    # thread has already ended while the loop still drains its queue (one thread fewer, briefly).
    clip = _small_clip(tmp_path / "clip.mp4", 260)
    out, report_path = tmp_path / "out.mp4", tmp_path / "report.json"
    # In a process of its own: the test session's threads (its shared Ray's driver starts and ends gRPC threads
    # at any time) must not count as the run's; in the suite they once made the OS threads "grow" by -1.
    done = subprocess.run([
        sys.executable, str(ROOT / "scripts" / "endurance.py"),
        "--model", str(mnv2_int8_onnx), "--source", str(clip), "--frames", "1500", "--warmup", "300",
        "--every", "300", "--device", "cpu", "--output", str(out), "--json", str(report_path), "--quiet",
    ], capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc = done.returncode
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert rc == 0, report["failures"]
    assert report["passed"] and report["failures"] == []
    assert report["edge_samples"] == []
    assert report["frames"] == 1500
    assert report["loop_frames"] == 260 and report["opens"] == 6  # ceil(1500 / 260)
    assert [s["frame"] for s in report["samples"]] == [300, 600, 900, 1200, 1500]
    assert report["py_threads_growth"] == 0 and report["os_threads_growth"] == 0
    assert report["py_threads_max_growth"] == 0 and report["os_threads_max_growth"] == 0
    assert report["fds_growth"] == 0 and report["fds_max_growth"] == 0
    assert report["py_threads_after"] == report["py_threads_before"]
    assert report["fds_after"] == report["fds_before"]
    assert report["rss_growth_mb"] < 50.0  # generous: the 20,000-frame run grew 7-8.5 MB after warm-up
    assert _count_frames(out) == 1500
    assert report["output_mb"] == pytest.approx(out.stat().st_size / 1e6)


def _sample(frame: int, rss: float, threads: int = 4, fds: int = 11) -> object:
    return endurance.Sample(frame=frame, elapsed_s=frame / 100, rss_mb=rss, py_threads=threads,
                            os_threads=threads + 8, fds=fds, fps=100.0, output_mb=0.0)


def _summarize(samples):
    return endurance.summarize(
        samples, 500, 50.0, frames=samples[-1].frame, fps=100.0, opens=1, loop_frames=None, output_mb=0.0,
        py_threads_before=1, py_threads_after=1, os_threads_before=5, os_threads_after=6, fds_before=9,
        fds_after=9,
    )


def test_verdict_measures_from_the_warmup_sample():
    # growth before warm-up does not count; after it, last - warm-up does
    report = _summarize([_sample(250, 100.0), _sample(500, 200.0), _sample(1000, 260.0), _sample(1500, 249.9)])
    assert report.rss_warmup_mb == 200.0 and report.rss_growth_mb == pytest.approx(49.9)
    assert report.rss_max_growth_mb == pytest.approx(60.0)
    assert report.passed
    grown = _summarize([_sample(500, 200.0), _sample(1000, 250.0)])
    assert not grown.passed and "RSS grew 50.0 MB" in grown.failures[0]
    threads = _summarize([_sample(500, 200.0), _sample(1000, 200.0, threads=5)])
    assert not threads.passed and "threads grew" in threads.failures[0]
    fds = _summarize([_sample(500, 200.0), _sample(1000, 200.0, fds=12)])
    assert not fds.passed and "file descriptors" in fds.failures[0]
    with pytest.raises(ValueError, match="warm-up"):
        _summarize([_sample(250, 100.0), _sample(500, 100.0)])


def test_edge_samples_are_the_ones_at_a_pass_boundary():
    samples = [_sample(f, 200.0) for f in (500, 1000, 1190, 1189, 1180, 1177, 2379)]
    report = _summarize(samples)
    report = endurance.Report(**{**report.__dict__, "loop_frames": 1189})
    # frame 1190 is the second pass's first frame; 1189, 1180 are among the first pass's last 12
    assert endurance.edge_samples(report) == (1190, 1189, 1180, 2379)
