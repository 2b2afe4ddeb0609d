"""Helpers for the live tests: a stand-in for the OpenCV window that presses scripted keys, and a poll."""

import time

import pytest

from realtime_cam.sinks import Sink


class ScriptedWindow(Sink):
    """Stands in for the OpenCV window: records what is shown and 'presses' scripted keys."""

    def __init__(self, keys_by_frame, wait_keys=()):
        self.keys_by_frame = dict(keys_by_frame)
        self.wait_keys = list(wait_keys)
        self.shown = []
        self.last_key = -1
        self.closed_after = None

    def write(self, image):
        self.shown.append(image)
        self.last_key = self.keys_by_frame.get(len(self.shown) - 1, -1)

    def wait_key(self, delay_ms):
        return self.wait_keys.pop(0) if self.wait_keys else 27

    @property
    def closed(self):
        return self.closed_after is not None and len(self.shown) > self.closed_after


def wait_until(condition, timeout=20.0, what="condition"):
    """Polls ``condition`` (not a timing assertion: the bound only keeps a broken run from hanging)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
