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
from realtime_cam.sinks import ImageFileSink, VideoFileSink, frames_in_file, write_json


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
    leftover = tmp_path / ".x.partial.mp4"            # the fixed name earlier versions used
    leftover.write_bytes(b"someone else's")
    leftover.chmod(0o444)
    with VideoFileSink(tmp_path / "x.mp4", 25, (64, 48)) as sink:
        write_frames(sink, 2)
    assert leftover.read_bytes() == b"someone else's"


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
    """An AVI cut in half still states all its frames in its header; decoding finds the truth."""
    whole = tmp_path / "whole.avi"
    with VideoFileSink(whole, 25, (64, 48)) as sink:
        write_frames(sink, 30)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    stated = int(cv2.VideoCapture(str(cut)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert stated == 30 and 0 < frames_in_file(cut) < 30


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

        def write(self, image):
            Failing.calls += 1
            if Failing.calls > 2:
                raise OSError(28, "No space left on device")
            real.write(image)

        def release(self):
            real.release()

    sink._writer = Failing()
    write_frames(sink, 4)
    with pytest.raises(SinkError) as caught:
        sink.close()
    assert str(caught.value).endswith(f"what was written is left in {sink.temporary_path}")
    assert "No space left on device" in str(caught.value) and not out.exists()


def test_a_signal_while_the_last_frames_are_drawn_and_written_loses_none(tiny_onnx):
    """Ctrl-C after the last frame is inferred, while the render thread still draws and writes: every frame
    explained must reach the sinks before the interrupt is raised (it used to close the sinks under the
    render thread, losing frames while saying they were saved)."""
    import signal
    import threading

    from realtime_cam.model import CamModel
    from realtime_cam.pipeline import RunOptions, run_loop
    from realtime_cam.sinks import Sink
    from realtime_cam.types import Frame

    class SlowSink(Sink):
        written = 0

        def write(self, image_bgr):
            time.sleep(0.1)  # 1.2 s for all 12: the signal comes while the render thread is at it
            SlowSink.written += 1

    def frames():
        for i in range(12):
            yield Frame(i, np.full((120, 160, 3), 20 * i, np.uint8), 0.0)
        # The source has ended: the loop infers what is left and waits for the render thread.
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()

    model = CamModel(tiny_onnx, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        run_loop(model, frames(), sinks=[SlowSink()], options=RunOptions(batch=4))
        time.sleep(2)  # not reached when the signal comes during the run, as it should
    assert SlowSink.written == 12
