"""Ground truth for ``evaluate``: boxes from a CSV file or PASCAL VOC / ImageNet XML, and the images they name.

Boxes here are ``box_xyxy`` with pixel edges, as in ``realtime_cam.localize`` (x1, y1 exclusive). Files use
pixel *indices* with the last row/column included: a CSV row gives 0-based indices (wsolevaluation's metadata
and ``../shared/data/imagenet-val-20/annotations.csv``: x1 = 499 in a 500-wide image), a VOC/ImageNet XML
gives 1-based ones.
"""

from __future__ import annotations

import csv
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CamError
from ..images import IMAGE_EXTENSIONS
from ..labels import whole_number
from ..localize import Box

REQUIRED_COLUMNS = ("file", "class_id", "x0", "y0", "x1", "y1")
WNID_RE = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class GroundTruth:
    """The annotated boxes of one class in one image (an image with several classes has one per class).

    Attributes:
        file: the image's path relative to the images folder, as the annotation names it.
        class_id: the ground-truth class.
        boxes_xyxy: its boxes, pixel edges in the stored image's coordinates.
        size_wh: the image size the annotation states, or None when it states none.
        where: where the annotation came from ("annotations.csv line 7"), for error messages.
    """

    file: str
    class_id: int
    boxes_xyxy: tuple[Box, ...]
    size_wh: tuple[int, int] | None = None
    where: str = ""


def _number(text: str | None, what: str, where: str) -> float:
    # Not cliutil.finite_float: its errors are argparse's, for an option; these name the file and line.
    try:
        value = float((text or "").strip())
    except ValueError:
        raise CamError(f"{where}: {what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise CamError(f"{where}: {what} is not finite: {text!r}")
    return value


def _checked_box(x0: float, y0: float, x1: float, y1: float, where: str) -> Box:
    if x0 < 0 or y0 < 0:
        raise CamError(f"{where}: negative box coordinate ({x0:g}, {y0:g})")
    if x1 <= x0 or y1 <= y0:
        raise CamError(f"{where}: empty box (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g})")
    return (x0, y0, x1, y1)


class _Collector:
    """Groups boxes by (image, class), in the order they first appear.

    An image with objects of several classes (common in PASCAL VOC) is scored once per class: each pair is
    a row, explained for its class against that class's boxes.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[str, int], dict] = {}
        self._sizes: dict[str, tuple[tuple[int, int], str]] = {}  # file -> first stated size, where

    def add(self, file: str, class_id: int, box: Box, size_wh: tuple[int, int] | None, where: str) -> None:
        item = self.items.setdefault((file, class_id), {"boxes": [], "size_wh": size_wh, "where": where})
        if size_wh is not None:  # one size per file, whichever class's row states it first
            first_size, first_where = self._sizes.setdefault(file, (size_wh, where))
            if size_wh != first_size:
                raise CamError(f"{where}: {file} is {size_wh[0]}x{size_wh[1]} here but "
                               f"{first_size[0]}x{first_size[1]} in {first_where}")
        item["boxes"].append(box)

    def result(self) -> list[GroundTruth]:
        return [GroundTruth(file, class_id, tuple(it["boxes"]), it["size_wh"], it["where"])
                for (file, class_id), it in self.items.items()]


def read_boxes_csv(path: Path, num_classes: int | None = None) -> list[GroundTruth]:
    """Read a CSV with a header naming at least file,class_id,x0,y0,x1,y1 (any case, extra columns allowed).

    Coordinates are 0-based pixel indices, x1/y1 included (as in wsolevaluation's metadata). Optional
    ``width`` and ``height`` columns are checked against the images.
    """
    name = path.name
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CamError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise CamError(f"{name} is empty: it needs a header line file,class_id,x0,y0,x1,y1") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CamError(f"{name} line 1: not a CSV file ({exc})") from None
        columns = [c.strip().lower() for c in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise CamError(f"{name}: the header must name {','.join(REQUIRED_COLUMNS)} (missing "
                           f"{', '.join(missing)}; got {','.join(columns)})")
        index = {c: columns.index(c) for c in (*REQUIRED_COLUMNS, "width", "height") if c in columns}
        collector = _Collector()
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                where = f"{name} line {line}"
                if len(row) < len(columns):
                    raise CamError(f"{where}: {len(row)} fields, the header has {len(columns)}")
                file = row[index["file"]].strip()
                if not file:
                    raise CamError(f"{where}: empty file name")
                class_text = row[index["class_id"]].strip()
                class_id = whole_number(class_text)
                if class_id is None:
                    raise CamError(f"{where}: class_id is not a whole number: {class_text!r}")
                if class_id < 0 or (num_classes is not None and class_id >= num_classes):
                    raise CamError(f"{where}: class_id {class_id} is out of range for a model with "
                                   f"{num_classes} classes")
                x0, y0, x1, y1 = (_number(row[index[c]], c, where) for c in ("x0", "y0", "x1", "y1"))
                # Inclusive indices -> pixel edges: the last column/row is inside the box.
                box = _checked_box(x0, y0, x1 + 1, y1 + 1, where)
                size_wh = None
                if "width" in index and "height" in index:
                    w_text, h_text = row[index["width"]].strip(), row[index["height"]].strip()
                    if w_text or h_text:
                        w, h = _number(w_text, "width", where), _number(h_text, "height", where)
                        if w < 1 or h < 1 or w != int(w) or h != int(h):
                            raise CamError(f"{where}: bad image size {w_text}x{h_text}")
                        size_wh = (int(w), int(h))
                collector.add(file, class_id, box, size_wh, where)
        except csv.Error as exc:
            raise CamError(f"{name} line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise CamError(f"{name} near line {line + 1}: not UTF-8 text") from None
    result = collector.result()
    if not result:
        raise CamError(f"{name} has a header but no boxes")
    return result


def load_wnids(path: str | os.PathLike) -> dict[str, int]:
    """WordNet ids in class order, one per line, first word of the line (ImageNet's LOC_synset_mapping.txt)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CamError(f"cannot read --wnids {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CamError(f"--wnids {path} is not a UTF-8 text file") from None
    wnids = [line.split()[0] for line in lines if line.strip()]
    bad = [w for w in wnids if not WNID_RE.match(w)]
    if bad or not wnids:
        raise CamError(f"--wnids {path}: expected one WordNet id (like n01440764) per line, found {bad[:1] or 'none'}")
    return {w: i for i, w in enumerate(wnids)}


def _class_from_name(name: str, labels: Sequence[str], where: str, wnids: dict[str, int] | None = None) -> int:
    # Not CamModel.class_id_for: its unique-prefix match suits a typed --class, but would read VOC's "dog" as
    # ImageNet's "dogsled" and "cat" as "catamaran"; ground truth names a whole label or fails.
    text = name.strip()
    if WNID_RE.match(text):
        if wnids is None:
            raise CamError(f"{where}: object name {text!r} is a WordNet id: pass --wnids FILE (ImageNet's "
                           "LOC_synset_mapping.txt: one id per line, in class order)")
        if text not in wnids:
            raise CamError(f"{where}: WordNet id {text!r} is not in --wnids")
        class_id = wnids[text]
        if class_id >= len(labels):
            raise CamError(f"{where}: class id {class_id} is out of range for a model with {len(labels)} classes")
        return class_id
    class_id = whole_number(text)
    if class_id is not None:
        if not 0 <= class_id < len(labels):
            raise CamError(f"{where}: class id {class_id} is out of range for a model with {len(labels)} classes")
        return class_id
    lowered = text.lower()
    for i, label in enumerate(labels):
        if label.lower() == lowered:
            return i
    raise CamError(f"{where}: object name {text!r} is neither a class id nor one of the model's labels")


def read_boxes_xml(paths: Sequence[Path], labels: Sequence[str],
                   wnids: dict[str, int] | None = None) -> list[GroundTruth]:
    """Read PASCAL VOC / ImageNet XML annotations (1-based pixel indices, xmax/ymax included).

    An object's ``<name>`` is a class id, one of the model's labels (case-insensitive), or a WordNet id
    looked up in ``wnids`` (ImageNet's XML). The image is
    ``<filename>`` (or the XML's own name), relative to the images folder; a name without an extension
    (ImageNet's) is looked up with the usual image extensions.
    """
    collector = _Collector()
    for path in paths:
        where = path.name
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            raise CamError(f"{where}: not valid XML ({exc})") from None
        except OSError as exc:
            raise CamError(f"cannot read {path}: {exc.strerror or exc}") from None
        file = (root.findtext("filename") or "").strip() or path.stem
        size_wh = None
        w_text, h_text = root.findtext("size/width"), root.findtext("size/height")
        if w_text and h_text:
            w, h = _number(w_text, "width", where), _number(h_text, "height", where)
            if w >= 1 and h >= 1:  # VOC files with an unknown size write 0
                size_wh = (int(w), int(h))
        for k, obj in enumerate(root.iter("object"), 1):
            obj_where = f"{where} object {k}"
            name = obj.findtext("name")
            if name is None:
                raise CamError(f"{obj_where}: no <name>")
            class_id = _class_from_name(name, labels, obj_where, wnids)
            bnd = obj.find("bndbox")
            if bnd is None:
                raise CamError(f"{obj_where}: no <bndbox>")
            x0, y0, x1, y1 = (_number(bnd.findtext(tag), tag, obj_where) for tag in ("xmin", "ymin", "xmax", "ymax"))
            # 1-based inclusive -> 0-based edges; some ImageNet files start at 0, hence the clip.
            box = _checked_box(max(0.0, x0 - 1), max(0.0, y0 - 1), x1, y1, obj_where)
            collector.add(file, class_id, box, size_wh, obj_where)
    result = collector.result()
    if not result:
        raise CamError("the XML annotations hold no <object> boxes")
    return result


def load_ground_truth(path: str | os.PathLike, labels: Sequence[str],
                      wnids: dict[str, int] | None = None) -> list[GroundTruth]:
    """Boxes from a CSV file, one XML file, or a folder of XML files."""
    p = Path(path)
    if not p.exists():
        raise CamError(f"boxes file not found: {p}")
    if p.is_dir():
        xmls = sorted(p.glob("*.xml"))
        if not xmls:
            raise CamError(f"{p} is a folder without .xml annotations (give a CSV file or a folder of XML)")
        return read_boxes_xml(xmls, labels, wnids)
    if p.suffix.lower() == ".xml":
        return read_boxes_xml([p], labels, wnids)
    return read_boxes_csv(p, num_classes=len(labels))


def resolve_image(images_dir: Path, gt: GroundTruth) -> Path:
    """The image file an annotation names; one-line error naming the annotation when it is missing."""
    path = images_dir / gt.file
    if path.is_file():
        return path
    if not Path(gt.file).suffix:  # ImageNet's XML names the image without its extension
        for ext in sorted(IMAGE_EXTENSIONS):
            for variant in (ext.upper(), ext):  # a case-sensitive disk holds ImageNet's as .JPEG
                candidate = path.with_name(path.name + variant)
                if candidate.is_file():
                    return candidate
    raise CamError(f"image not found: {path} (named in {gt.where})")
