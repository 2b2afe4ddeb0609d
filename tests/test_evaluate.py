"""`realtime-cam evaluate`: the metrics on hand-computed cases, the annotation readers, and the whole command on
the shared imagenet-val-20 with the real int8 MobileNetV2, checked against an independent computation here."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import needs_shared, shared

from realtime_cam.cams import METHODS
from realtime_cam.cli import build_parser, cmd_evaluate
from realtime_cam.errors import CamError
from realtime_cam.evaluation.annotations import load_ground_truth, read_boxes_csv, resolve_image
from realtime_cam.evaluation.metrics import (
    ImageResult,
    apply_crop,
    center_baseline,
    center_crop_transform,
    crop_boxes,
    max_box_acc,
    max_box_acc_v2,
    peak_xy,
    point_hits,
    rank_classes,
    score_image,
    summarize,
    wsol_best_ious,
    wsol_boxes,
    wsol_iou,
)

LABELS = ("tench", "goldfish", "tabby cat")


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["evaluate", *argv])


# ----------------------------------------------------------------------------- wsolevaluation boxes and IoU
def two_blob_map() -> np.ndarray:
    m = np.zeros((10, 12))
    m[1:3, 1:3] = 1.0     # small and hot: 4 pixels, contour area 1
    m[5:9, 4:9] = 0.5     # large and warm: 20 pixels, contour area 12
    return m


def test_wsol_iou_counts_inclusive_corners():
    assert wsol_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert wsol_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert wsol_iou((0, 0, 9, 9), (10, 10, 12, 12)) == 0.0
    assert wsol_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 1.0  # one pixel each, as wsolevaluation counts it


def test_wsol_boxes_largest_contour_and_all_contours():
    m = two_blob_map()
    # 0.3: uint8 values 255 and 127 are both above int(0.3 * 255) = 76; the box is (x, y, x + w, y + h).
    largest, boxes = wsol_boxes(m, 0.3)
    assert largest == (4, 5, 9, 9)
    assert sorted(boxes) == [(1, 1, 3, 3), (4, 5, 9, 9)]
    # 0.6: only the hot blob is above int(0.6 * 255) = 153.
    assert wsol_boxes(m, 0.6) == ((1, 1, 3, 3), [(1, 1, 3, 3)])
    # Nothing is strictly above the maximum: wsolevaluation's empty box.
    assert wsol_boxes(np.zeros((4, 4)), 0.0) == ((0, 0, 0, 0), [(0, 0, 0, 0)])


def test_two_boxes_the_best_matching_one_counts():
    m = two_blob_map()
    gt_big = (4.0, 5.0, 9.0, 9.0)   # edges of the warm blob: inclusive (4, 5, 8, 8)
    gt_small = (1.0, 1.0, 3.0, 3.0)  # edges of the hot blob: inclusive (1, 1, 2, 2)
    largest, every = wsol_best_ious(m, [gt_big, gt_small], [0.3, 0.6])
    # 0.3: box (4,5,9,9) vs (4,5,8,8): 20 / (30 + 20 - 20); 0.6: box (1,1,3,3) vs (1,1,2,2): 4 / 9.
    np.testing.assert_allclose(largest, [2 / 3, 4 / 9])
    np.testing.assert_allclose(every, [2 / 3, 4 / 9])


def test_a_miss_scores_zero():
    largest, every = wsol_best_ious(two_blob_map(), [(0.0, 6.0, 3.0, 10.0)], [0.3, 0.6])
    np.testing.assert_array_equal(largest, [0.0, 0.0])
    np.testing.assert_array_equal(every, [0.0, 0.0])


def test_all_contours_include_holes():
    ring = np.zeros((10, 10))
    ring[1:9, 1:9] = 1.0
    ring[3:7, 3:7] = 0.0
    hole = (3.0, 3.0, 7.0, 7.0)
    largest, every = wsol_best_ious(ring, [hole], [0.5])
    # Outer box (1,1,9,9) vs (3,3,6,6): 16/81; the hole's contour box (2,2,8,8): 16/49.
    assert largest[0] == pytest.approx(16 / 81)
    assert every[0] == pytest.approx(16 / 49)


def test_map_touching_the_border_is_clipped_to_the_last_pixel():
    m = np.zeros((8, 10))
    m[:, 7:] = 1.0
    largest, boxes = wsol_boxes(m, 0.5)
    assert largest == (7, 0, 9, 7)          # x + w = 10 and y + h = 8, clipped to W - 1, H - 1
    assert wsol_best_ious(m, [(7.0, 0.0, 10.0, 8.0)], [0.5])[0][0] == 1.0


def test_max_box_acc_picks_the_best_threshold_and_the_lowest_on_a_tie():
    ious = np.array([[0.6, 0.6, 0.6],
                     [0.7, 0.7, 0.1]])
    assert max_box_acc(ious, [0.1, 0.2, 0.3]) == (100.0, 0.1)
    ious = np.array([[0.4, 0.6, 0.6],
                     [0.2, 0.5, 0.1]])
    assert max_box_acc(ious, [0.1, 0.2, 0.3]) == (100.0, 0.2)


def test_max_box_acc_v2_maximises_each_iou_separately_then_averages():
    every = np.array([[0.35, 0.55, 0.75],
                      [0.31, 0.80, 0.10]])
    mean, per = max_box_acc_v2(every, [0.1, 0.2, 0.3])
    assert per == {0.3: (100.0, 0.1), 0.5: (100.0, 0.2), 0.7: (50.0, 0.2)}
    assert mean == pytest.approx(250 / 3)


# ----------------------------------------------------------------------------- the other metrics
def test_pointing_game_inside_and_tolerance():
    boxes = [(0.0, 0.0, 6.0, 6.0), (20.0, 20.0, 30.0, 30.0)]
    assert point_hits((5, 5), boxes)
    assert point_hits((25, 29), boxes)            # the second box
    assert not point_hits((6, 6), boxes)          # pixel centre 6.5 is outside
    assert point_hits((6, 6), boxes, tolerance=1.0)   # 0.707 px away
    assert not point_hits((10, 10), boxes, tolerance=5.0)


def test_peak_tie_takes_the_first_in_raster_order():
    m = np.zeros((4, 5), np.float32)
    m[2, 1] = m[1, 3] = 1.0
    assert peak_xy(m) == (3, 1)


def test_center_baseline_best_fraction_and_tie():
    sizes = [(100, 100), (200, 100), (100, 100)]
    boxes = [[(25.0, 25.0, 75.0, 75.0)], [(0.0, 0.0, 200.0, 100.0)], [(10.0, 10.0, 90.0, 90.0)]]
    # Centred boxes: IoU = (smaller / larger area). Image 1 needs f in [0.50, 0.70], image 2 f >= 0.71,
    # image 3 f >= 0.57: two of three from 0.57 up; the smallest such f is reported.
    acc, f = center_baseline(sizes, boxes)
    assert acc == pytest.approx(200 / 3) and f == 0.57
    assert center_baseline(sizes[:1], boxes[:1]) == (100.0, 0.5)


def test_score_image_two_boxes_and_a_miss():
    feat = np.zeros((7, 7), np.float32)
    feat[1, 5] = 1.0                                   # hot cell: x 50..60, y 10..20 in a 70x70 image
    two = [(0.0, 40.0, 20.0, 70.0), (40.0, 0.0, 70.0, 30.0)]
    hit = score_image(feat, two, (70, 70), class_id=2, topk_ids=[1, 2, 0], box_threshold=0.5)
    assert hit.pointing_hit and hit.peak_xy == (54, 14)   # the two pixels either side of 54.5 tie
    x0, y0, x1, y1 = hit.box_xyxy
    assert 40 <= x0 < 55 < x1 <= 70 and 0 <= y0 < 15 < y1 <= 30
    assert hit.box_iou == pytest.approx(
        (x1 - x0) * (y1 - y0) / (30 * 30), rel=1e-6)   # the box lies inside the second GT box
    assert not hit.top1_correct and hit.topk_correct
    miss = score_image(feat, [(0.0, 40.0, 20.0, 70.0)], (70, 70), class_id=2, topk_ids=[2])
    assert not miss.pointing_hit and miss.box_iou == 0.0 and not miss.loc_correct
    assert miss.top1_correct


def test_score_image_map_touching_the_border():
    feat = np.zeros((7, 7), np.float32)
    feat[:, 6] = 1.0
    r = score_image(feat, [(60.0, 0.0, 70.0, 70.0)], (70, 70), class_id=0, topk_ids=[0], box_threshold=0.5)
    assert r.box_xyxy[2] == pytest.approx(70) and r.box_xyxy[1] == 0 and r.box_xyxy[3] == pytest.approx(70)
    assert r.loc_correct and r.pointing_hit


def test_constant_map_gives_no_box():
    r = score_image(np.ones((7, 7), np.float32), [(0.0, 0.0, 10.0, 10.0)], (70, 70), 0, [0])
    assert r.box_xyxy is None and r.box_iou == 0.0


def _result(class_id: int, topk: tuple[int, ...], box_iou: float, hit: bool) -> ImageResult:
    return ImageResult(file="x", class_id=class_id, size_wh=(10, 10), gt_boxes_xyxy=((0.0, 0.0, 10.0, 10.0),),
                       topk_ids=topk, box_xyxy=None, box_iou=box_iou, peak_xy=(0, 0), pointing_hit=hit,
                       wsol_ious_largest=np.array([0.6, 0.2]), wsol_ious_all=np.array([0.6, 0.8]))


def test_summarize_top1_topk_and_the_localization_variants():
    results = [
        _result(1, (1, 2), 0.7, True),    # right, localized
        _result(1, (2, 1), 0.6, True),    # top-2 only, localized
        _result(1, (2, 0), 0.9, False),   # wrong, localized
        _result(1, (1, 0), 0.3, False),   # right, not localized
    ]
    s = summarize(results, topk=2, thresholds=[0.1, 0.2])
    assert (s.top1, s.topk_acc) == (50.0, 75.0)
    assert (s.gt_known_loc, s.top1_loc, s.topk_loc) == (75.0, 25.0, 50.0)
    assert s.pointing_game == 50.0
    assert (s.max_box_acc, s.max_box_acc_threshold) == (100.0, 0.1)
    assert s.max_box_acc_v2 == pytest.approx((100 + 100 + 100) / 3)
    assert s.center_baseline == 100.0 and s.center_baseline_fraction == 0.71   # IoU f^2 >= 0.5


def test_rank_classes_breaks_ties_by_class_id():
    logits = np.array([1.0, 3.0, 2.0, 3.0], np.float32)
    assert rank_classes(logits, 1) == (1,)
    assert rank_classes(logits, 3) == (1, 3, 2)


def test_center_crop_transform_and_boxes():
    tf = center_crop_transform((500, 375), (224, 224))
    assert tf.resized_wh == (341, 256) and tf.offset_xy == (58, 16)
    boxes = crop_boxes([(0.0, 0.0, 500.0, 375.0), (10.0, 10.0, 50.0, 50.0), (200.0, 150.0, 300.0, 225.0)], tf)
    assert boxes[0] == (0.0, 0.0, 224.0, 224.0)         # the whole image: the whole crop
    assert len(boxes) == 2                              # the corner box fell out of the crop
    np.testing.assert_allclose(boxes[1], (200 * 0.682 - 58, 150 * 256 / 375 - 16,
                                          300 * 0.682 - 58, 225 * 256 / 375 - 16))
    frame = np.zeros((375, 500, 3), np.uint8)
    assert apply_crop(frame, tf).shape == (224, 224, 3)


# ----------------------------------------------------------------------------- annotation files
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_extra_columns_any_case_inclusive_corners(tmp_path):
    p = write(tmp_path / "b.csv", "File,Class_ID,wnid,X0,Y0,X1,Y1,width,height\n"
                                  "a.jpg,2,n1,0,0,9,4,20,10\n"
                                  "a.jpg,2,n1,10,5,19,9,20,10\n"
                                  "\n"
                                  "b.png,0,n2,3,3,3,3,,\n")
    gts = read_boxes_csv(p, num_classes=3)
    assert [g.file for g in gts] == ["a.jpg", "b.png"]
    assert gts[0].boxes_xyxy == ((0.0, 0.0, 10.0, 5.0), (10.0, 5.0, 20.0, 10.0))
    assert gts[0].size_wh == (20, 10) and gts[0].class_id == 2
    assert gts[1].boxes_xyxy == ((3.0, 3.0, 4.0, 4.0),) and gts[1].size_wh is None
    assert gts[1].where == "b.csv line 5"


@pytest.mark.parametrize("text,message", [
    ("file,class_id,x0,y0,x1\na.jpg,1,0,0,3\n", "missing y1"),
    ("file,class_id,x0,y0,x1,y1\na.jpg,1,0,0,3,3\na.jpg,one,0,0,3,3\n", "b.csv line 3: class_id"),
    ("file,class_id,x0,y0,x1,y1\na.jpg,7,0,0,3,3\n", "line 2: class_id 7 is out of range"),
    ("file,class_id,x0,y0,x1,y1\na.jpg,1,0,zero,3,3\n", "line 2: y0 is not a number"),
    ("file,class_id,x0,y0,x1,y1\na.jpg,1,5,0,3,3\n", "line 2: empty box"),
    ("file,class_id,x0,y0,x1,y1\na.jpg,1,-1,0,3,3\n", "line 2: negative"),
    ("file,class_id,x0,y0,x1,y1\na.jpg,1,0,0,3\n", "line 2: 5 fields"),
    ("file,class_id,x0,y0,x1,y1\n", "no boxes"),
    ("", "is empty"),
])
def test_csv_errors_name_the_file_and_line(tmp_path, text, message):
    p = write(tmp_path / "b.csv", text)
    with pytest.raises(CamError, match=message) as info:
        read_boxes_csv(p, num_classes=3)
    assert "\n" not in str(info.value)


VOC = """<annotation>
  <filename>{filename}</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object><name>{name}</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>100</xmax><ymax>375</ymax></bndbox></object>
  <object><name>{name}</name><bndbox><xmin>201</xmin><ymin>1</ymin><xmax>300</xmax><ymax>50</ymax></bndbox></object>
</annotation>
"""


def test_xml_folder_labels_ids_and_one_based_corners(tmp_path):
    (tmp_path / "ann").mkdir()
    write(tmp_path / "ann" / "a.xml", VOC.format(filename="a.jpg", name="Tabby Cat"))
    write(tmp_path / "ann" / "b.xml", VOC.format(filename="ILSVRC_b", name="1"))
    gts = load_ground_truth(tmp_path / "ann", LABELS)
    assert [(g.file, g.class_id) for g in gts] == [("a.jpg", 2), ("ILSVRC_b", 1)]
    assert gts[0].boxes_xyxy == ((0.0, 10.0, 100.0, 375.0), (200.0, 0.0, 300.0, 50.0))
    assert gts[0].size_wh == (500, 375)
    # An ImageNet <filename> has no extension: the image is found with one.
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ILSVRC_b.JPEG").write_bytes(b"x")
    assert resolve_image(tmp_path / "img", gts[1]).name == "ILSVRC_b.JPEG"
    with pytest.raises(CamError, match=r"image not found: .*a\.jpg \(named in a\.xml object 1\)"):
        resolve_image(tmp_path / "img", gts[0])


def test_xml_errors(tmp_path):
    bad = write(tmp_path / "bad.xml", VOC.format(filename="a.jpg", name="zebra"))
    with pytest.raises(CamError, match=r"bad\.xml object 1: object name 'zebra'"):
        load_ground_truth(bad, LABELS)
    broken = write(tmp_path / "broken.xml", "<annotation><object>")
    with pytest.raises(CamError, match=r"broken\.xml: not valid XML"):
        load_ground_truth(broken, LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamError, match="without .xml"):
        load_ground_truth(tmp_path / "empty", LABELS)
    with pytest.raises(CamError, match="boxes file not found"):
        load_ground_truth(tmp_path / "nope.csv", LABELS)


# ----------------------------------------------------------------------------- command line
def test_parser_choices_defaults_and_validators(capsys):
    args = parse(["--images", "d", "--boxes", "b.csv"])
    assert (args.method, args.box_threshold, args.topk, args.crop, args.pointing_tolerance) == \
        ("cam", 0.2, 5, "none", 0.0)
    for bad in (["--box-threshold", "1.5"], ["--topk", "0"], ["--method", "nope"], ["--crop", "left"],
                ["--pointing-tolerance", "-1"]):
        with pytest.raises(SystemExit):
            parse(["--images", "d", "--boxes", "b.csv", *bad])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "resized to the model's input size directly (no crop)" in text
    for name in METHODS:
        assert name in text


# ----------------------------------------------------------------------------- the whole command, real data
def _components(mask: np.ndarray) -> list[tuple[int, int, int, int, int, int]]:
    """8-connected components by run-length union-find: (pixels, first run, x0, y0, x1, y1) with edges."""
    runs, parent, previous = [], [], []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(mask.shape[0]):
        d = np.diff(np.concatenate(([0], mask[y].astype(np.int8), [0])))
        current = []
        for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1):
            k = len(runs)
            runs.append((y, int(a), int(b)))
            parent.append(k)
            for j in previous:
                _, c, e = runs[j]
                if c <= b + 1 and a <= e + 1:
                    parent[find(j)] = find(k)
            current.append(k)
        previous = current
    comps: dict[int, list[int]] = {}
    for k, (y, a, b) in enumerate(runs):
        r = find(k)
        if r not in comps:
            comps[r] = [0, k, a, y, b + 1, y + 1]
        c = comps[r]
        c[0] += b - a + 1
        c[1] = min(c[1], k)
        c[2], c[3], c[4], c[5] = min(c[2], a), min(c[3], y), max(c[4], b + 1), max(c[5], y + 1)
    return [tuple(c) for c in comps.values()]


def _plain_iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def independent_numbers(model_path: Path, folder: Path, threshold: float = 0.2) -> dict:
    """The headline numbers again, written out with loops: no code from realtime_cam.evaluation."""
    from realtime_cam.model import CamModel

    model = CamModel(model_path, device="cpu")
    truth: dict[str, tuple[int, list]] = {}
    with open(folder / "annotations.csv", newline="") as f:
        for row in csv.DictReader(f):
            entry = truth.setdefault(row["file"], (int(row["class_id"]), []))
            entry[1].append(tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1")))
    top1 = top5 = loc = top1_loc = top5_loc = pointing = 0
    center_hits = {f: 0 for f in range(50, 101)}
    for file, (class_id, boxes_incl) in truth.items():
        image = cv2.imread(str(folder / file), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        h, w = image.shape[:2]
        logits, features = model.infer(image)
        ranked = sorted(range(len(logits)), key=lambda c: (-float(logits[c]), c))
        is_top1, is_top5 = ranked[0] == class_id, class_id in ranked[:5]
        cam = np.tensordot(model.head_weight[class_id], features, axes=1).astype(np.float32)
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        # Pointing game: peak of the map upsampled to the image, inside a box (inclusive pixel indices).
        up = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
        py, px = np.unravel_index(int(np.argmax(up)), up.shape)
        pointing += any(x0 <= px <= x1 and y0 <= py <= y1 for x0, y0, x1, y1 in boxes_incl)
        # The paper's rule as the overlay draws it: at most 640 px wide, >= threshold * max, largest blob.
        scale = min(1.0, 640 / w)
        ww, wh = max(1, round(w * scale)), max(1, round(h * scale))
        small = cv2.resize(cam, (ww, wh), interpolation=cv2.INTER_LINEAR)
        comps = _components(small >= threshold * small.max())
        _, _, bx0, by0, bx1, by1 = min(comps, key=lambda c: (-c[0], c[1]))
        box = (bx0 * w / ww, by0 * h / wh, bx1 * w / ww, by1 * h / wh)
        edges = [(x0, y0, min(x1 + 1, w), min(y1 + 1, h)) for x0, y0, x1, y1 in boxes_incl]
        ok = max(_plain_iou(box, g) for g in edges) >= 0.5
        top1 += is_top1
        top5 += is_top5
        loc += ok
        top1_loc += ok and is_top1
        top5_loc += ok and is_top5
        for f in center_hits:
            c = ((1 - f / 100) * w / 2, (1 - f / 100) * h / 2, (1 + f / 100) * w / 2, (1 + f / 100) * h / 2)
            center_hits[f] += max(_plain_iou(c, g) for g in edges) >= 0.5
    n = len(truth)
    best_f = max(center_hits, key=lambda f: (center_hits[f], -f))
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "gt_known_loc": 100 * loc / n,
            "top1_loc": 100 * top1_loc / n, "top5_loc": 100 * top5_loc / n,
            "pointing_game": 100 * pointing / n, "center_baseline": 100 * center_hits[best_f] / n,
            "center_baseline_fraction": best_f / 100, "images": n}


@needs_shared
def test_whole_command_on_imagenet_val_20_matches_an_independent_computation(mnv2_int8_onnx, tmp_path, capsys):
    folder = shared("imagenet-val-20")
    out = tmp_path / "eval.json"
    args = parse(["--model", str(mnv2_int8_onnx), "--images", str(folder),
                  "--boxes", str(folder / "annotations.csv"), "--json", str(out),
                  "--save-dir", str(tmp_path / "overlays"), "--device", "cpu"])
    assert cmd_evaluate(args) == 0
    printed = capsys.readouterr()
    assert "MaxBoxAccV2" in printed.out and "images 20/20" in printed.err
    doc = json.loads(out.read_text())
    assert not list(tmp_path.glob(".*partial*"))
    for key in ("top1", "top5", "gt_known_loc", "top1_loc", "top5_loc", "max_box_acc", "max_box_acc_v2",
                "pointing_game", "center_baseline", "max_box_acc_threshold", "settings", "per_image"):
        assert key in doc
    assert doc["images"] == 20 and doc["boxes"] == 39 and len(doc["per_image"]) == 20
    overlays = list((tmp_path / "overlays").iterdir())  # one per (image, class) row, flat in the folder
    assert len(overlays) == 20 and all(p.name.endswith(".cam.jpg") and p.is_file() for p in overlays)
    assert doc["settings"]["box_threshold"] == 0.2 and doc["settings"]["crop"] == "none"
    expected = independent_numbers(mnv2_int8_onnx, folder)
    for key, value in expected.items():
        assert doc[key] == pytest.approx(value), key
    # Sanity of the wsolevaluation numbers: percentages of 20 images, V2 the mean of its three.
    assert 0.0 <= doc["max_box_acc_threshold"] <= 0.99
    per = doc["max_box_acc_v2_per_iou"]
    assert doc["max_box_acc_v2"] == pytest.approx(np.mean([per[k]["acc"] for k in ("0.3", "0.5", "0.7")]))
    assert per["0.5"]["acc"] >= doc["max_box_acc"]   # every contour includes the largest one
    assert per["0.3"]["acc"] >= per["0.5"]["acc"] >= per["0.7"]["acc"]
    for key in ("top1", "top5", "gt_known_loc", "max_box_acc", "pointing_game", "center_baseline"):
        assert (doc[key] * 20 / 100) == pytest.approx(round(doc[key] * 20 / 100))
    overlays = sorted((tmp_path / "overlays").glob("*.jpg"))
    assert len(overlays) == 20
    first = cv2.imread(str(overlays[0]))
    assert first.shape[:2] == (400, 500)   # ILSVRC2012_val_00000011 at its own size


@needs_shared
def test_center_crop_and_errors_on_the_shared_set(mnv2_int8_onnx, tmp_path, capsys):
    folder = shared("imagenet-val-20")
    out = tmp_path / "crop.json"
    args = parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes",
                  str(folder / "annotations.csv"), "--crop", "center", "--max-images", "4", "--json", str(out),
                  "--device", "cpu", "--topk", "3"])
    assert cmd_evaluate(args) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 4 and "top3" in doc and "top3_loc" in doc
    for row in doc["per_image"]:
        assert row["size_wh"] == [224, 224]
        for x0, y0, x1, y1 in row["gt_boxes"]:
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224

    bad = write(tmp_path / "missing.csv", "file,class_id,x0,y0,x1,y1\nILSVRC2012_val_00000011.JPEG,109,1,1,5,5\n"
                                          "nope.JPEG,109,1,1,5,5\n")
    args = parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(bad), "--device", "cpu"])
    with pytest.raises(CamError, match=r"image not found: .*nope\.JPEG \(named in missing\.csv line 3\)"):
        cmd_evaluate(args)
    size = write(tmp_path / "size.csv", "file,class_id,width,height,x0,y0,x1,y1\n"
                                        "ILSVRC2012_val_00000011.JPEG,109,400,500,1,1,5,5\n")
    args = parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(size), "--device", "cpu"])
    with pytest.raises(CamError, match=r"size\.csv line 2: the annotation says 400x500 but .* is 500x400"):
        cmd_evaluate(args)
    args = parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(size),
                  "--json", str(tmp_path / "out.txt")])
    with pytest.raises(CamError, match="json"):
        cmd_evaluate(args)
    capsys.readouterr()


@needs_shared
def test_center_crop_leaves_out_objects_the_model_never_sees(mnv2_int8_onnx, tmp_path, capsys):
    folder = shared("imagenet-val-20")
    # ILSVRC2012_val_00000011 is 500x400: resized to 320x256 and cropped from x 48, a box in the top-left
    # corner is not in the crop; the second row's box is the whole image.
    csv = write(tmp_path / "corner.csv", "file,class_id,x0,y0,x1,y1\n"
                                         "ILSVRC2012_val_00000011.JPEG,109,1,1,20,20\n"
                                         "ILSVRC2012_val_00004646.JPEG,109,0,0,500,375\n")
    out = tmp_path / "crop.json"
    assert cmd_evaluate(parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(csv),
                               "--crop", "center", "--device", "cpu", "--json", str(out)])) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 1
    assert doc["left_out_outside_crop"] == [{"file": "ILSVRC2012_val_00000011.JPEG", "class_id": 109}]
    assert [row["file"] for row in doc["per_image"]] == ["ILSVRC2012_val_00004646.JPEG"]
    assert "1 (image, class) row(s) left out: every box of the class falls outside" in capsys.readouterr().out
    # without the crop the model sees the corner: both rows count
    assert cmd_evaluate(parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(csv),
                               "--device", "cpu", "--json", str(out)])) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 2 and doc["left_out_outside_crop"] == []
    only = write(tmp_path / "only.csv", "file,class_id,x0,y0,x1,y1\nILSVRC2012_val_00000011.JPEG,109,1,1,20,20\n")
    with pytest.raises(CamError, match="every image's boxes fall outside the centre crop"):
        cmd_evaluate(parse(["--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(only),
                            "--crop", "center", "--device", "cpu"]))


def test_imagenet_xml_with_wordnet_ids(tmp_path):
    from realtime_cam.errors import CamError
    from realtime_cam.evaluation.annotations import load_ground_truth, load_wnids

    labels = tuple(f"class {i}" for i in range(1000))
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "a.xml").write_text(
        "<annotation><filename>a</filename><object><name>n01530575</name><bndbox><xmin>11</xmin>"
        "<ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object></annotation>")
    with pytest.raises(CamError, match="WordNet id.*--wnids"):
        load_ground_truth(xml, labels)
    wnids = tmp_path / "LOC_synset_mapping.txt"
    ids = [f"n{i:08d}" for i in range(1000)]
    ids[11] = "n01530575"
    wnids.write_text("\n".join(f"{w} some name" for w in ids) + "\n")
    (truth,) = load_ground_truth(xml, labels, load_wnids(wnids))
    assert truth.class_id == 11


def test_an_image_with_two_classes_is_scored_once_per_class(tmp_path):
    from realtime_cam.evaluation.annotations import read_boxes_csv

    path = tmp_path / "b.csv"
    path.write_text("file,class_id,x0,y0,x1,y1\na.jpg,1,0,0,3,3\na.jpg,2,5,5,9,9\na.jpg,1,1,1,4,4\n")
    truths = read_boxes_csv(path, num_classes=3)
    assert [(t.file, t.class_id, len(t.boxes_xyxy)) for t in truths] == [("a.jpg", 1, 2), ("a.jpg", 2, 1)]


def test_overlay_names_stay_in_the_save_dir_differ_per_class_and_never_reuse_an_input_name():
    from realtime_cam.evaluation.annotations import GroundTruth
    from realtime_cam.evaluation.run import overlay_name

    assert overlay_name(GroundTruth("a.JPEG", 5, ())) == "a.JPEG.class5.cam.jpg"
    assert overlay_name(GroundTruth("a.JPEG", 7, ())) != overlay_name(GroundTruth("a.JPEG", 5, ()))
    assert overlay_name(GroundTruth("sub/b.jpg", 1, ())) == "sub__b.jpg.class1.cam.jpg"
    assert overlay_name(GroundTruth("img.png", 3, ())) != overlay_name(GroundTruth("img.jpg", 3, ()))
    for escaping in ("../outside/victim.jpg", "/abs/victim.jpg", "./../../victim.jpg"):
        name = overlay_name(GroundTruth(escaping, 3, ()))
        assert "/" not in name and ".." not in name.split(".class")[0], name
    for existing in ("x.jpg", "x.class2.cam.jpg"):  # an overlay never takes the name of the image it explains
        assert overlay_name(GroundTruth(existing, 2, ())) != existing


def test_overlay_paths_are_numbered_rather_than_shared_or_put_over_an_input(tmp_path):
    from realtime_cam.evaluation.annotations import GroundTruth
    from realtime_cam.evaluation.run import unique_overlay_path

    used: set = set()
    clash = tmp_path / "x.jpg.class2.cam.jpg"  # an input image that happens to have an overlay's name
    inputs = {clash.resolve()}
    first = unique_overlay_path(tmp_path, GroundTruth("a/b.jpg", 1, ()), used, inputs)
    second = unique_overlay_path(tmp_path, GroundTruth("a__b.jpg", 1, ()), used, inputs)  # same flat name
    third = unique_overlay_path(tmp_path, GroundTruth("x.jpg", 2, ()), used, inputs)
    assert first.name == "a__b.jpg.class1.cam.jpg" and second.name == "a__b.jpg.class1.2.cam.jpg"
    assert third.name == "x.jpg.class2.2.cam.jpg" and third.parent == tmp_path


@pytest.mark.parametrize("class_text", ["--5", "\u00b2", "7.0"])
def test_a_class_id_that_is_not_a_whole_number_is_one_line(tmp_path, class_text):
    from realtime_cam.evaluation.annotations import read_boxes_csv

    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text(f"file,class_id,x0,y0,x1,y1\na.jpg,{class_text},1,1,5,5\n", encoding="utf-8")
    with pytest.raises(CamError, match="class_id is not a whole number"):
        read_boxes_csv(csv_path, num_classes=1000)


def test_a_wnids_or_labels_file_that_is_not_text_is_one_line(tmp_path):
    from realtime_cam.contract import load_labels
    from realtime_cam.errors import ModelError
    from realtime_cam.evaluation.annotations import load_wnids

    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CamError, match="is not a UTF-8 text file"):
        load_wnids(binary)
    with pytest.raises(ModelError, match="is not a UTF-8 text file"):
        load_labels(str(binary))
