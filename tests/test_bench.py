"""`realtime-cam bench` runs, and its JSON holds what a reader needs (the speed itself is not asserted)."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import pytest
from conftest import needs_shared, shared

from realtime_cam import bench
from realtime_cam.bench import source_revision
from realtime_cam.cams import METHODS
from realtime_cam.cli import main


@needs_shared
def test_bench_writes_a_complete_report_and_a_chart(mnv2_int8_onnx, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--model", str(mnv2_int8_onnx), "--model", str(mnv2_int8_onnx),
                 "--source", str(shared("videos", "bottle-detection.mp4")), "--device", "cpu,cuda",
                 "--frames", "30", "--warmup", "5", "--json", str(out_json), "--plot", str(out_png)]) == 0
    report = json.loads(out_json.read_text())
    env = report["environment"]
    for key in ("realtime_cam", "python", "numpy", "opencv", "onnxruntime", "onnxruntime_providers", "cpu",
                "cpu_count", "usable_cores", "opencv_threads"):
        assert key in env, key
    assert "load_average_at_start" in env or not hasattr(os, "getloadavg")
    assert env.get("git") == source_revision()  # the commit, when the code runs from a checkout
    assert report["config"]["frames"] == 30 and report["config"]["source_size_wh"] == [640, 360]
    rows = [r for r in report["results"] if r["device"] == "cpu"]
    assert len(rows) == 2
    for row in rows:
        assert row["provider"] == "CPUExecutionProvider"
        for part in ("inference", "pipeline", "file_to_file"):
            assert row[part]["fps"] > 0
        assert {"median_ms", "p95_ms"} <= set(row["inference"])
        stages = {**row["pipeline"]["stages"], **row["file_to_file"]["stages"]}
        for stage in ("preprocess", "inference", "cam", "overlay", "decode", "encode"):
            assert {"median_ms", "p95_ms"} <= set(stages[stage]), stage
        assert row["file_to_file"]["frames"] == 30
        assert 0 < row["ratios"]["file_to_file_vs_inference"]
        # files are batched as `run` batches them; inference alone is also measured at that batch
        assert row["batch"] == report["config"]["batch"] == 4
        assert row["inference_batched"]["fps"] > 0 and row["inference_batched"]["batch"] == 4
        assert 0 < row["ratios"]["file_to_file_vs_inference_batched"]
        # inference with inputs and outputs on the device (IO binding), at the batch: what the copies cost
        resident = row["inference_resident"]
        assert resident["fps"] > 0 and resident["plain_fps"] > 0 and resident["batch"] == 4
        assert row["ratios"]["inference_vs_resident"] == pytest.approx(resident["plain_fps"] / resident["fps"])
        # where the CPU went: the helper threads by role, and the rest (inference and the loop's thread)
        cpu = row["file_to_file"]["cpu_ms_per_frame"]
        assert {"total", "inference_and_loop", "capture", "preprocess", "render", "encode"} <= set(cpu)
        assert cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"))
        assert all(v > 0 for v in cpu.values())
        assert row["inference"]["cpu_ms_per_frame"] > 0
        # video files by codec: OpenCV's capture and mp4v writer against PyAV's decoder and H.264, in one run
        codecs = row["codecs"]
        assert set(codecs["decode_ms"]) == {"opencv", "pyav"}
        assert codecs["encode_ms"]["pyav libx264"]["codec"] == "libx264"
        assert codecs["encode_ms"]["opencv mp4v"]["codec"] == "mp4v"
        assert all(v["mean_ms"] > 0 and v["bytes"] > 0 for v in codecs["encode_ms"].values())
        f2f = codecs["file_to_file"]
        assert f2f["pyav libx264"]["fps"] > 0 and f2f["opencv mp4v"]["fps"] > 0
        assert row["ratios"]["file_to_file_h264_vs_mp4v"] == pytest.approx(
            f2f["pyav libx264"]["fps"] / f2f["opencv mp4v"]["fps"])
    # the same model twice: fidelity must be perfect
    fid = rows[1]["fidelity_vs_first"]
    assert fid["top1_agreement_pct"] == 100.0 and fid["map_r_median"] == pytest.approx(1.0)
    if not any(r["device"] == "cuda" for r in report["results"]):
        assert any(s["device"] == "cuda" for s in report["skipped"])
    pytest.importorskip("torchvision")
    seed = report["seed_baseline"]["cpu"]
    assert seed["fps"] > 0 and "pipeline_vs_seed" in rows[0]["ratios"]
    assert cv2.imread(str(out_png)) is not None
    table = capsys.readouterr().out
    assert "infer FPS" in table and "infer@batch" in table and "seed (torch eager)" in table
    assert "file to file FPS by reader and encoder: opencv mp4v" in table and "(H.264 / mp4v " in table


def test_bench_without_the_seed_baseline_never_imports_torch(tiny_onnx, tmp_path):
    code = ("import sys; from realtime_cam.cli import main; "
            f"assert main(['bench', '--model', {str(tiny_onnx)!r}, '--device', 'cpu', '--frames', '10', "
            "'--warmup', '2', '--no-seed']) == 0; "
            "assert 'torch' not in sys.modules, 'bench imported torch'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_too_few_frames_for_the_batch_is_one_line(tiny_onnx, capsys):
    assert main(["bench", "--model", str(tiny_onnx), "--device", "cpu", "--frames", "2", "--warmup", "1",
                 "--no-seed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("realtime-cam: error: --frames 2 is too few") and "--frames 11 or more" in err


def test_bench_frame_by_frame_has_no_batched_figures(tiny_onnx, tmp_path, capsys):
    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(tiny_onnx), "--device", "cpu", "--frames", "6", "--warmup", "2",
                 "--batch", "1", "--no-seed", "--json", str(out_json)]) == 0
    row = json.loads(out_json.read_text())["results"][0]
    assert row["batch"] == 1 and "inference_batched" not in row
    assert set(row["ratios"]) == {"file_to_file_vs_inference", "inference_vs_resident", "file_to_file_h264_vs_mp4v"}
    assert row["inference_resident"]["batch"] == 1
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith(tiny_onnx.name))
    assert line.split()[2:5] == ["1", row["inference"]["fps"].__format__(".1f"), "-"]


def test_io_binding_that_fails_is_reported_and_the_rest_still_runs(tiny_onnx, tmp_path, capsys, monkeypatch):
    def refuse(model, batches):
        raise RuntimeError("no binding on this provider\nsecond line")

    monkeypatch.setattr(bench, "resident_runner", refuse)
    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(tiny_onnx), "--device", "cpu", "--frames", "6", "--warmup", "2",
                 "--batch", "1", "--no-seed", "--json", str(out_json)]) == 0
    row = json.loads(out_json.read_text())["results"][0]
    assert row["inference_resident"] == {"error": "no binding on this provider"}
    assert "inference_vs_resident" not in row["ratios"] and row["file_to_file"]["fps"] > 0
    captured = capsys.readouterr()
    assert "(IO binding), 1 per call: did not run: no binding on this provider" in captured.out  # the table
    assert "IO binding did not run (no binding on this provider)" in captured.err                # progress


def test_bench_json_names_the_commit_only_when_the_code_is_tracked(tmp_path):
    """environment.git says which code made the figures; an installed copy inside a repository names none."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    package = repo / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")

    # the user's own git configuration (signing, hooks) must not take part
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True, env=env).stdout.strip()

    assert source_revision(package) is None  # not a repository at all
    git("init", "-q")
    assert source_revision(package) is None  # in a repository, but the package's files are not tracked
    git("add", "pkg/__init__.py")
    git("commit", "-q", "-m", "first")
    assert source_revision(package) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (package / "scratch.py").write_text("")  # an untracked file does not make the code differ from the commit
    assert source_revision(package)["dirty"] is False
    (package / "__init__.py").write_text("x = 2\n")
    assert source_revision(package)["dirty"] is True


def test_frames_that_would_not_fit_in_memory_are_one_line_before_decoding_them():
    from realtime_cam.bench import check_frames_fit_in_memory
    from realtime_cam.errors import CamError

    frame = 640 * 360 * 3
    check_frames_fit_in_memory(320, frame, available=8 * 2**30)  # 70 MB of 8 GiB: fine
    with pytest.raises(CamError, match="use a smaller --frames"):
        check_frames_fit_in_memory(20_020, frame, available=8 * 2**30)  # 13.8 GB


@needs_shared
def test_bench_refuses_too_many_frames_after_decoding_only_the_first(monkeypatch):
    from realtime_cam import bench
    from realtime_cam.errors import CamError

    monkeypatch.setattr(bench, "available_memory", lambda: 100 * 2**20)  # 100 MiB: 150 frames of 640x360
    decoded = []
    real_open = bench.open_source

    class Counted:  # the source, counting the frames taken from it
        def __init__(self, spec):
            self.source = real_open(spec)
            self.live = self.source.live

        def __enter__(self):
            self.source.__enter__()
            return self

        def __exit__(self, *exc):
            return self.source.__exit__(*exc)

        def __iter__(self):
            for frame in self.source:
                decoded.append(frame)
                yield frame

    monkeypatch.setattr(bench, "open_source", Counted)
    with pytest.raises(CamError, match="use a smaller --frames"):
        bench.load_frames(str(shared("videos", "bottle-detection.mp4")), 1000)
    assert len(decoded) == 1


def test_bench_runs_a_model_whose_head_has_no_cam(tmp_path, capsys):
    """A 'graph' head (explained with in-graph gradients): bench times it with gradcam, and compares maps of
    one kind in its fidelity row."""
    import onnx
    from synthetic import tiny_contract_model

    from realtime_cam.export.from_onnx import rewrite_onnx_classifier

    plain = tmp_path / "plain.onnx"
    model = tiny_contract_model()
    del model.graph.output[1:]  # the logits only: an ordinary classifier, whose map --features names
    onnx.save(model, str(plain))
    graph_model = tmp_path / "graph.onnx"
    rewrite_onnx_classifier(plain, graph_model, features="features", log=lambda _: None)
    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(graph_model), "--model", str(graph_model), "--device", "cpu",
                 "--frames", "8", "--warmup", "2", "--batch", "2", "--no-seed", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert rows[0]["pipeline"]["fps"] > 0 and rows[1]["fidelity_vs_first"]["map_r_median"] > 0.99


def test_bench_reports_each_methods_cpu_per_frame_against_cams(tiny_onnx, tmp_path, capsys):
    """eigencam cost 3-7x cam's CPU when numpy's BLAS threads fought inference; bench now shows each method's
    cost (the figure, not a timing assertion) and says why the seed baseline is missing."""
    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(tiny_onnx), "--device", "cpu", "--frames", "10", "--warmup", "2",
                 "--batch", "1", "--no-seed", "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    methods = report["results"][0]["methods"]
    assert methods["reference"] == "cam" and set(methods["results"]) == set(METHODS)
    for figures in methods["results"].values():
        assert figures["cpu_ms_per_frame"] > 0
        assert figures["cpu_ratio"] == pytest.approx(figures["cpu_ms_per_frame"]
                                                     / methods["results"]["cam"]["cpu_ms_per_frame"])
    assert methods["results"]["cam"]["cpu_ratio"] == 1.0
    assert report["seed_baseline_left_out"] == {"cpu": "--no-seed"} and "seed_baseline" not in report
    table = capsys.readouterr().out
    assert "CPU ms per frame by method" in table and "eigencam" in table
    assert "seed baseline left out: --no-seed (cpu)" in table
