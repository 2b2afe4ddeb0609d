"""The headless loop's helper threads: preprocessing ahead of inference, and rendering behind it.

Each keeps order (one thread, one FIFO queue) and hands an error to the loop's thread instead of dying
quietly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from .threads import HELPER_CPU, lower_this_threads_priority
from .timing import StageTimes
from .types import Frame

Item = TypeVar("Item")
CLOSE_WAIT_S = 0.5  # how long closing waits for a helper thread that may be stuck in its source


class Prefetcher:
    """Preprocesses frames in a thread of its own, ahead of inference, ``batch`` at a time.

    Yields (frames, inputs) in order, ``inputs`` being [len(frames), 3, H, W]; the last batch of a file can
    be shorter. An error in the thread (or in the source) is raised in the consumer.
    """

    def __init__(self, frames: Iterable[Frame], prepare: Callable[[Sequence[np.ndarray]], np.ndarray],
                 times: StageTimes, batch: int = 1, queue_size: int = 4) -> None:
        self._frames = frames
        self._prepare = prepare
        self._times = times
        self._batch = batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="preprocess", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        """Hand an item over (waiting for room); False once the consumer has closed."""
        if self._stop.is_set():
            return False
        self._queue.put(item)
        return not self._stop.is_set()

    def _hand_over(self, frames: list[Frame]) -> bool:
        """Preprocess a batch and queue it; False once the consumer has closed."""
        t0 = time.perf_counter()
        inputs = self._prepare([frame.image_bgr for frame in frames])
        self._times.add("preprocess", time.perf_counter() - t0, len(frames))
        return self._put((frames, inputs))

    def _loop(self) -> None:
        lower_this_threads_priority()
        pending: list[Frame] = []
        try:
            for frame in self._frames:
                pending.append(frame)
                if len(pending) == self._batch:
                    if not self._hand_over(pending):
                        return
                    pending = []
            if pending and not self._hand_over(pending):
                return
            self._put(None)
        except BaseException as exc:  # surfaces in the consumer, after the frames read before it
            if pending:
                try:
                    self._hand_over(pending)
                except BaseException:  # noqa: BLE001 - the first error is the one to report
                    pass
            self._put(exc)
        finally:
            HELPER_CPU.add_this_thread("preprocess")

    def __iter__(self) -> Iterator[tuple[list[Frame], np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        # Emptying the queue releases a put() that waits for room; the thread then sees the stop flag.
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        # At the end of a source the thread has finished already. Stopped early, it may be waiting on the
        # source for a frame that does not come (a stalled stream): it ends when the source closes, and only
        # drops what it reads meanwhile, so the run does not wait for it.
        self._thread.join(timeout=CLOSE_WAIT_S)


class OrderedWorker(Generic[Item]):
    """Calls ``handle`` on every submitted item, in order, in a thread of its own (the render thread).

    An error in ``handle`` stops the work: it is raised again in the submitting thread at the next
    :meth:`submit` or at :meth:`finish`; later items are drained unhandled so that no producer stays blocked.
    """

    def __init__(self, handle: Callable[[Item], None], name: str, queue_size: int = 4) -> None:
        self._handle = handle
        self._name = name
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        lower_this_threads_priority()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._error is not None:
                    continue  # drain, so that a producer blocked on put() is released
                try:
                    self._handle(item)
                except BaseException as exc:  # surfaces in the submitting thread
                    self._error = exc
        finally:
            HELPER_CPU.add_this_thread(self._name)

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: Item) -> None:
        self.check()
        self._queue.put(item)

    def finish(self) -> None:
        """Wait for every submitted item to be handled; raise the worker's error, if any. Once it has returned or
        was abandoned, calling it again only raises that error."""
        if not self._done:
            self._queue.put(None)
            self._thread.join()
            self._done = True
        self.check()

    def abandon(self) -> None:
        """Stop waiting for this worker for good (a second Ctrl-C while it drains): its thread is a daemon."""
        self._done = True
