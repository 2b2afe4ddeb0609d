"""What a collection holds: ``DIR | 'GLOB' | LIST.txt`` expanded into input files, each with the relative path
its outputs mirror, and the output names those files get.

A folder is walked recursively; a glob is expanded (``**`` included) relative to its fixed leading folders; a
``.txt`` list names files, folders or globs, one a line (blank lines and ``#`` comments ignored, relative
entries relative to the list's folder). Only videos and images (by extension) are kept.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import SourceError
from ..images import IMAGE_EXTENSIONS, WRITABLE_IMAGE_EXTENSIONS
from ..sources import VIDEO_EXTENSIONS, is_live_spec, read_source_list

GLOB_CHARS = frozenset("*?[")
LIST_SUFFIX = ".txt"
VIDEO_OUTPUT_SUFFIX = ".mp4"  # every overlay video, whatever the input's container
IMAGE_OUTPUT_SUFFIX = ".png"  # an image whose own format cannot be written (see WRITABLE_IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Item:
    """One input file of a collection.

    Attributes:
        path: the file, as found.
        rel: its path relative to the collection's root (POSIX form): its outputs mirror it.
        kind: "video" or "image".
        output_rel: the overlay's path relative to the output folder.
    """

    path: str
    rel: str
    kind: str
    output_rel: str


def media_kind(path: str | os.PathLike) -> str | None:
    """"video", "image", or None for a file a collection skips."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return None


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def is_collection(spec: str | os.PathLike | None) -> bool:
    """A folder, a glob pattern (that is not the name of an existing file), or an existing ``.txt`` list."""
    if spec is None:
        return False
    text = str(spec)
    if not text.strip() or is_live_spec(text):
        return False
    path = Path(text)
    if path.is_dir():
        return True
    if path.is_file():
        return path.suffix.lower() == LIST_SUFFIX
    return _has_glob(text)


def _glob_root(pattern: str) -> Path:
    """The folders of a pattern before its first wildcard: what its matches are relative to."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _has_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _walk(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")  # hidden: our own results, editors' folders
                         and not (exclude is not None and _same(root_path / d, exclude)))
        found += [root_path / f for f in sorted(files) if not f.startswith(".")]
    return found


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _expand(entry: str, base: Path, exclude: Path | None, where: str) -> list[tuple[Path, Path]]:
    """(file, root it is relative to) for one folder, glob or file name."""
    path = Path(entry) if Path(entry).is_absolute() else base / entry
    if path.is_dir():
        return [(f, path) for f in _walk(path, exclude)]
    if path.is_file():
        return [(path, path.parent)]
    if _has_glob(entry):
        root = _glob_root(str(path))
        matches = sorted(glob.glob(str(path), recursive=True))
        out: list[tuple[Path, Path]] = []
        for match in map(Path, matches):
            out += [(f, root) for f in _walk(match, exclude)] if match.is_dir() else [(match, root)]
        return out
    raise SourceError(f"{where}: not found: {entry}")


def discover(spec: str, exclude: Path | None = None) -> list[Item]:
    """The videos and images a collection holds, in a stable order, with their relative and output paths.

    ``exclude``: a folder whose files are never inputs (the output folder, when it lies inside the input).
    Raises a one-line SourceError for a list entry that is not there or a collection with nothing to explain.
    """
    text = str(spec)
    path = Path(text)
    if path.is_file() and path.suffix.lower() == LIST_SUFFIX:
        found: list[tuple[Path, Path]] = []
        for entry in read_source_list(path):
            found += _expand(entry, path.parent, exclude, f"list {path}")
        files = [f for f, _ in found]
        # Entries from several places: relative to their common folder, so that two files never share a name.
        common = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if files else path.parent
        pairs = [(f, common, f.resolve()) for f in files]
    else:
        if not path.is_dir() and not _has_glob(text):
            raise SourceError(f"source not found: {text}")
        pairs = [(f, root, f) for f, root in _expand(text, Path("."), exclude, "--source")]
    items: list[Item] = []
    seen: set[str] = set()
    skipped = 0
    for file, root, for_rel in pairs:
        kind = media_kind(file)
        if kind is None or not file.is_file() or _inside(file, exclude):
            skipped += kind is None
            continue
        real = str(file.resolve())
        if real in seen:  # listed twice (a file and the folder holding it)
            continue
        seen.add(real)
        rel = PurePosixPath(Path(os.path.relpath(for_rel, root)).as_posix())
        items.append(Item(path=str(file), rel=str(rel), kind=kind, output_rel=""))
    if not items:
        what = f" ({skipped} file(s) that are neither videos nor images)" if skipped else ""
        raise SourceError(f"{text}: no video or image to explain{what}")
    return _with_output_names(items)


def output_rel(rel: str, kind: str) -> str:
    """Where an input's overlay goes under the output folder: videos as .mp4, images in their own format when
    it can be written, else .png."""
    p = PurePosixPath(rel)
    if kind == "video":
        return str(p.with_suffix(VIDEO_OUTPUT_SUFFIX))
    return rel if p.suffix.lower() in WRITABLE_IMAGE_EXTENSIONS else str(p.with_suffix(IMAGE_OUTPUT_SUFFIX))


def _with_output_names(items: list[Item]) -> list[Item]:
    """Give each item its output name; two inputs that would share one (a.avi and a.mp4) keep their own suffix
    in it (a.avi.mp4)."""
    wanted = [output_rel(item.rel, item.kind) for item in items]
    counts: dict[str, int] = {}
    for name in wanted:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    out = []
    for item, name in zip(items, wanted):
        if counts[name.lower()] > 1 and name != item.rel:
            suffix = VIDEO_OUTPUT_SUFFIX if item.kind == "video" else PurePosixPath(name).suffix
            name = item.rel + suffix
        out.append(Item(item.path, item.rel, item.kind, name))
    return out
