"""The paper's box rule on crafted maps, including an empty map and a map touching the border."""

import numpy as np
import pytest

from realtime_cam.localize import cam_box, component_boxes, iou, threshold_mask


def test_largest_component_wins_and_box_is_in_frame_coordinates():
    m = np.zeros((10, 10), np.float32)
    m[1:3, 1:3] = 1.0          # small, hottest blob
    m[5:9, 4:9] = 0.5          # larger, cooler blob (above 0.2 of the max)
    boxes = component_boxes(threshold_mask(m, 0.2))
    assert boxes[0] == ((4.0, 5.0, 9.0, 9.0), 20)
    assert boxes[1] == ((1.0, 1.0, 3.0, 3.0), 4)


def test_threshold_is_relative_to_the_maximum():
    m = np.array([[0.0, 0.1], [0.3, 1.0]], np.float32)
    assert threshold_mask(m, 0.2).tolist() == [[False, False], [True, True]]
    assert threshold_mask(m, 0.5).tolist() == [[False, False], [False, True]]


def test_empty_and_constant_zero_maps_give_no_box():
    assert cam_box(np.zeros((7, 7), np.float32), (224, 224)) is None
    assert component_boxes(np.zeros((4, 4), bool)) == []


def test_map_touching_the_border_gives_a_box_to_the_edge():
    m = np.zeros((7, 7), np.float32)
    m[:, 5:] = 1.0             # the right two columns, full height
    box = cam_box(m, (700, 700), threshold=0.5)
    x0, y0, x1, y1 = box
    assert x1 == pytest.approx(700) and y0 == 0 and y1 == pytest.approx(700)
    assert 450 < x0 < 560      # the upsampled edge lies between the columns


def test_box_scales_with_the_frame_and_work_width():
    m = np.zeros((8, 8), np.float32)
    m[2:6, 2:6] = 1.0
    small = cam_box(m, (160, 160), threshold=0.5)
    big = cam_box(m, (1600, 1600), threshold=0.5)    # computed at 640 wide, scaled by 2.5
    np.testing.assert_allclose(np.array(big) / 10, small, atol=1.0)


@pytest.mark.parametrize("a,b,expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
    ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),
])
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
