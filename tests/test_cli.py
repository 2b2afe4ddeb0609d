"""`realtime-cam run` end to end on real and synthetic media, through main() and the installed console script."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import pytest
from conftest import needs_shared, shared
from mjpeg_server import MjpegServer
from synthetic import write_photo

from realtime_cam.cams import METHODS
from realtime_cam.cli import build_parser, main

SCRIPT = shutil.which("realtime-cam", path=os.path.dirname(sys.executable)) or shutil.which("realtime-cam")


def decoded_frames(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return frames, size, fps


def mean_saturation(frame_bgr):
    return float(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2HSV)[..., 1].mean())


@needs_shared
def test_run_writes_every_decoded_frame_at_the_sources_size_and_rate(tiny_onnx, tmp_path, capsys):
    src = shared("videos", "vtest.avi")
    out = tmp_path / "o.mp4"
    assert main(["run", "--model", str(tiny_onnx), "--source", str(src), "--output", str(out),
                 "--no-display"]) == 0
    frames, size, fps = decoded_frames(out)
    inputs, in_size, in_fps = decoded_frames(src)
    assert len(frames) == len(inputs) == 341          # not the 682 the header claims
    # OpenCV reads the header's 50 FPS (682 frames in 13.6 s); the file plays at 25, as its frames' times say.
    assert size == in_size == (1280, 720) and in_fps == pytest.approx(50) and fps == pytest.approx(25)
    # The heatmap is visible: the grey street scene becomes strongly coloured, on every frame we look at.
    for i in (0, 170, 340):
        assert mean_saturation(frames[i]) > mean_saturation(inputs[i]) + 60
    err = capsys.readouterr().err
    # The progress bar ends on the true count. The header's 682 is shown only as an estimate ("~682"), until
    # the frames counted in the background (a thread at low priority: late on a busy machine) replace it.
    assert ("frames 341/341" in err or "frames 341 " in err) and "FPS" in err
    assert err.count("682") == err.count("/~682")
    assert not list(tmp_path.glob(".*partial*"))


def test_image_source_to_image_output(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "cat.png"
    photo = write_photo(tmp_path / "chelsea-sized.png", (451, 300))  # the size of skimage's chelsea.png
    assert main(["run", "--model", str(tiny_onnx), "--source", str(photo),
                 "--output", str(out), "--no-display", "--alpha", "0.6"]) == 0
    image = cv2.imread(str(out))
    assert image.shape == (300, 451, 3)
    assert "realtime-cam: 1 frame; last: " in capsys.readouterr().err  # no frame rate for a single frame


def test_a_class_given_by_a_prefix_says_which_class_it_chose(tiny_onnx, tmp_path, capsys):
    """`--class bottle` pinned 'bottlecap' without a word."""
    photo = write_photo(tmp_path / "photo.png", (160, 120))
    from realtime_cam import CamModel

    assert CamModel(tiny_onnx, device="cpu").class_id_for("bottle") == 455  # the API stays silent
    assert capsys.readouterr().err == ""
    assert main(["run", "--model", str(tiny_onnx), "--source", str(photo), "--no-display", "--class", "bottle"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "bottlecap" in line]
    assert len(lines) == 2 and "--class bottle" in lines[0] and "455" in lines[0]  # that line, then the result


def test_export_output_must_be_an_onnx_file(tmp_path, capsys):
    assert main(["export", "--weights", "none", "--output", str(tmp_path / "model.txt")]) == 2
    assert capsys.readouterr().err.strip() == "realtime-cam: error: --output must name an .onnx file; got model.txt"
    assert not list(tmp_path.iterdir())


def test_export_output_that_is_a_folder_or_not_writable_is_one_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    assert main(["export", "--weights", "none", "--output", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == f"realtime-cam: error: --output {folder} is a folder; name the .onnx file to write"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode, **kw))
    assert main(["export", "--weights", "none", "--output", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"realtime-cam: error: output folder is not writable: {tmp_path}"


@needs_shared
def test_live_mjpeg_url_with_max_frames(tiny_onnx, tmp_path):
    out = tmp_path / "live.avi"
    with MjpegServer(shared("videos", "vtest.avi"), fps=30) as server:
        assert main(["run", "--model", str(tiny_onnx), "--source", server.url, "--output", str(out),
                     "--no-display", "--max-frames", "15"]) == 0
    frames, size, _ = decoded_frames(out)
    assert len(frames) >= 15 and size == (320, 180)   # live: written in real time (gaps repeat a frame)


@pytest.mark.parametrize("argv,match", [
    (["run", "--source", "/no/such/video.mp4"], "source not found: /no/such/video.mp4"),
    (["run", "--model", "/no/such/model.onnx"], "model file not found"),
    (["run", "--source", ""], "--source is empty"),
    (["run", "--source", "/no/such.mp4", "--model", "/no/such/model.onnx"], "source not found"),  # source first
    (["run", "--output", "."], "output path is a directory: ."),
    (["run", "--class=--5"], "no class named '--5'"),            # not a number to int(), and no label
    (["run", "--class", "\u00b2"], "no class named '\u00b2'"),  # str.isdigit() is True for a superscript
])
def test_user_mistakes_get_one_line_and_exit_code_2(argv, match, capsys, tiny_onnx):
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_onnx)]
    assert main([*argv, "--no-display"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("realtime-cam: error: ") and match in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("argv", [["run", "--alpha", "2"], ["run", "--max-frames", "0"],
                                  ["run", "--method", "nope"], ["export", "--input-size", "0", "3"],
                                  ["export", "--input-size", "100000", "100000"], ["export", "--mean", "nan", "0", "0"],
                                  ["run", "--batch", "65"], ["bench", "--batch", "0"]])
def test_out_of_range_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, not argparse's usage block
    assert err[0].startswith(f"realtime-cam {argv[0]}: error: argument ")
    assert err[0].endswith(f"(see realtime-cam {argv[0]} --help)")


def test_an_unknown_option_is_named_by_its_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--bogus", "1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "realtime-cam run: error: unrecognized arguments: --bogus 1 (see realtime-cam run --help)"


def test_no_command_shows_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "run" in out and "export" in out and "bench" in out and "evaluate" in out


def test_output_folder_that_does_not_exist_is_refused_before_work(tiny_onnx, capsys):
    assert main(["run", "--model", str(tiny_onnx), "--output", "/no/such/dir/o.mp4", "--no-display"]) == 2
    assert "output folder does not exist" in capsys.readouterr().err


def test_output_extension_opencv_cannot_write(tiny_onnx, tmp_path, capsys):
    assert main(["run", "--model", str(tiny_onnx), "--output", str(tmp_path / "o.xyz"), "--no-display"]) == 2
    assert "use one of" in capsys.readouterr().err


def test_cli_choices_come_from_the_registries():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    method = next(a for a in run._actions if a.dest == "method")
    assert set(method.choices) == set(METHODS)


@needs_shared
def test_run_without_model_exports_the_default_into_the_cache(tmp_path, monkeypatch, resnet18_state_dict):
    pytest.importorskip("torchvision")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # Named after its own sha256 (the hash is checked), and the URL says so (never contacted: the file is cached).
    checkpoint = checkpoints / f"resnet18-{hashlib.sha256(resnet18_state_dict.read_bytes()).hexdigest()[:8]}.pth"
    shutil.copy(resnet18_state_dict, checkpoint)
    monkeypatch.setenv("REALTIME_CAM_WEIGHTS_URL", f"http://127.0.0.1:9/{checkpoint.name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REALTIME_CAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o.png"
    assert main(["run", "--source", str(shared("images", "darknet_dog.jpg")), "--output", str(out),
                 "--no-display"]) == 0
    assert (tmp_path / "cache" / "resnet18.onnx").exists() and out.exists()


def test_run_without_model_and_without_the_export_extra_says_where_the_weights_go(tmp_path, monkeypatch, capsys):
    # torch is not needed: offline with an empty cache, the message is about the weights file, not an install.
    monkeypatch.setenv("REALTIME_CAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REALTIME_CAM_WEIGHTS_URL", "http://127.0.0.1:9/resnet18-f37072fd.pth")  # nothing listens
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were absent
    assert main(["run", "--no-display"]) == 2
    err = capsys.readouterr().err.strip()
    assert "realtime-cam[export]" not in err and "could not get resnet18 weights" in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err


def test_console_script_and_the_runtime_never_imports_torch(tiny_onnx, tmp_path):
    assert SCRIPT, "the realtime-cam console script is not installed"
    photo = write_photo(tmp_path / "photo.jpg")
    out = tmp_path / "o.png"
    res = subprocess.run([SCRIPT, "run", "--model", str(tiny_onnx), "--source",
                          str(photo), "--output", str(out), "--no-display"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.exists()
    code = ("import sys; from realtime_cam.cli import main; "
            f"rc = main(['run', '--model', {str(tiny_onnx)!r}, '--source', "
            f"{str(photo)!r}, '--no-display']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'runtime imported torch'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    res = subprocess.run([sys.executable, "-m", "realtime_cam", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "realtime-cam" in res.stdout


@needs_shared
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_a_finalised_playable_video(resnet18_onnx, tmp_path, sig, code):
    out = tmp_path / "o.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(resnet18_onnx),
                             "--source", str(shared("videos", "vtest.avi")), "--output", str(out),
                             "--no-display"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # wait until frames are flowing
        if line.startswith("frames ") or time.monotonic() > deadline:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "finalised" in err and "Traceback" not in err
    frames, size, _ = decoded_frames(out)
    assert 0 < len(frames) < 341 and size == (1280, 720)
    assert not list(tmp_path.glob(".*partial*"))


def test_a_missing_webcam_is_our_one_line_not_opencvs_dozen(tiny_onnx, capfd, monkeypatch):
    monkeypatch.delenv("OPENCV_LOG_LEVEL", raising=False)
    before = cv2.utils.logging.getLogLevel()
    assert main(["run", "--model", str(tiny_onnx), "--source", "7", "--no-display", "--reconnect", "0"]) == 2
    err = capfd.readouterr().err.strip().splitlines()  # capfd: OpenCV writes to the file descriptor itself
    assert err[-1] == "realtime-cam: error: cannot open webcam 7 (no such camera, or it is busy)"
    assert not any("WARN" in line or "ERROR:" in line or "OpenCV" in line for line in err), err
    assert cv2.utils.logging.getLogLevel() == before  # OpenCV's log is back as it was


def test_a_runtime_only_install_hears_of_the_export_extra_only_where_it_is_needed(tiny_onnx, tmp_path):
    """Without torch (`pip install .`), run, bench and the help say nothing about installing the export extra,
    and bench says that it left out the seed baseline, and why."""
    photo = write_photo(tmp_path / "photo.png", (160, 120))
    commands = {
        "help": ["--help"], "run-help": ["run", "--help"], "bench-help": ["bench", "--help"],
        "evaluate-help": ["evaluate", "--help"],
        "run": ["run", "--model", str(tiny_onnx), "--source", str(photo), "--no-display"],
        "bench": ["bench", "--model", str(tiny_onnx), "--device", "cpu", "--frames", "6", "--warmup", "2",
                  "--batch", "1"],
    }
    outputs = {}
    for name, argv in commands.items():
        code = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "  # as if not installed
                f"from realtime_cam.cli import main; sys.exit(main({argv!r}))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, (name, res.stderr[-2000:])
        outputs[name] = res.stdout + res.stderr
    for name, text in outputs.items():
        assert "export extra" not in text and "realtime-cam[export]" not in text, (name, text)
    assert "seed baseline left out: torch is not installed" in outputs["bench"]


def test_a_window_without_a_display_is_one_line_not_qts_abort(tiny_onnx, tmp_path):
    """Over SSH without X, `run` (a window by default) used to end in Qt's abort: four lines of its own and
    exit 134. It is our one line, exit 2, pointing at --no-display."""
    photo = write_photo(tmp_path / "cat.jpg", (64, 48))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM")}
    done = subprocess.run([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx), "--source",
                           str(photo)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("realtime-cam: error: no display to open a window on ($DISPLAY "
                                                    "is not set): use --no-display to run headless")
    assert "Qt" not in done.stderr and "Traceback" not in done.stderr
