"""Sources against real files and a real HTTP stream; the capture policies."""

import threading
import time

import cv2
import numpy as np
import pytest
from conftest import needs_shared, shared
from mjpeg_server import MjpegServer

from realtime_cam.errors import SourceError
from realtime_cam.sources import SOURCE_KINDS, Frame, FrameBuffer, open_source, opencv_quiet


def _frame(i):
    return Frame(i, np.zeros((1, 1, 3), np.uint8), 0.0)


def test_queue_policy_keeps_every_frame_in_order_and_makes_the_reader_wait():
    buf = FrameBuffer("queue", maxsize=2)
    got = []

    def produce():
        for i in range(50):
            buf.put(_frame(i))
        buf.finish()

    t = threading.Thread(target=produce)
    t.start()
    while (f := buf.get()) is not None:
        got.append(f.index)
        assert len(buf._items) <= 2
    t.join()
    assert got == list(range(50))


def test_latest_policy_newest_frame_wins():
    buf = FrameBuffer("latest")
    for i in range(10):
        buf.put(_frame(i))
    assert buf.get().index == 9
    assert buf.dropped == 9
    buf.finish()
    assert buf.get() is None


def test_an_error_in_the_capture_thread_surfaces_in_the_reader():
    buf = FrameBuffer("queue")
    buf.put(_frame(0))
    buf.finish(RuntimeError("decoder crashed"))
    assert buf.get().index == 0
    with pytest.raises(RuntimeError, match="decoder crashed"):
        buf.get()


def test_closing_releases_a_producer_waiting_for_room():
    buf = FrameBuffer("queue", maxsize=1)
    buf.put(_frame(0))
    result = []
    t = threading.Thread(target=lambda: result.append(buf.put(_frame(1))))
    t.start()
    time.sleep(0.05)
    buf.close()
    t.join(timeout=2)
    assert not t.is_alive() and result == [False]


@needs_shared
def test_video_file_yields_every_decodable_frame_not_the_header_count():
    path = shared("videos", "vtest.avi")
    with open_source(str(path)) as src:
        assert src.kind == "video" and not src.live
        assert src.size_wh == (1280, 720)
        assert src.fps == pytest.approx(25.0)  # its header says 50 (682 frames in 13.6 s): it plays at 25
        assert src.frame_count == 682  # the header's claim: asking starts the count
        frames = list(src)
        assert src.frame_count == 341 and src.frame_count_exact  # counted from the packets meanwhile
    assert [f.index for f in frames] == list(range(341))
    times = [f.time_s for f in frames]
    assert times[:3] == pytest.approx([0.0, 0.04, 0.08]) and times[-1] == pytest.approx(340 * 0.04)


@needs_shared
def test_image_source_yields_one_bgr_frame():
    with open_source(str(shared("images", "skimage_chelsea.png"))) as src:
        frames = list(src)
    assert src.kind == "image" and len(frames) == 1
    assert frames[0].image_bgr.shape == (300, 451, 3)


@needs_shared
def test_live_http_mjpeg_stream():
    with MjpegServer(shared("videos", "vtest.avi"), fps=50) as server:
        with open_source(server.url) as src:
            assert src.kind == "stream" and src.live
            frames = []
            for frame in src:
                frames.append(frame)
                if len(frames) == 20:
                    break
    assert frames[0].image_bgr.shape == (180, 320, 3)
    assert [f.index for f in frames] == sorted(f.index for f in frames)


def test_webcam_index_that_does_not_exist():
    with pytest.raises(SourceError, match="webcam 97"):
        open_source("97")


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.mp4", "not found"),
    (lambda p: p, "directory"),
    (lambda p: _write(p / "empty.mp4", b""), "empty file"),
    (lambda p: _write(p / "notes.mp4", b"not a video, just text"), "as a video"),
    (lambda p: _write(p / "noise.bin", np.random.default_rng(0).bytes(5000)), "as a video"),
    (lambda p: _write(p / "noise.png", np.random.default_rng(0).bytes(5000)), "as an image"),
])
def test_bad_paths_get_a_specific_error(tmp_path, make, match):
    with pytest.raises(SourceError, match=match):
        open_source(str(make(tmp_path)))


def test_every_source_kind_is_registered_with_a_test_and_an_opener():
    assert list(SOURCE_KINDS) == ["webcam", "stream", "image", "video"]
    for accepts, opener in SOURCE_KINDS.values():
        assert callable(accepts) and callable(opener)


def test_opencv_quiet_blocks_may_overlap_across_threads(monkeypatch):
    """A stream reconnecting in its capture thread while another source opens: the level comes back once both end."""
    monkeypatch.delenv("OPENCV_LOG_LEVEL", raising=False)
    before = cv2.utils.logging.getLogLevel()
    first_in, second_done = threading.Event(), threading.Event()

    def reconnecting():
        with opencv_quiet():
            first_in.set()
            second_done.wait(5)

    thread = threading.Thread(target=reconnecting)
    thread.start()
    first_in.wait(5)
    with opencv_quiet():  # starts after the first, ends before it
        assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_SILENT
    assert cv2.utils.logging.getLogLevel() == cv2.utils.logging.LOG_LEVEL_SILENT  # the first is still open
    second_done.set()
    thread.join(5)
    assert cv2.utils.logging.getLogLevel() == before
