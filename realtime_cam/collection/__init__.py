"""Whole collections of videos and images (a folder, a glob, a list file), in-process or on Ray.

Light to import: Ray, the model and the loop are imported by the functions that need them.
"""

from .discover import Item, discover, is_collection


def run_collection(args):
    """``run`` on a collection (see ``command.run_collection``)."""
    from .command import run_collection as run

    return run(args)


__all__ = ["Item", "discover", "is_collection", "run_collection"]
