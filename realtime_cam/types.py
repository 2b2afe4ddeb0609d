"""The values that travel through the loop: a captured frame and what the model says about it.

Importable without onnxruntime or OpenCV, so that drawing, sinks and other programs can use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One captured frame.

    Attributes:
        index: 0-based position in the source (for live sources: among frames delivered).
        image_bgr: HxWx3 uint8 BGR.
        captured_at: ``time.perf_counter()`` when the frame was read, for capture-to-display latency.
        time_s: its presentation time in the source, in seconds from the start (a video file's timestamp,
            kept by outputs so that variable-frame-rate video keeps its timing); None when the source has none.
    """

    index: int
    image_bgr: np.ndarray
    captured_at: float
    time_s: float | None = None


@dataclass(frozen=True, eq=False)
class Prediction:
    """What the model says about one frame, and where it looked.

    Attributes:
        class_id: the explained class: the top-1, unless a class was asked for or hysteresis holds an earlier
            top-1 (``held``).
        label: its name.
        probability: its softmax probability.
        topk: the k most probable classes as (class_id, label, probability), most probable first, whatever
            class is explained (a held or pinned one may be further down, or not among them).
        cam: float32 [h, w] at feature resolution, min-max normalised to [0, 1].
        method: the map method used (a key of ``realtime_cam.cams.METHODS``).
        probabilities: float32 [K] softmax over all classes (smoothed over time in a smoothed run).
        pinned: True when the class was chosen by the user rather than by the ranking.
        held: True when the explained class is the top-1 that hysteresis keeps although another class (topk's
            first) is more probable on this frame.
    """

    class_id: int
    label: str
    probability: float
    topk: tuple[tuple[int, str, float], ...]
    cam: np.ndarray = field(repr=False)
    method: str = "cam"
    probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))
    pinned: bool = False
    held: bool = False

    def as_dict(self) -> dict:
        """What JSON can hold of it (the map and the full probabilities left out): snapshots, the web page."""
        return {"class_id": self.class_id, "label": self.label, "probability": self.probability,
                "pinned": self.pinned, "held": self.held, "method": self.method,
                "topk": [{"class_id": c, "label": name, "probability": p} for c, name, p in self.topk]}
