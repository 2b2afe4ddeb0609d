"""What a collection gains from a second worker on this machine without Ray: the in-process runner in one plain
process over every file, then in P plain processes side by side, each over its share (one inference thread
each, as a Ray worker of one CPU). Wall time, and CPU time from each process's own count.

Usage: python scripts/collection_processes.py MODEL.onnx FOLDER [P]    (P: default 2)
(docs/collections.md quotes it: int8 MobileNetV2 on 96 short clips, 2 cores.)
"""
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, tempfile, time
from realtime_cam.collection.discover import discover
from realtime_cam.collection.job import JobOptions
from realtime_cam.collection.local import run_local
from realtime_cam.collection.results import table_format
model, folder, part, parts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
items = discover(folder)[part::parts]
with tempfile.TemporaryDirectory() as out:
    options = JobOptions(model=model, output_dir=out, table_format=table_format(), device="cpu", method="cam",
                         overwrite=True, threads=1)
    start, cpu = time.perf_counter(), time.process_time()
    run_local(items, options, lambda summary: None)
    print(json.dumps({"files": len(items), "seconds": time.perf_counter() - start,
                      "cpu_s": time.process_time() - cpu}))
"""


def run(model: str, folder: str, parts: int) -> dict:
    start = time.perf_counter()
    children = [subprocess.Popen([sys.executable, "-c", CHILD, model, folder, str(p), str(parts)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for p in range(parts)]
    each = [json.loads(child.communicate()[0]) for child in children]
    return {"processes": parts, "seconds": time.perf_counter() - start, "each": each,
            "cpu_s": sum(e["cpu_s"] for e in each)}


def main() -> None:
    model, folder = sys.argv[1], sys.argv[2]
    parts = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count(),
              "model": model, "folder": folder}
    report["one"] = run(model, folder, 1)
    report["side_by_side"] = run(model, folder, parts)
    report["speedup"] = report["one"]["seconds"] / report["side_by_side"]["seconds"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
