"""`realtime-cam evaluate`: classification and localization accuracy of the maps on annotated images.

Three layers, kept apart so the math can be tested on hand-made maps and boxes:

* reading ground truth (:func:`load_ground_truth`: a CSV with one row per box, or PASCAL VOC / ImageNet XML);
* pure metric functions on arrays and boxes (:func:`score_image`, :func:`summarize` and the helpers they
  use), returning frozen dataclasses;
* the model part (:func:`run_evaluate`), which loads each image, runs the model and hands the map to
  :func:`score_image`; and the command (:func:`add_parser`, :func:`cmd_evaluate`).

Box conventions. Inside this module boxes are ``box_xyxy`` with pixel edges, as in ``realtime_cam.localize``
(x1, y1 exclusive). Files use pixel *indices* with the last row/column included: a CSV row gives 0-based
indices (wsolevaluation's metadata and ``../shared/data/imagenet-val-20/annotations.csv``: x1 = 499 in a
500-wide image), a VOC/ImageNet XML gives 1-based ones. MaxBoxAcc uses wsolevaluation's own convention (integer
boxes, inclusive corners, ``+ 1`` in areas) so that its numbers are computed the way theirs are.

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

import argparse
import collections
import csv
import logging
import math
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Callable, Sequence

import cv2
import numpy as np

from .cams import METHODS, top_k_ids
from .cliutil import HelpFormatter, fraction, non_negative_float, positive_int
from .labels import whole_number
from .errors import CamError, SinkError
from .explain import Request, explain
from .localize import Box, cam_box, iou, upsample
from .progress import Progress
from .sinks import write_json

if TYPE_CHECKING:  # run_evaluate imports the model (and ONNX Runtime) only when it runs
    from .model import CamModel, Prediction

log = logging.getLogger("realtime_cam")

# wsolevaluation's threshold list at its default cam_curve_interval of 0.01: 0.00, 0.01, ..., 0.99.
CAM_THRESHOLDS = np.arange(0, 1, 0.01)
# MaxBoxAccV2 averages MaxBoxAcc at these IoU thresholds (wsolevaluation's iou_threshold_list 30, 50, 70).
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
LOC_IOU = 0.5
# The centre-box baseline searches box sides of 0.50, 0.51, ..., 1.00 of the image's.
CENTER_FRACTIONS = np.round(np.arange(50, 101) / 100.0, 2)
CROPS = ("none", "center")
# ImageNet evaluation: resize the shorter side to 256 for a 224 crop.
CROP_RESIZE_RATIO = 256 / 224
IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG", ".bmp", ".webp", ".tif", ".tiff")
REQUIRED_COLUMNS = ("file", "class_id", "x0", "y0", "x1", "y1")

BoxIncl = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class GroundTruth:
    """The annotated boxes of one class in one image (an image with several classes has one per class).

    Attributes:
        file: the image's path relative to the images folder, as the annotation names it.
        class_id: the ground-truth class.
        boxes_xyxy: its boxes, pixel edges in the stored image's coordinates.
        size_wh: the image size the annotation states, or None when it states none.
        where: where the annotation came from ("annotations.csv line 7"), for error messages.
    """

    file: str
    class_id: int
    boxes_xyxy: tuple[Box, ...]
    size_wh: tuple[int, int] | None = None
    where: str = ""


def _number(text: str | None, what: str, where: str) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        raise CamError(f"{where}: {what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise CamError(f"{where}: {what} is not finite: {text!r}")
    return value


def _checked_box(x0: float, y0: float, x1: float, y1: float, where: str) -> Box:
    if x0 < 0 or y0 < 0:
        raise CamError(f"{where}: negative box coordinate ({x0:g}, {y0:g})")
    if x1 <= x0 or y1 <= y0:
        raise CamError(f"{where}: empty box (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g})")
    return (x0, y0, x1, y1)


class _Collector:
    """Groups boxes by (image, class), in the order they first appear.

    An image with objects of several classes (common in PASCAL VOC) is scored once per class: each pair is
    a row, explained for its class against that class's boxes.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[str, int], dict] = {}
        self._sizes: dict[str, tuple[tuple[int, int], str]] = {}  # file -> first stated size, where

    def add(self, file: str, class_id: int, box: Box, size_wh: tuple[int, int] | None, where: str) -> None:
        item = self.items.setdefault((file, class_id), {"boxes": [], "size_wh": size_wh, "where": where})
        if size_wh is not None:  # one size per file, whichever class's row states it first
            first_size, first_where = self._sizes.setdefault(file, (size_wh, where))
            if size_wh != first_size:
                raise CamError(f"{where}: {file} is {size_wh[0]}x{size_wh[1]} here but "
                               f"{first_size[0]}x{first_size[1]} in {first_where}")
        item["boxes"].append(box)

    def result(self) -> list[GroundTruth]:
        return [GroundTruth(file, class_id, tuple(it["boxes"]), it["size_wh"], it["where"])
                for (file, class_id), it in self.items.items()]


def read_boxes_csv(path: Path, num_classes: int | None = None) -> list[GroundTruth]:
    """Read a CSV with a header naming at least file,class_id,x0,y0,x1,y1 (any case, extra columns allowed).

    Coordinates are 0-based pixel indices, x1/y1 included (as in wsolevaluation's metadata). Optional
    ``width`` and ``height`` columns are checked against the images.
    """
    name = path.name
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CamError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise CamError(f"{name} is empty: it needs a header line file,class_id,x0,y0,x1,y1") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CamError(f"{name} line 1: not a CSV file ({exc})") from None
        columns = [c.strip().lower() for c in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise CamError(f"{name}: the header must name {','.join(REQUIRED_COLUMNS)} (missing "
                           f"{', '.join(missing)}; got {','.join(columns)})")
        index = {c: columns.index(c) for c in (*REQUIRED_COLUMNS, "width", "height") if c in columns}
        collector = _Collector()
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                where = f"{name} line {line}"
                if len(row) < len(columns):
                    raise CamError(f"{where}: {len(row)} fields, the header has {len(columns)}")
                file = row[index["file"]].strip()
                if not file:
                    raise CamError(f"{where}: empty file name")
                class_text = row[index["class_id"]].strip()
                class_id = whole_number(class_text)
                if class_id is None:
                    raise CamError(f"{where}: class_id is not a whole number: {class_text!r}")
                if class_id < 0 or (num_classes is not None and class_id >= num_classes):
                    raise CamError(f"{where}: class_id {class_id} is out of range for a model with "
                                   f"{num_classes} classes")
                x0, y0, x1, y1 = (_number(row[index[c]], c, where) for c in ("x0", "y0", "x1", "y1"))
                # Inclusive indices -> pixel edges: the last column/row is inside the box.
                box = _checked_box(x0, y0, x1 + 1, y1 + 1, where)
                size_wh = None
                if "width" in index and "height" in index:
                    w_text, h_text = row[index["width"]].strip(), row[index["height"]].strip()
                    if w_text or h_text:
                        w, h = _number(w_text, "width", where), _number(h_text, "height", where)
                        if w < 1 or h < 1 or w != int(w) or h != int(h):
                            raise CamError(f"{where}: bad image size {w_text}x{h_text}")
                        size_wh = (int(w), int(h))
                collector.add(file, class_id, box, size_wh, where)
        except csv.Error as exc:
            raise CamError(f"{name} line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise CamError(f"{name} near line {line + 1}: not UTF-8 text") from None
    result = collector.result()
    if not result:
        raise CamError(f"{name} has a header but no boxes")
    return result


WNID_RE = re.compile(r"^n\d{8}$")


def load_wnids(path: str | os.PathLike) -> dict[str, int]:
    """WordNet ids in class order, one per line, first word of the line (ImageNet's LOC_synset_mapping.txt)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CamError(f"cannot read --wnids {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CamError(f"--wnids {path} is not a UTF-8 text file") from None
    wnids = [line.split()[0] for line in lines if line.strip()]
    bad = [w for w in wnids if not WNID_RE.match(w)]
    if bad or not wnids:
        raise CamError(f"--wnids {path}: expected one WordNet id (like n01440764) per line, found {bad[:1] or 'none'}")
    return {w: i for i, w in enumerate(wnids)}


def _class_from_name(name: str, labels: Sequence[str], where: str, wnids: dict[str, int] | None = None) -> int:
    text = name.strip()
    if WNID_RE.match(text):
        if wnids is None:
            raise CamError(f"{where}: object name {text!r} is a WordNet id: pass --wnids FILE (ImageNet's "
                           "LOC_synset_mapping.txt: one id per line, in class order)")
        if text not in wnids:
            raise CamError(f"{where}: WordNet id {text!r} is not in --wnids")
        class_id = wnids[text]
        if class_id >= len(labels):
            raise CamError(f"{where}: class id {class_id} is out of range for a model with {len(labels)} classes")
        return class_id
    class_id = whole_number(text)
    if class_id is not None:
        if not 0 <= class_id < len(labels):
            raise CamError(f"{where}: class id {class_id} is out of range for a model with {len(labels)} classes")
        return class_id
    lowered = text.lower()
    for i, label in enumerate(labels):
        if label.lower() == lowered:
            return i
    raise CamError(f"{where}: object name {text!r} is neither a class id nor one of the model's labels")


def read_boxes_xml(paths: Sequence[Path], labels: Sequence[str],
                   wnids: dict[str, int] | None = None) -> list[GroundTruth]:
    """Read PASCAL VOC / ImageNet XML annotations (1-based pixel indices, xmax/ymax included).

    An object's ``<name>`` is a class id, one of the model's labels (case-insensitive), or a WordNet id
    looked up in ``wnids`` (ImageNet's XML). The image is
    ``<filename>`` (or the XML's own name), relative to the images folder; a name without an extension
    (ImageNet's) is looked up with the usual image extensions.
    """
    collector = _Collector()
    for path in paths:
        where = path.name
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise CamError(f"{where}: not valid XML ({exc})") from None
        except OSError as exc:
            raise CamError(f"cannot read {path}: {exc.strerror or exc}") from None
        file = (root.findtext("filename") or "").strip() or path.stem
        size_wh = None
        w_text, h_text = root.findtext("size/width"), root.findtext("size/height")
        if w_text and h_text:
            w, h = _number(w_text, "width", where), _number(h_text, "height", where)
            if w >= 1 and h >= 1:  # VOC files with an unknown size write 0
                size_wh = (int(w), int(h))
        for k, obj in enumerate(root.iter("object"), 1):
            obj_where = f"{where} object {k}"
            name = obj.findtext("name")
            if name is None:
                raise CamError(f"{obj_where}: no <name>")
            class_id = _class_from_name(name, labels, obj_where, wnids)
            bnd = obj.find("bndbox")
            if bnd is None:
                raise CamError(f"{obj_where}: no <bndbox>")
            x0, y0, x1, y1 = (_number(bnd.findtext(tag), tag, obj_where) for tag in ("xmin", "ymin", "xmax", "ymax"))
            # 1-based inclusive -> 0-based edges; some ImageNet files start at 0, hence the clip.
            box = _checked_box(max(0.0, x0 - 1), max(0.0, y0 - 1), x1, y1, obj_where)
            collector.add(file, class_id, box, size_wh, obj_where)
    result = collector.result()
    if not result:
        raise CamError("the XML annotations hold no <object> boxes")
    return result


def load_ground_truth(path: str | os.PathLike, labels: Sequence[str],
                      wnids: dict[str, int] | None = None) -> list[GroundTruth]:
    """Boxes from a CSV file, one XML file, or a folder of XML files."""
    p = Path(path)
    if not p.exists():
        raise CamError(f"boxes file not found: {p}")
    if p.is_dir():
        xmls = sorted(p.glob("*.xml"))
        if not xmls:
            raise CamError(f"{p} is a folder without .xml annotations (give a CSV file or a folder of XML)")
        return read_boxes_xml(xmls, labels, wnids)
    if p.suffix.lower() == ".xml":
        return read_boxes_xml([p], labels, wnids)
    return read_boxes_csv(p, num_classes=len(labels))


def overlay_name(gt: GroundTruth) -> str:
    """The file name of one (image, class) row's overlay in --save-dir.

    Flat, so that an annotation naming "../x.jpg" or an absolute path cannot write outside the folder; with
    the class in it, so that two classes of one image do not overwrite each other; and never the name of an
    input image, even when --save-dir is the images folder.
    """
    parts = [p for p in PurePath(gt.file).parts if p not in ("..", ".") and not PurePath(p).anchor]
    return "__".join(parts or ["image"]) + f".class{gt.class_id}.cam.jpg"


def unique_overlay_path(save_dir: Path, gt: GroundTruth, used: set[Path], inputs: set[Path]) -> Path:
    """``overlay_name`` in ``save_dir``, numbered when two rows would share it (``a/b.jpg`` and
    ``a__b.jpg``) or when it is an input image; ``used`` collects what was given out."""
    name = overlay_name(gt)
    path, n = save_dir / name, 1
    while path.resolve() in used or path.resolve() in inputs:
        n += 1
        path = save_dir / name.replace(".cam.jpg", f".{n}.cam.jpg")
    used.add(path.resolve())
    return path


def resolve_image(images_dir: Path, gt: GroundTruth) -> Path:
    """The image file an annotation names; one-line error naming the annotation when it is missing."""
    path = images_dir / gt.file
    if path.is_file():
        return path
    if not Path(gt.file).suffix:
        for ext in IMAGE_EXTENSIONS:
            candidate = path.with_name(path.name + ext)
            if candidate.is_file():
                return candidate
    raise CamError(f"image not found: {path} (named in {gt.where})")


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CropTransform:
    """ImageNet-style evaluation crop: resize so the crop's shorter side is 224/256 of the resized image's.

    Attributes:
        resized_wh: the whole image's size after resizing.
        offset_xy: the crop's top-left corner in the resized image.
        crop_wh: the crop's size (the model's input size).
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


# ----------------------------------------------------------------------------- the model part
@dataclass(frozen=True)
class EvaluateConfig:
    """What ``evaluate`` runs: see ``realtime-cam evaluate --help`` for each option."""

    model: Path
    images: Path
    boxes: Path
    method: str = "cam"
    box_threshold: float = 0.2
    topk: int = 5
    crop: str = "none"
    pointing_tolerance: float = 0.0
    device: str = "auto"
    save_dir: Path | None = None
    max_images: int | None = None
    wnids: Path | None = None


@dataclass(frozen=True)
class EvalReport:
    """A finished evaluation: its settings, the summary, one result per image, and the model's labels.

    ``outside_crop`` lists the (file, class_id) rows left out under ``--crop center`` because every box of the
    class falls outside the crop: the model never saw the object, so they say nothing about the map.
    """

    config: EvaluateConfig
    summary: EvalSummary
    results: tuple[ImageResult, ...]
    labels: tuple[str, ...]
    seconds: float
    outside_crop: tuple[tuple[str, int], ...] = ()


def read_image(path: Path) -> np.ndarray:
    """An image as stored (EXIF orientation ignored: annotations use the stored pixel grid), BGR uint8."""
    data = np.fromfile(str(path), dtype=np.uint8)
    frame = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if frame is None:
        raise CamError(f"cannot decode image {path}")
    return frame


def rank_classes(logits: np.ndarray, k: int) -> tuple[int, ...]:
    """The k highest-scoring classes, best first; equal logits are ranked by class id (like np.argmax).

    An int8 model's logits take few distinct values, so exact ties for the top-1 do happen; a fixed rule
    keeps top-1 the same whatever k is.
    """
    return tuple(int(c) for c in top_k_ids(np.asarray(logits), k))


def draw_result(frame_bgr: np.ndarray, map_hw: np.ndarray, result: ImageResult, labels: Sequence[str],
                box_threshold: float) -> np.ndarray:
    """The map over the image, ground-truth boxes in green, the paper's-rule box in red, and a label."""
    from .overlay import blend, colorize, draw_text_lines

    h, w = frame_bgr.shape[:2]
    out = blend(frame_bgr, colorize(map_hw, (w, h)), 0.5)
    thickness = max(2, round(min(w, h) / 200))

    def rect(box: Box, color: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = box
        cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1),
                      color, thickness)

    for g in result.gt_boxes_xyxy:
        rect(g, (0, 255, 0))
    if result.box_xyxy is not None:
        rect(result.box_xyxy, (0, 0, 255))
    cv2.circle(out, result.peak_xy, thickness * 2, (255, 255, 255), -1)
    top = result.topk_ids[0] if result.topk_ids else -1
    lines = [f"GT: {labels[result.class_id]}",
             f"top-1: {labels[top] if top >= 0 else '?'} ({'right' if result.top1_correct else 'wrong'})",
             f"box @{box_threshold:.2f}: IoU {result.box_iou:.2f} ({'hit' if result.loc_correct else 'miss'})"]
    draw_text_lines(out, lines)
    return out


def run_evaluate(config: EvaluateConfig, progress: Callable[[int], Progress] | None = None,
                 on_image: Callable[[ImageResult], None] | None = None) -> EvalReport:
    """Run the model over the annotated images and score every map.

    Args:
        config: the settings.
        progress: makes the progress line, given the number of images (None: no progress line).
        on_image: called with each image's result, e.g. to log it.
    """
    from .model import CamModel

    if config.method not in METHODS:
        raise CamError(f"unknown map method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.crop not in CROPS:
        raise CamError(f"--crop must be one of {', '.join(CROPS)}; got {config.crop!r}")
    if not config.images.is_dir():
        raise CamError(f"images folder not found: {config.images}")
    model = CamModel(config.model, device=config.device)
    labels = model.labels
    truths = load_ground_truth(config.boxes, labels, load_wnids(config.wnids) if config.wnids else None)
    if config.max_images is not None:
        truths = truths[: config.max_images]
    paths = [resolve_image(config.images, gt) for gt in truths]  # every image exists before any work
    if config.save_dir is not None:
        if config.save_dir.exists() and not config.save_dir.is_dir():
            raise SinkError(f"--save-dir is a file, not a folder: {config.save_dir}")
        config.save_dir.mkdir(parents=True, exist_ok=True)

    bar = progress(len(truths)) if progress is not None else None
    used_names: set[Path] = set()
    input_paths = {p.resolve() for p in paths}
    # An image with several classes is a row per class: it is read and inferred once, kept until its last row.
    rows_left = collections.Counter(paths)
    views: dict[Path, _ModelView] = {}
    results = []
    outside_crop: list[tuple[str, int]] = []
    start = time.perf_counter()
    for done, (gt, path) in enumerate(zip(truths, paths), 1):
        view = views.pop(path, None) or _ModelView.of(path, model, config)
        rows_left[path] -= 1
        if rows_left[path]:
            views[path] = view
        scored = _score_row(model, config, gt, path, view)
        if scored is None:  # nothing of the object is in what the model sees: no map can find it
            outside_crop.append((gt.file, gt.class_id))
        else:
            frame, prediction, result = scored
            results.append(result)
            if config.save_dir is not None:
                out_path = unique_overlay_path(config.save_dir, gt, used_names, input_paths)
                image = draw_result(frame, prediction.cam, result, labels, config.box_threshold)
                if not cv2.imwrite(str(out_path), image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
                    raise SinkError(f"cannot write {out_path}")
            if on_image is not None:
                on_image(result)
        if bar is not None and done < len(truths):  # close() prints the last line
            elapsed = time.perf_counter() - start
            bar.update(done, done / elapsed if elapsed > 0 else 0.0)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close(len(truths), len(truths) / elapsed if elapsed > 0 else 0.0)
    if not results and outside_crop:
        raise CamError(f"every image's boxes fall outside the centre crop ({len(outside_crop)} (image, class) "
                       "rows): nothing to score; use --crop none")
    summary = summarize(results, topk=config.topk)
    return EvalReport(config=config, summary=summary, results=tuple(results), labels=tuple(labels),
                      seconds=elapsed, outside_crop=tuple(outside_crop))


class _ModelView:
    """An image as the model sees it (cropped with ``--crop center``), and its network outputs, computed
    the first time a row asks for them."""

    def __init__(self, frame: np.ndarray, size_wh: tuple[int, int], crop: CropTransform | None) -> None:
        self.frame, self.size_wh, self.crop = frame, size_wh, crop
        self._outputs: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, path: Path, model: CamModel, config: EvaluateConfig) -> "_ModelView":
        frame = read_image(path)
        h, w = frame.shape[:2]
        if config.crop != "center":
            return cls(frame, (w, h), None)
        tf = center_crop_transform((w, h), model.info.input_size_hw)
        return cls(apply_crop(frame, tf), (w, h), tf)

    def outputs(self, model: CamModel) -> tuple[np.ndarray, np.ndarray]:
        if self._outputs is None:
            self._outputs = model.infer(self.frame)
        return self._outputs


def _score_row(model: CamModel, config: EvaluateConfig, gt: GroundTruth, path: Path,
               view: _ModelView) -> tuple[np.ndarray, Prediction, ImageResult] | None:
    """One (image, class) row: the image as the model saw it, the prediction and the scores; None when
    ``--crop center`` cut every box of the class away."""
    w, h = view.size_wh
    if gt.size_wh is not None and gt.size_wh != (w, h):
        raise CamError(f"{gt.where}: the annotation says {gt.size_wh[0]}x{gt.size_wh[1]} but {path.name} "
                       f"is {w}x{h}")
    gt_boxes = clip_boxes(gt.boxes_xyxy, (w, h))
    if view.crop is not None:
        gt_boxes = crop_boxes(gt_boxes, view.crop)
        if not gt_boxes:
            return None
    frame = view.frame
    eval_h, eval_w = frame.shape[:2]
    logits, features = view.outputs(model)
    request = Request(method=config.method, class_id=gt.class_id, topk=config.topk)
    prediction, _ = explain(logits, features, model.head_weight, model.labels, request)
    result = score_image(
        prediction.cam, gt_boxes, (eval_w, eval_h), gt.class_id, rank_classes(logits, config.topk),
        file=gt.file, box_threshold=config.box_threshold, pointing_tolerance=config.pointing_tolerance,
        top1_tie=bool(np.count_nonzero(logits == logits.max()) > 1),
    )
    return frame, prediction, result


# ----------------------------------------------------------------------------- output
def _round_box(box: Box | None) -> list[float] | None:
    return None if box is None else [round(float(v), 2) for v in box]


def report_dict(report: EvalReport) -> dict:
    """The JSON document: metrics (percent) at the top level, then settings and per-image rows."""
    s, c, k = report.summary, report.config, report.summary.topk
    doc: dict = {
        "top1": s.top1,
        f"top{k}": s.topk_acc,
        "gt_known_loc": s.gt_known_loc,
        "top1_loc": s.top1_loc,
        f"top{k}_loc": s.topk_loc,
        "max_box_acc": s.max_box_acc,
        "max_box_acc_threshold": s.max_box_acc_threshold,
        "max_box_acc_v2": s.max_box_acc_v2,
        "max_box_acc_v2_per_iou": {f"{d:g}": {"acc": a, "threshold": t} for d, (a, t) in
                                   s.max_box_acc_v2_per_iou.items()},
        "pointing_game": s.pointing_game,
        "center_baseline": s.center_baseline,
        "center_baseline_fraction": s.center_baseline_fraction,
        "images": s.images,
        "boxes": s.boxes,
        "top1_ties": s.top1_ties,
        "left_out_outside_crop": [{"file": f, "class_id": c} for f, c in report.outside_crop],
        "seconds": round(report.seconds, 3),
        "settings": {
            "model": str(c.model), "images": str(c.images), "boxes": str(c.boxes), "method": c.method,
            "box_threshold": c.box_threshold, "topk": c.topk, "crop": c.crop,
            "pointing_tolerance": c.pointing_tolerance, "device": c.device,
            "max_images": c.max_images,
            "loc_iou": LOC_IOU,
            "cam_thresholds": "0.00..0.99 step 0.01 (wsolevaluation cam_curve_interval 0.01)",
            "max_box_acc_v2_iou": list(V2_IOU_THRESHOLDS),
            "center_fractions": "0.50..1.00 step 0.01",
            "box_rule": "min-max normalised map, pixels >= box_threshold * max, largest 8-connected component",
        },
    }
    t_index = int(np.argmin(np.abs(CAM_THRESHOLDS - s.max_box_acc_threshold)))
    rows = []
    for r in report.results:
        rows.append({
            "file": r.file,
            "class_id": r.class_id,
            "label": report.labels[r.class_id],
            "size_wh": list(r.size_wh),
            "gt_boxes": [_round_box(b) for b in r.gt_boxes_xyxy],
            "topk": list(r.topk_ids),
            "top1_correct": r.top1_correct,
            "top1_tie": r.top1_tie,
            f"top{k}_correct": r.topk_correct,
            "box": _round_box(r.box_xyxy),
            "box_iou": round(r.box_iou, 4),
            "gt_known_loc": r.loc_correct,
            "peak_xy": list(r.peak_xy),
            "pointing_hit": r.pointing_hit,
            "max_box_acc_iou": round(float(r.wsol_ious_largest[t_index]), 4),
        })
    doc["per_image"] = rows
    return doc


def format_table(report: EvalReport) -> str:
    """A plain-text summary table."""
    s, c, k = report.summary, report.config, report.summary.topk
    v2 = " / ".join(f"{a:.1f}" for a, _ in s.max_box_acc_v2_per_iou.values())
    ious = "/".join(f"{d:g}" for d in s.max_box_acc_v2_per_iou)
    rows = [
        ("top-1 accuracy", f"{s.top1:.1f}%", ""),
        (f"top-{k} accuracy", f"{s.topk_acc:.1f}%", ""),
        ("GT-known localization", f"{s.gt_known_loc:.1f}%", f"box rule at {c.box_threshold:.2f}, IoU >= 0.5"),
        ("top-1 localization", f"{s.top1_loc:.1f}%", "classified right and box right"),
        (f"top-{k} localization", f"{s.topk_loc:.1f}%", f"GT class in top-{k} and its box right"),
        ("MaxBoxAcc", f"{s.max_box_acc:.1f}%", f"best threshold {s.max_box_acc_threshold:.2f}"),
        ("MaxBoxAccV2", f"{s.max_box_acc_v2:.1f}%", f"IoU {ious}: {v2}"),
        ("pointing game", f"{s.pointing_game:.1f}%",
         f"tolerance {c.pointing_tolerance:g} px" if c.pointing_tolerance else "peak inside a box"),
        ("centre-box baseline", f"{s.center_baseline:.1f}%", f"sides {s.center_baseline_fraction:.2f} of the image"),
    ]
    if k == 1:  # top-k is top-1: drop the repeated rows
        rows = [row for i, row in enumerate(rows) if i not in (1, 4)]
    width = max(len(name) for name, _, _ in rows)
    head = (f"{s.images} images, {s.boxes} boxes, method {c.method}, crop {c.crop} "
            f"({report.seconds:.1f} s)")
    lines = [head, f"{'metric':<{width}}  {'value':>6}  note"]
    lines += [f"{name:<{width}}  {value:>6}  {note}".rstrip() for name, value, note in rows]
    if report.outside_crop:
        lines.append(f"({len(report.outside_crop)} (image, class) row(s) left out: every box of the class falls "
                     "outside the centre crop, so the model never saw the object)")
    if s.top1_ties:
        lines.append(f"({s.top1_ties} image(s) had a tie for the highest logit: ranked by class id)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to a subparsers object; returns its parser."""
    from .providers import DEVICES
    from .paths import default_model_path

    parser = subparsers.add_parser(
        "evaluate", formatter_class=HelpFormatter,
        help="classification and localization accuracy of the maps on images with ground-truth boxes",
        description=(
            "Score the maps against ground-truth boxes: top-1/top-k accuracy, GT-known, top-1 and top-k "
            "localization (the paper's box rule), MaxBoxAcc and MaxBoxAccV2 (wsolevaluation's), the pointing game, "
            "and a centre-box baseline. Each image is resized to the model's input size directly (no crop), so "
            "the boxes map linearly and the maps are scored on the original image; --crop center instead "
            "resizes so the input is 224/256 of the shorter side and centre-crops (ImageNet evaluation), and "
            "scores in crop coordinates with the boxes moved, clipped to the crop, and dropped when outside it."
        ),
    )
    parser.add_argument("--model", type=Path, default=None,
                        help=f"realtime-cam model file (default: {default_model_path()})")
    parser.add_argument("--images", type=Path, required=True, metavar="DIR",
                        help="folder the annotations' file names are relative to")
    parser.add_argument("--boxes", type=Path, required=True, metavar="FILE",
                        help="CSV with a header naming file,class_id,x0,y0,x1,y1 (any case, extra columns "
                             "allowed; 0-based pixel indices, x1/y1 included; optional width,height are "
                             "checked), or a folder of PASCAL VOC / ImageNet XML files (1-based, <name> a class "
                             "id, one of the model's labels, or a WordNet id with --wnids). An image with several "
                             "classes is scored once per class")
    parser.add_argument("--method", choices=sorted(METHODS), default="cam", help="map method")
    parser.add_argument("--box-threshold", type=fraction, default=0.2, metavar="T",
                        help="the paper's box rule: keep pixels >= T times the maximum of the min-max normalised "
                             "map (i.e. T of the way from its minimum to its maximum), box of the largest "
                             "connected component; 0.2 is the paper's 20%%. MaxBoxAcc ignores it: it sweeps "
                             "0.00..0.99")
    parser.add_argument("--topk", type=positive_int, default=5, metavar="K",
                        help="k of the top-k accuracy and localization (JSON keys top{K}, top{K}_loc)")
    parser.add_argument("--crop", choices=CROPS, default="none",
                        help="none: resize the whole image to the input; center: ImageNet resize + centre crop")
    parser.add_argument("--pointing-tolerance", type=non_negative_float, default=0.0, metavar="PX",
                        help="pointing game: a peak within PX pixels of a box also hits (15 is common)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="write the metrics, the settings and per-image rows as JSON")
    parser.add_argument("--save-dir", type=Path, default=None, metavar="DIR",
                        help="write one overlay per image: the map, ground truth (green), the box (red)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs")
    parser.add_argument("--wnids", type=Path, default=None, metavar="FILE",
                        help="XML whose <name> is a WordNet id (ImageNet): the ids in class order, one per line "
                             "(ImageNet's LOC_synset_mapping.txt)")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N annotated images")
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``realtime-cam evaluate``; returns the exit code (errors are raised as CamError)."""
    from .paths import default_model_path
    from .sinks import check_output_path

    if args.json is not None:
        check_output_path(args.json, {".json"})
    model_path = args.model if args.model is not None else default_model_path()
    if not Path(model_path).exists():
        raise CamError(f"model file not found: {model_path} (make one with `realtime-cam export`)")
    config = EvaluateConfig(
        model=Path(model_path), images=args.images, boxes=args.boxes, method=args.method,
        box_threshold=args.box_threshold, topk=args.topk, crop=args.crop,
        pointing_tolerance=args.pointing_tolerance, device=args.device, save_dir=args.save_dir,
        max_images=args.max_images, wnids=args.wnids,
    )
    report = run_evaluate(config, progress=lambda total: Progress(total, label="images"))
    print(format_table(report))
    if args.json is not None:
        write_json(report_dict(report), args.json)
        log.info("wrote %s", args.json)
    if args.save_dir is not None:
        log.info("wrote %d overlays to %s", len(report.results), args.save_dir)
    return 0
