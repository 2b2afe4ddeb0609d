"""One stream's overlays for any number of HTTP clients: each client gets only the newest frame, and every
frame is JPEG-encoded once however many clients watch it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

JPEG_QUALITY = 80


@dataclass
class ClientStats:
    """One MJPEG client: frames sent, frames it missed because it was slower than the stream, and the bytes
    its handler holds now (at most one encoded frame)."""

    stream: int
    sent: int = 0
    skipped: int = 0
    pending_bytes: int = 0
    done: bool = False


class Broadcast:
    """The newest overlay of one stream and its JPEG, for the clients that watch it.

    ``publish`` (the render thread) stores a reference and wakes the clients, nothing more; the first client
    that wants a frame encodes it, the others reuse that encoding.
    """

    def __init__(self, stream_id: int, quality: int = JPEG_QUALITY) -> None:
        self.stream_id = stream_id
        self.quality = quality
        self.seq = 0  # frames published
        self.encodes = 0  # frames encoded (at most one per published frame)
        self.max_jpeg_bytes = 0  # the largest encoded frame so far
        self.ended = False
        self._image: np.ndarray | None = None
        self._jpeg: bytes | None = None
        self._jpeg_seq = -1
        self._encoding_seq = -1
        self._cond = threading.Condition()

    def publish(self, image_bgr: np.ndarray) -> None:
        with self._cond:
            self._image = image_bgr
            self.seq += 1
            self._cond.notify_all()

    def end(self) -> None:
        """The stream is over: clients finish their response."""
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def latest(self) -> tuple[int, np.ndarray | None]:
        with self._cond:
            return self.seq, self._image

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, bytes | None]:
        """The newest frame after ``seen`` as (seq, JPEG), waiting up to ``timeout``; (seen, None) when there is
        none yet, or the stream has ended. A frame another client is encoding is waited for, not encoded again."""
        with self._cond:
            if self.seq <= seen and not self.ended:
                self._cond.wait(timeout)
            if self.seq <= seen or self._image is None:
                return seen, None
            seq = self.seq
            while self._jpeg_seq < seq and self._encoding_seq == seq:
                self._cond.wait(1.0)
            if self._jpeg_seq >= seq:
                return self._jpeg_seq, self._jpeg
            self._encoding_seq, image = seq, self._image
        jpeg = self._encode(image)  # outside the lock: publishing never waits for an encode
        with self._cond:
            self.encodes += 1
            self.max_jpeg_bytes = max(self.max_jpeg_bytes, len(jpeg))
            if seq > self._jpeg_seq:
                self._jpeg, self._jpeg_seq = jpeg, seq
            self._cond.notify_all()
        return seq, jpeg

    def _encode(self, image_bgr: np.ndarray) -> bytes:
        try:
            ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        except cv2.error:
            return b""
        return buf.tobytes() if ok else b""
