"""Small media collections for the collection tests: synthetic clips and photos, and how to read outputs back."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from synthetic import moving_frames, write_photo


def write_clip(path: Path, frames: int = 12, size_wh: tuple[int, int] = (160, 120), fps: float = 10.0) -> Path:
    """A short clip of a disc crossing a photo (the extension picks the container: .avi MJPG, else mp4v)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(path), fourcc, fps, size_wh)
    for frame in moving_frames(frames, size_wh):
        writer.write(frame.image_bgr)
    writer.release()
    return path


def make_collection(root: Path, clips: int = 2, photos: int = 2, frames: int = 12) -> Path:
    """root/clips/clip-N.mp4, root/photos/photo-N.jpg, plus a text file a collection skips."""
    for i in range(clips):
        write_clip(root / "clips" / f"clip-{i}.mp4", frames=frames)
    for i in range(photos):
        (root / "photos").mkdir(parents=True, exist_ok=True)
        write_photo(root / "photos" / f"photo-{i}.jpg", (200, 150), seed=i)
    (root / "notes.txt").write_text("not media\n")
    return root


def decoded(path: Path) -> list[np.ndarray]:
    """Every frame of a video output, or the one image of an image output."""
    if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"):
        return [cv2.imread(str(path))]
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames


def partials(folder: Path) -> list[Path]:
    """Temporary files left anywhere under a folder."""
    return [p for p in folder.rglob("*") if ".partial" in p.name]
