"""The live view: key transitions, temporal stability, and the loop driven by injected keys."""

import json

import cv2
import numpy as np
import pytest
from conftest import needs_shared, shared
from live_helpers import ScriptedWindow
from synthetic import moving_frames

from realtime_cam import CamModel
from realtime_cam.cams import METHODS, cam
from realtime_cam.explain import Request, explain
from realtime_cam.overlay import prediction_lines
from realtime_cam.pipeline import RunOptions, explain_frame, run_loop
from realtime_cam.sources import open_source
from realtime_cam.temporal import TemporalOptions, TemporalState, hold_leader, smooth_map, smooth_probabilities
from realtime_cam.view import QUIT, RECORD, SNAPSHOT, ViewState, handle_key


def key(ch):
    return ord(ch) if isinstance(ch, str) else ch


# ----------------------------------------------------------------------------- pure transitions
def test_keys_change_the_view_as_documented():
    v = ViewState(topk=3)
    v, _ = handle_key(v, key("n"), 5)
    assert v.rank == 1
    v, _ = handle_key(v, key("p"), 5)
    v, _ = handle_key(v, key("p"), 5)
    assert v.rank == 2                               # wraps around the top-k
    v, _ = handle_key(v, key("c"), 42)
    assert v.pinned_class == 42
    v, _ = handle_key(v, key("c"), 7)
    assert v.pinned_class is None                    # c again unpins
    v, _ = handle_key(v, key("m"), 0)
    assert v.method == list(METHODS)[1]
    v, _ = handle_key(v, key("b"), 0)
    assert v.show_box
    v, _ = handle_key(v, key("+"), 0)
    assert v.alpha == pytest.approx(0.6)
    for _ in range(10):
        v, _ = handle_key(v, key("-"), 0)
    assert v.alpha == 0.0
    v, _ = handle_key(v, 32, 0)
    assert v.paused
    assert handle_key(v, key("s"), 0)[1] == SNAPSHOT
    assert handle_key(v, key("r"), 0)[1] == RECORD
    assert handle_key(v, key("q"), 0)[1] == QUIT and handle_key(v, 27, 0)[1] == QUIT
    assert handle_key(v, -1, 0) == (v, None)


# ----------------------------------------------------------------------------- temporal
class TemporalFilter:
    """Threads one stream's TemporalState through the pure functions, as the loop does."""

    def __init__(self, options=TemporalOptions()):
        self.state = TemporalState(options=options)

    def map(self, raw, key):
        shown, self.state = smooth_map(self.state, raw, key)
        return shown

    def probabilities(self, probs):
        smoothed, self.state = smooth_probabilities(self.state, probs)
        return smoothed

    def leader(self, probs):
        top, self.state = hold_leader(self.state, probs)
        return top


def test_smoothing_averages_and_restarts_when_the_class_changes():
    f = TemporalFilter(TemporalOptions(smooth=0.5, scale="frame"))
    a = np.array([[0.0, 1.0]], np.float32)
    b = np.array([[1.0, 0.0]], np.float32)
    f.map(a, (1, "cam"))
    np.testing.assert_allclose(f.map(b, (1, "cam")), [[0.0, 0.0]])    # 0.5a + 0.5b is constant -> zeros
    np.testing.assert_allclose(f.map(b, (2, "cam")), [[1.0, 0.0]])    # new class: history dropped
    np.testing.assert_allclose(f.map(b, (2, "gradcam")), [[1.0, 0.0]])


def test_probabilities_are_averaged():
    f = TemporalFilter(TemporalOptions(smooth=0.6))
    f.probabilities(np.array([1.0, 0.0], np.float32))
    np.testing.assert_allclose(f.probabilities(np.array([0.0, 1.0], np.float32)), [0.6, 0.4])


def test_hysteresis_keeps_the_label_until_a_challenger_leads_for_n_frames():
    f = TemporalFilter(TemporalOptions(hysteresis=3))
    a, b = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    assert f.leader(a) == 0
    assert [f.leader(b), f.leader(b)] == [0, 0]
    assert f.leader(a) == 0                # the challenger's run is broken
    assert [f.leader(b), f.leader(b), f.leader(b)] == [0, 0, 1]


def test_with_hysteresis_the_list_stays_ranked_by_probability_and_marks_the_held_label():
    """It showed '1. shower curtain 11.2%' above '2. ski mask 18.2%': the held label moved to the top."""
    labels = ["shower curtain", "ski mask", "bathtub"]
    features, head = np.ones((2, 3, 3), np.float32), np.ones((3, 2), np.float32)
    state = TemporalState(options=TemporalOptions(hysteresis=3))
    first, state = explain(np.log([0.6, 0.3, 0.1]), features, head, labels, Request(topk=3), state)
    assert first.class_id == 0 and not first.held
    shown, state = explain(np.log([0.3, 0.45, 0.25]), features, head, labels, Request(topk=3), state)
    assert shown.class_id == 0 and shown.label == "shower curtain" and shown.held   # hysteresis holds it
    assert [c for c, _, _ in shown.topk] == [1, 0, 2]                                 # ... but the list is honest
    lines = prediction_lines(shown)
    assert lines[0].startswith("shower curtain 30.0%") and "held" in lines[0]
    assert [line[:4] for line in lines[1:]] == [" 1. ", ">2. ", " 3. "]
    assert lines[1].startswith(" 1. ski mask 45.0%") and lines[2].startswith(">2. shower curtain 30.0%")
    # n/p step through that list: rank 1 is the second most probable class, not the held one's neighbour
    second, _ = explain(np.log([0.3, 0.45, 0.25]), features, head, labels, Request(topk=3, rank=1), state)
    assert second.class_id == 0 and not second.held


def test_running_scale_stops_the_colours_breathing():
    f = TemporalFilter(TemporalOptions(scale="running", running_decay=0.99))
    strong = np.array([[0.0, 10.0]], np.float32)
    weak = np.array([[0.0, 5.0]], np.float32)
    f.map(strong, (0, "cam"))
    shown = f.map(weak, (0, "cam"))
    assert shown[0, 1] == pytest.approx(0.5, abs=0.01)   # per-frame scaling would show 1.0


# ----------------------------------------------------------------------------- the loop with keys
@pytest.fixture(scope="module")
def mnv2(mnv2_int8_onnx):
    return CamModel(mnv2_int8_onnx, device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_onnx):
    """The tiny onnx.helper contract model: the loop's keys do not depend on what the model sees."""
    return CamModel(tiny_onnx, device="cpu")


def first_bottle_frames(n):
    """The first n frames of the bottle video."""
    frames = []
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        for f in src:
            frames.append(f)
            if len(frames) == n:
                break
    return frames


@pytest.fixture(scope="module")
def frames():
    """12 frames of a disc moving over a synthetic photo."""
    return moving_frames(12)


def test_keys_through_the_loop(tiny, frames, tmp_path):
    window = ScriptedWindow({1: key("n"), 3: key("c"), 5: key("m"), 6: key("s"), 7: key("r"), 9: key("r"),
                             10: key("q")})
    result = run_loop(tiny, iter(frames), window=window,
                      options=RunOptions(view=ViewState(topk=3), snapshot_dir=tmp_path))
    assert result.stopped_by == "quit" and result.frames == 11
    # After 'n' the second of the top-k is explained; 'c' pinned it; 'm' switched to the next method.
    assert result.last.pinned and result.last.method == list(METHODS)[1]
    pngs = sorted(tmp_path.glob("snapshot-*.png"))
    assert len(pngs) == 1
    meta = json.loads(pngs[0].with_suffix(".json").read_text())
    assert meta["method"] == list(METHODS)[1] and meta["pinned"] and len(meta["topk"]) == 3
    assert np.load(pngs[0].with_suffix(".npy")).shape == (7, 7)
    recordings = list(tmp_path.glob("recording-*.mp4"))
    assert len(recordings) == 1
    cap = cv2.VideoCapture(str(recordings[0]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2    # frames 8 and 9 were recorded


def test_pause_holds_the_frame_and_serves_keys(tiny, frames, tmp_path):
    # space pauses at frame 2 (the held frame is redrawn, marked 'paused'); while paused 'b' redraws it with
    # the box; space resumes; q at the next frame.
    window = ScriptedWindow({2: 32, 5: key("q")}, wait_keys=[key("b"), 32])
    result = run_loop(tiny, iter(frames), window=window, options=RunOptions(snapshot_dir=tmp_path))
    assert result.stopped_by == "quit" and result.frames == 4
    assert len(window.shown) == 6                         # 4 frames + 2 redraws of the held frame
    assert not np.array_equal(window.shown[3], window.shown[4])  # the second redraw has the box


def test_window_closed_ends_the_run_like_q(tiny, frames, tmp_path):
    window = ScriptedWindow({})
    window.closed_after = 3
    result = run_loop(tiny, iter(frames), window=window, options=RunOptions(snapshot_dir=tmp_path))
    assert result.stopped_by == "window-closed" and result.frames == 4


def test_pinned_class_is_explained_on_every_frame(tiny, frames):
    view = ViewState(pinned_class=285)  # Egyptian cat, on frames with no cat in them
    f = TemporalState()
    for frame in frames[:3]:
        logits, feats = tiny.infer(frame.image_bgr)
        p, f = explain_frame(tiny, logits, feats, view, f)
        assert p.class_id == 285 and p.pinned and p.label == "Egyptian cat"
        raw = cam(feats, tiny.head_weight, 285)
        np.testing.assert_allclose(p.cam, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5)


@needs_shared
def test_every_live_option_works_headless_on_a_video(mnv2_int8_onnx, tmp_path, capsys):
    from realtime_cam.cli import main

    src = shared("videos", "bottle-detection.mp4")
    for method in METHODS:
        out = tmp_path / f"{method}.mp4"
        assert main(["run", "--model", str(mnv2_int8_onnx), "--source", str(src), "--output", str(out),
                     "--no-display", "--max-frames", "30", "--method", method, "--box", "--smooth", "0.6",
                     "--topk", "5", "--scale", "running", "--colormap", "turbo", "--class", "water bottle"]) == 0
        cap = cv2.VideoCapture(str(out))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 30
    assert "map flicker" in capsys.readouterr().err


@needs_shared
def test_smoothing_reduces_flicker_on_the_bottle_video(mnv2, tmp_path):
    frames = first_bottle_frames(150)
    raw = run_loop(mnv2, iter(frames), options=RunOptions())
    smooth = run_loop(mnv2, iter(frames), options=RunOptions(temporal=TemporalOptions(smooth=0.6)))
    assert smooth.flicker < 0.7 * raw.flicker
