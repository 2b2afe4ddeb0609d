"""The in-process runner: a collection's files one after another, with one model (no Ray needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .discover import Item
from .job import FileWorker, JobOptions


def run_local(items: Sequence[Item], options: JobOptions, on_done: Callable[[dict], None],
              on_frames: Callable[[int], None] | None = None, model=None) -> None:
    """Explain each item in order; ``on_done`` gets each file's summary as it ends, ``on_frames`` each frame.

    ``model``: a CamModel already loaded with these options (the command loads one to check them).
    """
    worker = FileWorker(options, model=model)
    for item in items:
        on_done(worker(item, on_frames=on_frames))
