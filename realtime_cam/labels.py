"""Classes by name or id: what a user types (``--class``, a CSV's class column) to a class id."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import CamError


def whole_number(text: str) -> int | None:
    """The integer a user typed ("7", "-3"), or None for anything else ("--5", "²", "7.0", "seven").

    str.isdigit accepts characters int() refuses (superscripts), so the check is on ASCII digits."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else None


def check_class_id(class_id: int, num_classes: int) -> None:
    if not 0 <= class_id < num_classes:
        raise CamError(f"class id {class_id} is out of range 0..{num_classes - 1}")


def class_id_for(labels: Sequence[str], name_or_id: str | int) -> int:
    """A class id from an id or a label (exact, then case-insensitive, then a unique prefix)."""
    text = str(name_or_id).strip()
    number = whole_number(text)
    if number is not None:
        check_class_id(number, len(labels))
        return number
    lowered = [label.lower() for label in labels]
    for candidates in (
        [i for i, label in enumerate(labels) if label == text],
        [i for i, label in enumerate(lowered) if label == text.lower()],
        [i for i, label in enumerate(lowered) if label.startswith(text.lower())],
    ):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(labels[i] for i in candidates[:5])
            raise CamError(f"class {text!r} is ambiguous: {names}, ...")
    raise CamError(f"no class named {text!r} in this model's {len(labels)} labels")
