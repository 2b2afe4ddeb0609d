"""The Ray runner: a collection on Ray Data, one row (one task) per input file, an actor pool in which each
actor holds one model. Only paths and summaries cross: each worker writes its file's overlay and results into
the output folder itself.

By default the command starts an embedded Ray on this machine (loopback only, no dashboard) and stops it at the
end; ``--ray-address`` joins a running cluster instead, whose nodes must all see the output folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import CamError
from .discover import Item
from .job import FileWorker, JobOptions, _node, error_summary, one_line

log = logging.getLogger("realtime_cam")

# Set before Ray starts: the node's address is 127.0.0.1 (nothing listens beyond loopback), no token auth.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def ray_available() -> bool:
    """Whether the ray extra (ray[data]) imports."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[object]:
    """Ray for the block: joined at ``address``, else started here on loopback and shut down after (every
    process it started ends with it). A Ray already initialised by the caller (a test, a notebook) is used
    as it is and left running."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # Ray's C++ side logs, on stderr, notes a user cannot act on (Ray Data's actors keep their constructor in
    # the object store); its failures reach us as Python exceptions. RAY_BACKEND_LOG_LEVEL set by the user wins.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray

    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        check_reachable(address)
    try:
        with _native_stderr_off():
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CamError(f"cannot start or join {where}: {text}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _native_stderr_off() -> Iterator[None]:
    """The process's stderr (file descriptor 2) to /dev/null for the block: Ray's C++ side prints, as it starts,
    that it took its log level from RAY_BACKEND_LOG_LEVEL, on every run. A failure to start still reaches us
    as a Python exception, said in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.close(null)
        os.dup2(saved, 2)
        os.close(saved)


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A one-line error when nothing answers at HOST:PORT (Ray itself would retry for minutes)."""
    import re
    import socket

    match = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", address.strip())
    if match is None:  # "auto", "ray://...": left to Ray
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout_s).close()
    except OSError as exc:
        raise CamError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start a Ray "
                       "head with `ray start --head` (see docs/collections.md)") from None


def warn_if_not_shared(address: str | None, output_dir: Path) -> None:
    """Joining a cluster: every node writes into the output folder, so it must be storage they all see."""
    if not address or address.split(":")[0] in LOCAL_ADDRESSES:
        return
    fs = _filesystem_type(output_dir)
    if fs is None or fs in ("nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "ceph", "lustre", "gpfs", "glusterfs",
                            "beegfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "9p", "virtiofs"):
        return
    log.warning("--output %s is on a local %s file system as far as can be told: on a cluster, every node writes "
                "its files there, so it must be shared storage (NFS, a cluster file system) mounted at the same "
                "path on every node", output_dir, fs)


def _filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path``, from /proc/mounts (None where that cannot be told)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    real, best, kind = str(path.resolve()), "", None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (real == fields[1] or real.startswith(fields[1].rstrip("/") + "/")) \
                and len(fields[1]) >= len(best):
            best, kind = fields[1], fields[2]
    return kind


def worker_error(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong in the worker (its last ``SomeError: message``)."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b.*?: ", line):
            return line
    return lines[0] if lines else type(exc).__name__


class _RayFileWorker:
    """A Ray Data actor: one model; each call explains the one file of its batch."""

    options: dict = {}  # set on the subclass run_on_ray makes

    def __init__(self) -> None:
        # A model this node cannot load (missing here, no CUDA) fails each of its files with the reason: an
        # actor that failed to start would be restarted by Ray again and again.
        self._worker: FileWorker | None = None
        self._error: str | None = None
        try:
            self._worker = FileWorker(JobOptions(**self.options))
        except CamError as exc:
            self._error = f"worker on {_node()}: {one_line(exc)}"

    def __call__(self, batch: dict) -> dict:
        summaries = []
        for i in range(len(batch["path"])):
            item = Item(str(batch["path"][i]), str(batch["rel"][i]), str(batch["kind"][i]),
                        str(batch["output_rel"][i]))
            summary = self._worker(item) if self._worker is not None else error_summary(item, self._error or "")
            summaries.append(json.dumps(summary))
        return {"summary": summaries}


def worker_plan(total_cpus: float, workers: int | None, files: int, node_cpus: float | None = None,
                cpus_each: float | None = None) -> tuple[int, float, int]:
    """(actors, CPUs each, ONNX Runtime threads each): ``workers`` actors (default one per CPU), never more
    than there are files, sharing the CPUs (a fraction each when there are more workers than CPUs; exactly
    ``cpus_each`` when given), and never more CPUs each than one node has (``node_cpus``)."""
    total = max(total_cpus, 1.0)
    wanted = workers if workers is not None else max(1, int(total))
    n = max(1, min(wanted, files))
    cpus = cpus_each if cpus_each is not None else total / wanted
    if node_cpus:
        cpus = min(cpus, node_cpus)
    return n, cpus, max(1, int(cpus))


# Files per actor from which the next file is queued at each actor while it works on one (Ray Data's
# max_tasks_in_flight_per_actor=2): handing an actor its next file after it reports the last took 15-35 ms
# of the driver here, and under load much more (2 actors on 2 cores idled a third of the time on 30-frame
# clips). With fewer files, each goes to the first actor that is free, so that a long video never waits
# behind another while an actor idles.
QUEUE_FROM_FILES_PER_ACTOR = 4


def tasks_in_flight(files: int, actors: int) -> int:
    """Ray Data's max_tasks_in_flight_per_actor for a collection (see QUEUE_FROM_FILES_PER_ACTOR)."""
    return 2 if files >= QUEUE_FROM_FILES_PER_ACTOR * actors else 1


def largest_first(items: Sequence[Item]) -> list[Item]:
    """The items by size, largest first: the long videos start first and short files fill in at the end, so
    that no actor is left with a long one when the others are done. (Results keep the collection's order.)"""
    def size(item: Item) -> int:
        try:
            return os.path.getsize(item.path)
        except OSError:
            return 0
    return sorted(items, key=size, reverse=True)


def _largest_node_cpus(ray, gpus: bool) -> float | None:
    """The most CPUs one alive node offers (among nodes with a GPU when ``gpus``)."""
    sizes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes()
             if n.get("Alive") and (not gpus or n["Resources"].get("GPU", 0.0) > 0)]
    return max(sizes) if sizes else None


def run_on_ray(items: Sequence[Item], options: JobOptions, on_done: Callable[[dict], None],
               workers: int | None = None, gpus_per_worker: float = 0.0, cpus_per_worker: float | None = None
               ) -> dict:
    """Explain the items on the Ray that is initialised; ``on_done`` gets each summary as its file ends.
    ``cpus_per_worker`` overrides the even share of the CPUs (``bench`` measures one worker of one CPU).
    Returns the plan used (actors, CPUs and GPUs each, tasks in flight per actor)."""
    import ray
    import ray.data

    # Its execution notes and its own report of a worker's failure: our progress line and error say them.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts files and frames for the whole collection
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    actors, cpus, threads = worker_plan(total_cpus, workers, len(items), _largest_node_cpus(ray, gpus_per_worker > 0),
                                        cpus_each=cpus_per_worker)
    in_flight = tasks_in_flight(len(items), actors)
    options = replace(options, threads=threads)
    ds = ray.data.from_items([asdict(item) for item in largest_first(items)], override_num_blocks=len(items))
    # The options travel in the class itself (pickled by value): no constructor arguments in the object store,
    # which a restarted actor (a worker that died) would need again.
    worker = type("CollectionWorker", (_RayFileWorker,), {"options": asdict(options)})
    ds = ds.map_batches(
        worker, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight),
        num_cpus=cpus, num_gpus=gpus_per_worker or None,
    )
    try:
        for row in ds.iter_rows():
            on_done(json.loads(row["summary"]))
    except (CamError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a worker that cannot start (the model missing on a node) or a bug in one
        raise CamError(f"a Ray worker failed: {worker_error(exc)}") from None
    return {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus_per_worker, "threads": threads,
            "tasks_in_flight": in_flight}
