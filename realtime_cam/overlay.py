"""Drawing: uint8 BGR in, uint8 BGR out. Nothing here keeps state between frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from .model import Prediction

FONT = cv2.FONT_HERSHEY_SIMPLEX


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


def colorize(map01: np.ndarray, size_wh: tuple[int, int], colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """A [0, 1] map upsampled (bilinear) to ``size_wh`` and coloured: HxWx3 uint8 BGR."""
    w, h = size_wh
    up = cv2.resize(map01.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.applyColorMap(np.clip(up * 255.0 + 0.5, 0, 255).astype(np.uint8), colormap)


def blend(frame_bgr: np.ndarray, heat_bgr: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * frame + alpha * heat, uint8."""
    return cv2.addWeighted(frame_bgr, 1.0 - alpha, heat_bgr, alpha, 0.0)


def text_scale(frame_hw: tuple[int, int]) -> tuple[float, int]:
    """Font scale and stroke thickness that stay legible from 160x120 to 4K."""
    h, w = frame_hw
    scale = max(0.45, min(h, w * 0.75) / 720.0 * 0.8)
    return scale, max(1, int(round(scale * 2)))


def draw_text_lines(image: np.ndarray, lines: Sequence[str], origin_xy: tuple[int, int] = (0, 0)) -> None:
    """Draw white lines of text on a dark box at ``origin_xy`` (top-left), in place.

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
    x1 = min(w - 1, x0 + widest + 2 * pad)
    y1 = min(h - 1, y0 + step * len(lines) + pad)
    # A translucent dark box keeps the text readable over any colour of the heatmap.
    roi = image[y0:y1, x0:x1]
    roi[:] = (roi * 0.35).astype(np.uint8)
    for i, line in enumerate(lines):
        y = y0 + pad + line_h + i * step
        cv2.putText(image, line, (x0 + pad, y), FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def prediction_lines(prediction: Prediction) -> list[str]:
    """The label line for the explained class: 'tabby 81.2%'."""
    return [f"{prediction.label} {prediction.probability * 100:.1f}%"]


def render(
    frame_bgr: np.ndarray,
    prediction: Prediction,
    style: OverlayStyle = OverlayStyle(),
    extra_lines: Sequence[str] = (),
) -> np.ndarray:
    """The map over the whole frame, JET-coloured and blended, with the label and any extra HUD lines."""
    h, w = frame_bgr.shape[:2]
    out = blend(frame_bgr, colorize(prediction.cam, (w, h), style.colormap), style.alpha)
    draw_text_lines(out, [*prediction_lines(prediction), *extra_lines])
    return out
