"""Helpers for the worker threads around the inference loop."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import cv2

# Niceness for decode/render/encode threads. Inference runs ONNX Runtime's own thread pool, whose parallel
# regions wait for their slowest thread: a helper thread that preempts one of them stalls the whole
# operator. At a lower priority the helpers fill the gaps between operators instead (Linux applies nice
# per thread).
WORKER_NICENESS = 19


def lower_this_threads_priority(niceness: int = WORKER_NICENESS) -> None:
    """Make the calling thread yield the CPU to inference; a no-op where the OS cannot do it per thread."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, niceness))
    except OSError:
        pass


# On up to this many cores inference keeps every core busy, so helper work is best done by one thread each,
# without OpenCV's or FFmpeg's own thread pools (their threads start at normal priority and take cores from
# inference for nothing). Measured on 2 cores: drawing an overlay costs 0.45 ms of CPU without OpenCV's pool,
# 0.78 ms with it; decoding a 640x360 H.264 frame 0.24 ms on one FFmpeg thread, 0.66 ms on two.
FEW_CORES = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def few_cores() -> bool:
    """True when inference and the helper threads compete for the same few cores (see FEW_CORES)."""
    return usable_cores() <= FEW_CORES


class ProcessWideOverride:
    """A process-wide setting held at another value while any holder needs it.

    Holders may nest and overlap across threads: the first to enter saves the setting and overrides it, the
    last to leave puts it back as it was.
    """

    def __init__(self, get: Callable[[], object], set_: Callable[[object], object], value: object) -> None:
        self._get, self._set, self._value = get, set_, value
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: object = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._saved = self._get()
                self._set(self._value)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._set(self._saved)


_OPENCV_ONE_THREAD = ProcessWideOverride(cv2.getNumThreads, cv2.setNumThreads, 1)


@contextlib.contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV's own thread pool off while a pipelined run needs the cores, on machines with few cores.

    OpenCV's setting is process-wide: the pool comes back, as it was, when the last run that turned it off
    ends.
    """
    if not few_cores():
        yield
        return
    with _OPENCV_ONE_THREAD.held():
        yield


@functools.cache
def _blas_controller():
    """threadpoolctl's handle on the BLAS libraries loaded in the process (numpy's OpenBLAS, ...), found once:
    the search walks every loaded library (3 ms here), which a collection would pay on each of its files."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> list[dict]:
    """threadpoolctl's description of each BLAS library loaded in the process."""
    return _blas_controller().info()


def _limit_blas(limits: int | list[dict]) -> None:
    """Every BLAS library at ``limits`` threads, or each back at its own count in a list from _blas_threads."""
    _blas_controller().limit(limits=limits)


_BLAS_ONE_THREAD = ProcessWideOverride(_blas_threads, _limit_blas, 1)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS at one thread while a run explains frames.

    The maps' matrix products are small (eigencam's Gram matrix is [hw, hw]); BLAS threads of their own only
    fight inference for the cores: eigencam ran at 21 FPS instead of 146 with them, on 2 cores. OpenBLAS's
    setting is process-wide: it comes back, as it was, when the last run ends.
    """
    with _BLAS_ONE_THREAD.held():
        yield


class HelperCpu:
    """CPU time used by the helper threads (capture, preprocess, render, encode), per role, in seconds.

    Each helper thread adds its own total when it ends, so that ``bench`` can say where the CPU went.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}

    def add_this_thread(self, role: str) -> None:
        """Add the calling thread's CPU time so far under ``role`` (call it as the thread ends)."""
        with self._lock:
            self._seconds[role] = self._seconds.get(role, 0.0) + time.thread_time()

    def take(self) -> dict[str, float]:
        """The totals since the last take, and start again from zero."""
        with self._lock:
            seconds, self._seconds = self._seconds, {}
        return seconds


HELPER_CPU = HelperCpu()


T = TypeVar("T")


def interruptible(call: Callable[[], T], name: str = "open") -> T:
    """``call()`` in a daemon thread, waited for in a way Ctrl-C and SIGTERM interrupt.

    For calls that can block without end in native code (opening a named pipe nobody writes to, a network
    source that never answers): the handlers of those signals run in the main thread between its waits. An
    interrupted call is abandoned; its thread ends with the process.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # raised again in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
