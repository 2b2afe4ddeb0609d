"""Static int8 quantization of a contract file for ONNX Runtime's CPU provider.

QDQ format, per-channel int8 weights, uint8 activations, calibrated on real frames preprocessed exactly as
the runtime does; the head (pooling + linear layer) stays float32 and the metadata is the fp32 file's, so
the runtime cannot tell the copy from the fp32 file except by speed. Never imports torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime import quantization as ortq

from realtime_cam.contract import write_contract
from realtime_cam.errors import ExportError, SourceError
from realtime_cam.preprocess import Preprocessor, as_bgr

from .checks import replace_atomically
from .frames import Sources, as_specs, describe, sample_frames
from .lowering import (
    check_outputs,
    describe_kept,
    drop_unused_head_copies,
    fidelity_to_fp32,
    head_nodes,
    keep_metadata,
    keep_token_grid,
    load_fp32_contract,
    sample_check_frames,
    with_note,
)
from .options import (
    CALIBRATIONS,
    DEFAULT_CALIBRATION,
    DEFAULT_CALIBRATION_FRAMES,
    DEFAULT_CHECK_FRAMES,
    Calibration,
)

__all__ = ["QuantReport", "quantize_int8"]

# Per-channel DequantizeLinear (its ``axis`` attribute) needs ONNX opset 13.
_PER_CHANNEL_OPSET = 13

# Frames per calibration pass: onnxruntime keeps every intermediate tensor of a pass in memory
# (about 30 MB a frame for MobileNetV2 at 224x224), so passes are kept short.
_FRAMES_PER_PASS = 16


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_int8` wrote.

    Attributes:
        path: the int8 contract file.
        calibration_frames: how many frames the activation ranges were calibrated on.
        calibration_sources: the sources those frames came from, as given.
        method: the calibration, a key of :data:`CALIBRATIONS`.
        activation_type: "uint8" or "int8".
        excluded_nodes: the nodes left in float32 (the head: pooling and the linear layer; for a graph head
            also the network after the explained layer and the gradient's nodes).
        fidelity: ``realtime_cam.fidelity.fidelity`` of the int8 model against the fp32 one on the check
            frames, or None when no check set was given.
    """

    path: Path
    calibration_frames: int
    calibration_sources: tuple[str, ...]
    method: str
    activation_type: str
    excluded_nodes: tuple[str, ...]
    fidelity: dict | None = None


def _name_nodes(graph: onnx.GraphProto, indices: Iterable[int]) -> list[str]:
    """The names of these nodes, giving unique names to unnamed ones (quantizers select nodes by name)."""
    taken = {node.name for node in graph.node}
    names = []
    for i in indices:
        node = graph.node[i]
        if not node.name:
            base, k = f"realtime_cam_head_{node.op_type}", 0
            while f"{base}_{k}" in taken:
                k += 1
            node.name = f"{base}_{k}"
            taken.add(node.name)
        names.append(node.name)
    return names


def _at_least_opset(model: onnx.ModelProto, opset: int, name: str) -> onnx.ModelProto:
    """A copy of ``model`` that imports at least ``opset`` of the default ONNX domain."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ValidationError per op
        raise ExportError(f"{name} uses ONNX opset {current}; converting it to opset {opset} (needed for "
                          f"per-channel int8) failed: {str(exc).splitlines()[0][:200]}") from None


class _Inputs(ortq.CalibrationDataReader):
    """Preprocessed frames for onnxruntime's calibrators, one per call; ``set_range`` lets them go in passes."""

    def __init__(self, input_name: str, inputs: list[np.ndarray]) -> None:
        self._name = input_name
        self._inputs = inputs
        self._next, self._end = 0, len(inputs)

    def __len__(self) -> int:
        return len(self._inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._inputs))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        batch = self._inputs[self._next]
        self._next += 1
        return {self._name: batch}


@contextlib.contextmanager
def _ort_warnings_off() -> Iterator[None]:
    """ONNX Runtime's warnings off for the sessions the quantizer makes (a graph head's ``target_class`` is an
    input with a default, which it warns about on each), errors still shown. The quantizer's own notes on
    Python's root logger are dropped, and the root logger is as it was after: its module-level
    ``logging.warning`` gave it a handler, through which every later line of ours was printed a second time
    ("INFO:realtime_cam:wrote ...")."""
    import logging

    import onnxruntime as ort

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    if not handlers:  # its notes on the root logger ("Please consider pre-processing ...") go nowhere:
        root.addHandler(logging.NullHandler())  # ours say what a user can act on
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings
        root.handlers[:] = handlers
        root.setLevel(level)


def _pass_size(count: int) -> int:
    """The largest divisor of ``count`` up to _FRAMES_PER_PASS (onnxruntime wants passes of equal size)."""
    return max(d for d in range(1, min(count, _FRAMES_PER_PASS) + 1) if count % d == 0)


def _quantize_graph(
    model: onnx.ModelProto,
    inputs: list[np.ndarray],
    calibration: Calibration,
    activation: ortq.QuantType,
    log: Callable[[str], None],
) -> tuple[onnx.ModelProto, list[str]]:
    """Pre-process, calibrate and quantize (QDQ, per-channel int8 weights) everything but the head.

    Returns:
        The quantized model and the names of the nodes left in float32.
    """
    with tempfile.TemporaryDirectory(prefix="realtime_cam_int8_") as tmp, _ort_warnings_off():
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(prepared))
        try:
            # Shape inference lets the quantizer see every tensor's type and shape; its graph optimisation
            # folds constants (and any BatchNormalization left in the graph) before ranges are measured.
            # Its symbolic shape inference needs sympy, which only the export extra brings (through torch);
            # ONNX's own shape inference serves a classifier without it.
            ortq.quant_pre_process(str(prepared), str(prepared),
                                   skip_symbolic_shape=importlib.util.find_spec("sympy") is None)
        except Exception as exc:  # noqa: BLE001 - a model it cannot optimise is still quantizable as is
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log(f"note: onnxruntime's quantization pre-processing failed ({reason}); quantizing the model as it is")
            onnx.save(model, str(prepared))
        model = onnx.load(str(prepared))
        excluded = _name_nodes(model.graph, head_nodes(model.graph))
        onnx.save(model, str(prepared))
        quantized = Path(tmp) / "int8.onnx"
        reader = _Inputs(model.graph.input[0].name, inputs)
        # onnxruntime's calibrators print their progress on stdout; this module reports through ``log``.
        with contextlib.redirect_stdout(io.StringIO()):
            ortq.quantize_static(
                str(prepared),
                str(quantized),
                reader,
                quant_format=ortq.QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                activation_type=activation,
                weight_type=ortq.QuantType.QInt8,
                calibrate_method=ortq.CalibrationMethod[calibration.method],
                nodes_to_exclude=excluded,
                extra_options={"CalibStridedMinMax": _pass_size(len(inputs)), **dict(calibration.options)},
            )
        return onnx.load(str(quantized)), excluded


def quantize_int8(
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    calibrate: Sources,
    *,
    max_frames: int = DEFAULT_CALIBRATION_FRAMES,
    method: str = DEFAULT_CALIBRATION,
    activation_type: str = "uint8",
    check: Sources | None = None,
    check_frames: int = DEFAULT_CHECK_FRAMES,
    log: Callable[[str], None] = print,
) -> QuantReport:
    """Statically quantize a contract file to int8 for ONNX Runtime's CPU provider.

    QDQ format with per-channel int8 weights and uint8 activations: x86 CPUs multiply u8 x s8 natively
    (VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``), so that is the pair onnxruntime's CPU kernels are built
    around. The head (pooling, glue and the linear layer) stays float32: it costs nothing and keeps the
    class and the map's weights exact; the file's head is the fp32 file's W and b.

    Args:
        fp32_path: the float32 contract file.
        output: where to write the int8 contract file (written to a temporary name, checked, renamed).
        calibrate: image files, folders of images or video files whose frames set the activation ranges;
            preprocessed exactly as the runtime will (the model's own size and normalisation).
        max_frames: at most this many calibration frames, spread over the sources.
        method: a key of :data:`CALIBRATIONS`.
        activation_type: "uint8" (default, fastest on x86) or "int8".
        check: frames NOT used for calibration to measure fidelity on right away (optional).
        check_frames: at most this many check frames.
        log: where the human-readable summary lines go.

    Raises:
        ExportError: a model that is not a contract file, a bad calibration or check source, an unknown
            method, or a quantized model that fails its checks.
    """
    if method not in CALIBRATIONS:
        raise ExportError(f"unknown calibration {method!r}; choose from {', '.join(CALIBRATIONS)}")
    activation = {"uint8": ortq.QuantType.QUInt8, "int8": ortq.QuantType.QInt8}.get(activation_type)
    if activation is None:
        raise ExportError(f"activation type must be uint8 or int8, got {activation_type!r}")
    fp32_path, output = Path(fp32_path), Path(output)
    source_model, info, weight, bias = load_fp32_contract(fp32_path)

    try:
        specs = as_specs(calibrate)
        frames = sample_frames(specs, max_frames)
    except SourceError as exc:
        raise ExportError(f"calibration source: {exc}") from None
    check_iter = sample_check_frames(check, check_frames)
    preprocess = Preprocessor(info.input_size_hw, info.mean, info.std, info.channel_order)
    try:
        inputs = [preprocess(as_bgr(frame)).copy() for frame in frames]
    except SourceError as exc:  # a video that stops decoding half-way
        raise ExportError(f"calibration source: {exc}") from None
    overlap = {str(Path(s).resolve()) for s in specs} & {str(Path(s).resolve()) for s in as_specs(check)} \
        if check is not None else set()
    if overlap:
        log(f"warning: {', '.join(sorted(overlap))} is both calibration and check data; "
            "the fidelity measured on it flatters the int8 model")
    described = describe(specs)
    log(f"calibrating {fp32_path.name} on {len(inputs)} frames of {described} ({method})")

    model = _at_least_opset(source_model, _PER_CHANNEL_OPSET, fp32_path.name)
    drop_unused_head_copies(model)
    model, excluded = _quantize_graph(model, inputs, CALIBRATIONS[method], activation, log)

    note = (f"int8 QDQ per-channel ({activation_type} activations, {method} calibration), "
            f"calibrated on {len(inputs)} frames of {described}")
    keep_metadata(model, source_model)
    write_contract(model, with_note(info, note), weight, bias)
    keep_token_grid(model, source_model)
    replace_atomically(model, output, lambda saved: check_outputs(saved, inputs[:2], weight, bias, "int8"))
    log(f"wrote {output} ({note}); {describe_kept(excluded, graph_head=weight is None)}")

    result = fidelity_to_fp32(fp32_path, output, check_iter, "int8", log)
    return QuantReport(
        path=output, calibration_frames=len(inputs), calibration_sources=tuple(specs), method=method,
        activation_type=activation_type, excluded_nodes=tuple(excluded), fidelity=result,
    )
