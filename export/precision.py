"""Lower-precision copies of a contract file, and how faithful their maps stay.

- :func:`quantize_int8`: static int8 quantization for ONNX Runtime's CPU provider (QDQ format, per-channel
  int8 weights, uint8 activations), calibrated on real frames preprocessed exactly as the runtime does.
- :func:`convert_fp16`: float16 weights and arithmetic for the CUDA provider; inputs and outputs stay
  float32, so the runtime is unchanged.
- :func:`fidelity`: top-1 agreement and map correlation of a candidate model against a reference; what
  ``realtime-cam bench`` reports.

Both writers keep the head (pooling + linear layer) in float32 and write a contract file whose metadata is
the source model's, so the runtime cannot tell them apart from the fp32 file except by speed. Only onnx,
onnxruntime and numpy are needed (plus onnxconverter-common for float16); never torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, version_converter
from onnxruntime import quantization as ortq

from realtime_cam.contract import (
    FEATURES,
    HEAD_BIAS_COPY,
    HEAD_WEIGHT_COPY,
    LOGITS,
    PREFIX,
    ModelInfo,
    read_contract,
    write_contract,
)
from realtime_cam.errors import CamError, ExportError, SourceError
from realtime_cam.fidelity import fidelity, format_fidelity
from realtime_cam.images import IMAGE_EXTENSIONS
from realtime_cam.model import CamModel
from realtime_cam.preprocess import Preprocessor, as_bgr
from realtime_cam.sources import VIDEO_EXTENSIONS, open_source

from .checks import cpu_session, float_tolerance, replace_atomically

__all__ = [
    "CALIBRATIONS",
    "DEFAULT_CALIBRATION",
    "Fp16Report",
    "QuantReport",
    "convert_fp16",
    "fidelity",
    "format_fidelity",
    "quantize_int8",
    "sample_frames",
]

Sources = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are chosen from the calibration frames.

    Attributes:
        method: the name of an ``onnxruntime.quantization.CalibrationMethod``.
        options: ``extra_options`` for ``quantize_static`` (its ``Calib*`` keys).
        summary: one line for the CLI's help.
    """

    method: str
    options: tuple[tuple[str, object], ...] = ()
    summary: str = ""


# One line per calibration; the CLI's choices read this.
CALIBRATIONS: dict[str, Calibration] = {
    "minmax": Calibration("MinMax", (), "the full range seen on the calibration frames"),
    # onnxruntime's percentile default makes the range symmetric around 0, which wastes half of a uint8
    # range on post-ReLU tensors; the plain (asymmetric) percentile keeps the zero point where it belongs.
    "percentile": Calibration(
        "Percentile", (("CalibPercentile", 99.99), ("CalibTensorRangeSymmetric", False)),
        "clip each range at the 99.99th percentile of the values seen",
    ),
    "entropy": Calibration("Entropy", (), "the range that minimises KL divergence of the histogram"),
}
DEFAULT_CALIBRATION = "percentile"

_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "MatMulInteger",
                  "ConvInteger"}

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
        excluded_nodes: the nodes left in float32 (the head: pooling and the linear layer).
        fidelity: :func:`fidelity` of the int8 model against the fp32 one on the check frames, or None
            when no check set was given.
    """

    path: Path
    calibration_frames: int
    calibration_sources: tuple[str, ...]
    method: str
    activation_type: str
    excluded_nodes: tuple[str, ...]
    fidelity: dict | None = None


@dataclass(frozen=True)
class Fp16Report:
    """What :func:`convert_fp16` wrote and how its check went.

    Attributes:
        path: the float16 contract file.
        checked_inputs: how many seeded synthetic images the fp16 model was compared with the fp32 one on.
        top1_agreement_pct: how often their top-1 classes agreed on those (a synthetic image's top classes
            are often near-ties, so only ``fidelity`` on real frames says much).
        logits_max_abs_diff: the largest |fp16 logit - fp32 logit| on those inputs.
        logits_bound: what that difference was allowed to be.
        fidelity: :func:`fidelity` against the fp32 file on the check frames, or None when none were given.
    """

    path: Path
    checked_inputs: int
    top1_agreement_pct: float
    logits_max_abs_diff: float
    logits_bound: float
    fidelity: dict | None = None


# ----------------------------------------------------------------------------- frames
def sample_frames(sources: Sources, max_frames: int) -> Iterator[np.ndarray]:
    """Up to ``max_frames`` BGR frames spread evenly over image files, video files and folders of either.

    The budget is shared out evenly between the sources (a folder's images are one source, each of its videos
    another); images are planned first, so what a source with few frames leaves over goes to the videos. A
    video's frames are counted by decoding it (containers' frame counts are not trusted), then the chosen
    ones are read in a second pass.
    The sources are all opened and checked before this returns; the frames are read lazily.

    Raises:
        SourceError: a missing, unreadable or empty source, a folder without images or videos, or a live source
            (webcams and streams have no end to spread frames over).
    """
    if max_frames < 1:
        raise SourceError(f"need at least one frame to sample, got max_frames={max_frames}")
    specs = _as_specs(sources)
    images: list[list[str]] = []
    videos: list[tuple[str, int | None]] = []  # (file, frames; None until counted)
    for spec in specs:
        path = Path(spec)
        if not path.exists():
            raise SourceError(f"source not found: {spec}")
        if path.is_dir():  # its images are one source, each of its videos another
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            pictures = [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            clips = [str(p) for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
            if not pictures and not clips:
                raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or videos "
                                  f"({', '.join(sorted(VIDEO_EXTENSIONS))}) in the folder {spec}")
            if pictures:
                images.append(pictures)
            videos.extend((clip, None) for clip in clips)  # counted when the budget reaches them
            continue
        with open_source(spec) as source:  # reads the first frame: a bad file fails here
            if source.live:
                raise SourceError(f"{spec} is a live source; sample frames from image or video files")
            if source.kind == "image":
                images.append([spec])
            else:
                videos.append((spec, sum(1 for _ in source)))

    budget, left = max_frames, len(images) + len(videos)
    chosen_images: list[str] = []
    for files in images:
        picked = _spread(len(files), -(-budget // left))  # a fair share, rounded up: never over budget
        chosen_images.extend(files[i] for i in picked)
        budget, left = budget - len(picked), left - 1
    chosen_videos: list[tuple[str, list[int]]] = []
    for spec, count in videos:
        if budget <= 0:
            break
        picked = _spread(count if count is not None else _count_frames(spec), -(-budget // left))
        if picked:
            chosen_videos.append((spec, picked))
        budget, left = budget - len(picked), left - 1
    # Decode every chosen image now, so that a corrupt file is an error here rather than mid-calibration.
    for file in chosen_images:
        with open_source(file):
            pass
    return _read_frames(chosen_images, chosen_videos)


def _count_frames(video: str) -> int:
    """A video's frames, by decoding it (containers' frame counts are not trusted)."""
    with open_source(video) as source:  # reads the first frame: a bad file fails here
        return sum(1 for _ in source)


def _as_specs(sources: Sources) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        return [os.fspath(sources)]
    specs = [os.fspath(s) for s in sources]
    if not specs:
        raise SourceError("no frame sources given")
    return specs


def _spread(count: int, take: int) -> list[int]:
    """``take`` indices in 0..count-1, evenly spread and including both ends (all of them if count <= take)."""
    if count <= take:
        return list(range(count))
    if take <= 0:
        return []
    if take == 1:
        return [count // 2]
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, take)})


def _read_frames(images: list[str], videos: list[tuple[str, list[int]]]) -> Iterator[np.ndarray]:
    for file in images:
        with open_source(file) as source:
            for frame in source:
                yield frame.image_bgr
    for spec, indices in videos:
        wanted = set(indices)
        last = max(indices, default=-1)
        with open_source(spec) as source:
            for frame in source:
                if frame.index in wanted:
                    yield frame.image_bgr
                if frame.index >= last:
                    break


def _describe(specs: list[str]) -> str:
    names = [Path(s).name + ("/" if Path(s).is_dir() else "") for s in specs]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


# ----------------------------------------------------------------------------- graph helpers
def _load_contract(path: str | os.PathLike) -> tuple[onnx.ModelProto, ModelInfo, np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no model file at {path}")
    try:
        model = onnx.load(str(path))
        info, weight, bias = read_contract(model)
    except CamError as exc:
        raise ExportError(f"{path.name}: {exc}") from None
    except Exception as exc:  # protobuf DecodeError, OSError, ...: not an ONNX file
        raise ExportError(f"cannot read {path} as an ONNX model ({str(exc).splitlines()[0][:200]})") from None
    _require_float32(model, path.name)
    return model, info, weight, bias


def _require_float32(model: onnx.ModelProto, name: str) -> None:
    """Refuse a model that is already quantized or float16: this module starts from the fp32 file."""
    quantized = sorted({n.op_type for n in model.graph.node
                        if n.op_type in _QUANTIZED_OPS or n.op_type.startswith("QLinear")})
    if quantized:
        raise ExportError(f"{name} is already quantized ({', '.join(quantized)}); give the float32 contract file")
    if any(init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for init in model.graph.initializer):
        raise ExportError(f"{name} already holds float16 weights; give the float32 contract file")


def _head_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices of the nodes between ``features`` and ``logits``: the pooling, glue and the linear layer."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}

    def upstream(tensor: str) -> set[int]:
        nodes: set[int] = set()
        stack = [tensor]
        while stack:
            i = producer.get(stack.pop())
            if i is not None and i not in nodes:
                nodes.add(i)
                stack.extend(name for name in graph.node[i].input if name)
        return nodes

    return sorted(upstream(LOGITS) - upstream(FEATURES))


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


def _drop_unused_head_copies(model: onnx.ModelProto) -> None:
    """Remove the contract's head copies when no node reads them; write_contract adds them again as float32."""
    used = {name for node in model.graph.node for name in node.input}
    for i in range(len(model.graph.initializer) - 1, -1, -1):
        name = model.graph.initializer[i].name
        if name in (HEAD_WEIGHT_COPY, HEAD_BIAS_COPY) and name not in used:
            del model.graph.initializer[i]
    for i in range(len(model.graph.input) - 1, -1, -1):
        if model.graph.input[i].name in (HEAD_WEIGHT_COPY, HEAD_BIAS_COPY):
            del model.graph.input[i]


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


def _keep_metadata(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give ``model`` the source model's metadata other than the contract's (write_contract adds that)."""
    del model.metadata_props[:]
    model.metadata_props.extend(p for p in source.metadata_props if not p.key.startswith(PREFIX))
    model.doc_string = source.doc_string


def _check_outputs(path: Path, batches: list[np.ndarray], weight: np.ndarray, bias: np.ndarray,
                   what: str) -> list[np.ndarray]:
    """Check a written file: onnx.checker, float32 ``logits`` and ``features``, and a float head.

    Returns:
        The logits for each batch.
    """
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the {what} model: {str(exc).splitlines()[0]}") from None
    session = cpu_session(path, "the converted model")
    declared = [(o.name, o.type) for o in session.get_outputs()[:2]]
    if declared != [(LOGITS, "tensor(float)"), (FEATURES, "tensor(float)")]:
        raise ExportError(f"the {what} model's outputs are {declared}, not float logits and features; "
                          "this is a bug in realtime-cam")
    name = session.get_inputs()[0].name
    all_logits = []
    for batch in batches:
        logits, features = session.run([LOGITS, FEATURES], {name: batch})
        # The head stayed float32, so the map must explain the logits to float rounding, as in the fp32 file.
        predicted = features.astype(np.float64).mean(axis=(2, 3)) @ weight.T.astype(np.float64) + bias
        error = float(np.abs(predicted - logits).max())
        if error > float_tolerance(logits):
            raise ExportError(f"the {what} model's W @ mean(features) + b misses its logits by {error:.3g}; "
                              "this is a bug in realtime-cam")
        all_logits.append(logits)
    return all_logits


# ----------------------------------------------------------------------------- int8
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
    with tempfile.TemporaryDirectory(prefix="realtime_cam_int8_") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(model, str(prepared))
        try:
            # Shape inference lets the quantizer see every tensor's type and shape; its graph optimisation
            # folds constants (and any BatchNormalization left in the graph) before ranges are measured.
            ortq.quant_pre_process(str(prepared), str(prepared))
        except Exception as exc:  # noqa: BLE001 - a model it cannot optimise is still quantizable as is
            log(f"note: onnxruntime's quantization pre-processing failed ({str(exc).splitlines()[0][:200]}); "
                "quantizing the model as it is")
            onnx.save(model, str(prepared))
        model = onnx.load(str(prepared))
        excluded = _name_nodes(model.graph, _head_nodes(model.graph))
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
    max_frames: int = 200,
    method: str = DEFAULT_CALIBRATION,
    activation_type: str = "uint8",
    check: Sources | None = None,
    check_frames: int = 100,
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
        check: frames NOT used for calibration to measure :func:`fidelity` on right away (optional).
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
    source_model, info, weight, bias = _load_contract(fp32_path)

    try:
        specs = _as_specs(calibrate)
        frames = sample_frames(specs, max_frames)
    except SourceError as exc:
        raise ExportError(f"calibration source: {exc}") from None
    try:
        check_iter = sample_frames(check, check_frames) if check is not None else None
    except SourceError as exc:
        raise ExportError(f"check source: {exc}") from None
    preprocess = Preprocessor(info.input_size_hw, info.mean, info.std, info.channel_order)
    try:
        inputs = [preprocess(as_bgr(frame)).copy() for frame in frames]
    except SourceError as exc:  # a video that stops decoding half-way
        raise ExportError(f"calibration source: {exc}") from None
    overlap = {str(Path(s).resolve()) for s in specs} & {str(Path(s).resolve()) for s in _as_specs(check)} \
        if check is not None else set()
    if overlap:
        log(f"warning: {', '.join(sorted(overlap))} is both calibration and check data; "
            "the fidelity measured on it flatters the int8 model")
    described = _describe(specs)
    log(f"calibrating {fp32_path.name} on {len(inputs)} frames of {described} ({method})")

    model = _at_least_opset(source_model, _PER_CHANNEL_OPSET, fp32_path.name)
    _drop_unused_head_copies(model)
    model, excluded = _quantize_graph(model, inputs, CALIBRATIONS[method], activation, log)

    note = (f"int8 QDQ per-channel ({activation_type} activations, {method} calibration), "
            f"calibrated on {len(inputs)} frames of {described}")
    info = dataclasses.replace(info, source=f"{info.source}; {note}" if info.source else note)
    _keep_metadata(model, source_model)
    write_contract(model, info, weight, bias)
    replace_atomically(model, output, lambda saved: _check_outputs(saved, inputs[:2], weight, bias, "int8"))
    log(f"wrote {output} ({note}); head {', '.join(excluded)} kept float32")

    result = None
    if check_iter is not None:
        result = fidelity(CamModel(fp32_path, device="cpu"), CamModel(output, device="cpu"), check_iter)
        log(f"int8 vs fp32: {format_fidelity(result)}")
    return QuantReport(
        path=output, calibration_frames=len(inputs), calibration_sources=tuple(specs), method=method,
        activation_type=activation_type, excluded_nodes=tuple(excluded), fidelity=result,
    )


# ----------------------------------------------------------------------------- float16
# float16's real limits (smallest subnormal, largest finite); onnxconverter-common's defaults (1e-7, 1e4)
# would clamp any constant above 1e4.
_FP16_TINY = 5.96e-08
_FP16_MAX = 65504.0


def _float16_converter() -> Callable[..., onnx.ModelProto]:
    try:
        from onnxconverter_common import float16  # noqa: PLC0415 - optional, only this command needs it
    except ImportError:
        raise ExportError("float16 conversion needs onnxconverter-common: pip install onnxconverter-common") from None
    return float16.convert_float_to_float16


def _to_fp16_with_fp32_head(model: onnx.ModelProto, convert: Callable[..., onnx.ModelProto]) -> onnx.ModelProto:
    """Convert the backbone (everything up to ``features``) to float16; put the float32 head back on top.

    onnxconverter-common's ``node_block_list`` would keep the head's nodes in float32 but casts every
    tensor between two of them through float16 and leaves ``logits`` typed float16; so the head is taken
    off, the backbone converted with float32 input and ``features``, and the original head re-attached to
    float32 casts of the tensors it reads.
    """
    graph = model.graph
    head_index = set(_head_nodes(graph))
    head = [graph.node[i] for i in sorted(head_index)]
    body = [node for i, node in enumerate(graph.node) if i not in head_index]
    head_outputs = {name for node in head for name in node.output}
    head_inputs = list(dict.fromkeys(name for node in head for name in node.input if name))
    body_inputs = {name for node in body for name in node.input}
    initializers = {init.name: init for init in graph.initializer}
    head_only = [initializers[n] for n in head_inputs if n in initializers and n not in body_inputs]
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})

    backbone = onnx.ModelProto()
    backbone.CopyFrom(model)
    backbone.graph.ClearField("node")
    backbone.graph.node.extend(body)
    dropped = {init.name for init in head_only}
    kept = [init for init in model.graph.initializer if init.name not in dropped]
    backbone.graph.ClearField("initializer")
    backbone.graph.initializer.extend(kept)
    keep_info = [vi for vi in model.graph.value_info if vi.name not in head_outputs]
    backbone.graph.ClearField("value_info")
    backbone.graph.value_info.extend(keep_info)
    outputs = [o for o in model.graph.output if o.name != LOGITS]
    backbone.graph.ClearField("output")
    backbone.graph.output.extend(outputs)
    converted = convert(backbone, min_positive_val=_FP16_TINY, max_finite_val=_FP16_MAX, keep_io_types=True)

    # What the head reads from the backbone (the map, and any shared constant) it now reads in float32.
    converted_inits = {init.name: init for init in converted.graph.initializer}
    rename: dict[str, str] = {}
    casts = []
    for name in head_inputs:
        if name in head_outputs or name in dropped or types.get(name) != TensorProto.FLOAT:
            continue
        if name == FEATURES or name in {i.name for i in converted.graph.input}:
            continue  # float32 already: keep_io_types keeps the graph's inputs and outputs float32
        rename[name] = f"{name}_float32"
        if name in converted_inits:
            converted.graph.initializer.append(_renamed_copy(initializers[name], rename[name]))
        else:
            casts.append(helper.make_node("Cast", [name], [rename[name]], to=TensorProto.FLOAT,
                                          name=f"realtime_cam_{name}_to_float32"))
    attached = []
    for node in head:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            copy.input[i] = rename.get(name, name)
        attached.append(copy)
    converted.graph.initializer.extend(head_only)
    converted.graph.node.extend([*casts, *attached])
    features = [o for o in converted.graph.output if o.name == FEATURES]
    others = [o for o in converted.graph.output if o.name != FEATURES]
    logits = [o for o in model.graph.output if o.name == LOGITS]
    converted.graph.ClearField("output")
    converted.graph.output.extend([*logits, *features, *others])
    return converted


def _renamed_copy(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """A copy of an initializer under another name."""
    copy = onnx.TensorProto()
    copy.CopyFrom(init)
    copy.name = name
    return copy


def _test_inputs(info: ModelInfo, count: int) -> list[np.ndarray]:
    """Seeded smooth random images (colour blobs, not white noise), preprocessed as the runtime does."""
    rng = np.random.default_rng(0)
    preprocess = Preprocessor(info.input_size_hw, info.mean, info.std, info.channel_order)
    h, w = info.input_size_hw
    return [
        preprocess(cv2.resize(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8), (w, h),
                              interpolation=cv2.INTER_CUBIC)).copy()
        for _ in range(count)
    ]


def convert_fp16(
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    check: Sources | None = None,
    check_frames: int = 100,
    log: Callable[[str], None] = print,
) -> Fp16Report:
    """Convert a contract file to float16 for the CUDA provider, keeping float32 inputs and outputs.

    The backbone runs in float16 (onnxconverter-common's ``convert_float_to_float16`` with
    ``keep_io_types``); the head (pooling and linear layer) stays float32, so the file's head W, b (the
    fp32 file's, float32) explain its logits exactly. The result is checked in ONNX Runtime's CPU provider
    (which runs float16 nodes through inserted casts: correct, slow) against the fp32 file.

    Args:
        fp32_path: the float32 contract file.
        output: where to write the float16 contract file (written to a temporary name, checked, renamed).
        check: frames to measure :func:`fidelity` on right away, in the CPU provider (optional).
        check_frames: at most this many check frames.
        log: where the human-readable summary lines go.

    Raises:
        ExportError: a model that is not a contract file, onnxconverter-common missing, or a converted
            model that fails its checks.
    """
    fp32_path, output = Path(fp32_path), Path(output)
    source_model, info, weight, bias = _load_contract(fp32_path)
    convert = _float16_converter()
    try:
        check_iter = sample_frames(check, check_frames) if check is not None else None
    except SourceError as exc:
        raise ExportError(f"check source: {exc}") from None
    model = onnx.ModelProto()
    model.CopyFrom(source_model)
    _drop_unused_head_copies(model)
    try:
        with warnings.catch_warnings(record=True) as clamped:
            warnings.simplefilter("always")
            model = _to_fp16_with_fp32_head(model, convert)
    except Exception as exc:  # noqa: BLE001 - the converter raises ValueError, KeyError, ... on odd graphs
        raise ExportError(f"float16 conversion of {fp32_path.name} failed ({str(exc).splitlines()[0][:200]})") from None
    if clamped:
        log(f"{len(clamped)} weights outside float16's range (magnitudes {_FP16_TINY:g} to {_FP16_MAX:g}) "
            "were clamped into it")
    _keep_metadata(model, source_model)
    note = "float16 (float32 input, outputs and head)"
    info = dataclasses.replace(info, source=f"{info.source}; {note}" if info.source else note)
    write_contract(model, info, weight, bias)

    inputs = _test_inputs(info, 4)
    reference = cpu_session(fp32_path, "the fp32 model")
    name = reference.get_inputs()[0].name
    expected = [reference.run([LOGITS], {name: x})[0] for x in inputs]

    def verify(saved: Path) -> tuple[float, float, float]:
        got = _check_outputs(saved, inputs, weight, bias, "float16")
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        # float16 keeps 11 significant bits; through a deep network the logits drift by a few per mille of
        # their scale. 2% of the largest logit flags a broken conversion (overflow, underflow), not rounding.
        bound = 0.02 * max(1.0, max(float(np.abs(e).max()) for e in expected))
        if diff > bound:
            raise ExportError(f"the float16 model's logits differ from the fp32 model's by {diff:.3g} "
                              f"(allowed {bound:.3g}); the network overflows or underflows in float16")
        agree = [int(np.argmax(g)) == int(np.argmax(e)) for g, e in zip(got, expected, strict=True)]
        return diff, bound, 100.0 * sum(agree) / len(agree)

    diff, bound, agreement = replace_atomically(model, output, verify)
    log(f"wrote {output} ({note}); on {len(inputs)} test images its logits are within {diff:.3g} of the "
        f"fp32 model's (allowed {bound:.3g}), top-1 agreement {agreement:.0f}%")
    result = None
    if check_iter is not None:
        result = fidelity(CamModel(fp32_path, device="cpu"), CamModel(output, device="cpu"), check_iter)
        log(f"float16 vs fp32: {format_fidelity(result)}")
    return Fp16Report(path=output, checked_inputs=len(inputs), top1_agreement_pct=agreement,
                      logits_max_abs_diff=diff, logits_bound=bound, fidelity=result)
