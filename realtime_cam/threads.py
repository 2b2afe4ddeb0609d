"""Helpers for the worker threads around the inference loop."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

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


@contextlib.contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV's own thread pool off for a while (process-wide), then back as it was.

    In a pipelined run the cores are already shared between inference and the helper threads; OpenCV
    splitting a resize or a colour map over more threads only adds hand-offs (measured on 2 cores: drawing
    an overlay costs 0.78 ms of CPU with the pool, 0.45 ms without).
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)
