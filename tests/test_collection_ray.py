"""Collections on Ray: a local Ray with 2 CPUs started once per session (conftest's local_ray), and a
two-node cluster (ray.cluster_utils) for placement. Outputs equal running each file alone; a worker killed
mid-file loses nothing; evaluate through Ray equals the in-process numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from collection_media import decoded, partials, write_clip
from conftest import ROOT, needs_shared, shared

from realtime_cam.cli import build_parser, cmd_evaluate, main
from realtime_cam.collection import discover
from realtime_cam.collection.results import read_table

pytest.importorskip("ray.data")


def test_shared_videos_and_images_on_ray_equal_each_file_run_alone(local_ray, mnv2_int8_onnx, tmp_path, capsys):
    listing = tmp_path / "set.txt"
    listing.write_text("\n".join([str(shared("videos")), str(shared("images", "darknet_dog.jpg")),
                                  str(shared("images", "skimage_coffee.png"))]) + "\n")
    out = tmp_path / "out"
    common = ["--model", str(mnv2_int8_onnx), "--no-display", "--max-frames", "6", "--box", "--device", "cpu"]
    assert main(["run", "--source", str(listing), "--output", str(out), "--workers", "2", *common]) == 0
    err = capsys.readouterr().err
    assert "5 file(s) explained (20 frames)" in err and "Ray, 2 worker(s)" in err
    rows = read_table(out / "results.parquet")
    for item in discover(str(listing)):
        alone = tmp_path / "alone" / item.output_rel
        alone.parent.mkdir(parents=True, exist_ok=True)
        assert main(["run", "--source", item.path, "--output", str(alone), *common]) == 0
        mine, theirs = decoded(out / item.output_rel), decoded(alone)
        assert len(mine) == len(theirs) == (6 if item.kind == "video" else 1)
        assert all((a == b).all() for a, b in zip(mine, theirs)), item.rel
        assert [r["frame"] for r in rows if r["file"] == item.rel] == list(range(len(mine)))
    assert {item.output_rel for item in discover(str(listing))} == {
        "videos/vtest.mp4", "videos/car-detection.mp4", "videos/bottle-detection.mp4", "images/darknet_dog.jpg",
        "images/skimage_coffee.png"}
    assert not partials(out)


def _holder_of(folder: Path) -> int | None:
    """The pid of a process (not this one) with a temporary output file under ``folder`` open."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(folder)) and ".partial" in target:
                    return int(pid)
        except OSError:
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the worker through /proc")
def test_a_worker_killed_mid_file_loses_nothing_and_a_second_run_does_nothing_again(local_ray, tiny_onnx,
                                                                                       tmp_path, capsys):
    root = tmp_path / "in"
    for i in range(4):
        write_clip(root / f"clip-{i}.mp4", frames=240, size_wh=(320, 240))
    out = tmp_path / "out"
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            pid = _holder_of(out)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        code = main(["run", "--model", str(tiny_onnx), "--source", str(root), "--output", str(out), "--no-display",
                     "--workers", "2"])
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was caught writing a file"
    assert code == 0
    assert "4 file(s) explained (960 frames)" in capsys.readouterr().err
    summary = read_table(out / "summary.parquet")
    assert {s["status"] for s in summary} == {"ok"} and killed[0] not in {s["pid"] for s in summary}
    for i in range(4):
        assert len(decoded(out / f"clip-{i}.mp4")) == 240
    assert len(read_table(out / "results.parquet")) == 960
    assert not partials(out)
    # Run again: everything is complete, nothing is redone.
    assert main(["run", "--model", str(tiny_onnx), "--source", str(root), "--output", str(out), "--no-display",
                 "--workers", "2"]) == 0
    assert "0 file(s) explained (0 frames), 4 skipped as complete" in capsys.readouterr().err


@pytest.fixture
def two_node_cluster(local_ray):
    """A second Ray, of two nodes with one CPU each, the second declaring a GPU (the CPU provider runs it)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster, cluster.head_node.node_id, gpu_node.node_id
    cluster.shutdown()


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    """The command in a process of its own (it joins another Ray than this test process's)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "realtime_cam", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_on_a_cluster_files_spread_over_the_nodes_and_a_gpu_worker_lands_on_the_gpu_node(two_node_cluster,
                                                                                         tiny_onnx, tmp_path):
    cluster, cpu_node, gpu_node = two_node_cluster
    assert cluster.address.startswith("127.0.0.1:")
    root = tmp_path / "in"
    for i in range(6):
        write_clip(root / f"clip-{i}.mp4", frames=60)
    spread = _run_cli("run", "--model", str(tiny_onnx), "--source", str(root), "--output", str(tmp_path / "a"),
                      "--no-display", "--ray-address", cluster.address, "--workers", "2")
    assert spread.returncode == 0, spread.stderr
    nodes = {s["node"] for s in read_table(tmp_path / "a" / "summary.parquet")}
    assert nodes == {cpu_node, gpu_node}
    on_gpu = _run_cli("run", "--model", str(tiny_onnx), "--source", str(root), "--output", str(tmp_path / "b"),
                      "--no-display", "--ray-address", cluster.address, "--workers", "1", "--gpus-per-worker", "1")
    assert on_gpu.returncode == 0, on_gpu.stderr
    assert "and 1 GPU" in on_gpu.stderr
    summary = read_table(tmp_path / "b" / "summary.parquet")
    assert len(summary) == 6 and {s["node"] for s in summary} == {gpu_node}


def test_evaluate_through_ray_equals_the_in_process_numbers(local_ray, mnv2_int8_onnx, tmp_path, capsys):
    folder = shared("imagenet-val-20")
    docs = {}
    for name, extra in (("here", []), ("ray", ["--workers", "2"])):
        args = build_parser().parse_args([
            "evaluate", "--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes",
            str(folder / "annotations.csv"), "--json", str(tmp_path / f"{name}.json"), "--save-dir",
            str(tmp_path / name), "--device", "cpu", *extra])
        assert cmd_evaluate(args) == 0
        docs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        docs[name].pop("seconds")
    assert docs["ray"] == docs["here"]
    assert docs["here"]["images"] == 20
    here = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert here == sorted(p.name for p in (tmp_path / "ray").iterdir()) and len(here) == 20
    for name in here:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()


def test_bench_collection_reports_each_runner_and_rays_overhead(local_ray, tiny_onnx, tmp_path, capsys):
    for i in range(3):
        write_clip(tmp_path / "in" / f"clip-{i}.mp4", frames=4)
    out = tmp_path / "bench.json"
    assert main(["bench", "--collection", str(tmp_path / "in"), "--model", str(tiny_onnx), "--workers", "2",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["runner"] for r in report["results"]] == ["in-process", "ray-1", "ray-1-of-1-cpu", "ray-2"]
    assert all(r["files"] == 3 and r["frames"] == 12 and r["files_per_s"] > 0 for r in report["results"])
    assert {"ray_startup_s", "ray_data_first_run_s", "ray_overhead_fixed_s", "ray_overhead_per_file_s",
            "speedup_n_over_1", "speedup_n_over_1_cpu"} <= set(report)
    assert "commit" in report["environment"].get("git", {"commit": ""})
    table = capsys.readouterr().out
    assert "2 workers vs 1 worker of 1 CPU" in table and "Ray Data's first run" in table


def test_the_embedded_ray_leaves_no_process_behind(tiny_onnx, tmp_path):
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rcray", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        write_clip(tmp_path / "in" / "clip.mp4", frames=3)
        done = subprocess.run(
            [sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx), "--source", str(tmp_path / "in"),
             "--output", str(tmp_path / "out"), "--no-display", "--workers", "1"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                              "RAY_TMPDIR": ray_tmp})
        assert done.returncode == 0, done.stderr
        assert "Ray, 1 worker(s)" in done.stderr
        assert any(Path(ray_tmp).iterdir()), "the command's Ray did not use RAY_TMPDIR"
        deadline = time.monotonic() + 10
        while True:
            left = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:  # every process of that Ray inherited the variable (workers rename themselves "ray::...")
                    if f"RAY_TMPDIR={ray_tmp}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                        left.append(pid)
                except OSError:
                    continue
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not left, f"processes of the command's Ray still running: {left}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@needs_shared
def test_ctrl_c_during_evaluate_on_ray_writes_what_was_scored_marked_partial(mnv2_int8_onnx, tmp_path):
    """As in-process (test_evaluate_faults): the rows whose images came back before Ctrl-C are reported, marked
    partial, exit 130; it used to end with no report."""
    import shutil
    import tempfile

    source = shared("imagenet-val-20")
    rows = (source / "annotations.csv").read_text().splitlines()
    folder = tmp_path / "images"  # the 20 images 8 times over under other names: 160 Ray tasks, time to stop
    folder.mkdir()
    many = [rows[0]]
    for k in range(8):
        for name in sorted({row.split(",")[0] for row in rows[1:]}):
            (folder / f"{k}-{name}").symlink_to(source / name)
        many += [f"{k}-{row}" for row in rows[1:]]
    csv = tmp_path / "many.csv"
    csv.write_text("\n".join(many) + "\n")
    out, overlays = tmp_path / "r.json", tmp_path / "overlays"
    ray_tmp = tempfile.mkdtemp(prefix="rcray", dir="/tmp")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "realtime_cam", "evaluate", "--model", str(mnv2_int8_onnx), "--images",
             str(folder), "--boxes", str(csv), "--device", "cpu", "--json", str(out), "--save-dir", str(overlays),
             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp})
        deadline = time.monotonic() + 180
        while not (overlays.is_dir() and len(list(overlays.iterdir())) >= 10) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # their results reach the command
        os.kill(proc.pid, signal.SIGINT)
        stdout, err = proc.communicate(timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and 0 < doc["images"] < 160
    assert f"wrote {out} (partial: interrupted)" in err
    assert "interrupted: these figures cover only the" in stdout
