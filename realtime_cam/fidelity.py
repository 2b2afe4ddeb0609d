"""How faithfully one model reproduces another's predictions and maps (int8 or fp16 vs fp32).

What ``realtime-cam bench`` and ``export --int8/--fp16`` report. Pure numpy on the models' outputs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

import numpy as np

from .cams import compute_map
from .errors import CamError
from .model import CamModel


def fidelity(reference: CamModel, candidate: CamModel, frames_bgr: Iterable[np.ndarray]) -> dict:
    """How faithfully ``candidate`` reproduces ``reference``'s predictions and maps, frame by frame.

    For each frame, both models run; the class is the reference's top-1, and both raw CAMs of that class
    (each model's features with its own head, at feature resolution, before normalisation) are compared
    with Pearson's r. Two constant maps (neither says where) count as r = 1, a constant map against one that
    varies as r = 0.

    Args:
        reference: the model to match (the fp32 file).
        candidate: the model under test (int8, fp16, ...).
        frames_bgr: HxWx3 uint8 BGR frames of any size.

    Returns:
        ``{"frames": N, "top1_agreement_pct": float, "map_r_median": float, "map_r_min": float,
        "top1_agree": (bool, ...), "map_r": (float, ...)}``, the tuples per frame, in order.

    Raises:
        CamError: when there is no frame, or the two models' feature maps differ in shape.
    """
    agree: list[bool] = []
    correlations: list[float] = []
    # CAM where both heads allow it, else Grad-CAM (from a head's closed form or the model's own gradients).
    method = "cam" if "cam" in reference.methods and "cam" in candidate.methods else "gradcam"
    for frame in frames_bgr:
        out_ref = reference.run(reference.prepare(frame)).row(0)
        out_cand = candidate.run(candidate.prepare(frame)).row(0)
        (logits_ref, features_ref), (logits_cand, features_cand) = (
            (o.logits, o.features) for o in (out_ref, out_cand))
        if features_ref.shape != features_cand.shape:
            raise CamError(
                f"the models' feature maps differ in shape ({list(features_ref.shape)} vs "
                f"{list(features_cand.shape)}): they are not two versions of one network"
            )
        class_id = int(np.argmax(logits_ref))
        agree.append(int(np.argmax(logits_cand)) == class_id)
        correlations.append(_pearson(_raw_map(reference, frame, out_ref, class_id, method),
                                     _raw_map(candidate, frame, out_cand, class_id, method)))
    if not agree:
        raise CamError("fidelity needs at least one frame")
    return {
        "frames": len(agree),
        "top1_agreement_pct": 100.0 * sum(agree) / len(agree),
        "map_r_median": float(statistics.median(correlations)),
        "map_r_min": float(min(correlations)),
        "top1_agree": tuple(agree),
        "map_r": tuple(correlations),
    }


def _raw_map(model: CamModel, frame: np.ndarray, out, class_id: int, method: str) -> np.ndarray:
    source = model.gradient_source(frame, out)
    grads = source(class_id) if source is not None and method != "cam" else None
    return compute_map(method, out.features, model.head_weight, class_id, grads_chw=grads)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    norm = float(np.sqrt((a @ a) * (b @ b)))
    if norm == 0.0:
        # A constant map says "nowhere in particular": it agrees with another constant map and nothing else.
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b) / norm


def format_fidelity(result: dict) -> str:
    """One line for a :func:`fidelity` result."""
    return (f"top-1 agreement {result['top1_agreement_pct']:.1f}% on {result['frames']} frames, "
            f"map Pearson r median {result['map_r_median']:.4f} (min {result['map_r_min']:.4f})")
