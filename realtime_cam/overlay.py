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


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


@dataclass(frozen=True)
class TextBlock:
    """Where and how :func:`draw_text_lines` draws lines of text: its dark box ``rect`` (``fits``: whole, not
    cut by the frame's edges), the font, and the spacing."""

    lines: tuple[str, ...]
    rect: Rect
    fits: bool
    scale: float
    thickness: int
    pad: int
    line_h: int
    step: int


def text_block(frame_hw: tuple[int, int], lines: Sequence[str], origin_xy: tuple[int, int] = (0, 0),
               anchor: str = "top", right_aligned: bool = False) -> TextBlock:
    """The layout of lines of text on a frame (see :func:`draw_text_lines`), without drawing them."""
    h, w = frame_hw
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
    natural = (x0, y0, x0 + widest + 2 * pad, y0 + step * len(lines) + pad)
    rect = (x0, y0, min(w, natural[2]), min(h, natural[3]))
    return TextBlock(tuple(lines), rect, rect == natural, scale, thickness, pad, line_h, step)


def draw_text_lines(image: np.ndarray, lines: Sequence[str], origin_xy: tuple[int, int] = (0, 0),
                    anchor: str = "top", right_aligned: bool = False,
                    color: tuple[int, int, int] = (255, 255, 255)) -> Rect | None:
    """Draw lines of text (white, or ``color``, BGR) on a dark box, in place; returns the box (None for no lines).

    Args:
        origin_xy: the box's top-left corner (anchor "top") or bottom-left corner (anchor "bottom"); with
            ``right_aligned``, x is the box's right edge instead.

    The font shrinks when the longest line would not fit the frame's width.
    """
    if not lines:
        return None
    block = text_block(image.shape[:2], lines, origin_xy, anchor, right_aligned)
    x0, y0, x1, y1 = block.rect
    # A translucent dark box keeps the text readable over any colour of the heatmap.
    roi = image[y0:y1, x0:x1]
    roi[:] = (roi * 0.35).astype(np.uint8)
    for i, line in enumerate(block.lines):
        y = y0 + block.pad + block.line_h + i * block.step
        cv2.putText(image, line, (x0 + block.pad, y), FONT, block.scale, color, block.thickness, cv2.LINE_AA)
    return block.rect


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


def box_line_widths(frame_hw: tuple[int, int]) -> tuple[int, int]:
    """The box's line width and the width of its dark outline on each side, scaled to the frame: 2 and 1
    pixels at 640x360, 6 and 3 at 1920x1080."""
    line = max(2, round(min(frame_hw) / 180))
    return line, max(1, round(line / 2))


def draw_box_lines(image: np.ndarray, box_xyxy: tuple[float, float, float, float],
                   color: tuple[int, int, int] = (255, 255, 255), thickness: int | None = None) -> None:
    """The localization box's lines in ``color`` (BGR) with a dark outline on both sides, in place: seen on
    any image, light or dark. Scaled to the frame unless ``thickness`` says how wide the line is."""
    line, outline = box_line_widths(image.shape[:2])
    if thickness is not None:
        line, outline = thickness, max(1, round(thickness / 2))
    x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
    x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)  # exclusive edges -> last pixel inside
    cv2.rectangle(image, (x0, y0), (x1, y1), (0, 0, 0), line + 2 * outline)
    cv2.rectangle(image, (x0, y0), (x1, y1), color, line)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def box_label_block(frame_hw: tuple[int, int], box_xyxy: tuple[float, float, float, float], label: str,
                    avoid: Sequence[Rect] = ()) -> TextBlock:
    """Where the box's label goes: inside the box's bottom-left corner, else its top-left, else below a block
    it would cover, else under or over the box; the first place that covers none of ``avoid`` (the class
    list and other text already drawn), or the first one when every place does."""
    h, w = frame_hw
    line, outline = box_line_widths(frame_hw)
    inset = line + outline
    x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
    left = min(max(0, x0 + inset), w - 1)
    places = [((left, min(max(1, y1 - inset), h)), "bottom"), ((left, min(max(0, y0 + inset), h - 1)), "top")]
    places += [((left, min(rect[3] + 1, h - 1)), "top") for rect in avoid]
    places += [((max(0, x0), min(y1 + outline, h - 1)), "top"), ((max(0, x0), max(1, y0 - outline)), "bottom")]
    blocks = [text_block(frame_hw, [label], origin, anchor) for origin, anchor in places]
    for block in blocks:
        if block.fits and not any(_overlaps(block.rect, rect) for rect in avoid):
            return block
    return blocks[0]


def draw_box(image: np.ndarray, box_xyxy: tuple[float, float, float, float], label: str,
             color: tuple[int, int, int] = (255, 255, 255), thickness: int | None = None,
             avoid: Sequence[Rect] = ()) -> None:
    """The localization box (see :func:`draw_box_lines`) and its label, placed clear of the ``avoid`` rects
    (see :func:`box_label_block`), in place."""
    draw_box_lines(image, box_xyxy, color, thickness)
    block = box_label_block(image.shape[:2], box_xyxy, label, avoid)
    draw_text_lines(image, list(block.lines), block.rect[:2])


def render(
    frame_bgr: np.ndarray,
    prediction: Prediction,
    style: OverlayStyle = OverlayStyle(),
    extra_lines: Sequence[str] = (),
    box_xyxy: tuple[float, float, float, float] | None = None,
    help_lines: Sequence[str] = (),
) -> np.ndarray:
    """The map over the whole frame, colour-mapped and blended, with the labels, an optional box,
    HUD lines (bottom-right) and help (top, from the middle).

    The box's lines go under the text; its label goes where it covers none of the text."""
    h, w = frame_bgr.shape[:2]
    out = blend(frame_bgr, colorize(prediction.cam, (w, h), style.colormap), style.alpha)
    if box_xyxy is not None:
        draw_box_lines(out, box_xyxy)
    drawn = [draw_text_lines(out, prediction_lines(prediction))]
    if extra_lines:
        drawn.append(draw_text_lines(out, list(extra_lines), (w, h), anchor="bottom", right_aligned=True))
    if help_lines:
        drawn.append(draw_text_lines(out, list(help_lines), (w // 2, 0)))
    if box_xyxy is not None:
        label = box_label_block((h, w), box_xyxy, prediction.label, [rect for rect in drawn if rect is not None])
        draw_text_lines(out, list(label.lines), label.rect[:2])
    return out
