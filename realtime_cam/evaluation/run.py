"""Running ``evaluate``: the model over the annotated images, each map scored, the report and the overlays."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..cams import METHODS
from ..errors import CamError, SinkError
from ..explain import Request, explain
from ..images import read_image
from ..localize import Box
from ..progress import Progress
from ..sinks import write_image
from .annotations import GroundTruth, load_ground_truth, load_wnids, resolve_image
from .metrics import (
    CAM_THRESHOLDS,
    CROPS,
    LOC_IOU,
    V2_IOU_THRESHOLDS,
    CropTransform,
    EvalSummary,
    ImageResult,
    apply_crop,
    center_crop_transform,
    clip_boxes,
    crop_boxes,
    rank_classes,
    score_image,
    summarize,
)

if TYPE_CHECKING:  # run_evaluate imports the model (and ONNX Runtime) only when it runs
    from ..model import CamModel, Outputs
    from ..types import Prediction



# ----------------------------------------------------------------------------- the run
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
    ``outside_image`` lists the rows whose boxes all lie outside their image (a wrong annotation).
    ``interrupted`` is the Ctrl-C or SIGTERM that stopped the run early (the report then covers the rows
    scored before it), None for a complete run.
    """

    config: EvaluateConfig
    summary: EvalSummary
    results: tuple[ImageResult, ...]
    labels: tuple[str, ...]
    seconds: float
    outside_crop: tuple[tuple[str, int], ...] = ()
    outside_image: tuple[tuple[str, int], ...] = ()
    interrupted: BaseException | None = None


def run_evaluate(config: EvaluateConfig, progress: Callable[[int], Progress] | None = None,
                 on_image: Callable[[ImageResult], None] | None = None, runner: Callable | None = None) -> EvalReport:
    """Run the model over the annotated images and score every map.

    Args:
        config: the settings.
        progress: makes the progress line, given the number of images (None: no progress line).
        on_image: called with each image's result, e.g. to log it.
        runner: does the per-image work elsewhere (``collection.evaluate.ray_runner``), with the same arguments
            and results as :func:`score_rows`; None: here, one image after another.
    """
    from ..model import CamModel

    if config.method not in METHODS:
        raise CamError(f"unknown map method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.crop not in CROPS:
        raise CamError(f"--crop must be one of {', '.join(CROPS)}; got {config.crop!r}")
    from ..collection import is_collection

    if not is_collection(config.images):
        raise CamError(f"images folder not found: {config.images}")
    if config.save_dir is not None:  # before any work: a folder that cannot be made is a one-line error
        make_save_dir(config.save_dir)
    model = CamModel(config.model, device=config.device)
    labels = model.labels
    truths = load_ground_truth(config.boxes, labels, load_wnids(config.wnids) if config.wnids else None)
    if config.max_images is not None:
        truths = truths[: config.max_images]
    if config.images.is_dir():
        paths = [resolve_image(config.images, gt) for gt in truths]  # every image exists before any work
    else:  # a glob or a list of images: the annotations name them by their path relative to it
        from ..collection.evaluate import collection_resolver

        resolve = collection_resolver(config.images)
        paths = [resolve(gt) for gt in truths]

    bar = progress(len(truths)) if progress is not None else None
    start = time.perf_counter()
    results, left_out, interrupted = (runner or score_rows)(model, config, truths, paths, bar, on_image)
    elapsed = time.perf_counter() - start
    if bar is not None and interrupted is None:
        bar.close(len(truths), len(truths) / elapsed if elapsed > 0 else 0.0)
    if not results and not left_out["outside image"]:
        raise CamError(f"every image's boxes fall outside the centre crop ({len(left_out['outside crop'])} "
                       "(image, class) rows): nothing to score; use --crop none")
    if not results:
        raise CamError(f"no (image, class) row can be scored: {len(left_out['outside image'])} have every box "
                       f"outside their image and {len(left_out['outside crop'])} outside the centre crop; check "
                       "the annotations")
    summary = summarize(results, topk=config.topk)
    return EvalReport(config=config, summary=summary, results=tuple(results), labels=tuple(labels),
                      seconds=elapsed, outside_crop=tuple(left_out["outside crop"]),
                      outside_image=tuple(left_out["outside image"]), interrupted=interrupted)


def score_rows(model: CamModel, config: EvaluateConfig, truths: Sequence[GroundTruth], paths: Sequence[Path],
               bar: Progress | None, on_image: Callable[[ImageResult], None] | None
               ) -> tuple[list[ImageResult], dict[str, list[tuple[str, int]]], BaseException | None]:
    """Every (image, class) row here, in order: the results, the rows left out (by why), and the Ctrl-C that
    stopped it early (None when complete)."""
    labels = model.labels
    used_names: set[Path] = set()
    input_paths = {p.resolve() for p in paths}
    # An image with several classes is a row per class: it is read and inferred once, kept until its last row.
    rows_left = collections.Counter(paths)
    views: dict[Path, _ModelView] = {}
    results = []
    left_out: dict[str, list[tuple[str, int]]] = {"outside crop": [], "outside image": []}
    interrupted: BaseException | None = None
    start = time.perf_counter()
    try:
        for done, (gt, path) in enumerate(zip(truths, paths), 1):
            view = views.pop(path, None) or _ModelView.of(path, model, config)
            rows_left[path] -= 1
            if rows_left[path]:
                views[path] = view
            scored = _score_row(model, config, gt, path, view)
            if isinstance(scored, str):  # nothing of the object is in what the model sees: no map can find it
                left_out[scored].append((gt.file, gt.class_id))
            else:
                frame, prediction, result = scored
                if config.save_dir is not None:
                    out_path = unique_overlay_path(config.save_dir, gt, used_names, input_paths)
                    write_image(out_path, draw_result(frame, prediction.cam, result, labels, config.box_threshold),
                                (cv2.IMWRITE_JPEG_QUALITY, 90))
                results.append(result)  # after its overlay: an interrupted run counts only whole files
                if on_image is not None:
                    on_image(result)
            if bar is not None and done < len(truths):  # close() prints the last line
                elapsed = time.perf_counter() - start
                bar.update(done, done / elapsed if elapsed > 0 else 0.0)
    except KeyboardInterrupt as exc:  # the rows scored so far are reported, marked as such, then it is raised
        if not results:
            raise
        interrupted = exc
    return results, left_out, interrupted


def make_save_dir(folder: Path) -> None:
    """The overlay folder, made if missing; a one-line error when it is a file or cannot be made."""
    try:
        if folder.exists() and not folder.is_dir():
            raise SinkError(f"--save-dir is a file, not a folder: {folder}")
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, a name too long, no permission
        raise SinkError(f"cannot make --save-dir {folder}: {exc.strerror or exc}") from None


class _ModelView:
    """An image as the model sees it (cropped with ``--crop center``), and its network outputs, computed
    the first time a row asks for them."""

    def __init__(self, frame: np.ndarray, size_wh: tuple[int, int], crop: CropTransform | None) -> None:
        self.frame, self.size_wh, self.crop = frame, size_wh, crop
        self._outputs: Outputs | None = None

    @classmethod
    def of(cls, path: Path, model: CamModel, config: EvaluateConfig) -> _ModelView:
        frame = read_image(path)
        h, w = frame.shape[:2]
        if config.crop != "center":
            return cls(frame, (w, h), None)
        tf = center_crop_transform((w, h), model.info.input_size_hw)
        return cls(apply_crop(frame, tf), (w, h), tf)

    def outputs(self, model: CamModel) -> Outputs:
        if self._outputs is None:
            self._outputs = model.run(model.prepare(self.frame)).row(0)
        return self._outputs


def _score_row(model: CamModel, config: EvaluateConfig, gt: GroundTruth, path: Path,
               view: _ModelView) -> tuple[np.ndarray, Prediction, ImageResult] | str:
    """One (image, class) row: the image as the model saw it, the prediction and the scores; or why it is
    left out: "outside image" (every box of the class lies outside its image) or "outside crop"
    (``--crop center`` cut every box away)."""
    w, h = view.size_wh
    if gt.size_wh is not None and gt.size_wh != (w, h):
        raise CamError(f"{gt.where}: the annotation says {gt.size_wh[0]}x{gt.size_wh[1]} but {path.name} "
                       f"is {w}x{h}")
    gt_boxes = clip_boxes(gt.boxes_xyxy, (w, h))
    if not gt_boxes:
        return "outside image"
    if view.crop is not None:
        gt_boxes = crop_boxes(gt_boxes, view.crop)
        if not gt_boxes:
            return "outside crop"
    frame = view.frame
    eval_h, eval_w = frame.shape[:2]
    out = view.outputs(model)
    logits = out.logits
    request = Request(method=config.method, class_id=gt.class_id, topk=config.topk)
    prediction, _ = explain(logits, out.features, model.head_weight, model.labels, request,
                            gradients=model.gradient_source(frame, out))
    result = score_image(
        prediction.cam, gt_boxes, (eval_w, eval_h), gt.class_id, rank_classes(logits, config.topk),
        file=gt.file, box_threshold=config.box_threshold, pointing_tolerance=config.pointing_tolerance,
        top1_tie=bool(np.count_nonzero(logits == logits.max()) > 1),
    )
    return frame, prediction, result


# ----------------------------------------------------------------------------- overlays
def draw_result(frame_bgr: np.ndarray, map_hw: np.ndarray, result: ImageResult, labels: Sequence[str],
                box_threshold: float) -> np.ndarray:
    """The map over the image, ground-truth boxes in green, the paper's-rule box in red (drawn and labelled
    as the live overlay draws it), the map's peak, and what was scored."""
    from ..overlay import blend, colorize, draw_box, draw_text_lines

    h, w = frame_bgr.shape[:2]
    out = blend(frame_bgr, colorize(map_hw, (w, h)), 0.5)
    thickness = max(2, round(min(w, h) / 200))
    for x0, y0, x1, y1 in result.gt_boxes_xyxy:  # no label: there may be many, and small
        cv2.rectangle(out, (int(round(x0)), int(round(y0))), (int(round(x1)) - 1, int(round(y1)) - 1),
                      (0, 255, 0), thickness)
    if result.box_xyxy is not None:
        draw_box(out, result.box_xyxy, labels[result.class_id], color=(0, 0, 255), thickness=thickness)
    cv2.circle(out, result.peak_xy, thickness * 2, (255, 255, 255), -1)
    top = result.topk_ids[0] if result.topk_ids else -1
    lines = [f"GT: {labels[result.class_id]}",
             f"top-1: {labels[top] if top >= 0 else '?'} ({'right' if result.top1_correct else 'wrong'})",
             f"box @{box_threshold:.2f}: IoU {result.box_iou:.2f} ({'hit' if result.loc_correct else 'miss'})"]
    draw_text_lines(out, lines)
    return out


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


# ----------------------------------------------------------------------------- the report
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
        "left_out_outside_image": [{"file": f, "class_id": c} for f, c in report.outside_image],
        "partial": report.interrupted is not None,
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
    if report.outside_image:
        files = ", ".join(f"{f} class {c}" for f, c in report.outside_image[:5])
        more = ", ..." if len(report.outside_image) > 5 else ""
        lines.append(f"({len(report.outside_image)} (image, class) row(s) left out: every box of the class lies "
                     f"outside its image, check the annotation: {files}{more})")
    if report.interrupted is not None:
        lines.append(f"(interrupted: these figures cover only the {s.images} row(s) scored before it stopped)")
    if s.top1_ties:
        lines.append(f"({s.top1_ties} image(s) had a tie for the highest logit: ranked by class id)")
    return "\n".join(lines)
