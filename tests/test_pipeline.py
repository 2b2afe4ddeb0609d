"""The headless pipeline: files are inferred a batch at a time, yet every frame is written, once, in order."""

import threading

import cv2
import numpy as np
import onnx
import pytest
import threadpoolctl
from conftest import needs_shared, shared
from onnx import helper, numpy_helper

from realtime_cam import CamModel, threads
from realtime_cam.pipeline import RunOptions, run_loop
from realtime_cam.sinks import Sink, VideoFileSink
from realtime_cam.sources import Frame, open_source
from realtime_cam.timing import Pacer, Rate
from realtime_cam.view import ViewState


class Collect(Sink):
    def __init__(self):
        self.images = []

    def write(self, image_bgr):
        self.images.append(image_bgr.copy())


@pytest.fixture(scope="module")
def mnv2(mnv2_int8_onnx):
    return CamModel(mnv2_int8_onnx, device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_onnx):
    """The tiny onnx.helper contract model: for tests where any model will do (no torch, no ../shared)."""
    return CamModel(tiny_onnx, device="cpu")


def count_forward_calls(model, monkeypatch):
    """The batch sizes the model's forward is called with (a list that grows as the test runs)."""
    sizes = []
    real = model.forward

    def counting(inputs):
        sizes.append(len(inputs))
        return real(inputs)

    monkeypatch.setattr(model, "forward", counting)
    return sizes


@pytest.fixture
def calls(mnv2, monkeypatch):
    return count_forward_calls(mnv2, monkeypatch)


@pytest.fixture
def tiny_calls(tiny, monkeypatch):
    return count_forward_calls(tiny, monkeypatch)


def run_file(model, batch, max_frames=None):
    sink = Collect()
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        result = run_loop(model, src, sinks=[sink], options=RunOptions(batch=batch, max_frames=max_frames))
    return result, sink.images


def numbered_frames(n, live=False):
    """Frames whose brightness says their index (a list iterator, or a 'live' one)."""
    frames = [Frame(i, np.full((240, 320, 3), 10 * i, np.uint8), 0.0) for i in range(n)]

    class Live:
        live = True

        def __iter__(self):
            return iter(frames)

    return Live() if live else iter(frames)


@needs_shared
def test_batched_file_run_writes_every_frame_in_order_as_frame_by_frame_does(mnv2, calls):
    assert mnv2.batch_size(4) == 4
    one, by_one = run_file(mnv2, batch=1, max_frames=23)
    assert set(calls) == {1}
    calls.clear()
    four, by_four = run_file(mnv2, batch=4, max_frames=23)
    assert calls == [4] * 6                          # the sixth batch is cut to 3 frames by --max-frames
    assert one.frames == four.frames == len(by_one) == len(by_four) == 23
    assert four.stopped_by == "max-frames" and four.fps > 0
    for i, (a, b) in enumerate(zip(by_one, by_four)):
        # Same frame, same class, same map: batching may move a colour by a level through float rounding.
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.mean() < 0.05 and np.percentile(diff, 99.9) <= 2, f"frame {i} differs"
    assert one.last.class_id == four.last.class_id
    # Frames differ from each other (the video moves), so a swap of two frames would have been caught.
    assert np.abs(by_four[0].astype(np.int16) - by_four[22].astype(np.int16)).mean() > 1.0


@needs_shared
def test_whole_file_with_a_short_last_batch(mnv2, calls):
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        total = sum(1 for _ in src)
    assert total % 8 != 0
    result, images = run_file(mnv2, batch=8)
    assert result.frames == len(images) == total and result.stopped_by == "end"
    assert calls == [8] * (total // 8 + 1)     # the last frames are padded: one input shape per run


def test_frames_from_memory_are_batched_in_order(tiny, tiny_calls):
    sink = Collect()
    no_heatmap = RunOptions(batch=3, view=ViewState(alpha=0.0))   # the overlay is the frame (plus labels)
    result = run_loop(tiny, numbered_frames(7), sinks=[sink], options=no_heatmap)
    assert tiny_calls == [3, 3, 3]                 # 7 frames: the last batch is padded
    assert result.frames == len(sink.images) == 7
    assert [int(img[200:, 280:].mean()) for img in sink.images] == [10 * i for i in range(7)]


def test_a_live_source_is_never_batched(tiny, tiny_calls):
    result = run_loop(tiny, numbered_frames(6, live=True), sinks=[Collect()], options=RunOptions(batch=4))
    assert tiny_calls == [1] * 6 and result.frames == 6


def test_max_frames_below_the_batch_still_reports_a_rate(tiny, tiny_calls):
    result = run_loop(tiny, numbered_frames(10), sinks=[Collect()], options=RunOptions(batch=4, max_frames=3))
    assert result.frames == 3 and result.fps > 0 and tiny_calls == [1, 1, 1]


def test_frames_read_before_a_source_error_are_still_written(tiny):
    def breaking():
        for i in range(6):
            yield Frame(i, np.full((48, 64, 3), 10 * i, np.uint8), 0.0)
        raise RuntimeError("the source broke")

    sink = Collect()
    with pytest.raises(RuntimeError, match="the source broke"):
        run_loop(tiny, breaking(), sinks=[sink], options=RunOptions(batch=4))
    assert len(sink.images) == 6        # the second batch had 2 frames when the error came


@pytest.fixture
def opencv_set_to_3_threads():
    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    yield
    cv2.setNumThreads(before)


class ThreadCountSpy(Sink):
    """Notes OpenCV's thread count while the run writes."""

    def __init__(self):
        self.seen = set()

    def write(self, image_bgr):
        self.seen.add(cv2.getNumThreads())


@pytest.mark.parametrize("few, during", [(True, {1}), (False, {3})])
def test_opencv_runs_single_threaded_on_few_cores_and_comes_back(tiny, monkeypatch, opencv_set_to_3_threads,
                                                                  few, during):
    """Up to threads.FEW_CORES cores, OpenCV's pool is off during a run; with cores to spare it is left alone."""
    monkeypatch.setattr(threads, "few_cores", lambda: few)
    spy = ThreadCountSpy()
    run_loop(tiny, numbered_frames(4), sinks=[spy])
    assert spy.seen == during and cv2.getNumThreads() == 3
    if few:  # a run that fails puts the pool back too

        class Failing(Sink):
            def write(self, image_bgr):
                raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            run_loop(tiny, numbered_frames(4), sinks=[Failing()])
        assert cv2.getNumThreads() == 3


def test_files_are_decoded_by_one_thread_only_on_few_cores(monkeypatch, tmp_path):
    from realtime_cam.video_file import VideoFileReader, decode_threads

    clip = tmp_path / "c.mp4"
    with VideoFileSink(clip, 25, (64, 48)) as sink:
        for i in range(3):
            sink.write(np.full((48, 64, 3), 40 * i, np.uint8))
    monkeypatch.setattr("realtime_cam.video_file.few_cores", lambda: True)
    assert decode_threads() == 1
    reader = VideoFileReader(str(clip))
    assert reader._stream.thread_count == 1
    reader.release()
    monkeypatch.setattr("realtime_cam.video_file.few_cores", lambda: False)
    assert decode_threads() == 0  # FFmpeg's choice


@needs_shared
def test_a_model_with_a_fixed_batch_of_one_runs_frame_by_frame(mnv2_int8_onnx, tmp_path):
    proto = onnx.load(str(mnv2_int8_onnx))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed-batch.onnx"
    onnx.save(proto, str(fixed))
    model = CamModel(fixed, device="cpu")
    assert model.batch_size(4) == 1
    result, images = run_file(model, batch=4, max_frames=6)
    assert result.frames == len(images) == 6


@needs_shared
def test_a_dynamic_batch_that_only_runs_one_frame_is_found_quietly(mnv2_int8_onnx, tmp_path, capfd):
    # Declares a dynamic batch, but a Reshape to [1, 3, 224, 224] right after the input refuses 2 frames.
    proto = onnx.load(str(mnv2_int8_onnx))
    name = proto.graph.input[0].name
    for node in proto.graph.node:
        node.input[:] = ["one_frame" if i == name else i for i in node.input]
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 3, 224, 224], np.int64), "one_shape"))
    proto.graph.node.insert(0, helper.make_node("Reshape", [name, "one_shape"], ["one_frame"]))
    path = tmp_path / "reshapes-to-one.onnx"
    onnx.save(proto, str(path))
    model = CamModel(path, device="cpu")
    assert not isinstance(model._session.get_inputs()[0].shape[0], int)
    capfd.readouterr()
    assert model.batch_size(4) == 1
    assert "onnxruntime" not in capfd.readouterr().err   # a refusal is an answer, not an error to print
    result, images = run_file(model, batch=4, max_frames=5)
    assert result.frames == len(images) == 5


def test_batched_model_input_holds_each_frame_in_order(tiny):
    frames = [np.full((30, 40, 3), v, np.uint8) for v in (0, 128, 255)] + [np.zeros((20, 20), np.uint8)]
    batch = tiny.prepare_batch(frames)
    h, w = tiny.info.input_size_hw
    assert batch.shape == (4, 3, h, w) and batch.dtype == np.float32
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(batch[i], tiny.prepare(frame)[0])


def test_frames_per_second_counts_a_first_batch_as_its_start():
    frame_by_frame = Rate()
    for t in (1.0, 1.5, 2.0):
        frame_by_frame.tick(t)
    assert frame_by_frame.fps == pytest.approx(2 / 1.0)      # (N - 1) / (t_last - t_first)
    batched = Rate()
    for t in (1.0, 2.0, 3.0):
        batched.tick(t, 4)
    assert batched.done == 12 and batched.fps == pytest.approx(8 / 2.0)   # the first 4 start the clock
    single = Rate()
    single.tick(1.0, 4)
    assert single.fps == 0.0


def blas_threads():
    """numpy's BLAS libraries' thread counts, as threadpoolctl sees them."""
    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]


class BlasThreadSpy(Sink):
    """Notes, where the run draws and writes, which thread it is and numpy's BLAS thread counts there."""

    def __init__(self):
        self.seen = set()
        self.last_key, self.closed = -1, False  # enough of a window for the windowed loop

    def write(self, image_bgr):
        self.seen.add((threading.current_thread().name, tuple(blas_threads())))


@pytest.mark.parametrize("windowed", [False, True])
def test_numpys_blas_runs_one_thread_during_a_run_and_comes_back(tiny, windowed):
    """BLAS threads of its own made eigencam 3-7x slower than cam: they fought inference for the cores."""
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        assert before, "numpy's BLAS is not seen by threadpoolctl"
        spy = BlasThreadSpy()
        options = RunOptions(view=ViewState(method="eigencam"))
        if windowed:
            run_loop(tiny, numbered_frames(3), window=spy, options=options)
        else:
            run_loop(tiny, numbered_frames(3), sinks=[spy], options=options)
        assert spy.seen == {("MainThread" if windowed else "render", (1,) * len(before))}
        assert blas_threads() == before


def test_pacing_goes_on_at_the_files_rate_after_a_pause():
    pacer = Pacer(10.0)
    assert pacer.wait(100.0) == 0.0
    assert pacer.wait(100.02) == pytest.approx(0.08)       # the next frame's slot is 0.1 s after the first
    assert pacer.wait(100.2) == pytest.approx(0.0)         # a little late: no wait, the slots stay
    assert pacer.wait(100.25) == pytest.approx(0.05)
    assert pacer.wait(110.0) == 0.0                        # after a 10 s pause: start again from here ...
    assert pacer.wait(110.01) == pytest.approx(0.09)       # ... instead of 100 frames with no wait at all
