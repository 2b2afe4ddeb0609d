"""Bad input, faults and interruptions: a one-line error and a non-zero exit, or graceful recovery.

docs/reliability.md lists what was tried and what happens; each row points at a test here or in
test_sources.py / test_cli.py / test_model.py / test_export_torchvision.py.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import onnx
import pytest
from conftest import needs_shared, shared
from mjpeg_server import MjpegServer
from synthetic import photo, write_photo

from realtime_cam import CamModel
from realtime_cam.cli import main
from realtime_cam.errors import ModelError, SinkError, SourceError
from realtime_cam.pipeline import RunOptions, run_loop
from realtime_cam.sinks import VIDEO_CODECS, Sink, VideoFileSink
from realtime_cam.sources import open_source


def one_line_error(capsys, code, argv):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("realtime-cam: error: ")
    return last


def frame_count(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n


# ----------------------------------------------------------------------------- sources
@needs_shared
def test_truncated_mp4_ends_cleanly_with_what_could_be_decoded(mnv2_int8_onnx, tmp_path, capsys):
    data = shared("videos", "car-detection.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.mp4"
    code = main(["run", "--model", str(mnv2_int8_onnx), "--source", str(cut), "--output", str(out), "--no-display"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:   # the index is at the front: the first half decodes, then the file ends
        assert 0 < frame_count(out) < 377
    else:           # the index was in the cut-off half: nothing can be decoded
        assert code == 2 and "as a video" in err


def test_zero_frame_video_is_an_error(tmp_path):
    path = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    writer.release()
    with pytest.raises(SourceError):
        open_source(str(path))


def test_url_that_refuses_is_an_error_quickly():
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="stream http://127.0.0.1:9/"):
        open_source("http://127.0.0.1:9/cam.mjpg")
    assert time.monotonic() - t0 < 30


@needs_shared
def test_stream_that_drops_out_is_reconnected(mnv2_int8_onnx, tmp_path):
    out = tmp_path / "live.avi"
    with MjpegServer(shared("videos", "vtest.avi"), fps=60, stop_after=15) as server:
        assert main(["run", "--model", str(mnv2_int8_onnx), "--source", server.url, "--output", str(out),
                     "--no-display", "--max-frames", "40", "--reconnect", "5"]) == 0
        assert server.connections >= 3          # 15 frames per connection: it came back twice at least
    assert frame_count(out) >= 40               # live: written in real time, so gaps repeat frames


@needs_shared
def test_stream_that_is_gone_gives_up_after_n_tries(mnv2_int8_onnx, tmp_path, capsys):
    out = tmp_path / "live.avi"
    with MjpegServer(shared("videos", "vtest.avi"), fps=60, stop_after=10, max_connections=1) as server:
        line = one_line_error(capsys, 2, ["run", "--model", str(mnv2_int8_onnx), "--source", server.url,
                                          "--output", str(out), "--no-display", "--reconnect", "2"])
    assert "stopped delivering frames; gave up after 2 reconnect tries" in line
    assert frame_count(out) > 0                 # what came before the drop is kept, playable


@pytest.mark.parametrize("name,make", [
    ("gray.png", lambda img: cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)),
    ("bgra.png", lambda img: cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)),
    ("deep.png", lambda img: img.astype(np.uint16) * 257),
    ("tiny.png", lambda img: img[:1, :1]),
    ("8k.jpg", lambda img: cv2.resize(img, (7680, 4320))),
])
def test_unusual_frames_are_explained(tiny_onnx, tmp_path, name, make):
    image = make(photo((451, 300)))
    src = tmp_path / name
    assert cv2.imwrite(str(src), image)
    out = tmp_path / f"out-{name}"
    assert main(["run", "--model", str(tiny_onnx), "--source", str(src), "--output", str(out),
                 "--no-display", "--box"]) == 0
    result = cv2.imread(str(out))
    assert result.shape[:2] == image.shape[:2] and result.shape[2] == 3


# ----------------------------------------------------------------------------- models
def _edited_contract(src, tmp_path, edit):
    model = onnx.load(str(src))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def test_label_count_that_does_not_match_the_head(tiny_onnx, tmp_path):
    def drop_a_label(model):
        for p in model.metadata_props:
            if p.key == "realtime_cam.labels":
                p.value = json.dumps(json.loads(p.value)[:-1])

    with pytest.raises(ModelError, match="999 labels but its head has 1000 classes"):
        CamModel(_edited_contract(tiny_onnx, tmp_path, drop_a_label))


def test_features_of_the_wrong_rank(tmp_path):
    # A model whose 'features' are the pooled vector, not the map: its CAM would be meaningless.
    from onnx import TensorProto, helper, numpy_helper

    from realtime_cam.contract import ModelInfo, write_contract

    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["features"]),
         helper.make_node("Gemm", ["features", "W", "b"], ["logits"], transB=1)],
        "wrong", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3, 1, 1])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.zeros(2, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    write_contract(model, ModelInfo(labels=("a", "b"), input_size_hw=(8, 8)), weight, np.zeros(2, np.float32))
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    with pytest.raises(ModelError, match=r"'features' must be \[N, C, h, w\]; the model gives \[1, 3\]"):
        CamModel(tmp_path / "wrong.onnx")


def test_external_data_outside_the_models_folder_is_refused(tiny_onnx, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    model = onnx.load(str(tiny_onnx))
    onnx.save(model, str(inner / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=1024)
    model = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    (inner / "w.bin").rename(tmp_path / "w.bin")
    onnx.save(model, str(inner / "evil.onnx"))
    with pytest.raises(ModelError, match="points outside the directory"):
        CamModel(inner / "evil.onnx")


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv", [["run", "--topk", "0"], ["run", "--box-threshold", "1.5"],
                                  ["run", "--smooth", "1"], ["run", "--reconnect", "-1"],
                                  ["bench", "--frames", "-1"], ["bench", "--device", "tpu"],
                                  ["evaluate", "--box-threshold", "2"]])
def test_out_of_range_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: argument" in err[0] and err[0].endswith("--help)"), err


def test_output_folder_that_is_not_writable(tmp_path, monkeypatch, tiny_onnx, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) and mode == os.W_OK
                        else real_access(p, mode))
    line = one_line_error(capsys, 2, ["run", "--model", str(tiny_onnx), "--output", str(tmp_path / "o.mp4"),
                                      "--no-display"])
    assert "not writable" in line


# ----------------------------------------------------------------------------- faults in threads
class FailingSink(Sink):
    def __init__(self, after):
        self.after, self.n = after, 0

    def write(self, image):
        self.n += 1
        if self.n > self.after:
            raise OSError("disk full")


@needs_shared
def test_an_output_that_is_the_source_or_the_model_is_refused(mnv2_int8_onnx, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    video.write_bytes(shared("videos", "bottle-detection.mp4").read_bytes())
    before = video.read_bytes()
    link = tmp_path / "same.mp4"
    link.symlink_to(video)
    for output in (video, link, f"{tmp_path}/./clip.mp4"):
        line = one_line_error(capsys, 2, ["run", "--model", str(mnv2_int8_onnx), "--source", str(video),
                                          "--output", str(output), "--no-display", "--max-frames", "5"])
        assert "is also an input" in line
    assert video.read_bytes() == before
    # export: rewriting a model onto itself would destroy the model it reads
    model = tmp_path / "m.onnx"
    model.write_bytes(shared("models", "mobilenetv2-12-int8.onnx").read_bytes())
    line = one_line_error(capsys, 2, ["export", "--from-onnx", str(model), "--output", str(model)])
    assert "is also an input" in line
    assert model.read_bytes() == shared("models", "mobilenetv2-12-int8.onnx").read_bytes()


@needs_shared
def test_a_crash_in_the_render_thread_stops_the_run_with_its_error(mnv2_int8_onnx):
    model = CamModel(mnv2_int8_onnx, device="cpu")
    done = []

    def target():
        with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
            try:
                run_loop(model, src, sinks=[FailingSink(after=5)])
            except OSError as exc:
                done.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the run hung after a worker crashed"
    assert done and "disk full" in str(done[0])


@needs_shared
def test_a_crash_in_the_capture_thread_surfaces_in_the_loop(mnv2_int8_onnx, monkeypatch):
    import realtime_cam.sources as sources

    calls = {"n": 0}
    real = sources.as_bgr

    def flaky(frame):
        calls["n"] += 1
        if calls["n"] > 10:
            raise RuntimeError("decoder exploded")
        return real(frame)

    monkeypatch.setattr(sources, "as_bgr", flaky)
    model = CamModel(mnv2_int8_onnx, device="cpu")
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        with pytest.raises(RuntimeError, match="decoder exploded"):
            run_loop(model, src)


def test_a_video_is_written_under_a_temporary_name_until_it_is_complete(tmp_path):
    out = tmp_path / "o.mp4"
    sink = VideoFileSink(out, 25, (64, 48))
    sink.write(np.zeros((48, 64, 3), np.uint8))
    assert not out.exists() and list(tmp_path.glob(".o.*.partial.mp4"))
    sink.close()
    assert out.exists() and not list(tmp_path.glob(".*partial*")) and frame_count(out) == 1


@pytest.mark.parametrize("ext", sorted(VIDEO_CODECS))
def test_every_container_passes_the_read_back_with_every_frame(tmp_path, ext):
    """The finished file is read back before it takes its name: no container may fail that check."""
    out = tmp_path / f"o{ext}"
    with VideoFileSink(out, 25, (64, 48)) as sink:
        for i in range(37):
            sink.write(np.full((48, 64, 3), i * 6, np.uint8))
    assert out.exists() and frame_count(out) == 37 and not list(tmp_path.glob(".*partial*"))


def test_a_crash_leaves_no_file_that_looks_complete(tmp_path):
    out = tmp_path / "o.mp4"
    code = ("import os, numpy as np; from realtime_cam.sinks import VideoFileSink; "
            f"s = VideoFileSink({str(out)!r}, 25, (64, 48)); s.write(np.zeros((48, 64, 3), np.uint8)); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert not out.exists()


@needs_shared
@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX file-size limits (resource.RLIMIT_FSIZE)")
def test_a_video_the_disk_could_not_hold_is_an_error_not_a_success(mnv2_int8_onnx, tmp_path):
    """OpenCV's writer only logs failed writes; a file cut short (here by a file-size limit, as by a full
    disk) must not be reported as written, nor take the output's name."""
    out = tmp_path / "o.mp4"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from realtime_cam.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "run", "--model", str(mnv2_int8_onnx), "--source",
                           str(shared("videos", "bottle-detection.mp4")), "--output", str(out), "--no-display",
                           "--max-frames", "150"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "wrote" not in done.stderr
    # Neither OpenCV's warning per failed frame nor FFmpeg's own lines ("moov atom not found") beside ours.
    foreign = [line for line in done.stderr.splitlines() if "WARN" in line or line.startswith("[")]
    assert not foreign, foreign[:3]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"realtime-cam: error: writing {out} failed: ")
    # What was written is kept, under the name that says it is unfinished (one of this run's own).
    [partial] = tmp_path.glob(".o.*.partial.mp4")
    assert not out.exists() and last.endswith(f"what was written is left in {partial}")


def test_ctrl_c_while_a_video_is_finalised_waits_until_it_has_its_name():
    from realtime_cam.sinks import signals_held

    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # delivered now, it would raise here
            reached_the_end_of_the_block = True
    assert reached_the_end_of_the_block


def test_closing_the_buffer_releases_a_waiting_consumer():
    from realtime_cam.sources import FrameBuffer

    buf = FrameBuffer("latest")
    got = []
    t = threading.Thread(target=lambda: got.append(buf.get()))
    t.start()
    time.sleep(0.05)
    buf.close()
    t.join(timeout=2)
    assert not t.is_alive() and got == [None]


def test_a_webcam_index_too_large_for_opencv_is_one_line(capsys, tiny_onnx):
    line = one_line_error(capsys, 2, ["run", "--model", str(tiny_onnx), "--source", "99999999999",
                                      "--no-display"])
    assert "cannot open webcam 99999999999" in line


def test_a_snapshot_folder_that_cannot_be_made_is_one_error(tiny_onnx, tmp_path):
    from live_helpers import ScriptedWindow

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = CamModel(tiny_onnx, device="cpu")
    with open_source(str(write_photo(tmp_path / "photo.png"))) as src:
        with pytest.raises(SinkError, match="cannot use --snapshot-dir"):
            run_loop(model, src, window=ScriptedWindow({0: ord("s")}),
                     options=RunOptions(snapshot_dir=blocker / "snaps"))


def test_debug_on_a_subcommand_shows_the_traceback(tiny_onnx):
    with pytest.raises(SourceError):
        main(["run", "--debug", "--model", str(tiny_onnx), "--source", "/no/such.mp4", "--no-display"])


def test_opset_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--opset", "99", "--weights", "none"])
    assert exc.value.code == 2


def test_a_live_recording_is_written_in_real_time(tmp_path):
    # 5 frames explained 0.1 s apart from a 30 FPS camera: the video must last ~0.4 s, not 5/30 s.
    out = tmp_path / "live.mp4"
    with VideoFileSink(out, 30, (64, 48), real_time=True) as sink:
        for _ in range(5):
            sink.write(np.zeros((48, 64, 3), np.uint8))
            time.sleep(0.1)
    assert 11 <= frame_count(out) <= 15


@needs_shared
def test_ctrl_c_on_a_stalled_stream_ends_the_run_at_once(mnv2_int8_onnx):
    """A stream that stops sending but keeps its connection: the capture thread is stuck in a read (OpenCV's
    own timeout is 30 s). Ctrl-C used to wait 5 s for each of two threads in turn."""
    with MjpegServer(shared("videos", "vtest.avi"), fps=30, stall_after=10) as server:
        proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(mnv2_int8_onnx),
                                 "--source", server.url, "--no-display"], stderr=subprocess.PIPE, text=True)
        try:
            line = ""
            while not line.startswith("realtime-cam: model "):
                line = proc.stderr.readline()
                assert line, "the run ended before it loaded the model"
            time.sleep(3.0)  # 10 frames at 30 FPS, then silence
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            waited = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert waited < 6.0, f"took {waited:.1f} s to stop"  # it took 10.2 s: two 5 s joins in turn


def run_served_video(handler, model, out) -> subprocess.CompletedProcess:
    """`realtime-cam run --source http://127.0.0.1:PORT/vtest.avi --output OUT` against an HTTP server on
    loopback answering with ``handler``, stopped after."""
    import http.server

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        return subprocess.run([sys.executable, "-m", "realtime_cam", "run", "--model", str(model), "--source",
                               f"http://127.0.0.1:{httpd.server_address[1]}/vtest.avi", "--output", str(out),
                               "--no-display"], capture_output=True, text=True, timeout=240)
    finally:
        httpd.shutdown()
        httpd.server_close()


@needs_shared
def test_a_download_broken_off_says_so_and_keeps_every_frame_it_read(mnv2_int8_onnx, tmp_path):
    """A video file by URL whose transfer stops half-way (the server states the whole length, sends half and
    closes): it used to end as if the file were complete, with no word. Now one line says it ended early, and
    where, and the output holds every frame read."""
    import http.server

    data = shared("videos", "vtest.avi").read_bytes()

    class HalfThenClose(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True

    out = tmp_path / "o.mp4"
    done = run_served_video(HalfThenClose, mnv2_int8_onnx, out)
    assert done.returncode == 0, done.stderr[-2000:]
    early = [line for line in done.stderr.splitlines() if "the video ends early" in line]
    assert len(early) == 1 and "of the 13.8 s it states" in early[0], done.stderr[-2000:]
    read = int(early[0].split("the ")[-1].split(" frame(s) read")[0])
    assert 100 < read < 341  # about half of vtest.avi's frames
    assert frame_count(out) == read


def test_a_video_file_given_by_url_ends_when_the_file_does(mnv2_int8_onnx, tmp_path):
    """http://127.0.0.1/clip.avi: the end of the file used to be taken for a dropout, reopened, and the
    file played again without end."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    served = tmp_path / "served"
    served.mkdir()
    (served / "vtest.avi").symlink_to(shared("videos", "vtest.avi"))
    out = tmp_path / "o.avi"
    done = run_served_video(functools.partial(Quiet, directory=str(served)), mnv2_int8_onnx, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert frame_count(out) == frame_count(shared("videos", "vtest.avi"))  # each frame once
