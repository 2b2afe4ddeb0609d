"""The headless pipeline on files: batched inference keeps every frame, in order, with the same result."""

import cv2
import numpy as np
import onnx
import pytest

from conftest import needs_shared, shared
from realtime_cam import CamModel
from realtime_cam.pipeline import RunOptions, _Rate, run_loop
from realtime_cam.sinks import Sink
from realtime_cam.sources import Frame, open_source


class Collect(Sink):
    def __init__(self):
        self.images = []

    def write(self, image_bgr):
        self.images.append(image_bgr.copy())


@pytest.fixture(scope="module")
def mnv2(mnv2_int8_onnx):
    return CamModel(mnv2_int8_onnx, device="cpu")


def run_file(model, batch, max_frames=None):
    sink = Collect()
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        result = run_loop(model, src, sinks=[sink], options=RunOptions(batch=batch, max_frames=max_frames))
    return result, sink.images


@needs_shared
def test_batched_file_run_writes_every_frame_in_order_as_frame_by_frame_does(mnv2):
    # 23 frames: five batches of 4 and a last one of 3
    one, by_one = run_file(mnv2, batch=1, max_frames=23)
    four, by_four = run_file(mnv2, batch=4, max_frames=23)
    assert one.frames == four.frames == len(by_one) == len(by_four) == 23
    assert four.stopped_by == "max-frames"
    for i, (a, b) in enumerate(zip(by_one, by_four)):
        # Same frame, same class, same map: batching may move a colour by a level through float rounding.
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.mean() < 0.05 and np.percentile(diff, 99.9) <= 2, f"frame {i} differs"
    assert one.last.class_id == four.last.class_id
    # Frames differ from each other (the video moves), so a swap of two frames would have been caught.
    assert np.abs(by_four[0].astype(np.int16) - by_four[22].astype(np.int16)).mean() > 1.0


@needs_shared
def test_whole_file_with_a_short_last_batch(mnv2):
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        total = sum(1 for _ in src)
    assert total % 8 != 0
    result, images = run_file(mnv2, batch=8)
    assert result.frames == len(images) == total and result.stopped_by == "end"


@needs_shared
def test_the_headless_run_leaves_opencvs_thread_count_as_it_was(mnv2):
    before = cv2.getNumThreads()
    run_file(mnv2, batch=4, max_frames=5)
    assert cv2.getNumThreads() == before


@needs_shared
def test_a_model_with_a_fixed_batch_of_one_runs_frame_by_frame(mnv2_int8_onnx, tmp_path):
    proto = onnx.load(str(mnv2_int8_onnx))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed-batch.onnx"
    onnx.save(proto, str(fixed))
    model = CamModel(fixed, device="cpu")
    assert model.max_batch == 1 and model.batch_size(4) == 1
    result, images = run_file(model, batch=4, max_frames=6)
    assert result.frames == len(images) == 6


@needs_shared
def test_batched_model_input_holds_each_frame_in_order(mnv2):
    frames = [np.full((30, 40, 3), v, np.uint8) for v in (0, 128, 255)] + [np.zeros((20, 20), np.uint8)]
    batch = mnv2.prepare_batch(frames)
    h, w = mnv2.info.input_size_hw
    assert batch.shape == (4, 3, h, w) and batch.dtype == np.float32
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(batch[i], mnv2.prepare(frame)[0])


def test_frames_per_second_counts_a_first_batch_as_its_start():
    frame_by_frame = _Rate()
    for t in (1.0, 1.5, 2.0):
        frame_by_frame.tick(t)
    assert frame_by_frame.fps == pytest.approx(2 / 1.0)      # (N - 1) / (t_last - t_first)
    batched = _Rate()
    for t in (1.0, 2.0, 3.0):
        batched.tick(t, 4)
    assert batched.done == 12 and batched.fps == pytest.approx(8 / 2.0)   # the first 4 start the clock
    single = _Rate()
    single.tick(1.0, 4)
    assert single.fps == 0.0


@needs_shared
def test_frames_from_memory_are_batched_too(mnv2):
    frames = [Frame(i, np.full((48, 64, 3), 20 * i, np.uint8), 0.0) for i in range(7)]
    sink = Collect()
    result = run_loop(mnv2, iter(frames), sinks=[sink], options=RunOptions(batch=3))
    assert result.frames == len(sink.images) == 7
    assert [img.shape for img in sink.images] == [(48, 64, 3)] * 7
