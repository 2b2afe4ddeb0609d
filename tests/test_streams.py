"""Several live streams in one batched session: every stream explained, batches that hold several streams, a
stream that dies or fails leaves the others running, each stream's own view; the mosaic; `run` with several
sources."""

import itertools
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import cv2
import numpy as np
import pytest
from conftest import needs_shared, shared
from live_helpers import wait_until
from mjpeg_server import MjpegServer
from test_window import display, needs_x, press, screenshot, wait_for_window  # noqa: F401 - display: Xvfb fixture

from realtime_cam import streams, streams_bench
from realtime_cam.cli import main
from realtime_cam.model import CamModel
from realtime_cam.mosaic import SELECTED_COLOR, Tile, grid_shape, mosaic, tile_cell
from realtime_cam.providers import CPU
from realtime_cam.sinks import Sink
from realtime_cam.sources import FrameSource
from realtime_cam.streams import LiveFile, MultiStream, inference_lanes, open_live, read_source_list, stream_name
from realtime_cam.streams_bench import DemandFeed, feed_on_demand
from realtime_cam.streams_cli import _serve_mosaic, stream_specs
from realtime_cam.types import Frame
from realtime_cam.view import (
    KEY_ESC,
    KEY_HELP,
    KEY_TAB,
    MOSAIC_KEY_HELP,
    QUIT,
    SNAPSHOT,
    ViewState,
    handle_key,
    keys_help_text,
    mosaic_key,
    select_key,
)

BOTTLE, CAR, PEOPLE = ("videos", "bottle-detection.mp4"), ("videos", "car-detection.mp4"), ("videos", "vtest.avi")


@pytest.fixture(scope="module")
def tiny_model(tiny_onnx):
    return CamModel(tiny_onnx, device="cpu")


@needs_shared
def test_every_stream_is_explained_and_batches_hold_several_streams(tiny_model):
    with MjpegServer(shared(*PEOPLE), fps=25) as camera:
        sources = [open_live(str(shared(*BOTTLE))), open_live(str(shared(*CAR))), open_live(camera.url)]
        assert all(s.live for s in sources) and isinstance(sources[0], LiveFile)
        with MultiStream(tiny_model, sources, batch_timeout_s=0.05) as multi:
            assert multi.max_batch == 3
            wait_until(lambda: all(s.rate.done >= 15 for s in multi.streams), what="15 frames of every stream")
            sizes = Counter(multi.batch_sizes)
            shown = [s.shown for s in multi.streams]
    assert all(s["frames"] >= 15 and s["error"] is None for s in multi.result().streams.values())
    # One inference call explained frames of several streams, many times over.
    assert sum(n for size, n in sizes.items() if size >= 2) >= 5, sizes
    assert max(sizes) <= 3
    # Each stream's overlay is its own source's picture, at its own size.
    assert shown[0].overlay.shape[:2] == (360, 640) and shown[1].overlay.shape[:2] == (432, 768)
    assert shown[2].overlay.shape[:2] == (180, 320)


def test_streams_are_shared_among_inference_threads_only_on_a_cpu_with_two_streams_each():
    assert inference_lanes(4, 2, CPU) == 2 and inference_lanes(8, 2, CPU) == 2 and inference_lanes(8, 16, CPU) == 4
    assert inference_lanes(32, 16, CPU) == 4  # a copy of the model in memory per lane: at most 4
    assert inference_lanes(3, 2, CPU) == 1 and inference_lanes(1, 16, CPU) == 1  # each lane batches 2 streams
    assert inference_lanes(8, 1, CPU) == 1 and inference_lanes(8, 16, "CUDAExecutionProvider") == 1


def in_memory_feeds(n, frames=12):
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (96, 128, 3), np.uint8) for _ in range(frames)]
    return [DemandFeed(f"feed {i}", pictures, offset=3 * i) for i in range(n)]


def test_two_inference_threads_explain_each_stream_in_order_as_the_model_alone_does(tiny_model, monkeypatch):
    feeds = in_memory_feeds(4)
    drawn = []
    render = MultiStream._render

    def recording_render(self, stream, frame, out):
        drawn.append((stream.id, frame.index, frame.image_bgr, out))
        render(self, stream, frame, out)

    monkeypatch.setattr(MultiStream, "_render", recording_render)
    with MultiStream(tiny_model, feeds, lanes=2, batch_timeout_s=0.05) as multi:
        feed_on_demand(feeds, multi)
        lane_a, lane_b = multi.lanes
        assert [s.id for s in lane_a.streams] == [0, 2] and [s.id for s in lane_b.streams] == [1, 3]
        assert len({id(tiny_model), id(lane_a.model), id(lane_b.model)}) == 3  # a session of its own each
        assert "2 inference threads" in multi.describe()
        wait_until(lambda: all(s.rate.done >= 12 for s in multi.streams), what="12 frames of every stream")
        sizes = Counter(list(multi.batch_sizes))
    assert max(sizes) == 2 and sizes[2] >= 5, sizes  # each batch holds the frames of its lane's two streams
    for i in range(4):  # every frame of a stream drawn once, in the order it came
        indices = [index for sid, index, _, _ in drawn if sid == i]
        assert indices == sorted(set(indices)) and len(indices) >= 12
    for sid, _, image, out in drawn[:16]:  # a lane's session gives what the model alone gives
        alone = tiny_model.run(tiny_model.prepare(image)).row(0)
        np.testing.assert_allclose(out.logits, alone.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.features, alone.features, rtol=1e-5, atol=1e-5)


def test_a_failing_inference_thread_ends_every_stream_with_its_error(tiny_model, caplog):
    feeds = in_memory_feeds(4)
    with caplog.at_level(logging.ERROR, logger="realtime_cam"), \
            MultiStream(tiny_model, feeds, lanes=2, batch_timeout_s=0.05) as multi:
        feed_on_demand(feeds, multi)

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")

        multi.lanes[1].model.run = broken
        assert multi.wait(10), "the streams did not end"
    assert isinstance(multi.error, RuntimeError)
    assert all(s.slot.ended and s.slot.error == "out of memory" for s in multi.streams)
    assert "inference failed: out of memory" in caplog.text


@needs_shared
def test_a_source_that_dies_is_reported_once_and_the_others_go_on(tiny_model, caplog):
    with MjpegServer(shared(*PEOPLE), fps=25, stop_after=10) as camera:
        sources = [open_live(camera.url, reconnect=0), open_live(str(shared(*BOTTLE)))]
        with caplog.at_level(logging.WARNING, logger="realtime_cam"), MultiStream(tiny_model, sources) as multi:
            dying, other = multi.streams
            wait_until(lambda: dying.slot.ended, what="the camera's stream to end")
            after_death = other.rate.done
            wait_until(lambda: other.rate.done >= after_death + 20, what="the other stream to go on")
            assert not other.slot.ended and not multi.done
    assert "stopped delivering frames" in dying.slot.error
    ended = [r.getMessage() for r in caplog.records if "ended" in r.getMessage()]
    assert len(ended) == 1 and dying.name in ended[0] and "1 other streams go on" in ended[0]


class FailingSink(Sink):
    def __init__(self, after):
        self.after, self.frames = after, 0

    def write(self, image):
        self.frames += 1
        if self.frames > self.after:
            raise OSError("disk full")


@needs_shared
def test_a_stream_whose_output_fails_ends_alone(tiny_model):
    sources = [open_live(str(shared(*BOTTLE))), open_live(str(shared(*CAR)))]
    with MultiStream(tiny_model, sources, sinks=[[FailingSink(5)], []]) as multi:
        failing, other = multi.streams
        wait_until(lambda: failing.slot.ended, what="the failing stream to end")
        n = other.rate.done
        wait_until(lambda: other.rate.done >= n + 10, what="the other stream to go on")
    assert "disk full" in failing.slot.error and failing.rate.done == 5
    assert other.slot.error is None


@needs_shared
def test_each_stream_has_its_own_view_pin_and_pause(tiny_model):
    sources = [open_live(str(shared(*BOTTLE))), open_live(str(shared(*CAR)))]
    with MultiStream(tiny_model, sources) as multi:
        a, b = multi.streams
        wait_until(lambda: a.shown is not None and b.shown is not None, what="first overlays")
        tabby = tiny_model.class_id_for("tabby")
        a.set_view(pinned_class=tabby, method="gradcam")
        wait_until(lambda: a.shown.prediction.class_id == tabby, what="the pinned class on stream a")
        assert a.shown.prediction.pinned and a.shown.prediction.method == "gradcam"
        assert not b.shown.prediction.pinned and b.shown.prediction.method == "cam"
        a.set_view(paused=True)
        time.sleep(0.3)  # a frame already taken for inference still lands
        held, n = a.rate.done, b.rate.done
        before = a.shown.overlay
        a.set_view(alpha=0.9)  # redraws the held frame with the new view
        wait_until(lambda: a.shown.overlay is not before, what="the held frame's redraw")
        wait_until(lambda: b.rate.done >= n + 15, what="the other stream to go on")
        assert a.rate.done == held
        a.set_view(paused=False)
        wait_until(lambda: a.rate.done >= held + 5, what="stream a to resume")


@needs_shared
def test_a_video_file_plays_live_at_its_own_rate_and_can_loop():
    """Paced by the file's frame rate: a consumer reading nothing for a while finds only the newest frame;
    with loop, the file starts again at its end."""
    source = open_live(str(shared(*CAR)), loop=True)  # 377 frames at 12.5 fps
    with source:
        frames = iter(source)
        first = next(frames)
        time.sleep(0.5)  # ~6 frames played meanwhile: all but the newest are dropped
        second = next(frames)
        assert second.index - first.index >= 2 and second.captured_at > first.captured_at
    assert source.fps == pytest.approx(12.5)


class FileUntilClosed(FrameSource):
    """A file source whose reading is under way when it is closed (one frame, then it waits for close())."""

    kind = "video"
    live = False

    def __init__(self):
        super().__init__("clip.mp4")
        self.fps, self.size_wh = 25.0, (64, 48)
        self.closed = threading.Event()

    def __iter__(self):
        yield Frame(0, np.zeros((48, 64, 3), np.uint8), time.perf_counter(), 0.0)
        self.closed.wait(10)

    def close(self):
        self.closed.set()


def test_a_looping_file_closed_mid_read_is_not_opened_again():
    opened = []
    source = LiveFile(FileUntilClosed(), loop=True, reopen=lambda: opened.append(FileUntilClosed()) or opened[-1])
    frames = iter(source)
    next(frames)
    source.close()
    assert opened == [] and not source._thread.is_alive()


def test_source_lists_and_names(tmp_path):
    lst = tmp_path / "cams.txt"
    lst.write_text("# cameras\n0\n\nrtsp://10.0.0.5/stream1\nclip.mp4\n")
    assert read_source_list(lst) == ["0", "rtsp://10.0.0.5/stream1", "clip.mp4"]
    files = tmp_path / "files.txt"
    files.write_text("a.mp4\nb.mp4\n")
    assert read_source_list(files) == ["a.mp4", "b.mp4"]
    assert stream_specs([str(files)]) is None  # for run, a collection (issue 18); serve plays them live
    assert stream_specs([str(files)], files_too=True) == ["a.mp4", "b.mp4"]
    assert stream_specs([str(lst)]) == ["0", "rtsp://10.0.0.5/stream1", "clip.mp4"]
    assert stream_name("rtsp://10.0.0.5/stream1?x=1") == "10.0.0.5/stream1"
    assert stream_name("/a/clip.mp4", ["clip.mp4"]) == "clip.mp4 (2)"
    assert stream_name("0") == "webcam 0"


def test_run_takes_a_list_of_plain_files_as_a_collection(tmp_path, tiny_onnx):
    """A .txt of files only is a collection (every frame of each, to a folder), a list with a camera or URL in
    it is streams."""
    from synthetic import write_photo

    write_photo(tmp_path / "a.png")
    write_photo(tmp_path / "b.png")
    files = tmp_path / "files.txt"
    files.write_text("a.png\nb.png\n")
    out = tmp_path / "out"
    assert main(["run", "--model", str(tiny_onnx), "--source", str(files), "--output", str(out), "--no-display",
                 "--no-ray"]) == 0
    assert (out / "a.png").is_file() and (out / "b.png").is_file()


def test_mosaic_tiles_labels_and_ended_streams():
    red = np.zeros((90, 160, 3), np.uint8)
    red[:] = (0, 0, 255)
    tall = np.full((200, 100, 3), 255, np.uint8)
    image = mosaic([Tile(red, "a", 25.0), Tile(tall, "b", 12.0), Tile(None, "c"), Tile(red, "d", ended=True)],
                   tile_wh=(320, 180))
    assert grid_shape(4) == (2, 2) and grid_shape(5) == (2, 3) and grid_shape(1) == (1, 1)
    assert image.shape == (360, 640, 3)
    assert tuple(image[40, 160]) == (0, 0, 255)  # tile a: the frame fills it (same aspect ratio)
    assert tuple(image[40, 320 + 20]) == (24, 24, 24) and image[40, 320 + 160].min() == 255  # b: letterboxed
    assert image[270, 480, 2] < 100  # d: dimmed, it has ended


def _is_selected_colour(pixels):
    return np.all(pixels == SELECTED_COLOR, axis=-1)


def test_mosaic_marks_the_selected_tile_with_a_border_and_its_caption():
    grey = np.full((90, 160, 3), 128, np.uint8)
    tiles = [Tile(grey, "a", 25.0), Tile(grey, "b", 12.0), Tile(grey, "c")]
    for selected in range(3):
        image = mosaic(tiles, tile_wh=(320, 180), selected=selected)
        for i in range(3):
            x0, y0, x1, y1 = tile_cell(i, 3, (320, 180))
            cell = image[y0:y1, x0:x1]
            edges = [cell[1, 40:280], cell[-2, 200:280], cell[20:160, 1], cell[20:160, -2]]  # top, bottom, sides
            border = all(_is_selected_colour(edge).all() for edge in edges)
            text = cell[140:172, 6:120].astype(int)  # the caption's box, inside the border
            caption = ((text[..., 0] > 120) & (text[..., 2] > 120) & (text[..., 1] < 60)).sum()  # magenta-ish
            inside = cell[20:120, 20:300]
            assert border == (i == selected), (selected, i)
            assert (caption > 20) == (i == selected), (selected, i, caption)  # its text is magenta too
            assert (inside == 128).all()  # the frame itself is not drawn on
    plain = mosaic(tiles, tile_wh=(320, 180))  # nothing selected (as before): no mark anywhere
    assert not _is_selected_colour(plain).any()


def test_mosaic_keys_select_a_stream_and_act_on_its_view_only():
    views = [ViewState(), ViewState(method="gradcam"), ViewState()]
    methods = ("cam", "gradcam", "layercam")
    # Digits select that stream (a digit past the last stream keeps the selection), Tab the next, round.
    assert mosaic_key(views, 0, ord("2"), 7, methods) == (1, {}, None)
    assert mosaic_key(views, 1, ord("9"), 7, methods) == (1, {}, None)
    assert [select_key(i, KEY_TAB, 3) for i in range(3)] == [1, 2, 0]
    assert select_key(0, ord("m"), 3) is None
    # Any other key is the single view's, on the selected stream's view: the changes only, for set_view.
    assert mosaic_key(views, 1, ord("m"), 7, methods) == (1, {"method": "layercam"}, None)
    assert mosaic_key(views, 0, ord("m"), 7, methods) == (0, {"method": "gradcam"}, None)
    assert mosaic_key(views, 2, ord("c"), 7, methods) == (2, {"pinned_class": 7}, None)
    assert mosaic_key(views, 2, ord(" "), 7, methods) == (2, {"paused": True}, None)
    assert mosaic_key(views, 2, ord("+"), 7, methods) == (2, {"alpha": 0.6}, None)
    assert mosaic_key(views, 1, ord("b"), 7, methods) == (1, {"show_box": True}, None)
    assert mosaic_key(views, 1, ord("s"), 7, methods) == (1, {}, SNAPSHOT)
    assert mosaic_key(views, 2, ord("q"), 7, methods) == (2, {}, QUIT)
    assert mosaic_key(views, 0, KEY_ESC, 7, methods) == (0, {}, QUIT)
    assert mosaic_key(views, 0, -1, 7, methods) == (0, {}, None)
    # The selection keys are free in the single view: they never meant anything else.
    for key in [KEY_TAB, *range(ord("1"), ord("9") + 1)]:
        assert handle_key(ViewState(), key, 7, methods) == (ViewState(), None)
    # run --help (and h in the mosaic, MOSAIC_KEY_HELP) list them after the single view's keys.
    text = keys_help_text()
    assert text.index("q / Esc") < text.index("1-9      select") < text.index("Tab      select the next")
    assert list(MOSAIC_KEY_HELP)[:2] == ["1-9", "Tab"] and set(KEY_HELP) < set(MOSAIC_KEY_HELP)


class ScriptedWindow:
    """The mosaic loop's window, without a display: it records what it is shown and, once every stream has
    shown a frame, gives one key of the script per refresh (waiting for ``until`` before a key that has one).
    It closes itself after ``timeout`` seconds: a key that never takes effect fails the test, never hangs it."""

    def __init__(self, multi, script, timeout=30.0):
        self.multi, self.script, self.shown, self.last_key, self.closed = multi, list(script), [], -1, False
        self.deadline = time.monotonic() + timeout

    def write(self, image):
        self.shown.append(image)
        self.last_key = -1
        self.closed = time.monotonic() > self.deadline
        if all(s.shown is not None for s in self.multi.streams) and self.script:
            key, until = self.script[0]
            if until is None or until():
                self.script.pop(0)
                self.last_key = key


@needs_shared
def test_the_mosaic_loop_acts_on_the_selected_stream(tiny_model, tmp_path):
    from realtime_cam.sinks import SnapshotSink

    sources = [open_live(str(shared(*BOTTLE)), loop=True), open_live(str(shared(*CAR)), loop=True)]
    snaps = [SnapshotSink(tmp_path / "one", 25.0), SnapshotSink(tmp_path / "two", 25.0)]
    with MultiStream(tiny_model, sources, sinks=[[snaps[0]], [snaps[1]]]) as multi:
        one, two = multi.streams
        changed = tiny_model.methods[1]
        window = ScriptedWindow(multi, [
            (ord("2"), None), (ord("m"), None),
            (ord("s"), lambda: two.shown.prediction.method == changed),  # a frame drawn with the new method
            (KEY_TAB, None), (ord("b"), None), (ord("q"), None)])
        stopped = _serve_mosaic(window, multi, snaps)
    assert stopped == "quit" and not window.script
    assert two.view.method == changed and one.view.method == "cam"  # stream 2's method, not stream 1's
    assert one.view.show_box and not two.view.show_box  # Tab went round to stream 1
    saved = list((tmp_path / "two").glob("snapshot-*.json"))
    assert len(saved) == 1 and not (tmp_path / "one").exists()  # the selected stream's snapshot
    assert json.loads(saved[0].read_text())["method"] == changed
    assert saved[0].with_suffix(".png").is_file() and saved[0].with_suffix(".npy").is_file()
    # The window showed the border on tile 1, then 2, then 1 again.
    assert [k for k, _ in itertools.groupby(marked_tiles(image) for image in window.shown)] == [[0], [1], [0]]


def marked_tiles(image, tiles=2, tile_w=640):
    """The tiles of a row of the mosaic whose top edge has the selection's border."""
    return [i for i in range(tiles) if _is_selected_colour(image[2, i * tile_w + 100:(i + 1) * tile_w - 100]).all()]


@needs_shared
def test_run_with_two_sources_writes_one_recording_per_stream(tmp_path, tiny_onnx, capsys):
    out = tmp_path / "recordings"
    code = main(["run", "--model", str(tiny_onnx), "--source", str(shared(*BOTTLE)), "--source", str(shared(*CAR)),
                 "--no-display", "--max-frames", "12", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00-bottle-detection.mp4", "01-car-detection.mp4"]
    for path, size in zip(files, [(640, 360), (768, 432)]):
        cap = cv2.VideoCapture(str(path))
        assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == size
        assert cap.read()[0]
        cap.release()
    assert "bottle-detection.mp4: 12 frames" in err and "streams each on average" in err
    assert f"wrote {files[0]}" in err


@needs_shared
def test_run_with_four_real_videos_explains_them_in_two_inference_threads(tmp_path, mnv2_int8_onnx, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(streams, "usable_cores", lambda: 2)  # as on this 2-core machine, whatever CI runs on
    out = tmp_path / "recordings"
    videos = [BOTTLE, CAR, PEOPLE, BOTTLE]
    code = main(["run", "--model", str(mnv2_int8_onnx), *[a for v in videos for a in ("--source", str(shared(*v)))],
                 "--no-display", "--max-frames", "10", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "4 streams, batched (at most 2 per inference call) in 2 inference threads side by side" in err
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00-bottle-detection.mp4", "01-car-detection.mp4", "02-vtest.mp4",
                                       "03-bottle-detection.mp4"]
    for path in files:
        assert f"wrote {path} (" in err
        cap = cv2.VideoCapture(str(path))
        assert cap.read()[0]
        cap.release()
    # Each stream is its own, with its own summary, the same video given twice too.
    assert err.count("bottle-detection.mp4: 10 frames") == 1 and "bottle-detection.mp4 (2): 10 frames" in err


@needs_shared
def test_run_with_several_sources_refuses_an_output_file(tmp_path, tiny_onnx, capsys):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"x")
    code = main(["run", "--model", str(tiny_onnx), "--source", str(shared(*BOTTLE)), "--source", str(shared(*CAR)),
                 "--no-display", "--output", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a folder" in err[0]


def test_one_source_keeps_the_single_stream_path(monkeypatch, tiny_onnx, tmp_path):
    """One --source never goes to the multi-stream loop (its options and outputs stay as they were)."""
    import realtime_cam.streams_cli as streams_cli

    monkeypatch.setattr(streams_cli, "cmd_run_streams", lambda *a: pytest.fail("went to the multi-stream loop"))
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    assert main(["run", "--model", str(tiny_onnx), "--source", str(image), "--no-display"]) == 0


@needs_x
@needs_shared
def test_the_window_shows_a_mosaic_its_keys_act_on_the_selected_stream_and_q_quits(display, tiny_onnx,  # noqa: F811
                                                                                    tmp_path):
    snaps = tmp_path / "snaps"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx), "--loop",
                             "--source", str(shared(*BOTTLE)), "--source", str(shared(*CAR)),
                             "--snapshot-dir", str(snaps)],
                            env=display, stderr=subprocess.PIPE, text=True)
    one, two = snaps / "00-bottle-detection", snaps / "01-car-detection"
    try:
        window = wait_for_window(display, "realtime-cam: 2 streams")
        # Stream 1 is selected at the start (waited for: a window mapped can still be black for a while; CI once
        # took its screenshot 1.5 s after the window appeared, all black).
        wait_until(lambda: marked_tiles(screenshot(display, tmp_path / "shot.png")) == [0], what="tile 1 marked")
        time.sleep(1.5)  # let the tiles paint
        shot = screenshot(display, tmp_path / "shot.png")
        geometry = subprocess.run(["xdotool", "getwindowgeometry", window], env=display, capture_output=True,
                                  text=True).stdout
        assert marked_tiles(shot) == [0]
        press(display, window, "2")
        wait_until(lambda: marked_tiles(screenshot(display, tmp_path / "shot2.png")) == [1], what="tile 2 marked")
        press(display, window, "m")  # stream 2's method
        time.sleep(1.0)  # the window reads one key per refresh: the next one must not come first
        press(display, window, "s")
        wait_until(lambda: list(two.glob("snapshot-*.json")), what="stream 2's snapshot")
        press(display, window, "Tab")  # round to stream 1
        wait_until(lambda: marked_tiles(screenshot(display, tmp_path / "shot3.png")) == [0], what="tile 1 marked")
        press(display, window, "s")
        wait_until(lambda: list(one.glob("snapshot-*.json")), what="stream 1's snapshot")
        press(display, window, "q")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "1280x360" in geometry  # two 640x360 tiles side by side
    hsv = cv2.cvtColor(shot[:360, :1280], cv2.COLOR_BGR2HSV)
    for tile in (hsv[:, :640], hsv[:, 640:]):  # a heatmap in each tile
        assert ((tile[..., 1] > 150) & (tile[..., 2] > 80)).mean() > 0.2
    assert "bottle-detection.mp4:" in err and "car-detection.mp4:" in err
    (snap_two,), (snap_one,) = two.glob("snapshot-*.json"), one.glob("snapshot-*.json")
    changed = CamModel(tiny_onnx, device="cpu").methods[1]
    assert json.loads(snap_two.read_text())["method"] == changed  # m changed stream 2's method
    assert json.loads(snap_one.read_text())["method"] == "cam"  # and not stream 1's
    assert f"saved {snap_two.with_suffix('.png')}" in err and f"saved {snap_one.with_suffix('.png')}" in err


@needs_shared
def test_sigterm_finalises_every_recording_and_says_so(tiny_onnx, tmp_path):
    out = tmp_path / "recordings"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx), "--loop",
                             "--no-display", "--output", str(out), "--source", str(shared(*BOTTLE)),
                             "--source", str(shared(*CAR))], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(list(out.glob("*"))) == 2, what="the two recordings to start")
        time.sleep(1.0)  # some frames into each
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "realtime-cam: terminated"
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00-bottle-detection.mp4", "01-car-detection.mp4"]  # renamed: complete
    for path in files:
        assert f"{path} is finalised with" in err
        cap = cv2.VideoCapture(str(path))
        assert cap.read()[0]
        cap.release()


@needs_shared
def test_run_reads_its_streams_from_a_text_file(tmp_path, tiny_onnx, capsys):
    with MjpegServer(shared(*PEOPLE), fps=25) as camera:
        listing = tmp_path / "cameras.txt"
        listing.write_text(f"# a camera and a clip\n{camera.url}\n\n{shared(*CAR)}\n")
        code = main(["run", "--model", str(tiny_onnx), "--source", str(listing), "--no-display", "--max-frames", "8"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 streams, batched" in err
    assert "127.0.0.1" in err and "/stream.mjpg: 8 frames" in err and "car-detection.mp4: 8 frames" in err


def test_bench_streams_reports_total_fps_latency_and_batches(tmp_path, tiny_onnx, capsys, monkeypatch):
    monkeypatch.setattr(streams, "usable_cores", lambda: 2)  # the loop's lanes as on this 2-core machine
    monkeypatch.setattr(streams_bench, "usable_cores", lambda: 2)
    out = tmp_path / "streams.json"
    assert main(["bench", "--model", str(tiny_onnx), "--streams", "1,3,4", "--device", "cpu", "--frames", "30",
                 "--warmup", "6", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    one, three, four, four_in_one = report["results"]
    assert (one["streams"], three["streams"]) == (1, 3) and one["vs_one_stream"] == 1.0
    assert one["mean_batch"] == 1.0 and three["mean_batch"] > 1.5  # every stream always has a frame ready
    assert len(three["latency_ms_per_stream"]) == 3 and three["latency_ms"]["p95_ms"] >= three["latency_ms"]["median_ms"]
    assert len(three["fps_total_per_round"]) == report["config"]["rounds"] == 3
    assert three["fps_total"] > 0 and "x 1 stream" in table
    # 4 streams run in two inference threads of two streams each; the same 4 in one thread are measured too.
    assert (four["streams"], four["inference_threads"], four_in_one["streams"], four_in_one["inference_threads"]) \
        == (4, 2, 4, 1)
    assert four["mean_batch"] <= 2 < four_in_one["mean_batch"]  # a lane batches its own two streams only
    assert four_in_one["vs_one_stream"] > 0 and len(four_in_one["fps_total_per_round"]) == 3
