"""Frame to model input: pure functions on arrays."""

from __future__ import annotations

import cv2
import numpy as np

from .errors import SourceError


def as_bgr(frame: np.ndarray) -> np.ndarray:
    """Bring any frame OpenCV can hand us to HxWx3 uint8 BGR (grayscale, BGRA and 16-bit included)."""
    if frame is None or not isinstance(frame, np.ndarray) or frame.size == 0:
        raise SourceError("empty frame")
    if frame.dtype != np.uint8:
        if frame.dtype == np.uint16:
            frame = (frame >> 8).astype(np.uint8)
        elif np.issubdtype(frame.dtype, np.floating):
            frame = np.clip(frame * 255.0, 0, 255).astype(np.uint8)
        else:
            raise SourceError(f"unsupported frame dtype {frame.dtype}")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 1:
        return cv2.cvtColor(frame[:, :, 0], cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    raise SourceError(f"unsupported frame shape {frame.shape}")


class Preprocessor:
    """BGR uint8 frame of any size -> [1, 3, H, W] float32, normalised as the model expects.

    The whole frame is resized to the model's input (no crop), so the map covers the whole frame.
    The output buffer is reused between calls: copy it if you keep it past the next call.
    """

    def __init__(
        self,
        input_size_hw: tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        channel_order: str = "RGB",
    ) -> None:
        self.input_size_hw = input_size_hw
        self._swap_rb = channel_order == "RGB"
        # (x / 255 - mean) / std == x * scale + offset, per channel, in the model's channel order.
        std_arr = np.asarray(std, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std_arr)).reshape(3, 1, 1)
        self._offset = (-np.asarray(mean, dtype=np.float32) / std_arr).reshape(3, 1, 1)
        h, w = input_size_hw
        self._out = np.empty((1, 3, h, w), dtype=np.float32)

    @property
    def buffer(self) -> np.ndarray:
        """The reused [1, 3, H, W] output buffer."""
        return self._out

    def __call__(self, frame_bgr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The model input for one frame, in ``out`` if given, else in the reused buffer."""
        h, w = self.input_size_hw
        resized = cv2.resize(frame_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        if self._swap_rb:
            resized = resized[:, :, ::-1]
        target = self._out if out is None else out
        chw = target[0]
        np.copyto(chw, resized.transpose(2, 0, 1))
        chw *= self._scale
        chw += self._offset
        return target
