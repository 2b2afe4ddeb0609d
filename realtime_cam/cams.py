"""Class activation maps: pure numpy functions at feature resolution.

Every method in METHODS maps what it needs (the head's weights, the gradients of the class score, or the
features alone) to a raw map [h, w]. What is shared is applied once, outside the methods (TorchCAM's
``compute_cams`` shape): the ReLU for methods defined with one, then min-max normalisation
(:func:`compute_map`). Upsampling to the frame happens when drawing.

For a head that is global average pooling + one linear layer, the gradient of the class score y_c with
respect to the feature A_k(i, j) is W[c, k] / (h * w), for every (i, j): the gradient methods have closed
forms there. Other heads carry the gradient as an output of the model file, computed inside the graph at
export (ONNX Runtime has no autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import CamError

EPS = 1e-6  # pytorch-grad-cam's constant (grad_cam_plusplus.py); it matters: here g is ~W/49


def cam(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """The paper's CAM: sum_k W[class, k] * A_k (Zhou et al. 2016, eq. 2), one matrix-vector product."""
    c, h, w = features_chw.shape
    return (weight_kc[class_id] @ features_chw.reshape(c, h * w)).reshape(h, w)


def head_gradients(features_chw: np.ndarray, weight_kc: np.ndarray, class_id: int) -> np.ndarray:
    """d y_c / d A_k(i, j) for a GAP + linear head: W[c, k] / (h * w), as a [C, 1, 1] array."""
    _, h, w = features_chw.shape
    return (weight_kc[class_id] / float(h * w)).astype(np.float32).reshape(-1, 1, 1)


def _weighted_sum(channel_weights: np.ndarray, features_chw: np.ndarray) -> np.ndarray:
    """sum_k w_k * A_k as one matrix-vector product."""
    c, h, w = features_chw.shape
    return (channel_weights.astype(np.float32) @ features_chw.reshape(c, h * w)).reshape(h, w)


def gradcam(features_chw: np.ndarray, grads_chw: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradients.

    For a GAP + linear head, before its ReLU, this equals CAM / (h * w) (tested, not assumed).
    """
    return _weighted_sum(grads_chw.mean(axis=(1, 2)), features_chw)


def gradcam_pp(features_chw: np.ndarray, grads_chw: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al. 2018) in the closed form pytorch-grad-cam uses, with exact gradients."""
    g2, g3 = grads_chw**2, grads_chw**3
    sum_a = features_chw.sum(axis=(1, 2)).reshape(-1, 1, 1)
    aij = g2 / (2.0 * g2 + sum_a * g3 + EPS)
    aij = np.where(grads_chw != 0, aij, 0.0)
    # Gradients that are constant over space come as [C, 1, 1]: their per-pixel weights are summed over the map.
    weights = np.broadcast_to(np.maximum(grads_chw, 0.0) * aij, features_chw.shape).sum(axis=(1, 2))
    return _weighted_sum(weights, features_chw)


def xgradcam(features_chw: np.ndarray, grads_chw: np.ndarray) -> np.ndarray:
    """XGrad-CAM (Fu et al. 2020): channel weights sum_ij(g * A) / sum_ij(A), as pytorch-grad-cam computes them."""
    weights = (grads_chw * features_chw).sum(axis=(1, 2)) / (features_chw.sum(axis=(1, 2)) + 1e-7)
    return _weighted_sum(weights, features_chw)


def layercam(features_chw: np.ndarray, grads_chw: np.ndarray) -> np.ndarray:
    """LayerCAM (Jiang et al. 2021): every position weighted by its own positive gradient, summed over channels."""
    return (np.maximum(grads_chw, 0.0) * features_chw).sum(axis=0)


def hirescam(features_chw: np.ndarray, grads_chw: np.ndarray) -> np.ndarray:
    """HiResCAM (Draelos & Carin 2020): gradients times features elementwise, summed over channels."""
    return (grads_chw * features_chw).sum(axis=0)


def eigencam(features_chw: np.ndarray, weight_kc: np.ndarray | None = None, class_id: int = 0) -> np.ndarray:
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


NEEDS = ("head", "grads", "features")


@dataclass(frozen=True)
class Method:
    """A registered map method.

    Attributes:
        fn: the pure function of what it needs: (features_chw, weight_kc, class_id) for "head" and "features",
            (features_chw, grads_chw) for "grads".
        relu: apply ReLU to the raw map (part of the method's definition).
        class_specific: False when the map ignores the class (eigencam).
        summary: one line for --help and the HUD.
        needs: "head" (the linear head's weights: a GAP + linear head), "grads" (d score / d features: from
            the model's gradient output, or in closed form for a GAP + linear head) or "features" only.
    """

    fn: Callable[..., np.ndarray]
    relu: bool
    class_specific: bool
    summary: str
    needs: str = "grads"


METHODS: dict[str, Method] = {
    "cam": Method(cam, relu=False, class_specific=True, needs="head",
                  summary="CAM (Zhou et al. 2016): W[class] @ features"),
    "gradcam": Method(gradcam, relu=True, class_specific=True, summary="Grad-CAM: spatial mean of the gradients"),
    "gradcam++": Method(gradcam_pp, relu=True, class_specific=True, summary="Grad-CAM++"),
    "xgradcam": Method(xgradcam, relu=True, class_specific=True, summary="XGrad-CAM: activation-weighted gradients"),
    "layercam": Method(layercam, relu=True, class_specific=True, summary="LayerCAM: per-position positive gradients"),
    "hirescam": Method(hirescam, relu=True, class_specific=True, summary="HiResCAM: gradients x features"),
    "eigencam": Method(eigencam, relu=False, class_specific=False, needs="features",
                       summary="Eigen-CAM: first principal component of the features (class-agnostic)"),
}


def normalize_map(raw: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] as float32; a constant map (no information) gives zeros, never NaN."""
    raw = raw.astype(np.float32, copy=False)
    lo = raw.min()
    span = raw.max() - lo  # in float32, as the division below: the peak is span / span, exactly 1
    if not np.isfinite(span) or float(span) <= 1e-12 * max(1.0, abs(float(lo))):
        return np.zeros_like(raw, dtype=np.float32)
    return (raw - lo) / span  # (multiplying by the reciprocal gave 1.0000001 at some peaks)


def compute_map(method: str, features_chw: np.ndarray, weight_kc: np.ndarray | None, class_id: int,
                grads_chw: np.ndarray | None = None) -> np.ndarray:
    """The raw map of a registered method, with its ReLU applied (not yet normalised).

    Args:
        weight_kc: the linear head's weight [K, C] of a GAP + linear head, else None.
        grads_chw: d logits[class_id] / d features ([C, h, w]); None computes it in closed form from
            ``weight_kc`` (GAP + linear heads only).
    """
    spec = METHODS[method]
    if spec.needs == "features":
        raw = spec.fn(features_chw, weight_kc, class_id)
    elif spec.needs == "head":
        if weight_kc is None:
            raise CamError(f"--method {method} needs a head of global average pooling + one linear layer, which "
                           "this model does not have; use a gradient method (gradcam, ...)")
        raw = spec.fn(features_chw, weight_kc, class_id)
    else:
        if grads_chw is None:
            if weight_kc is None:
                raise CamError(f"--method {method} needs the model's gradient output, which this model file "
                               "lacks; export it again")
            grads_chw = head_gradients(features_chw, weight_kc, class_id)
        raw = spec.fn(features_chw, grads_chw)
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
