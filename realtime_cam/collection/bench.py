"""``bench --collection DIR``: files and frames per second over a whole collection, in one run, for the
in-process sequential runner, Ray with 1 worker (holding every CPU, then one CPU: the size of each of the N)
and Ray with N workers; and what Ray costs per file.

Each configuration explains every file of the collection into a fresh temporary folder (overlays and results
written, as ``run`` writes them). Ray is started once, and Ray Data run once on one file before the timed
runs (its first run starts actors of its own); both are reported on their own. What Ray adds to
the same work (one model, in-process vs Ray with 1 worker) is split in two by also running the first file
alone each way: a fixed part per run (the worker's process and model, the dataset) and a part per file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CamError
from .discover import discover
from .job import ERROR, JobOptions
from .results import table_format

Log = Callable[[str], None]


def _measure(name: str, run: Callable[[Callable[[dict], None]], object], files: int) -> dict:
    summaries: list[dict] = []
    start = time.perf_counter()
    extra = run(summaries.append)
    seconds = time.perf_counter() - start
    failed = [s for s in summaries if s.get("status") == ERROR]
    if failed:
        raise CamError(f"bench --collection: {failed[0]['file']} failed: {failed[0].get('reason')}")
    frames = sum(s.get("frames") or 0 for s in summaries)
    row = {"runner": name, "files": files, "frames": frames, "seconds": round(seconds, 3),
           "files_per_s": round(files / seconds, 3), "frames_per_s": round(frames / seconds, 2)}
    if isinstance(extra, dict):
        row.update(extra)
    return row


def run_collection_bench(model: Path, folder: str, workers: int | None = None, device: str = "cpu",
                         batch: int | None = None, log: Log = print) -> dict:
    """The report: one row per runner, Ray's start-up, the per-file overhead and the N-worker speed-up."""
    from ..bench import environment
    from ..model import CamModel
    from ..pipeline import DEFAULT_BATCH
    from .local import run_local
    from .on_ray import ray_available, ray_session, run_on_ray

    items = discover(folder)
    n = workers or os.cpu_count() or 1
    report: dict = {"config": {"collection": folder, "model": str(model), "device": device, "files": len(items),
                               "workers": n, "batch": batch or DEFAULT_BATCH},
                    "environment": environment(), "results": []}
    with tempfile.TemporaryDirectory(prefix="realtime-cam-bench-collection-") as tmp:
        def options(name: str) -> JobOptions:
            return JobOptions(model=str(model), output_dir=str(Path(tmp) / name), table_format=table_format(),
                              device=device, method=CamModel(model, device).methods[0],
                              batch=batch or DEFAULT_BATCH, overwrite=True)

        log(f"in-process: {len(items)} files")
        local_options = options("local")
        report["results"].append(_measure("in-process", lambda done: run_local(items, local_options, done),
                                          len(items)))
        one_local = _measure("in-process-1-file", lambda done: run_local(items[:1], local_options, done), 1)
        if not ray_available():
            report["skipped"] = "ray: not installed (pip install 'realtime-cam[ray]')"
            return report
        t0 = time.perf_counter()
        with ray_session(num_cpus=n) as ray:
            ray.get(ray.remote(lambda: None).remote())  # a worker process is up: Ray has started
            report["ray_startup_s"] = round(time.perf_counter() - t0, 3)
            # Ray Data's first run in a session also starts its own actors (statistics, autoscaling, actor
            # locations: seconds of CPU here): one file first, untimed in the rows, so that whichever runner
            # came first does not pay for it alone. A command pays it once per run: reported on its own.
            first = _measure("ray-first-run-1-file", lambda done: run_on_ray(items[:1], options("ray-first"), done,
                                                                              workers=1), 1)
            report["ray_data_first_run_s"] = first["seconds"]
            # 1 worker holding every CPU (what --workers 1 gives), 1 worker of one CPU (the size of each of the
            # N workers: the base of the scaling), N workers
            runs = [("ray-1", 1, None)] + ([("ray-1-of-1-cpu", 1, 1.0), (f"ray-{n}", n, None)] if n > 1 else [])
            for name, count, cpus in runs:
                log(f"Ray, {count} worker(s)" + (f" of {cpus:g} CPU" if cpus else ""))
                opts = options(name)
                report["results"].append(_measure(
                    name, lambda done, o=opts, c=count, k=cpus: run_on_ray(items, o, done, workers=c,
                                                                           cpus_per_worker=k), len(items)))
            one_ray = _measure("ray-1-1-file", lambda done: run_on_ray(items[:1], options("ray-one"), done, workers=1),
                               1)
        report["first_file_alone"] = [one_local, one_ray]
    by = {r["runner"]: r for r in report["results"]}
    if "ray-1" in by and len(items) > 1:
        extra_all = by["ray-1"]["seconds"] - by["in-process"]["seconds"]
        extra_one = report["first_file_alone"][1]["seconds"] - report["first_file_alone"][0]["seconds"]
        report["ray_overhead_fixed_s"] = round(extra_one, 3)
        report["ray_overhead_per_file_s"] = round((extra_all - extra_one) / (len(items) - 1), 3)
    if f"ray-{n}" in by and n > 1:
        report["speedup_n_over_1"] = round(by["ray-1"]["seconds"] / by[f"ray-{n}"]["seconds"], 3)
        report["speedup_n_over_1_cpu"] = round(by["ray-1-of-1-cpu"]["seconds"] / by[f"ray-{n}"]["seconds"], 3)
    return report


def format_collection_table(report: dict) -> str:
    c = report["config"]
    lines = [f"{c['files']} files from {c['collection']}, model {Path(c['model']).name} on {c['device']}",
             f"{'runner':<14} {'seconds':>8} {'files/s':>8} {'frames/s':>9}"]
    for r in report["results"]:
        lines.append(f"{r['runner']:<14} {r['seconds']:>8.2f} {r['files_per_s']:>8.2f} {r['frames_per_s']:>9.1f}")
    if "ray_startup_s" in report:
        lines.append(f"Ray start-up {report['ray_startup_s']:.2f} s, and Ray Data's first run (one file: a worker, "
                     f"its model and Ray Data's own actors starting) {report['ray_data_first_run_s']:.2f} s (neither "
                     "in the rows above)")
    if "ray_overhead_per_file_s" in report:
        lines.append(f"Ray with 1 worker vs in-process: {report['ray_overhead_fixed_s']:+.2f} s per run (worker "
                     f"process, model, dataset) and {report['ray_overhead_per_file_s'] * 1000:+.0f} ms per file")
    if "speedup_n_over_1" in report:
        lines.append(f"{c['workers']} workers vs 1 worker of 1 CPU: {report['speedup_n_over_1_cpu']:.2f}x; vs 1 "
                     f"worker holding every CPU: {report['speedup_n_over_1']:.2f}x")
    if report.get("skipped"):
        lines.append(f"skipped: {report['skipped']}")
    return "\n".join(lines)


def cmd_bench_collection(args: argparse.Namespace, log: Log) -> int:
    """``bench --collection DIR`` (a branch of ``cmd_bench``)."""
    from ..paths import default_model_path
    from ..sinks import check_output_path, write_json

    if args.json is not None:
        check_output_path(args.json, {".json"})
    model = args.model[0] if args.model else default_model_path()
    if not Path(model).exists():
        raise CamError(f"model file not found: {model} (make one with `realtime-cam export`)")
    device = args.device[0] if args.device else "cpu"
    report = run_collection_bench(Path(model), str(args.collection), workers=args.workers, device=device,
                                  batch=args.batch, log=log)
    print(format_collection_table(report))
    if args.json is not None:
        write_json(report, args.json)
        log(f"wrote {args.json}")
    return 0
