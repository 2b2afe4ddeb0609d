"""``realtime-cam run --source DIR|'GLOB'|LIST.txt --output OUTDIR``: a whole collection, on Ray or in-process.

Checks everything it can before any work (the output folder, the files, the model and the options), runs the
files that are not complete yet, then combines every file's results into OUTDIR/results.* and
OUTDIR/summary.*. Exit status 2 when a file failed.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CamError, SinkError
from ..progress import Progress
from .discover import Item, discover
from .job import ERROR, SKIPPED, JobOptions, changed_options, completed, output_paths
from .results import FILE_COLUMNS, FRAME_COLUMNS, combine_tables, table_format, write_table

log = logging.getLogger("realtime_cam")

INSTALL_HINT = "pip install 'realtime-cam[ray]'"


class CollectionProgress(Progress):
    """``files 3/12 (25%), 1840 frames, 61.2 FPS``: files done of the collection and frames over all of them."""

    def __init__(self, total: int) -> None:
        super().__init__(total, label="files")
        self.frames = 0
        self.files = 0
        self._start = time.perf_counter()

    def _text(self, done: int, fps: float) -> str:
        pct = min(100, int(100 * done / self.total)) if self.total else 100
        return f"files {done}/{self.total} ({pct}%), {self.frames} frames, {fps:.1f} FPS"

    def _fps(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.frames / elapsed if elapsed > 0 else 0.0

    def add_frames(self, n: int) -> None:
        self.frames += n
        self.update(self.files, self._fps())

    def file_done(self, frames_counted: bool, summary: dict) -> None:
        self.files += 1
        if not frames_counted and summary.get("status") != SKIPPED:
            self.frames += summary.get("frames") or 0
        if self.files < (self.total or 0):  # finish() prints the last line
            self.update(self.files, self._fps())

    def finish(self) -> None:
        self.close(self.files, self._fps())


@dataclass
class CollectionReport:
    """What a collection run did: one summary per input file, in the collection's order."""

    summaries: list[dict] = field(default_factory=list)
    results_path: Path | None = None
    summary_path: Path | None = None
    rows: int = 0
    runner: str = "in-process"
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.summaries if s.get("status") == ERROR]


def check_output_dir(output: Path | None) -> Path:
    """The output folder, made if missing; a one-line error for a file path or one that cannot be made."""
    from ..sinks import FILE_SINKS

    if output is None:
        raise SinkError("a collection needs --output FOLDER: every overlay and the results are written there")
    if output.exists() and not output.is_dir():
        raise SinkError(f"--output must be a folder for a collection, and {output} is a file")
    if not output.exists() and output.suffix.lower() in FILE_SINKS:
        raise SinkError(f"--output must be a folder for a collection; {output} names a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"cannot make --output {output}: {exc.strerror or exc}") from None
    if not os.access(output, os.W_OK):
        raise SinkError(f"output folder is not writable: {output}")
    return output


def job_options(args: argparse.Namespace, model, model_path: Path, output: Path, fmt: str) -> JobOptions:
    """``run``'s options, checked against the model (a method it cannot give, a class it does not have)."""
    from ..cli import run_method

    method = run_method(model, args.method)
    class_id = model.class_id_for(args.class_name) if args.class_name is not None else None
    return JobOptions(
        model=str(model_path), output_dir=str(output), table_format=fmt, device=args.device, method=method,
        class_id=class_id, topk=args.topk, box=args.box, box_threshold=args.box_threshold, smooth=args.smooth,
        hysteresis=args.hysteresis, scale=args.scale, colormap=args.colormap, alpha=args.alpha, batch=args.batch,
        max_frames=args.max_frames, overwrite=getattr(args, "overwrite", False),
        codec=getattr(args, "codec", None), crf=getattr(args, "crf", None),
    )


def use_ray(args: argparse.Namespace) -> bool:
    """Ray unless --no-ray or it is not installed (then say how to get it; --ray-address needs it)."""
    from .on_ray import ray_available

    if getattr(args, "no_ray", False):
        if getattr(args, "ray_address", None):
            raise CamError("--ray-address and --no-ray contradict each other: choose one")
        return False
    if ray_available():
        if getattr(args, "ray_address", None):
            from .on_ray import check_reachable

            check_reachable(args.ray_address)  # before the model is loaded
        return True
    if getattr(args, "ray_address", None):
        raise CamError(f"--ray-address needs Ray, which is not installed: {INSTALL_HINT}")
    log.info("Ray is not installed: the files run one after another in this process (%s to run them on "
             "Ray, here or on a cluster)", INSTALL_HINT)
    return False


def remove_partials(options: JobOptions, items: Sequence[Item]) -> int:
    """Temporary files of this collection's outputs left by a worker that died mid-file (Ray ran the file
    again): removed, so that nothing partial remains. Run with no other run writing into the same folder."""
    removed = 0
    for item in items:
        for path in output_paths(options, item):
            pattern = os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.stem)}.*.partial{path.suffix}")
            for stale in glob.glob(pattern):
                try:
                    os.unlink(stale)
                    removed += 1
                except OSError:
                    pass
    return removed


def execute(items: Sequence[Item], options: JobOptions, ray: bool, model=None, workers: int | None = None,
            gpus_per_worker: float = 0.0, ray_address: str | None = None,
            progress: CollectionProgress | None = None) -> CollectionReport:
    """Run the files that are not complete yet (all of them with ``options.overwrite``), in-process or on Ray,
    then write the combined tables. Summaries come back in the collection's order."""
    start = time.perf_counter()
    by_rel: dict[str, dict] = {}
    todo: list[Item] = []
    redone: dict[str, None] = {}  # the options that differed for files done before, done again
    redone_files = 0
    for item in items:
        stored = None if options.overwrite else completed(options, item)
        if stored is not None:
            by_rel[item.rel] = {**stored, "status": SKIPPED}
            if progress is not None:
                progress.file_done(True, by_rel[item.rel])
        else:
            todo.append(item)
            changed = [] if options.overwrite else changed_options(options, item)
            redone.update(dict.fromkeys(changed))
            redone_files += bool(changed)
    if len(todo) < len(items):
        log.info("%d of %d files are already complete in %s: skipped (--overwrite redoes them)",
                 len(items) - len(todo), len(items), options.output_dir)
    if redone_files:
        log.info("%d file(s) in %s were made before with other options (%s): done again with these",
                 redone_files, options.output_dir, ", ".join(redone))

    def done(summary: dict, frames_counted: bool = False) -> None:
        by_rel[summary["file"]] = summary
        if progress is not None:
            progress.file_done(frames_counted, summary)
        if summary.get("status") == ERROR:
            log.warning("%s: %s", summary["file"], summary.get("reason"))

    runner = "in-process"
    try:
        if todo and ray:
            from .on_ray import ray_session, run_on_ray, warn_if_not_shared

            warn_if_not_shared(ray_address, Path(options.output_dir))
            with ray_session(ray_address):
                plan = run_on_ray(todo, options, done, workers=workers, gpus_per_worker=gpus_per_worker)
            runner = (f"Ray, {plan['actors']} worker(s) of {plan['cpus_per_actor']:g} CPU"
                      + (f" and {plan['gpus_per_actor']:g} GPU" if plan["gpus_per_actor"] else ""))
        elif todo:
            from .local import run_local

            run_local(todo, options, lambda s: done(s, frames_counted=True),
                      on_frames=progress.add_frames if progress is not None else None, model=model)
    finally:  # also after Ctrl-C: the workers Ray stopped mid-file leave their temporary files
        remove_partials(options, items)
    if progress is not None:
        progress.finish()
    report = CollectionReport(summaries=[by_rel[item.rel] for item in items], runner=runner)
    out = Path(options.output_dir)
    fmt = options.table_format
    complete = [item for item, s in zip(items, report.summaries) if s.get("status") != ERROR]
    report.results_path = out / f"results.{fmt}"
    report.rows = combine_tables([output_paths(options, item)[1] for item in complete], report.results_path,
                                 FRAME_COLUMNS, fmt)
    report.summary_path = write_table(report.summaries, out / f"summary.{fmt}", FILE_COLUMNS, fmt)
    report.seconds = time.perf_counter() - start
    return report


def run_collection(args: argparse.Namespace) -> int:
    """``run`` on a collection; returns the exit status (2 when any file failed)."""
    from ..cli import EXIT_ERROR, EXIT_OK, run_model_path
    from ..model import CamModel

    source = Path(str(args.source))
    if source.is_dir() and args.output is not None and args.output.is_dir() and os.path.samefile(source, args.output):
        raise SinkError(f"--output {args.output} is the collection's own folder: its overlays would replace the "
                        "images; choose another folder (one inside it is fine)")
    output = check_output_dir(args.output)
    items = discover(str(args.source), exclude=output)
    videos = sum(item.kind == "video" for item in items)
    log.info("%s: %d file(s) (%d video(s), %d image(s)) -> %s", args.source, len(items), videos,
             len(items) - videos, output)
    if not args.no_display:
        log.info("a collection runs headless (no window): its overlays go to %s", output)
    model_path = run_model_path(args.model)
    ray = use_ray(args)
    # Loaded here to check the options before any work; the in-process runner then uses it.
    model = CamModel(model_path, device=args.device)
    options = job_options(args, model, Path(model_path), output, table_format())
    if ray:
        model = None  # each Ray worker loads its own
    report = execute(items, options, ray, model=model, workers=getattr(args, "workers", None),
                     gpus_per_worker=getattr(args, "gpus_per_worker", 0.0) or 0.0,
                     ray_address=getattr(args, "ray_address", None), progress=CollectionProgress(len(items)))
    ok = sum(s.get("status") == "ok" for s in report.summaries)
    skipped = sum(s.get("status") == SKIPPED for s in report.summaries)
    frames = sum(s.get("frames") or 0 for s in report.summaries if s.get("status") == "ok")
    log.info("%d file(s) explained (%d frames), %d skipped as complete, %d failed; %s, %.1f s",
             ok, frames, skipped, len(report.failed), report.runner, report.seconds)
    log.info("wrote %s (%d frame rows) and %s", report.results_path, report.rows, report.summary_path)
    if report.failed:
        for s in report.failed:
            log.info("failed: %s: %s", s["file"], s.get("reason"))
        log.error("%d of %d file(s) failed (listed in %s)", len(report.failed), len(items), report.summary_path)
        return EXIT_ERROR
    return EXIT_OK
