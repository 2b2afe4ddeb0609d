"""A stand-in for the OpenCV window that presses scripted keys."""

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
