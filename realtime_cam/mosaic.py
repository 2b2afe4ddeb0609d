"""Several streams' overlays in one image: tiles of equal size, each with its stream's label and frame rate, and the
selected one (the one the window's keys act on) marked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .overlay import draw_text_lines

BACKGROUND = 24  # grey of empty tiles and letterbox bars
SELECTED_COLOR = (255, 0, 255)  # BGR magenta: the selected tile's border and caption (no colormap's colour)
SELECTED_BORDER = 4  # pixels, inside the tile


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


def tile_cell(index: int, count: int, tile_wh: tuple[int, int] = (640, 360)) -> tuple[int, int, int, int]:
    """Where tile ``index`` of ``count`` lies in the mosaic: (x0, y0, x1, y1), x1 and y1 excluded."""
    _, cols = grid_shape(count)
    r, c = divmod(index, cols)
    w, h = tile_wh
    return c * w, r * h, (c + 1) * w, (r + 1) * h


def mosaic(tiles: Sequence[Tile], tile_wh: tuple[int, int] = (640, 360), selected: int | None = None) -> np.ndarray:
    """One image holding every tile, row by row, each ``tile_wh`` with its caption at the bottom left.

    With ``selected`` (a tile's index), each caption starts with the tile's number (the key that selects it)
    and the selected tile has a magenta border and its caption, in magenta, in brackets: ``[2] name``."""
    rows, cols = grid_shape(len(tiles))
    w, h = tile_wh
    out = np.full((rows * h, cols * w, 3), BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        x0, y0, x1, y1 = tile_cell(i, len(tiles), tile_wh)
        cell = out[y0:y1, x0:x1]
        if tile.image_bgr is not None:
            cell[:] = fit(tile.image_bgr, tile_wh)
        if tile.ended:
            cell[:] = (cell.astype(np.uint16) // 3).astype(np.uint8)  # dimmed: nothing new comes
        caption, inset = tile_caption(tile), 0
        if selected is not None:  # numbered, and clear of the selected tile's border
            caption = f"[{i + 1}] {caption}" if i == selected else f"{i + 1}  {caption}"
            inset = SELECTED_BORDER
        color = SELECTED_COLOR if i == selected else (255, 255, 255)
        draw_text_lines(cell, [caption[:80]], (inset, h - inset), anchor="bottom", color=color)
        if i == selected:
            half = SELECTED_BORDER // 2  # a rectangle's thick line is centred on its edge
            cv2.rectangle(cell, (half, half), (w - 1 - half, h - 1 - half), SELECTED_COLOR, SELECTED_BORDER)
        else:
            cv2.rectangle(cell, (0, 0), (w - 1, h - 1), (80, 80, 80), 1)
    return out
