"""The metrics of ``evaluate``, as pure functions on maps and boxes (per wsolevaluation where named).

Boxes are ``box_xyxy`` with pixel edges, as in ``realtime_cam.localize`` (x1, y1 exclusive); MaxBoxAcc uses
wsolevaluation's own convention (integer boxes, inclusive corners, ``+ 1`` in areas) so that its numbers are
computed the way theirs are.

What each number means (all in percent of the evaluated images):

* ``top1`` / ``top{k}``: the ground-truth class is the top-1 / among the top-k predicted classes.
* ``gt_known_loc``: the ground-truth class's map, the paper's box rule (``localize.cam_box``: threshold the
  min-max normalised map at ``box_threshold`` of its maximum, box of the largest 8-connected component, exactly
  as the live overlay draws it) has IoU >= 0.5 with at least one ground-truth box of the image.
* ``top1_loc``: gt_known_loc and top-1 correct. ``top{k}_loc`` (Zhou et al.'s top-5 localization): among the
  top-k classes' boxes one has the right class and IoU >= 0.5; only the ground-truth class can have the right
  class, so this is: the ground-truth class is in the top-k and its map's box is correct.
* ``max_box_acc`` / ``max_box_acc_v2``: wsolevaluation (Choe et al., CVPR 2020), see :func:`wsol_best_ious`.
* ``pointing_game``: the peak of the ground-truth class's map, upsampled to the image, lies in a box
  (or within ``pointing_tolerance`` pixels of one).
* ``center_baseline``: a box centred in the image with sides a fraction f of the image's, the best f over
  0.50..1.00: a map that does not beat it localizes no better than a prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..cams import top_k_ids
from ..errors import CamError
from ..localize import Box, cam_box, iou, upsample

# wsolevaluation's threshold list at its default cam_curve_interval of 0.01: 0.00, 0.01, ..., 0.99.
CAM_THRESHOLDS = np.arange(0, 1, 0.01)
# MaxBoxAccV2 averages MaxBoxAcc at these IoU thresholds (wsolevaluation's iou_threshold_list 30, 50, 70).
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
LOC_IOU = 0.5
# The centre-box baseline searches box sides of 0.50, 0.51, ..., 1.00 of the image's.
CENTER_FRACTIONS = np.round(np.arange(50, 101) / 100.0, 2)
# ImageNet evaluation: resize the shorter side to 256 for a 224 crop.
CROP_RESIZE_RATIO = 256 / 224

BoxIncl = tuple[int, int, int, int]

CROPS = ("none", "center")  # evaluate --crop: the whole image resized, or ImageNet's resize + centre crop


# ----------------------------------------------------------------------------- crop and geometry
@dataclass(frozen=True)
class CropTransform:
    """ImageNet-style evaluation crop: resize so the crop's shorter side is 224/256 of the resized image's.

    Attributes:
        resized_wh: the whole image's size after resizing.
        offset_xy: the crop's top-left corner in the resized image.
        crop_wh: the crop's size (the model's input size).
        scale_xy: the resize factor per axis (resized over original size).
    """

    resized_wh: tuple[int, int]
    offset_xy: tuple[int, int]
    crop_wh: tuple[int, int]
    scale_xy: tuple[float, float]


def center_crop_transform(size_wh: tuple[int, int], input_hw: tuple[int, int],
                          ratio: float = CROP_RESIZE_RATIO) -> CropTransform:
    """Resize by ``ratio`` * the input size (the shorter side to 256 for a 224 input), then centre-crop.

    For a non-square input the image is scaled so that both sides cover the crop times ``ratio``.
    """
    w, h = size_wh
    in_h, in_w = input_hw
    scale = ratio * max(in_h / h, in_w / w)
    rw, rh = max(in_w, int(round(w * scale))), max(in_h, int(round(h * scale)))
    ox, oy = int(round((rw - in_w) / 2.0)), int(round((rh - in_h) / 2.0))
    return CropTransform((rw, rh), (ox, oy), (in_w, in_h), (rw / w, rh / h))


def apply_crop(frame_bgr: np.ndarray, tf: CropTransform) -> np.ndarray:
    """The crop a CropTransform describes, as an image."""
    resized = cv2.resize(frame_bgr, tf.resized_wh, interpolation=cv2.INTER_LINEAR)
    (ox, oy), (cw, ch) = tf.offset_xy, tf.crop_wh
    return np.ascontiguousarray(resized[oy:oy + ch, ox:ox + cw])


def crop_boxes(boxes_xyxy: Sequence[Box], tf: CropTransform) -> tuple[Box, ...]:
    """Boxes moved into crop coordinates, clipped to the crop; boxes left with no area are dropped."""
    sx, sy = tf.scale_xy
    (ox, oy), (cw, ch) = tf.offset_xy, tf.crop_wh
    out = []
    for x0, y0, x1, y1 in boxes_xyxy:
        b = (min(max(x0 * sx - ox, 0.0), float(cw)), min(max(y0 * sy - oy, 0.0), float(ch)),
             min(max(x1 * sx - ox, 0.0), float(cw)), min(max(y1 * sy - oy, 0.0), float(ch)))
        if b[2] > b[0] and b[3] > b[1]:
            out.append(b)
    return tuple(out)


def clip_boxes(boxes_xyxy: Sequence[Box], size_wh: tuple[int, int]) -> tuple[Box, ...]:
    """Boxes clipped to the image (annotations are sometimes a pixel past the edge)."""
    w, h = size_wh
    out = []
    for x0, y0, x1, y1 in boxes_xyxy:
        b = (float(min(x0, w)), float(min(y0, h)), float(min(x1, w)), float(min(y1, h)))
        if b[2] > b[0] and b[3] > b[1]:
            out.append(b)
    return tuple(out)


def best_iou(box: Box | None, gt_boxes_xyxy: Sequence[Box]) -> float:
    """The highest IoU of a box with any ground-truth box (0 for no box)."""
    if box is None:
        return 0.0
    return max((iou(box, g) for g in gt_boxes_xyxy), default=0.0)


def peak_xy(map_hw: np.ndarray) -> tuple[int, int]:
    """The (x, y) pixel of a map's maximum (the first in raster order on a tie)."""
    y, x = np.unravel_index(int(np.argmax(map_hw)), map_hw.shape)
    return int(x), int(y)


def point_hits(point_xy: tuple[int, int], gt_boxes_xyxy: Sequence[Box], tolerance: float = 0.0) -> bool:
    """Whether a pixel's centre lies in a box, or within ``tolerance`` pixels (Euclidean) of one."""
    cx, cy = point_xy[0] + 0.5, point_xy[1] + 0.5
    for x0, y0, x1, y1 in gt_boxes_xyxy:
        dx = max(x0 - cx, 0.0, cx - x1)
        dy = max(y0 - cy, 0.0, cy - y1)
        if math.hypot(dx, dy) <= tolerance:
            return True
    return False


def center_box(size_wh: tuple[int, int], fraction: float) -> Box:
    """The box centred in the image with sides ``fraction`` of the image's."""
    w, h = size_wh
    return ((1 - fraction) * w / 2, (1 - fraction) * h / 2, (1 + fraction) * w / 2, (1 + fraction) * h / 2)


def center_baseline(sizes_wh: Sequence[tuple[int, int]], gt_boxes: Sequence[Sequence[Box]],
                    fractions: Sequence[float] = tuple(CENTER_FRACTIONS)) -> tuple[float, float]:
    """Accuracy (percent, IoU >= 0.5 with a box) of the best centred box, and its side fraction.

    On a tie the smallest fraction wins.
    """
    if not sizes_wh:
        return 0.0, float(fractions[0])
    accuracies = [100.0 * sum(best_iou(center_box(s, f), b) >= LOC_IOU for s, b in zip(sizes_wh, gt_boxes))
                  / len(sizes_wh) for f in fractions]
    i = int(np.argmax(accuracies))
    return float(accuracies[i]), float(fractions[i])


# ----------------------------------------------------------------------------- wsolevaluation
# MaxBoxAcc and MaxBoxAccV2 follow clovaai/wsolevaluation, evaluation.py (BoxEvaluator,
# compute_bboxes_from_scoremaps, calculate_multiple_iou) and inference.py (normalize_scoremap):
# the map is resized with bicubic interpolation and min-max normalised; it is quantised to uint8 (x255,
# truncated) and a pixel is in at threshold t when its value is strictly above int(t * max) (cv2.THRESH_BINARY);
# boxes are the bounding rectangles of cv2.findContours(RETR_TREE) contours, (x, y, x + w, y + h) clipped to
# (W - 1, H - 1); IoU counts inclusive corners (areas with + 1); no contour gives the box (0, 0, 0, 0).
# MaxBoxAcc: the contour of largest cv2.contourArea, IoU >= 0.5 with any ground-truth box, the best threshold.
# MaxBoxAccV2 (multi_contour_eval): every contour's box, the best-matching one counts; MaxBoxAcc at IoU
# 0.3, 0.5 and 0.7, each maximised over thresholds separately, then averaged.
# Differences, on purpose: the map is resized to the evaluated image (the original image for --crop none)
# rather than to 224x224 with boxes scaled to it; IoU is unchanged by that per-axis scaling, so only pixel
# rounding differs.
def wsol_scoremap(map_hw: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """A map resized (bicubic) to ``size_wh`` and min-max normalised to [0, 1], float64; constant -> zeros."""
    up = cv2.resize(np.asarray(map_hw, dtype=np.float64), size_wh, interpolation=cv2.INTER_CUBIC)
    if not np.isfinite(up).all():
        return np.zeros_like(up)
    lo, hi = float(up.min()), float(up.max())
    if hi == lo:
        return np.zeros_like(up)
    return (up - lo) / (hi - lo)


def to_inclusive(box_xyxy: Box) -> BoxIncl:
    """A pixel-edge box as wsolevaluation's integer box with inclusive corners."""
    x0, y0, x1, y1 = box_xyxy
    return (int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)) - 1, int(math.ceil(y1)) - 1)


def wsol_iou(a: BoxIncl, b: BoxIncl) -> float:
    """IoU with inclusive integer corners (wsolevaluation's calculate_multiple_iou), 0 when degenerate."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union if union > 0 else 0.0


def wsol_boxes(scoremap01: np.ndarray, threshold: float) -> tuple[BoxIncl, list[BoxIncl]]:
    """The largest contour's box and every contour's box at one threshold (wsolevaluation's scoremap2bbox)."""
    height, width = scoremap01.shape
    image = (scoremap01 * 255).astype(np.uint8)
    # THRESH_BINARY keeps values strictly above the threshold.
    mask = (image > int(threshold * int(image.max()))).astype(np.uint8)
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return (0, 0, 0, 0), [(0, 0, 0, 0)]

    def rect(contour: np.ndarray) -> BoxIncl:
        x, y, w, h = cv2.boundingRect(contour)
        return (x, y, min(x + w, width - 1), min(y + h, height - 1))

    largest = max(contours, key=cv2.contourArea)  # the first of equal areas, as Python's max picks
    return rect(largest), [rect(c) for c in contours]


def wsol_best_ious(scoremap01: np.ndarray, gt_boxes_xyxy: Sequence[Box],
                   thresholds: Sequence[float] = CAM_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold, the best IoU with a ground-truth box of (the largest contour's box, any contour's box).

    Returns two float arrays [len(thresholds)]: MaxBoxAcc uses the first, MaxBoxAccV2 the second.
    """
    gts = [to_inclusive(g) for g in gt_boxes_xyxy]
    largest_ious = np.zeros(len(thresholds))
    all_ious = np.zeros(len(thresholds))
    if not gts:
        return largest_ious, all_ious
    for i, t in enumerate(thresholds):
        largest, boxes = wsol_boxes(scoremap01, float(t))
        largest_ious[i] = max(wsol_iou(largest, g) for g in gts)
        all_ious[i] = max(wsol_iou(b, g) for b in boxes for g in gts)
    return largest_ious, all_ious


def max_box_acc(best_ious: np.ndarray, thresholds: Sequence[float] = CAM_THRESHOLDS,
                iou_threshold: float = LOC_IOU) -> tuple[float, float]:
    """MaxBoxAcc from per-image, per-threshold best IoUs [N, T]: (accuracy in percent, its threshold).

    On a tie the lowest threshold is reported (wsolevaluation reports only the accuracy).
    """
    ious = np.asarray(best_ious, dtype=np.float64).reshape(-1, len(thresholds))
    if ious.shape[0] == 0:
        return 0.0, float(thresholds[0])
    accuracies = (ious >= iou_threshold).sum(axis=0) * 100.0 / ious.shape[0]
    i = int(np.argmax(accuracies))
    return float(accuracies[i]), round(float(thresholds[i]), 6)


def max_box_acc_v2(
    best_ious_all: np.ndarray, thresholds: Sequence[float] = CAM_THRESHOLDS,
    iou_thresholds: Sequence[float] = V2_IOU_THRESHOLDS,
) -> tuple[float, dict[float, tuple[float, float]]]:
    """MaxBoxAccV2: the mean over IoU thresholds of MaxBoxAcc (each with its own best threshold).

    Returns (mean in percent, {iou_threshold: (MaxBoxAcc, best cam threshold)}).
    """
    per = {float(d): max_box_acc(best_ious_all, thresholds, d) for d in iou_thresholds}
    return float(np.mean([acc for acc, _ in per.values()])), per


# ----------------------------------------------------------------------------- per image and summary
def rank_classes(logits: np.ndarray, k: int) -> tuple[int, ...]:
    """The k highest-scoring classes, best first; equal logits are ranked by class id (like np.argmax).

    An int8 model's logits take few distinct values, so exact ties for the top-1 do happen; a fixed rule
    keeps top-1 the same whatever k is.
    """
    return tuple(int(c) for c in top_k_ids(np.asarray(logits), k))


@dataclass(frozen=True, eq=False)
class ImageResult:
    """What one image scored (coordinates are those of the evaluated image: the original, or the crop).

    Attributes:
        file: the annotation's file name.
        class_id: the ground-truth class.
        size_wh: the evaluated image's size.
        gt_boxes_xyxy: the ground-truth boxes in it.
        topk_ids: the k most probable classes, most probable first.
        box_xyxy: the paper's-rule box of the ground-truth class's map (None for an empty map).
        box_iou: its best IoU with a ground-truth box.
        peak_xy: the map's peak, in pixels of the evaluated image.
        pointing_hit: the peak is in (or within the tolerance of) a box.
        wsol_ious_largest / wsol_ious_all: per cam threshold, best IoU of the largest / any contour's box.
        top1_tie: the highest logit is shared by several classes (quantized models do this); the ranking
            puts the lowest class id first, as ``np.argmax`` does.
    """

    file: str
    class_id: int
    size_wh: tuple[int, int]
    gt_boxes_xyxy: tuple[Box, ...]
    topk_ids: tuple[int, ...]
    box_xyxy: Box | None
    box_iou: float
    peak_xy: tuple[int, int]
    pointing_hit: bool
    wsol_ious_largest: np.ndarray = field(repr=False)
    wsol_ious_all: np.ndarray = field(repr=False)
    top1_tie: bool = False

    @property
    def top1_correct(self) -> bool:
        return bool(self.topk_ids) and self.topk_ids[0] == self.class_id

    @property
    def topk_correct(self) -> bool:
        return self.class_id in self.topk_ids

    @property
    def loc_correct(self) -> bool:
        """GT-known localization: the ground-truth class's box has IoU >= 0.5 with a ground-truth box."""
        return self.box_iou >= LOC_IOU


def score_image(map_hw: np.ndarray, gt_boxes_xyxy: Sequence[Box], size_wh: tuple[int, int], class_id: int,
                topk_ids: Sequence[int], file: str = "", box_threshold: float = 0.2,
                pointing_tolerance: float = 0.0, top1_tie: bool = False,
                thresholds: Sequence[float] = CAM_THRESHOLDS) -> ImageResult:
    """Every per-image metric from the ground-truth class's map (at any resolution, normalised or not).

    Args:
        map_hw: the ground-truth class's map, e.g. at feature resolution.
        gt_boxes_xyxy: ground-truth boxes, pixel edges in an image of ``size_wh``.
        size_wh: the evaluated image's (width, height).
        class_id: the ground-truth class.
        topk_ids: the predicted classes, most probable first.
        box_threshold: the paper's rule threshold, a fraction of the map's maximum.
        pointing_tolerance: pixels around a box that still count for the pointing game.
        top1_tie: recorded as is (see ImageResult).
        thresholds: the MaxBoxAcc threshold list.
    """
    map01 = np.asarray(map_hw, dtype=np.float32)
    lo, hi = float(map01.min()), float(map01.max())
    map01 = (map01 - lo) / (hi - lo) if hi > lo else np.zeros_like(map01)
    box = cam_box(map01, size_wh, threshold=box_threshold)
    peak = peak_xy(upsample(map01, size_wh))
    largest, every = wsol_best_ious(wsol_scoremap(map01, size_wh), gt_boxes_xyxy, thresholds)
    return ImageResult(
        file=file, class_id=int(class_id), size_wh=(int(size_wh[0]), int(size_wh[1])),
        gt_boxes_xyxy=tuple(gt_boxes_xyxy), topk_ids=tuple(int(c) for c in topk_ids), box_xyxy=box,
        box_iou=best_iou(box, gt_boxes_xyxy), peak_xy=peak,
        pointing_hit=point_hits(peak, gt_boxes_xyxy, pointing_tolerance),
        wsol_ious_largest=largest, wsol_ious_all=every, top1_tie=top1_tie,
    )


@dataclass(frozen=True)
class EvalSummary:
    """The dataset's numbers, in percent of the images (thresholds and fractions as fractions).

    An image with objects of several classes counts once per class: ``images`` is the number of
    (image, class) rows scored.

    Attributes:
        topk: the k of ``topk_acc`` and ``topk_loc``.
        max_box_acc_v2_per_iou: {IoU threshold: (MaxBoxAcc, its best cam threshold)}.
    """

    images: int
    boxes: int
    topk: int
    top1: float
    topk_acc: float
    gt_known_loc: float
    top1_loc: float
    topk_loc: float
    max_box_acc: float
    max_box_acc_threshold: float
    max_box_acc_v2: float
    max_box_acc_v2_per_iou: dict[float, tuple[float, float]]
    pointing_game: float
    center_baseline: float
    center_baseline_fraction: float
    top1_ties: int = 0


def summarize(results: Sequence[ImageResult], topk: int = 5,
              thresholds: Sequence[float] = CAM_THRESHOLDS) -> EvalSummary:
    """Aggregate per-image results into the dataset's numbers."""
    n = len(results)
    if n == 0:
        raise CamError("no images to evaluate")

    def pct(flags: Sequence[bool]) -> float:
        return 100.0 * sum(bool(f) for f in flags) / n

    largest = np.stack([r.wsol_ious_largest for r in results])
    every = np.stack([r.wsol_ious_all for r in results])
    mba, mba_t = max_box_acc(largest, thresholds, LOC_IOU)
    v2, v2_per = max_box_acc_v2(every, thresholds)
    center, center_f = center_baseline([r.size_wh for r in results], [r.gt_boxes_xyxy for r in results])
    return EvalSummary(
        images=n, boxes=sum(len(r.gt_boxes_xyxy) for r in results), topk=topk,
        top1=pct([r.top1_correct for r in results]),
        topk_acc=pct([r.topk_correct for r in results]),
        gt_known_loc=pct([r.loc_correct for r in results]),
        top1_loc=pct([r.top1_correct and r.loc_correct for r in results]),
        topk_loc=pct([r.topk_correct and r.loc_correct for r in results]),
        max_box_acc=mba, max_box_acc_threshold=mba_t, max_box_acc_v2=v2, max_box_acc_v2_per_iou=v2_per,
        pointing_game=pct([r.pointing_hit for r in results]),
        center_baseline=center, center_baseline_fraction=center_f,
        top1_ties=sum(r.top1_tie for r in results),
    )
