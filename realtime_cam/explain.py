"""From a frame's network outputs to a :class:`Prediction`: softmax, top-k, pinning, hysteresis, smoothing.

Pure: the arrays and the request go in, the prediction and the stream's next temporal state come out. The
ONNX Runtime session lives in ``model.py``; drawing in ``overlay.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .cams import METHODS, compute_map, normalize_map, softmax, top_k_ids
from .errors import CamError
from .labels import check_class_id
from .temporal import TemporalState, hold_leader, smooth_map, smooth_probabilities
from .types import Prediction


@dataclass(frozen=True)
class Request:
    """What to explain on a frame.

    Attributes:
        method: a key of ``realtime_cam.cams.METHODS``.
        class_id: explain this class (pinned) instead of the ranking's choice.
        topk: how many classes ``Prediction.topk`` lists.
        rank: which of the top-k to explain when no class is given (0: the top-1, or the class hysteresis
            holds; 1 and up: that place in the list ranked by probability).
    """

    method: str = "cam"
    class_id: int | None = None
    topk: int = 5
    rank: int = 0


def explain(
    logits: np.ndarray,
    features_chw: np.ndarray,
    head_weight_kc: np.ndarray,
    labels: Sequence[str],
    request: Request = Request(),
    temporal: TemporalState | None = None,
    gradients: Callable[[int], np.ndarray] | None = None,
) -> tuple[Prediction, TemporalState | None]:
    """One frame's prediction with its [0, 1] map, and the stream's next temporal state.

    Args:
        logits: [K] for this frame.
        features_chw: [C, h, w] for this frame.
        head_weight_kc: the linear head's weight [K, C].
        labels: K class names.
        temporal: a video's history: smooths probabilities and maps over frames and holds the explained top-1
            (hysteresis: ``Prediction.held``; the top-k list stays ranked by probability); None treats the frame
            on its own (and None is returned for it).
        gradients: d logits[c] / d features [C, h, w] for a class c, from the model's gradient output (a head
            that is not GAP + linear); None: the closed form of the GAP + linear head.
    """
    if request.method not in METHODS:
        raise CamError(f"unknown map method {request.method!r}; choose from {', '.join(METHODS)}")
    probabilities = softmax(logits)
    if temporal is not None:
        probabilities, temporal = smooth_probabilities(temporal, probabilities)
    ranking = [int(i) for i in top_k_ids(probabilities, request.topk)]  # always by probability
    top = ranking[0]
    if temporal is not None:  # hysteresis keeps the explained top-1 until a challenger has led long enough
        top, temporal = hold_leader(temporal, probabilities)
    pinned = request.class_id is not None
    if pinned:
        class_id = int(request.class_id)
        check_class_id(class_id, len(labels))
    elif request.rank <= 0:
        class_id = top
    else:
        class_id = ranking[min(request.rank, len(ranking) - 1)]
    needs_grads = METHODS[request.method].needs == "grads" and gradients is not None
    raw = compute_map(request.method, features_chw, head_weight_kc, class_id,
                      grads_chw=gradients(class_id) if needs_grads else None)
    if temporal is None:
        shown = normalize_map(raw)
    else:
        key = (class_id if METHODS[request.method].class_specific else None, request.method)
        shown, temporal = smooth_map(temporal, raw, key)
    prediction = Prediction(
        class_id=class_id,
        label=labels[class_id],
        probability=float(probabilities[class_id]),
        topk=tuple((i, labels[i], float(probabilities[i])) for i in ranking),
        cam=shown,
        method=request.method,
        probabilities=probabilities,
        pinned=pinned,
        held=not pinned and request.rank <= 0 and class_id != ranking[0],
    )
    return prediction, temporal
