"""Class activation maps: pure numpy functions of (features, head, class), at feature resolution.

Every method in METHODS maps ``(features_chw, weight_kc, class_id) -> raw map [h, w]``. What is shared is
applied once, outside the methods (TorchCAM's ``compute_cams`` shape): the ReLU for methods defined with
one, then min-max normalisation (:func:`compute_map`). Upsampling to the frame happens when drawing.

For a head that is global average pooling + one linear layer, the gradient of the class score y_c with
respect to the feature A_k(i, j) is W[c, k] / (h * w), for every (i, j). So the gradient methods have
closed forms here and need no autograd, which ONNX does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

EPS = 1e-6  # pytorch-grad-cam's constant (grad_cam_plusplus.py); it matters: here g is ~W/49


def cam(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """The paper's CAM: sum_k W[class, k] * A_k (Zhou et al. 2016, eq. 2), one matrix-vector product."""
    c, h, w = features_chw.shape
    return (weight_kc[class_id] @ features_chw.reshape(c, h * w)).reshape(h, w)


def head_gradients(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """d y_c / d A_k(i, j) for a GAP + linear head: W[c, k] / (h * w), as a [C, 1, 1] array."""
    _, h, w = features_chw.shape
    return (weight_kc[class_id] / float(h * w)).astype(np.float32).reshape(-1, 1, 1)


def gradcam(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradients.

    Before its ReLU this equals CAM / (h * w) for this head (tested, not assumed).
    """
    grads = head_gradients(features_chw, weight_kc, class_id)
    alpha = grads.reshape(-1)  # the spatial mean of a gradient that is constant over space
    c, h, w = features_chw.shape
    return (alpha @ features_chw.reshape(c, h * w)).reshape(h, w)


def gradcam_pp(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al. 2018) in the closed form pytorch-grad-cam uses, with exact gradients."""
    grads = head_gradients(features_chw, weight_kc, class_id)
    g2, g3 = grads**2, grads**3
    sum_a = features_chw.sum(axis=(1, 2)).reshape(-1, 1, 1)
    aij = g2 / (2.0 * g2 + sum_a * g3 + EPS)
    aij = np.where(grads != 0, aij, 0.0)
    c, h, w = features_chw.shape
    # The per-pixel weights are constant over space here, so their spatial sum is h * w times one of them.
    weights = (np.maximum(grads, 0.0) * aij).reshape(-1) * float(h * w)
    return (weights.astype(np.float32) @ features_chw.reshape(c, h * w)).reshape(h, w)


def eigencam(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """Eigen-CAM (Muhammad & Yeasin 2020): the features' first principal component; no class involved.

    The sign of a principal component is arbitrary: it is chosen so the map correlates positively with the
    total activation, so that hot means 'strongly activated' on every frame (no flipping on video).
    """
    c, h, w = features_chw.shape
    x = features_chw.reshape(c, h * w).T.astype(np.float32)  # [hw, C]
    x = x - x.mean(axis=0, keepdims=True)
    # The first right singular vector of the [hw, C] matrix, via the small [hw, hw] Gram matrix.
    gram = x @ x.T
    eigvals, eigvecs = np.linalg.eigh(gram)
    u = eigvecs[:, -1]
    if eigvals[-1] <= 0:
        return np.zeros((h, w), np.float32)
    proj = u * np.sqrt(eigvals[-1])  # == x @ v1
    total = features_chw.reshape(c, h * w).sum(axis=0)
    if np.dot(proj - proj.mean(), total - total.mean()) < 0:
        proj = -proj
    return proj.reshape(h, w).astype(np.float32)


@dataclass(frozen=True)
class Method:
    """A registered map method.

    Attributes:
        fn: the pure function (features_chw, weight_kc, class_id) -> raw map.
        relu: apply ReLU to the raw map (part of the method's definition).
        class_specific: False when the map ignores the class (eigencam).
        summary: one line for --help and the HUD.
    """

    fn: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    relu: bool
    class_specific: bool
    summary: str


METHODS: dict[str, Method] = {
    "cam": Method(cam, relu=False, class_specific=True, summary="CAM (Zhou et al. 2016): W[class] @ features"),
    "gradcam": Method(gradcam, relu=True, class_specific=True, summary="Grad-CAM, closed form for GAP+linear"),
    "gradcam++": Method(gradcam_pp, relu=True, class_specific=True, summary="Grad-CAM++, closed form"),
    "eigencam": Method(eigencam, relu=False, class_specific=False,
                       summary="Eigen-CAM: first principal component of the features (class-agnostic)"),
}


def normalize_map(raw: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] as float32; a constant map (no information) gives zeros, never NaN."""
    raw = raw.astype(np.float32, copy=False)
    lo = float(raw.min())
    span = float(raw.max()) - lo
    if not np.isfinite(span) or span <= 1e-12 * max(1.0, abs(lo)):
        return np.zeros_like(raw, dtype=np.float32)
    return (raw - lo) * np.float32(1.0 / span)


def compute_map(method: str, features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """The raw map of a registered method, with its ReLU applied (not yet normalised)."""
    spec = METHODS[method]
    raw = spec.fn(features_chw, weight_kc, class_id)
    return np.maximum(raw, 0.0) if spec.relu else raw


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, float32."""
    shifted = logits.astype(np.float32) - np.max(logits, axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def top_k_ids(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values, largest first (ties: lower id first)."""
    k = max(1, min(int(k), probabilities.shape[0]))
    # A full stable sort (microseconds for 1000 classes) keeps ties in id order whatever k is.
    return np.argsort(-probabilities, kind="stable")[:k]
