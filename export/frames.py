"""Frames sampled from videos, images and folders of clips: what int8 calibration and the fidelity checks run on."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from realtime_cam.errors import SourceError
from realtime_cam.images import IMAGE_EXTENSIONS
from realtime_cam.sources import VIDEO_EXTENSIONS, open_source

__all__ = ["Sources", "as_specs", "describe", "sample_frames"]

Sources = str | os.PathLike | Sequence[str | os.PathLike]


def sample_frames(sources: Sources, max_frames: int) -> Iterator[np.ndarray]:
    """Up to ``max_frames`` BGR frames spread evenly over image files, video files and folders of either.

    The budget is shared out evenly between the sources (a folder's images are one source, each of its videos
    another); images are planned first, so what a source with few frames leaves over goes to the videos. A
    video's frames are counted by decoding it (containers' frame counts are not trusted), then the chosen
    ones are read in a second pass.
    The sources are all opened and checked before this returns; the frames are read lazily.

    Raises:
        SourceError: a missing, unreadable or empty source, a folder without images or videos, or a live source
            (webcams and streams have no end to spread frames over).
    """
    if max_frames < 1:
        raise SourceError(f"need at least one frame to sample, got max_frames={max_frames}")
    specs = as_specs(sources)
    images: list[list[str]] = []
    videos: list[tuple[str, int | None]] = []  # (file, frames; None until counted)
    for spec in specs:
        path = Path(spec)
        if not path.exists():
            raise SourceError(f"source not found: {spec}")
        if path.is_dir():  # its images are one source, each of its videos another
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            pictures = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            clips = [str(p) for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
            if not pictures and not clips:
                raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or videos "
                                  f"({', '.join(sorted(VIDEO_EXTENSIONS))}) in the folder {spec}")
            if pictures:
                images.append(pictures)
            videos.extend((clip, None) for clip in clips)  # counted when the budget reaches them
            continue
        with open_source(spec) as source:  # reads the first frame: a bad file fails here
            if source.live:
                raise SourceError(f"{spec} is a live source; sample frames from image or video files")
            if source.kind == "image":
                images.append([spec])
            else:
                videos.append((spec, sum(1 for _ in source)))

    budget, left = max_frames, len(images) + len(videos)
    chosen_images: list[str] = []
    for files in images:
        picked = _spread(len(files), -(-budget // left))  # a fair share, rounded up: never over budget
        chosen_images.extend(files[i] for i in picked)
        budget, left = budget - len(picked), left - 1
    chosen_videos: list[tuple[str, list[int]]] = []
    for spec, count in videos:
        if budget <= 0:
            break
        picked = _spread(count if count is not None else _count_frames(spec), -(-budget // left))
        if picked:
            chosen_videos.append((spec, picked))
        budget, left = budget - len(picked), left - 1
    # Decode every chosen image now, so that a corrupt file is an error here rather than mid-calibration.
    for file in chosen_images:
        with open_source(file):
            pass
    return _read_frames(chosen_images, chosen_videos)


def _count_frames(video: str) -> int:
    """A video's frames, by decoding it (containers' frame counts are not trusted)."""
    with open_source(video) as source:  # reads the first frame: a bad file fails here
        return sum(1 for _ in source)


def as_specs(sources: Sources) -> list[str]:
    """One source or several, as a non-empty list of path strings."""
    if isinstance(sources, (str, os.PathLike)):
        return [os.fspath(sources)]
    specs = [os.fspath(s) for s in sources]
    if not specs:
        raise SourceError("no frame sources given")
    return specs


def _spread(count: int, take: int) -> list[int]:
    """``take`` indices in 0..count-1, evenly spread and including both ends (all of them if count <= take)."""
    if count <= take:
        return list(range(count))
    if take <= 0:
        return []
    if take == 1:
        return [count // 2]
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, take)})


def _read_frames(images: list[str], videos: list[tuple[str, list[int]]]) -> Iterator[np.ndarray]:
    for file in images:
        with open_source(file) as source:
            for frame in source:
                yield frame.image_bgr
    for spec, indices in videos:
        wanted = set(indices)
        last = max(indices, default=-1)
        with open_source(spec) as source:
            for frame in source:
                if frame.index in wanted:
                    yield frame.image_bgr
                if frame.index >= last:
                    break


def describe(specs: list[str]) -> str:
    """The sources' names for a log line (a folder ends in /), the first four and how many more."""
    names = [Path(s).name + ("/" if Path(s).is_dir() else "") for s in specs]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
