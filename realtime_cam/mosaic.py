"""Several streams' overlays in one image: tiles of equal size, each with its stream's label and frame rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .overlay import draw_text_lines

BACKGROUND = 24  # grey of empty tiles and letterbox bars


@dataclass(frozen=True)
class Tile:
    """One stream's tile: its last overlay (None before the first), its label, frames per second, and whether it
    has ended (and why)."""

    image_bgr: np.ndarray | None
    label: str
    fps: float = 0.0
    ended: bool = False
    error: str | None = None


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) for n tiles: as square as possible, wider than tall."""
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


def fit(image_bgr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The image scaled to fit ``size_wh`` whole, centred on a dark background (its aspect ratio kept)."""
    w, h = size_wh
    out = np.full((h, w, 3), BACKGROUND, np.uint8)
    ih, iw = image_bgr.shape[:2]
    scale = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    resized = cv2.resize(image_bgr, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x, y = (w - nw) // 2, (h - nh) // 2
    out[y:y + nh, x:x + nw] = resized
    return out


def tile_caption(tile: Tile) -> str:
    if tile.ended:
        return f"{tile.label}: ended" + (f" ({tile.error})" if tile.error else "")
    return f"{tile.label}  {tile.fps:.1f} FPS" if tile.fps > 0 else tile.label


def mosaic(tiles: Sequence[Tile], tile_wh: tuple[int, int] = (640, 360)) -> np.ndarray:
    """One image holding every tile, row by row, each ``tile_wh`` with its caption at the bottom left."""
    rows, cols = grid_shape(len(tiles))
    w, h = tile_wh
    out = np.full((rows * h, cols * w, 3), BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        cell = out[r * h:(r + 1) * h, c * w:(c + 1) * w]
        if tile.image_bgr is not None:
            cell[:] = fit(tile.image_bgr, tile_wh)
        if tile.ended:
            cell[:] = (cell.astype(np.uint16) // 3).astype(np.uint8)  # dimmed: nothing new comes
        draw_text_lines(cell, [tile_caption(tile)[:80]], (0, h), anchor="bottom")
        cv2.rectangle(cell, (0, 0), (w - 1, h - 1), (80, 80, 80), 1)
    return out
