"""Helpers for the worker threads around the inference loop."""

from __future__ import annotations

import os
import threading

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
