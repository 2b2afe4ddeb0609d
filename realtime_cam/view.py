"""What the live view shows, and how keys change it: a frozen state and pure transitions.

The loop owns one :class:`ViewState`; a key press gives a new state (``dataclasses.replace``) and maybe an
action for the loop to carry out (quit, snapshot, record). Headless runs start from the same state built
from the command line, so every live option also works on video files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

from .cams import METHODS

KEY_TAB = 9
KEY_ESC = 27
KEY_SPACE = 32

# key -> (what it does, for the on-screen help). The loop's handling is in handle_key below.
KEY_HELP: dict[str, str] = {
    "q / Esc": "quit",
    "space": "pause / resume",
    "n / p": "explain the next / previous of the top-k",
    "c": "pin / unpin the explained class",
    "m": "next map method",
    "b": "boxes on / off",
    "+ / -": "more / less heatmap",
    "s": "snapshot (PNG + map .npy + JSON)",
    "r": "start / stop recording",
    "h": "this help",
}

# The mosaic of several streams (``run`` with several sources) adds these; every key of KEY_HELP but q/Esc acts on
# the selected stream (see mosaic_key below).
MOSAIC_KEY_HELP: dict[str, str] = {
    "1-9": "select that stream (magenta border)",
    "Tab": "select the next stream",
    **KEY_HELP,
}

QUIT, SNAPSHOT, RECORD = "quit", "snapshot", "record"


@dataclass(frozen=True)
class ViewState:
    """The live view's settings.

    Attributes:
        method: map method (a key of METHODS).
        pinned_class: the class explained on every frame, or None to follow the ranking.
        rank: which of the top-k is explained when no class is pinned (0: the top-1).
        topk: how many classes are listed (and n/p step through).
        show_box: draw the paper's localization box.
        alpha: heatmap weight in the blend.
        paused: hold the current frame.
        show_help: list the keys on screen.
    """

    method: str = "cam"
    pinned_class: int | None = None
    rank: int = 0
    topk: int = 3
    show_box: bool = False
    alpha: float = 0.5
    paused: bool = False
    show_help: bool = False


def keys_help_text() -> str:
    """The window's keys for ``run --help``: the single view's, then those the mosaic of several streams adds."""
    lines = ["Window keys:", *(f"  {k:8} {v}" for k, v in KEY_HELP.items()), "",
             "With several sources the window is a mosaic, and the keys above act on the selected stream:"]
    return "\n".join(lines + [f"  {k:8} {v}" for k, v in MOSAIC_KEY_HELP.items() if k not in KEY_HELP])


def handle_key(state: ViewState, key: int, current_class: int | None,
               methods: Sequence[str] = tuple(METHODS)) -> tuple[ViewState, str | None]:
    """The state after ``key`` and the action the loop must carry out (or None).

    Args:
        current_class: the class explained on the frame on screen (what ``c`` pins).
        methods: the methods the model can give, in METHODS order (``m`` steps through these only).
    """
    if key < 0:
        return state, None
    ch = chr(key).lower() if key < 256 else ""
    if key == KEY_ESC or ch == "q":
        return state, QUIT
    if key == KEY_SPACE:
        return replace(state, paused=not state.paused), None
    if ch in ("n", "p"):
        step = 1 if ch == "n" else -1
        return replace(state, rank=(state.rank + step) % max(1, state.topk), pinned_class=None), None
    if ch == "c":
        if state.pinned_class is not None:
            return replace(state, pinned_class=None), None
        return replace(state, pinned_class=current_class), None
    if ch == "m":
        names = list(methods)
        at = names.index(state.method) if state.method in names else -1
        return replace(state, method=names[(at + 1) % len(names)]), None
    if ch == "b":
        return replace(state, show_box=not state.show_box), None
    if ch in ("+", "="):
        return replace(state, alpha=min(1.0, round(state.alpha + 0.1, 2))), None
    if ch in ("-", "_"):
        return replace(state, alpha=max(0.0, round(state.alpha - 0.1, 2))), None
    if ch == "h":
        return replace(state, show_help=not state.show_help), None
    if ch == "s":
        return state, SNAPSHOT
    if ch == "r":
        return state, RECORD
    return state, None


def view_changes(old: ViewState, new: ViewState) -> dict[str, object]:
    """The fields ``new`` changes from ``old`` (what ``Stream.set_view`` takes)."""
    return {f.name: getattr(new, f.name) for f in fields(ViewState) if getattr(new, f.name) != getattr(old, f.name)}


def select_key(selected: int, key: int, count: int) -> int | None:
    """The stream a mosaic key selects among ``count``: 1-9 that stream (when there is one), Tab the one after
    ``selected`` (round); None for any other key."""
    if key == KEY_TAB:
        return (selected + 1) % max(1, count)
    if ord("1") <= key <= ord("9"):
        index = key - ord("1")
        return index if index < count else selected
    return None


def mosaic_key(views: Sequence[ViewState], selected: int, key: int, current_class: int | None,
               methods: Sequence[str] = tuple(METHODS)) -> tuple[int, Mapping[str, object], str | None]:
    """A key in the mosaic: (the stream selected after it, the changes to that stream's view, the action for
    it). Selection keys (see :func:`select_key`) change no view; every other key is :func:`handle_key` on
    the selected stream's view, exactly as in the single-stream window.

    Args:
        views: every stream's view, in tile order.
        current_class: the class explained on the selected stream's tile (what ``c`` pins).
    """
    chosen = select_key(selected, key, len(views))
    if chosen is not None:
        return chosen, {}, None
    view = views[selected]
    new, action = handle_key(view, key, current_class, methods)
    return selected, view_changes(view, new), action
