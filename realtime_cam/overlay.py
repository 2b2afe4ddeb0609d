"""Drawing: uint8 BGR in, uint8 BGR out. Nothing here keeps state between frames."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .types import Prediction

FONT = cv2.FONT_HERSHEY_SIMPLEX

# Every colormap OpenCV has, by its lower-case name: jet, turbo, inferno, viridis, ...
COLORMAPS: dict[str, int] = {
    name[len("COLORMAP_"):].lower(): getattr(cv2, name) for name in dir(cv2) if name.startswith("COLORMAP_")
}


@dataclass(frozen=True)
class OverlayStyle:
    """How the map is drawn.

    Attributes:
        alpha: the heatmap's weight in the blend: out = (1 - alpha) * frame + alpha * heatmap.
            0 shows only the frame, 1 only the heatmap.
        colormap: an OpenCV colormap (cv2.COLORMAP_*); red is where the class evidence is highest.
    """

    alpha: float = 0.5
    colormap: int = cv2.COLORMAP_JET


@functools.cache
def colormap_table(colormap: int) -> np.ndarray:
    """The 256x1x3 BGR table of an OpenCV colormap.

    OpenCV rebuilds it on every applyColorMap call given a colormap id; given the table instead, it makes the
    same pixels in half the time (0.14 instead of 0.28 ms at 640x360).
    """
    table = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), colormap)
    table.flags.writeable = False
    return table


def colorize(map01: np.ndarray, size_wh: tuple[int, int], colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """A [0, 1] map upsampled (bilinear) to ``size_wh`` and coloured: HxWx3 uint8 BGR."""
    w, h = size_wh
    # Quantise at feature resolution, then upsample 8-bit: 4x cheaper than upsampling floats, and the
    # colours differ by a few levels of 255 at most.
    small = np.clip(map01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), colormap_table(colormap))


def blend(frame_bgr: np.ndarray, heat_bgr: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * frame + alpha * heat, uint8."""
    return cv2.addWeighted(frame_bgr, 1.0 - alpha, heat_bgr, alpha, 0.0)


def text_scale(frame_hw: tuple[int, int]) -> tuple[float, int]:
    """Font scale and stroke thickness that stay legible from 160x120 to 4K."""
    h, w = frame_hw
    scale = max(0.45, min(h, w * 0.75) / 720.0 * 0.8)
    return scale, max(1, int(round(scale * 2)))


def draw_text_lines(image: np.ndarray, lines: Sequence[str], origin_xy: tuple[int, int] = (0, 0),
                    anchor: str = "top", right_aligned: bool = False) -> None:
    """Draw white lines of text on a dark box, in place.

    Args:
        origin_xy: the box's top-left corner (anchor "top") or bottom-left corner (anchor "bottom"); with
            ``right_aligned``, x is the box's right edge instead.

    The font shrinks when the longest line would not fit the frame's width.
    """
    if not lines:
        return
    h, w = image.shape[:2]
    scale, thickness = text_scale((h, w))
    widest = max(cv2.getTextSize(line, FONT, scale, thickness)[0][0] for line in lines)
    pad = max(2, int(6 * scale))
    if widest + 2 * pad > w:
        scale *= (w - 2 * pad) / max(widest, 1)
        thickness = max(1, int(round(scale * 2)))
    (_, line_h), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    step = line_h + baseline + pad
    widest = max(cv2.getTextSize(line, FONT, scale, thickness)[0][0] for line in lines)
    x0, y0 = origin_xy
    if right_aligned:
        x0 = max(0, x0 - (widest + 2 * pad))
    if anchor == "bottom":
        y0 = max(0, y0 - (step * len(lines) + pad))
    x1 = min(w, x0 + widest + 2 * pad)
    y1 = min(h, y0 + step * len(lines) + pad)
    # A translucent dark box keeps the text readable over any colour of the heatmap.
    roi = image[y0:y1, x0:x1]
    roi[:] = (roi * 0.35).astype(np.uint8)
    for i, line in enumerate(lines):
        y = y0 + pad + line_h + i * step
        cv2.putText(image, line, (x0 + pad, y), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def prediction_lines(prediction: Prediction) -> list[str]:
    """The explained class first ('tabby 81.2%', with [pinned] or [held]), then the top-k ranked by
    probability with the explained one marked '>'."""
    head = f"{prediction.label} {prediction.probability * 100:.1f}%"
    if prediction.pinned:
        head += " [pinned]"
    elif prediction.held:
        head += " [held]"
    if prediction.method != "cam":
        head += f" ({prediction.method})"
    lines = [head]
    if len(prediction.topk) > 1:
        for rank, (class_id, label, prob) in enumerate(prediction.topk, 1):
            mark = ">" if class_id == prediction.class_id else " "
            lines.append(f"{mark}{rank}. {label} {prob * 100:.1f}%")
    return lines


def draw_box(image: np.ndarray, box_xyxy: tuple[float, float, float, float], label: str,
             color: tuple[int, int, int] = (255, 255, 255), thickness: int | None = None) -> None:
    """The localization box in ``color`` (BGR) with its label, in place; a dark outline keeps it visible on any
    colour. The line is as thick as the label's letters unless ``thickness`` says otherwise."""
    h, w = image.shape[:2]
    scale, text_thickness = text_scale((h, w))
    thickness = text_thickness if thickness is None else thickness
    x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
    x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)  # exclusive edges -> last pixel inside
    cv2.rectangle(image, (x0, y0), (x1, y1), (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.rectangle(image, (x0, y0), (x1, y1), color, thickness, cv2.LINE_AA)
    # The label sits inside the box's bottom-left corner: the top-left of the frame holds the class list.
    draw_text_lines(image, [label], (min(max(0, x0 + thickness), w - 1), min(max(1, y1 - thickness), h)),
                    anchor="bottom")


def render(
    frame_bgr: np.ndarray,
    prediction: Prediction,
    style: OverlayStyle = OverlayStyle(),
    extra_lines: Sequence[str] = (),
    box_xyxy: tuple[float, float, float, float] | None = None,
    help_lines: Sequence[str] = (),
) -> np.ndarray:
    """The map over the whole frame, colour-mapped and blended, with the labels, an optional box,
    HUD lines (bottom-right) and help (top, from the middle)."""
    h, w = frame_bgr.shape[:2]
    out = blend(frame_bgr, colorize(prediction.cam, (w, h), style.colormap), style.alpha)
    if box_xyxy is not None:
        draw_box(out, box_xyxy, prediction.label)
    draw_text_lines(out, prediction_lines(prediction))
    if extra_lines:  # bottom-right: the box label uses the bottom-left of its box
        draw_text_lines(out, list(extra_lines), (w, h), anchor="bottom", right_aligned=True)
    if help_lines:
        draw_text_lines(out, list(help_lines), (w // 2, 0))
    return out
