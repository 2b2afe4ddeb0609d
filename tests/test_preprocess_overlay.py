"""Preprocessing and drawing: shapes, dtypes and values on odd and extreme frame sizes."""

import cv2
import numpy as np
import pytest

from realtime_cam.cams import normalize_map
from realtime_cam.errors import SourceError
from realtime_cam.overlay import OverlayStyle, colorize, render
from realtime_cam.preprocess import Preprocessor, as_bgr
from realtime_cam.types import Prediction


def test_preprocessor_equals_the_textbook_transform():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = Preprocessor((224, 224), mean, std, "RGB")(frame)
    rgb = cv2.cvtColor(cv2.resize(frame, (224, 224), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    expected = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_preprocessor_bgr_order_keeps_channels():
    frame = np.zeros((4, 4, 3), np.uint8)
    frame[..., 0] = 255  # blue
    out = Preprocessor((4, 4), (0, 0, 0), (1, 1, 1), "BGR")(frame)
    assert out[0, 0].min() == pytest.approx(1.0) and out[0, 2].max() == 0


@pytest.mark.parametrize("frame,shape", [
    (np.zeros((5, 7), np.uint8), (5, 7, 3)),                  # grayscale
    (np.zeros((5, 7, 1), np.uint8), (5, 7, 3)),
    (np.zeros((5, 7, 4), np.uint8), (5, 7, 3)),               # BGRA
    (np.full((5, 7, 3), 65535, np.uint16), (5, 7, 3)),        # 16-bit
    (np.zeros((1, 1, 3), np.uint8), (1, 1, 3)),               # 1x1 px
])
def test_as_bgr_brings_any_frame_to_uint8_bgr(frame, shape):
    out = as_bgr(frame)
    assert out.shape == shape and out.dtype == np.uint8
    if frame.dtype == np.uint16:
        assert out.max() == 255


def test_as_bgr_refuses_empty():
    with pytest.raises(SourceError):
        as_bgr(np.zeros((0, 0, 3), np.uint8))


def _prediction(cam):
    return Prediction(class_id=1, label="tabby", probability=0.812, topk=((1, "tabby", 0.812),), cam=cam)


@pytest.mark.parametrize("size_wh", [(1, 1), (160, 120), (641, 479), (1920, 1080), (3840, 2160)])
def test_render_keeps_size_and_dtype(size_wh):
    w, h = size_wh
    frame = np.full((h, w, 3), 128, np.uint8)
    cam = normalize_map(np.arange(49, dtype=np.float32).reshape(7, 7))
    out = render(frame, _prediction(cam))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_heatmap_covers_the_whole_frame_with_jet_colours():
    # A map hot in the bottom-right corner: red there, blue at the top-left (JET), over the whole frame.
    frame = np.full((240, 320, 3), 128, np.uint8)
    cam = np.zeros((7, 7), np.float32)
    cam[-1, -1] = 1.0
    out = render(frame, _prediction(cam), OverlayStyle(alpha=1.0))
    b, g, r = out[-2, -2].astype(int)   # JET's top end is dark red
    assert r > 100 and r > 2 * g and b < 60, out[-2, -2]
    b, g, r = out[120, 10].astype(int)   # away from the text box
    assert b > 100 and r < 60, out[120, 10]


def test_alpha_blends_frame_and_heatmap():
    frame = np.full((50, 50, 3), 200, np.uint8)
    cam = np.zeros((7, 7), np.float32)
    heat = colorize(cam, (50, 50))
    out = render(frame, _prediction(cam), OverlayStyle(alpha=0.25))
    expected = (0.75 * 200 + 0.25 * heat[40, 40].astype(float))
    np.testing.assert_allclose(out[40, 40], expected, atol=1.0)


@pytest.mark.parametrize("size_wh", [(160, 120), (3840, 2160)])
def test_label_is_drawn_legibly(size_wh):
    # The label box holds white text whose height scales with the frame (>= 7 px at 160x120).
    w, h = size_wh
    frame = np.zeros((h, w, 3), np.uint8)
    out = render(frame, _prediction(np.zeros((7, 7), np.float32)), OverlayStyle(alpha=0.0))
    white = np.all(out > 200, axis=2)
    rows = np.flatnonzero(white.any(axis=1))
    cols = np.flatnonzero(white.any(axis=0))
    assert rows.size and cols.size
    assert rows.max() - rows.min() >= max(7, h // 40)
    assert cols.max() < w


def _ranked_prediction(cam):
    top = ((1, "tabby", 0.812), (2, "tiger cat", 0.101), (3, "egyptian cat", 0.05))
    return Prediction(class_id=1, label="tabby", probability=0.812, topk=top, cam=cam)


def _light_line_between_dark(row):
    """The widest run of light pixels (every channel > 200) with dark ones (every channel < 80) right on both
    sides, across a line drawn on the image; 0 when there is none."""
    light, dark = row.min(axis=1) > 200, row.max(axis=1) < 80
    widest, start = 0, None
    for i, is_light in enumerate([*light, False]):
        if is_light and start is None:
            start = i
        elif not is_light and start is not None:
            if dark[max(0, start - 3):start].any() and dark[i:i + 3].any():
                widest = max(widest, i - start)
            start = None
    return widest


@pytest.mark.parametrize("size_wh, width", [((640, 360), 2), ((1920, 1080), 5)])
@pytest.mark.parametrize("background", ["black", "white", "heatmap"])
def test_the_box_is_a_light_line_with_a_dark_outline_on_any_image(size_wh, width, background):
    """It was a one-pixel light line in a three-pixel dark outline: a thin dark line on most images."""
    w, h = size_wh
    frame = np.full((h, w, 3), 255 if background == "white" else 0, np.uint8)
    cam = normalize_map(np.arange(49, dtype=np.float32).reshape(7, 7))
    out = render(frame, _ranked_prediction(cam), OverlayStyle(alpha=1.0 if background == "heatmap" else 0.0),
                 box_xyxy=(0.3 * w, 0.3 * h, 0.8 * w, 0.9 * h))
    x0, y = int(0.3 * w), int(0.6 * h)
    assert _light_line_between_dark(out[y, x0 - 20:x0 + 20]) >= width       # the left edge, across
    x = int(0.55 * w)
    assert _light_line_between_dark(out[int(0.3 * h) - 20:int(0.3 * h) + 20, x]) >= width   # the top edge


def test_the_box_and_its_label_stay_clear_of_the_class_list():
    """A box near the top-left: its label was drawn where the class list then covered it."""
    w, h = 640, 360
    frame = np.full((h, w, 3), 128, np.uint8)
    prediction = _ranked_prediction(np.zeros((7, 7), np.float32))
    plain = render(frame, prediction, OverlayStyle(alpha=0.0))
    listed = np.argwhere((plain != frame).any(axis=2))
    (ly0, lx0), (ly1, lx1) = listed.min(axis=0), listed.max(axis=0) + 1         # the class list's block
    assert (ly0, lx0) == (0, 0) and ly1 < h // 2
    box = (0.0, 0.0, 0.3 * w, ly1 - 10.0)                                       # its bottom-left in the list
    boxed = render(frame, prediction, OverlayStyle(alpha=0.0), box_xyxy=box)
    near_box_lines = np.zeros((h, w), bool)
    bx1, by1, margin = int(box[2]), int(box[3]), 12
    near_box_lines[:by1 + margin, max(0, bx1 - margin):bx1 + margin] = True    # the right edge
    near_box_lines[max(0, by1 - margin):by1 + margin, :bx1 + margin] = True    # the bottom edge
    near_box_lines[:margin, :bx1 + margin] = near_box_lines[:by1 + margin, :margin] = True
    changed = (boxed != plain).any(axis=2)
    in_list = np.zeros((h, w), bool)
    in_list[ly0:ly1, lx0:lx1] = True
    # The class list's letters are all there, and the box label is somewhere else, visible.
    letters = in_list & (plain.min(axis=2) == 255)          # their cores (edges are anti-aliased)
    assert (boxed[letters].min(axis=1) > 200).all(), "the box covers the class list's letters"
    assert (changed & in_list & ~near_box_lines).sum() == 0, "the box label covers the class list"
    assert (changed & ~in_list & ~near_box_lines).sum() > 50, "the box label is nowhere to be seen"
