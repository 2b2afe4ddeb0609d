"""Boxes from maps (the CAM paper's rule), IoU: shared by the live overlay and `evaluate`.

Boxes are ``box_xyxy`` in pixel-edge coordinates of the frame: (x0, y0, x1, y1) with x1, y1 exclusive,
so a box covering the single pixel (3, 4) is (3, 4, 4, 5) and its area is (x1 - x0) * (y1 - y0).
"""

from __future__ import annotations

import cv2
import numpy as np

Box = tuple[float, float, float, float]


def upsample(map01: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a map to (width, height), as drawn on screen."""
    return cv2.resize(map01.astype(np.float32, copy=False), size_wh, interpolation=cv2.INTER_LINEAR)


def component_boxes(mask: np.ndarray) -> list[tuple[Box, int]]:
    """Every 8-connected component of a boolean mask as (box_xyxy, area in pixels), largest first."""
    if not mask.any():
        return []
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    boxes = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        boxes.append(((float(x), float(y), float(x + w), float(y + h)), area))
    boxes.sort(key=lambda item: -item[1])
    return boxes


def threshold_mask(map_hw: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels at or above ``threshold`` times the map's maximum; nothing for a map with no positive peak."""
    peak = float(map_hw.max()) if map_hw.size else 0.0
    if peak <= 0 or not np.isfinite(peak):
        return np.zeros(map_hw.shape, bool)
    return map_hw >= threshold * peak


def cam_box(map01: np.ndarray, frame_size_wh: tuple[int, int], threshold: float = 0.2,
            work_width: int = 640) -> Box | None:
    """The paper's box: threshold at ``threshold`` of the map's max, largest connected component's box.

    The map is upsampled to the frame's aspect at most ``work_width`` wide (boxes at 4K cost no more than
    at 640), and the box is scaled to frame coordinates. None when no pixel passes (an empty map).
    """
    fw, fh = frame_size_wh
    scale = min(1.0, work_width / max(fw, 1))
    ww, wh = max(1, round(fw * scale)), max(1, round(fh * scale))
    boxes = component_boxes(threshold_mask(upsample(map01, (ww, wh)), threshold))
    if not boxes:
        return None
    x0, y0, x1, y1 = boxes[0][0]
    sx, sy = fw / ww, fh / wh
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
