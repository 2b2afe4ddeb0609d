"""Outputs that say "wrote" are complete and are what this run wrote (issue 15, items 1-5).

Each test names the case of docs/reliability.md it covers. As root, file permissions do not stop a rename,
so a refused rename is simulated by making os.replace fail as the kernel would.
"""

import os
import shutil
import time

import cv2
import numpy as np
import pytest

from realtime_cam.errors import SinkError
from realtime_cam.partial import PartialFile
from realtime_cam.sinks import ImageFileSink, VideoFileSink, unreadable_end, write_json


def frames_in_file(path):
    """How many frames of a video decode, one by one."""
    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.grab():
        count += 1
    cap.release()
    return count


def write_frames(sink, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        sink.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_two_runs_writing_one_output_at_once_never_share_a_temporary_file(tmp_path):
    out = tmp_path / "x.mp4"
    first, second = VideoFileSink(out, 25, (64, 48)), VideoFileSink(out, 25, (64, 48))
    assert first.temporary_path != second.temporary_path
    write_frames(first, 5)
    write_frames(second, 9, seed=1)
    first.close()
    assert frames_in_file(out) == 5                 # complete when it took the name
    second.close()
    assert frames_in_file(out) == 9                 # the later one replaces it whole, never mixed
    assert not list(tmp_path.glob(".*partial*"))


def test_an_output_folder_deleted_during_the_run_is_an_error_not_wrote(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    sink = VideoFileSink(folder / "x.avi", 25, (64, 48))
    write_frames(sink, 3)
    shutil.rmtree(folder)
    with pytest.raises(SinkError, match="its temporary file .* was removed or replaced during the run"):
        sink.close()
    assert not (folder / "x.avi").exists()


def test_a_source_named_like_a_temporary_file_is_neither_truncated_nor_deleted(tmp_path):
    """Rescuing a file a killed run left (old fixed name .clip.partial.avi) by reading it as the source."""
    rescued = tmp_path / ".clip.partial.avi"
    with VideoFileSink(tmp_path / "made.avi", 25, (64, 48)) as made:
        write_frames(made, 7)
    os.replace(tmp_path / "made.avi", rescued)
    before = rescued.read_bytes()
    with VideoFileSink(tmp_path / "clip.avi", 25, (64, 48)) as sink:
        write_frames(sink, 4)
    assert rescued.read_bytes() == before and frames_in_file(tmp_path / "clip.avi") == 4


def test_a_refused_rename_says_where_the_complete_file_is(tmp_path, monkeypatch):
    out = tmp_path / "x.mp4"
    sink = VideoFileSink(out, 25, (64, 48))
    write_frames(sink, 6)

    def refuse(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("realtime_cam.partial.os.replace", refuse)
    with pytest.raises(SinkError) as caught:
        sink.close()
    message = str(caught.value)
    assert message == (f"cannot give {out} its name (Operation not permitted); the complete file is "
                       f"{sink.temporary_path}")
    assert sink.temporary_path.exists() and frames_in_file(sink.temporary_path) == 6 and not out.exists()


def test_a_leftover_temporary_file_of_someone_else_is_left_alone(tmp_path):
    """A file of the old fixed temporary name beside the output stays as it is; and a file put where this
    run's temporary file was, when the run ends without frames, is not deleted."""
    leftover = tmp_path / ".x.partial.mp4"            # the fixed name earlier versions used
    leftover.write_bytes(b"someone else's")
    leftover.chmod(0o444)
    with VideoFileSink(tmp_path / "x.mp4", 25, (64, 48)) as sink:
        write_frames(sink, 2)
    assert leftover.read_bytes() == b"someone else's"
    sink = VideoFileSink(tmp_path / "y.mp4", 25, (64, 48))
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"theirs")
    os.replace(theirs, sink.temporary_path)            # no frame written: close would delete its own file
    sink.close()
    assert sink.temporary_path.read_bytes() == b"theirs"


def test_a_temporary_file_replaced_during_the_run_is_not_deleted_nor_renamed(tmp_path):
    out = tmp_path / "x.mp4"
    sink = VideoFileSink(out, 25, (64, 48))
    write_frames(sink, 3)
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"not this run's")
    os.replace(theirs, sink.temporary_path)
    with pytest.raises(SinkError, match="removed or replaced"):
        sink.close()
    assert sink.temporary_path.read_bytes() == b"not this run's" and not out.exists()


def test_the_read_back_decodes_frames_instead_of_trusting_the_container(tmp_path):
    """An AVI cut in half still states all its frames in its header; its last frame does not decode."""
    whole = tmp_path / "whole.avi"
    with VideoFileSink(whole, 25, (64, 48)) as sink:
        write_frames(sink, 30)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    stated = int(cv2.VideoCapture(str(cut)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert stated == 30 and 0 < frames_in_file(cut) < 30
    assert unreadable_end(whole, 30) is None
    assert unreadable_end(cut, 30) == "does not decode up to its frame 30"
    assert unreadable_end(tmp_path / "missing.avi", 30) == "is no readable video"


def test_json_and_images_take_their_name_whole_and_leave_no_temporary_file(tmp_path):
    write_json({"a": 1}, tmp_path / "r.json")
    ImageFileSink(tmp_path / "o.png").write(np.zeros((4, 4, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "r.json"]


def test_a_partial_file_is_created_exclusively_and_unique(tmp_path):
    a, b = PartialFile(tmp_path / "x.mp4"), PartialFile(tmp_path / "x.mp4")
    assert a.tmp != b.tmp and a.tmp.exists() and b.tmp.exists()
    assert a.tmp.name.startswith(".x.") and a.tmp.name.endswith(".partial.mp4")
    a.discard()
    b.discard()
    assert not list(tmp_path.iterdir())


def test_an_encoder_error_keeps_the_file_under_its_temporary_name(tmp_path):
    out = tmp_path / "x.avi"
    sink = VideoFileSink(out, 25, (64, 48))
    real = sink._writer

    class Failing:
        calls = 0

        def write(self, image, time_s):
            Failing.calls += 1
            if Failing.calls > 2:
                raise OSError(28, "No space left on device")
            real.write(image, time_s)

        def close(self):
            real.close()

        def abort(self):
            real.abort()

    sink._writer = Failing()
    try:
        write_frames(sink, 4)  # the encoder's error may surface at a later write already
    except SinkError:
        pass
    with pytest.raises(SinkError) as caught:
        sink.close()
    assert str(caught.value).endswith(f"what was written is left in {sink.temporary_path}")
    assert "No space left on device" in str(caught.value) and not out.exists()


def test_a_signal_while_the_last_frames_are_drawn_and_written_loses_none(tiny_onnx):
    """Ctrl-C after the last frame is inferred, while the render thread still draws and writes: every frame
    explained must reach the sinks before the interrupt is raised (it used to close the sinks under the
    render thread, losing frames while saying they were saved)."""
    import signal

    from realtime_cam.model import CamModel
    from realtime_cam.pipeline import RunOptions, run_loop
    from realtime_cam.sinks import Sink
    from realtime_cam.types import Frame

    class SlowSink(Sink):
        written = 0

        def write(self, image_bgr):
            time.sleep(0.05)
            SlowSink.written += 1
            if SlowSink.written == 11:  # every frame is inferred and handed over: the loop is draining
                os.kill(os.getpid(), signal.SIGINT)

    def frames():
        for i in range(12):
            yield Frame(i, np.full((120, 160, 3), 20 * i, np.uint8), 0.0)

    model = CamModel(tiny_onnx, device="cpu")
    returned = False
    with pytest.raises(KeyboardInterrupt):
        run_loop(model, frames(), sinks=[SlowSink()], options=RunOptions(batch=4))
        returned = True
        time.sleep(2)
    assert not returned  # the signal came during the drain, and was acted on once it was done
    assert SlowSink.written == 12


def test_outputs_get_the_mode_any_new_file_gets(tmp_path):
    """A temporary file is private while it is written; the output must not stay so (0600 made exported
    models and overlays unreadable to other users)."""
    plain = tmp_path / "plain"
    plain.write_text("x")
    write_json({"a": 1}, tmp_path / "r.json")
    with VideoFileSink(tmp_path / "v.avi", 25, (64, 48)) as sink:
        write_frames(sink, 2)
    for name in ("r.json", "v.avi"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, name


def test_a_second_signal_stops_waiting_for_a_sink_that_hangs(tiny_onnx):
    """A sink stuck (a hung network mount): the first Ctrl-C waits for the frames to be written, the second
    one ends the wait."""
    import signal
    import threading

    from realtime_cam.model import CamModel
    from realtime_cam.pipeline import RunOptions, run_loop
    from realtime_cam.sinks import Sink
    from realtime_cam.types import Frame

    release, fired = threading.Event(), threading.Event()

    class StuckSink(Sink):
        def write(self, image_bgr):
            if not fired.is_set():  # two Ctrl-C, once: the first is held, the second must end the wait
                fired.set()
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
                threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT)).start()
            release.wait(30)

    frames = [Frame(i, np.zeros((60, 80, 3), np.uint8), 0.0) for i in range(3)]
    model = CamModel(tiny_onnx, device="cpu")
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_loop(model, iter(frames), sinks=[StuckSink()], options=RunOptions(batch=1))
        waited = time.monotonic() - t0
    finally:
        release.set()
    assert waited < 10, f"took {waited:.1f} s: the second Ctrl-C did not end the wait on the stuck sink"
