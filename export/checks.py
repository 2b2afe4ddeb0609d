"""Checks every export runs before a file gets its final name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from realtime_cam.errors import ExportError
from realtime_cam.partial import PartialFile

T = TypeVar("T")


def float_tolerance(reference: np.ndarray) -> float:
    """What 'equal within float tolerance' means here: 1e-3 relative to the largest value, at least 1e-3."""
    return 1e-3 * max(1.0, float(np.abs(reference).max()))


def cpu_session(model: bytes | Path, what: str) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for checking an export; a model it cannot load is an ExportError."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the head copy is an unused initializer: no warning per load
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise ExportError(f"onnxruntime cannot load {what} ({str(exc).splitlines()[0][:300]})") from None


def check_contract_file(
    path: Path, batch: np.ndarray, logits_ref: np.ndarray, features_ref: np.ndarray
) -> tuple[float, float]:
    """Run onnx.checker and compare ONNX Runtime's outputs with the reference; raise when they differ.

    Returns:
        (max |logits diff|, max |features diff|).
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported model: {str(exc).splitlines()[0]}") from None
    session = cpu_session(path, "the exported model")
    name = session.get_inputs()[0].name
    logits, features = session.run(["logits", "features"], {name: batch.astype(np.float32)})
    diff_logits = float(np.abs(logits - logits_ref).max())
    diff_features = float(np.abs(features - features_ref).max())
    if diff_logits > float_tolerance(logits_ref) or diff_features > float_tolerance(features_ref):
        raise ExportError(
            f"ONNX Runtime disagrees with the reference beyond float tolerance "
            f"(max |logits diff| {diff_logits:.3g}, max |features diff| {diff_features:.3g})"
        )
    return diff_logits, diff_features


def replace_atomically(model: onnx.ModelProto, output: Path, verify: Callable[[Path], T]) -> T:
    """Save to a temporary name of this run's own beside ``output``, verify it, then give it its name; never
    leave half a file, and never remove a file this run did not create."""
    output = Path(output)
    if not output.parent.is_dir():
        output.parent.mkdir(parents=True, exist_ok=True)
    with PartialFile(output) as tmp:
        try:
            onnx.save(model, str(tmp))
        except OSError as exc:  # a full disk, a folder that became read-only
            raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
        return verify(tmp)  # committed when the block ends without an error
