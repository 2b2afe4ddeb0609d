"""Whole collections of videos and images (a folder, a glob, a list file), in-process or on Ray.

Light to import: Ray, the model and the loop are imported by the functions that need them.
"""

import argparse

from ..cliutil import non_negative_float, positive_int
from .discover import Item, discover, is_collection


def run_collection(args):
    """``run`` on a collection (see ``command.run_collection``)."""
    from .command import run_collection as run

    return run(args)


def add_collection_options(run: argparse.ArgumentParser) -> None:
    """``run``'s options for a collection (--source a folder, a 'GLOB' or a LIST.txt; --output a folder)."""
    group = run.add_argument_group(
        "collections", "--source DIR, 'GLOB' or LIST.txt (files, folders or globs, one a line) explains every video "
                       "and image in it into --output FOLDER, mirroring their relative paths (videos as .mp4), with "
                       "per-frame results in FOLDER/results.parquet (.csv without pyarrow) and a per-file summary; "
                       "on Ray when the ray extra is installed, else one file after another")
    group.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="Ray workers, each holding one model (default: one per CPU the cluster offers)")
    group.add_argument("--gpus-per-worker", type=non_negative_float, default=0.0, metavar="F",
                       help="GPUs each Ray worker reserves (e.g. 0.5: two workers share a GPU; with --device cuda)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (`ray start --head` prints it) instead of starting a local Ray; "
                            "--output must then be storage every node sees")
    group.add_argument("--no-ray", action="store_true", help="run the files one after another in this process")
    group.add_argument("--overwrite", action="store_true",
                       help="redo files whose outputs are complete (by default a run resumes: they are skipped)")


__all__ = ["Item", "add_collection_options", "discover", "is_collection", "run_collection"]
