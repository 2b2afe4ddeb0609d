"""Image files: which names are images, and the one reader every part of the package uses.

Extensions are lower-case here and compared lower-cased (``a.JPG`` is an image, and an output ``o.PNG`` is
written as PNG).
"""

from __future__ import annotations

import os
from pathlib import PurePath

import cv2
import numpy as np

from .errors import SourceError
from .preprocess import as_bgr

# What OpenCV reads as a still image: `run --source`, calibration folders, evaluate's image lookup.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jp2"})
# What an overlay may be written as (`run --output`). Narrower than the readable set: .pgm holds grey only,
# so the heatmap would lose its colours; .ppm and .jp2 have never been offered as outputs, and adding them
# would be a new feature rather than a move.
WRITABLE_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS - {".pgm", ".ppm", ".jp2"}


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether a file name has a readable image extension, in any case."""
    return PurePath(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as stored, HxWx3 uint8 BGR; a one-line SourceError when it cannot be read or decoded.

    The bytes are decoded with cv2.imdecode (cv2.imread cannot open some non-ASCII paths on Windows).
    IMREAD_UNCHANGED ignores EXIF orientation, so the pixels are in the stored grid that annotations use;
    ``as_bgr`` brings grayscale, alpha, 16-bit and float images to BGR, as it does for video frames.
    """
    try:
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise SourceError(f"cannot decode {path} as an image")
    return as_bgr(image)
