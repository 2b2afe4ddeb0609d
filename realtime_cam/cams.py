"""Class activation maps: pure numpy functions of (features, head, class), at feature resolution.

Every method in METHODS has the signature ``method(features_chw, weight_kc, class_id) -> raw map [h, w]``;
normalisation is shared and applied once, outside the methods (:func:`normalize_map`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MapMethod = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def cam(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """The paper's CAM: sum_c W[class, c] * F[c] (Zhou et al. 2016, eq. 2), one matrix-vector product."""
    c, h, w = features_chw.shape
    return (weight_kc[class_id] @ features_chw.reshape(c, h * w)).reshape(h, w)


METHODS: dict[str, MapMethod] = {
    "cam": cam,
}


def normalize_map(raw: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] as float32; a constant map (no information) gives zeros, never NaN."""
    raw = raw.astype(np.float32, copy=False)
    lo = float(raw.min())
    span = float(raw.max()) - lo
    if not np.isfinite(span) or span <= 1e-12 * max(1.0, abs(lo)):
        return np.zeros_like(raw, dtype=np.float32)
    return (raw - lo) * np.float32(1.0 / span)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, float32."""
    shifted = logits.astype(np.float32) - np.max(logits, axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted
