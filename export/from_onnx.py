"""Rewrite an existing ONNX image classifier whose head is global average pooling + one linear layer.

The head is found by reading the graph backwards from its output, whatever names the model uses:

    pool      GlobalAveragePool, ReduceMean over the spatial axes, an AveragePool whose kernel covers the
              whole map, or QLinearGlobalAveragePool / QLinearAveragePool [com.microsoft]
    (glue)    Flatten / Reshape / Squeeze / Identity / Dropout, QuantizeLinear / DequantizeLinear
    linear    Gemm, MatMul, a 1x1 Conv, QLinearMatMul, QGemm [com.microsoft] or QLinearConv
    (bias)    Add or QLinearAdd [com.microsoft] of a constant, plus glue
    (softmax) an optional Softmax / LogSoftmax / QLinearSoftmax [com.microsoft]: the logits are its input

The original graph is kept; the pre-pooling map and the logits become the outputs ``features`` and
``logits`` and the head (W [K, C], b [K]) is dequantized to float32. Anything else is refused with an
:class:`ExportError` naming the ops found, because a head that is not linear in the pooled features has no
class activation map: a silently wrong map is worse than none. Only onnx, onnxruntime and numpy are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper, shape_inference
from realtime_cam.contract import (
    FEATURES,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    LOGITS,
    ModelInfo,
    default_labels,
    read_contract,
    write_contract,
)
from realtime_cam.errors import CamError, ExportError

from .checks import cpu_session, float_tolerance, replace_atomically

__all__ = ["RewriteReport", "rewrite_onnx_classifier"]

# How far back from the output the head search looks; heads are a handful of ops, this only bounds the
# walk through models that have no pooling at all.
_MAX_WALK = 64
_TEST_SEED = 0

_MS = "com.microsoft"
_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool", "QLinearGlobalAveragePool", "QLinearAveragePool"}
_QUANTIZED_POOLS = {"QLinearGlobalAveragePool", "QLinearAveragePool"}
_GLUE = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_LINEAR = {"Gemm", "MatMul", "Conv", "QLinearMatMul", "QGemm", "QLinearConv"}
_BIAS = {"Add", "QLinearAdd"}
_SOFTMAX = {"Softmax", "LogSoftmax", "QLinearSoftmax"}
_MS_OPS = {"QLinearGlobalAveragePool", "QLinearAveragePool", "QGemm", "QLinearAdd", "QLinearSoftmax"}
_QUANTIZED_OPS = _QDQ | _MS_OPS | {"QLinearMatMul", "QLinearConv"}
# (tensor, the node producing it) from the graph output backwards; (shape, ONNX elem type) per tensor.
_Path = list[tuple[str, "onnx.NodeProto | None"]]
_Shapes = dict[str, tuple[tuple[int, ...], int]]
_NEEDS = ("global average pooling followed by exactly one linear layer (Gemm, MatMul(+Add) or 1x1 Conv), "
          "optionally a Softmax")


@dataclass(frozen=True)
class RewriteReport:
    """What a rewrite wrote and how well it checks out.

    Attributes:
        path: the contract file written.
        num_classes: K, the number of logits.
        feature_shape_chw: (C, h, w) of the ``features`` output at the model's input size.
        head_kind: the head's ops from the pooling to the output, e.g. "GlobalAveragePool -> Flatten -> Gemm".
        quantized: whether the head computes on quantized tensors (its map then matches only up to rounding).
        logits_max_abs_diff: max |rewritten logits - original model's logits| on the test input (should be 0).
        head_max_abs_error: max |W @ mean_hw(features) + b - logits| on the test input.
        head_error_bound: the bound that error was checked against.
    """

    path: Path
    num_classes: int
    feature_shape_chw: tuple[int, int, int]
    head_kind: str
    quantized: bool
    logits_max_abs_diff: float
    head_max_abs_error: float
    head_error_bound: float


@dataclass
class _Head:
    """What the backward walk found (internal, filled in while parsing)."""

    logits: str                      # tensor holding the logits in the original graph
    logits_quant: tuple[str, str] | None  # (scale, zero point) names when ``logits`` is quantized
    features: str                    # the pooling's input tensor
    feature_quant: tuple[str, str] | None  # (scale, zero point) names when ``features`` is quantized
    weight: np.ndarray               # [K, C] float64
    bias: np.ndarray                 # [K] float64
    ops: list[str]                   # op types from the pooling to the output
    quantized: bool
    # Requantization steps (largest scale of each) before and after the linear layer; they bound how far
    # W @ GAP(features) + b may be from the quantized model's logits.
    requant_before: list[float] = field(default_factory=list)
    requant_after: list[float] = field(default_factory=list)


def rewrite_onnx_classifier(
    src: str | Path,
    output: str | Path,
    *,
    labels_path: str | None = None,
    input_size_hw: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bgr: bool = False,
    log: Callable[[str], None] = print,
) -> RewriteReport:
    """Rewrite an ONNX classifier with a GAP + linear head (float or quantized) into a contract file.

    Args:
        src: the classifier (.onnx); it is read, never modified.
        output: where to write the contract file (written to a temporary name, then renamed).
        labels_path: class names, one per line (default: ImageNet-1k for 1000 classes, else numbered).
        input_size_hw: the input size, needed when the model's input height/width are not fixed.
        mean: per-channel mean on the 0..1 scale in the model's channel order (default ImageNet's).
        std: per-channel std on the 0..1 scale in the model's channel order (default ImageNet's).
        bgr: the model takes BGR input (the ImageNet defaults are then given in BGR order).
        log: where the human-readable summary lines go.

    Returns:
        A :class:`RewriteReport` with the head found and the measured differences.

    Raises:
        ExportError: an unreadable model, a head that is not GAP + linear, a missing input size, or a
            rewritten model that does not reproduce the original.
    """
    src = Path(src)
    model = _load(src)
    graph = model.graph
    original_bytes = model.SerializeToString()

    image_input = _image_input(graph, src)
    size_hw = _input_size(image_input, input_size_hw, src)
    order = "BGR" if bgr else "RGB"
    # ModelInfo keeps mean/std in the model's channel order, so the ImageNet defaults flip for BGR models.
    mean_t = tuple(float(v) for v in (mean if mean is not None else IMAGENET_MEAN_RGB[:: -1 if bgr else 1]))
    std_t = tuple(float(v) for v in (std if std is not None else IMAGENET_STD_RGB[:: -1 if bgr else 1]))
    if len(mean_t) != 3 or len(std_t) != 3 or min(std_t) <= 0:
        raise ExportError(f"mean and std need three values each, std positive; got {list(mean_t)}, {list(std_t)}")

    batch_dim = image_input.type.tensor_type.shape.dim[0]
    batches = [batch_dim.dim_value] if batch_dim.HasField("dim_value") and batch_dim.dim_value > 0 else [1, 2]
    tests = [_test_input(n, size_hw, mean_t, std_t) for n in batches]

    if len(graph.output) > 1:
        log(f"{src.name}: using its first output {graph.output[0].name!r}; the others are dropped")
    index = _Index(graph)
    path = _data_path(index, graph.output[0].name)
    shapes = _shapes(model, path, image_input.name, tests[0], src)
    head = _parse_head(index, path, shapes, src)

    num_classes, channels = head.weight.shape
    features_shape = shapes[head.features][0]
    logits_shape = shapes[head.logits][0]
    if features_shape[1] != channels or logits_shape[-1] != num_classes or math.prod(logits_shape[1:]) != num_classes:
        raise ExportError(
            f"{src.name}: the head found ({' -> '.join(head.ops)}) has W {list(head.weight.shape)} but the map "
            f"'{head.features}' is {list(features_shape)} and the output '{head.logits}' is {list(logits_shape)}"
        )
    feature_chw = (int(features_shape[1]), int(features_shape[2]), int(features_shape[3]))
    head_kind = " -> ".join(head.ops)
    log(f"{src.name}: head {head_kind}; features '{head.features}' "
        f"[{feature_chw[0]}x{feature_chw[1]}x{feature_chw[2]}], {num_classes} classes"
        + (" (quantized)" if head.quantized else ""))

    original = _original_logits(original_bytes, head, index, image_input.name, tests, src)
    input_dims = image_input.type.tensor_type.shape.dim
    fixed_hw = all(d.HasField("dim_value") and d.dim_value > 0 for d in input_dims[2:])
    _rewire(model, head, image_input, feature_chw, num_classes, len(logits_shape), fixed_hw=fixed_hw)

    try:
        info = ModelInfo(labels=default_labels(num_classes, labels_path), input_size_hw=size_hw, mean=mean_t,
                         std=std_t, channel_order=order, source=f"{src.name} rewritten by realtime-cam ({head_kind})")
    except CamError as exc:
        raise ExportError(str(exc)) from None
    weight32, bias32 = head.weight.astype(np.float32), head.bias.astype(np.float32)
    write_contract(model, info, weight32, bias32)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the rewritten {src.name}: {str(exc).splitlines()[0]}") from None

    diff, err, bound = _check(model, head, image_input.name, tests, original, src)
    if head.quantized:  # the contract keeps 0 for float heads
        write_contract(model, dataclasses.replace(info, head_tolerance=err), weight32, bias32)

    def verify(saved: Path) -> None:
        try:
            onnx.checker.check_model(str(saved))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the saved {saved}: {str(exc).splitlines()[0]}") from None

    replace_atomically(model, Path(output), verify)
    log(f"check on seeded random input (batch {', '.join(map(str, batches))}): logits equal the original "
        f"model's to {diff:.3g}; W @ mean(features) + b reproduces them to {err:.3g} (allowed {bound:.3g})")
    return RewriteReport(
        path=Path(output), num_classes=int(num_classes), feature_shape_chw=feature_chw, head_kind=head_kind,
        quantized=head.quantized, logits_max_abs_diff=diff, head_max_abs_error=err, head_error_bound=bound,
    )


# ----------------------------------------------------------------------------- reading the model
def _load(src: Path) -> onnx.ModelProto:
    if not src.is_file():
        raise ExportError(f"no ONNX model at {src}")
    try:
        return onnx.load(str(src))
    except (DecodeError, OSError, ValueError) as exc:  # not protobuf, or external data missing
        raise ExportError(f"cannot read {src} as an ONNX model ({str(exc).splitlines()[0][:200]})") from None


def _image_input(graph: onnx.GraphProto, src: Path) -> onnx.ValueInfoProto:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{src.name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                          "an image classifier with one image input is needed")
    image = inputs[0]
    tensor = image.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT:
        raise ExportError(f"{src.name}: input '{image.name}' is "
                          f"{TensorProto.DataType.Name(tensor.elem_type)}, not float32 [N, 3, H, W]")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise ExportError(f"{src.name}: input '{image.name}' has shape {_fmt_dims(dims)}, not [N, 3, H, W] "
                          "(channels-last models are not supported)")
    return image


def _input_size(image: onnx.ValueInfoProto, asked: tuple[int, int] | None, src: Path) -> tuple[int, int]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim]
    h, w = dims[2], dims[3]
    if h and w:
        if asked is not None and tuple(asked) != (h, w):
            raise ExportError(f"{src.name} takes {h}x{w} input; the input size {asked[0]}x{asked[1]} "
                              "asked for does not fit it")
        return int(h), int(w)
    if asked is None:
        raise ExportError(f"{src.name}: input '{image.name}' {_fmt_dims(dims)} has no fixed height/width; "
                          "give the size it expects with --input-size H W")
    return int(asked[0]), int(asked[1])


def _fmt_dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _test_input(n: int, size_hw: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Seeded uniform pixels in 0..1, normalised like real input: the range the quantizers were set for."""
    pixels = np.random.default_rng(_TEST_SEED).random((n, 3, *size_hw), dtype=np.float32)
    return ((pixels - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]).astype(np.float32)


class _Index:
    """Producers, initializers and constant folding over one graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self._values: dict[str, np.ndarray | None] = {}

    def is_const(self, name: str) -> bool:
        if not name:
            return False
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        if node is None:
            return False
        if node.op_type == "Constant":
            return True
        if node.op_type in ("Identity", "Cast", "Transpose", "DequantizeLinear"):
            return all(self.is_const(i) for i in node.input if i)
        return False

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of a tensor (initializer, Constant, or DequantizeLinear/Cast/... of those)."""
        if name not in self._values:
            self._values[name] = self._fold(name) if self.is_const(name) else None
        return self._values[name]

    def _fold(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer[name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            for key, value in attrs.items():
                if key == "value":
                    return numpy_helper.to_array(value)
                if key in ("value_float", "value_floats"):
                    return np.asarray(value, np.float32)
                if key in ("value_int", "value_ints"):
                    return np.asarray(value, np.int64)
            return None
        inputs = [self.value(i) if i else None for i in node.input]
        if node.op_type == "Identity":
            return inputs[0]
        if node.op_type == "Cast":
            return inputs[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        if node.op_type == "Transpose":
            return np.transpose(inputs[0], attrs.get("perm"))
        zero_point = inputs[2] if len(inputs) > 2 else None
        return _dequantize(inputs[0], inputs[1], zero_point, attrs.get("axis", 1), attrs.get("block_size", 0))

    def scale(self, name: str) -> float:
        value = self.value(name)
        if value is None:
            raise ExportError(f"the quantization scale '{name}' is not a constant")
        return float(np.abs(value).max())


def _dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
                block_size: int = 0) -> np.ndarray:
    """DequantizeLinear in float64: per-tensor, per-axis (1-D scale) or blocked (block_size > 0)."""
    x = x.astype(np.float64)
    scale = np.asarray(scale, np.float64)
    zp = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point, np.float64)
    if scale.size == 1 and block_size == 0:
        return (x - zp.reshape(())) * scale.reshape(())
    axis = axis % x.ndim
    if block_size > 0:
        scale = np.repeat(scale, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        zp = zp if zp.size == 1 else np.repeat(zp, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        return (x - zp) * scale
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape if zp.size > 1 else ())) * scale.reshape(shape)


def _data_input(index: _Index, node: onnx.NodeProto) -> tuple[int, str] | None:
    """The input a node's activation flows through: its first non-constant input."""
    for i, name in enumerate(node.input):
        if name and not index.is_const(name):
            return i, name
    return None


def _data_path(index: _Index, output: str) -> _Path:
    """(tensor, its producer) from the output backwards along the activation, at most _MAX_WALK ops."""
    path: _Path = []
    tensor: str | None = output
    while tensor is not None and len(path) <= _MAX_WALK:
        node = index.producer.get(tensor)
        path.append((tensor, node))
        found = _data_input(index, node) if node is not None else None
        tensor = found[1] if found else None
    return path


def _shapes(model: onnx.ModelProto, path: _Path, input_name: str, x: np.ndarray, src: Path) -> _Shapes:
    """(shape, elem type) of the tensors on the path: from shape inference, else from one onnxruntime run.

    The contrib ops of QOperator models (QLinearGlobalAveragePool, QLinearAdd, QGemm) are unknown to
    onnx's shape inference, and a Reshape's target is often computed from Shape; running the model once is
    the reliable way to know those. Batch dims come out as the test batch.
    """
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
        infos = {v.name: v for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    except (shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError):
        # inference is only a shortcut: the probe below covers whatever it cannot do
        infos = {}
    shapes: _Shapes = {}
    missing = []
    for tensor, _ in path:
        if tensor == input_name:
            shapes[tensor] = (x.shape, TensorProto.FLOAT)
            continue
        info = infos.get(tensor)
        tt = info.type.tensor_type if info is not None else None
        dims = None
        if tt is not None and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if dims is None or not tt.elem_type or any(d is None for d in dims[1:]):
            missing.append(tensor)
        else:
            shapes[tensor] = ((x.shape[0], *dims[1:]) if dims else (), tt.elem_type)
    if missing:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in missing if t not in known)
        session = cpu_session(probe.SerializeToString(), src.name)
        try:
            values = session.run(missing, {input_name: x})
        except Exception as exc:  # noqa: BLE001 - re-raised; onnxruntime raises its own Fail/InvalidArgument types
            raise ExportError(f"onnxruntime cannot run {src.name}: {str(exc).splitlines()[0][:300]}") from None
        for tensor, value in zip(missing, values, strict=True):
            shapes[tensor] = (tuple(value.shape), helper.np_dtype_to_tensor_dtype(value.dtype))
    return shapes


# ----------------------------------------------------------------------------- finding the head
def _op(node: onnx.NodeProto) -> str:
    """The op type, with ops of an unexpected domain marked so they never match the tables."""
    domain = node.domain or ""
    if node.op_type in _MS_OPS:
        return node.op_type if domain == _MS else f"{domain}:{node.op_type}"
    if domain in ("", "ai.onnx") or (domain == _MS and node.op_type in _QDQ):
        return node.op_type
    return f"{domain}:{node.op_type}"


def _is_spatial(shapes: _Shapes, tensor: str) -> bool:
    shape = shapes.get(tensor, ((), 0))[0]
    return len(shape) == 4 and shape[2] * shape[3] > 1


def _parse_head(index: _Index, path: _Path, shapes: _Shapes, src: Path) -> _Head:
    """Find pooling -> linear -> (bias) -> (softmax) after the last spatial map, or raise naming what is there."""
    # Walk back to the last spatial (4-D, more than 1x1) tensor: the ops after it must be the head.
    chain: list[onnx.NodeProto] = []
    spatial = None
    for tensor, node in path:
        if _is_spatial(shapes, tensor):
            spatial = tensor
            break
        if node is None:
            break
        chain.append(node)
    chain.reverse()
    ops = [_op(n) for n in chain]

    def refuse(reason: str) -> ExportError:
        shown = " -> ".join(ops if len(ops) <= 12 else ["...", *ops[-12:]])
        if spatial is not None and not ops:
            where = f"its output '{spatial}' {list(shapes[spatial][0])} is itself a spatial map"
        elif spatial is not None:
            where = f"after the last spatial tensor '{spatial}' {list(shapes[spatial][0])} the graph does {shown}"
        elif ops:
            where = f"no 4-D spatial map within {len(ops)} ops of the output, which ends {shown}"
        else:
            where = f"no op computes its output '{path[0][0]}'"
        return ExportError(f"cannot rewrite {src.name}: {reason}: {where}; a class activation map needs {_NEEDS}")

    if spatial is None or not chain:
        raise refuse("no global average pooling over a feature map")
    pool = chain[0]
    reason = _pool_problem(pool, index, shapes)
    if reason:
        raise refuse(reason)

    # A linear layer multiplies by constant weights; a MatMul of two computed tensors (attention) is not one.
    linears = [n for n, op in zip(chain, ops, strict=True) if op in _LINEAR and _has_const_weight(n, index)]
    if not linears:
        channels = shapes[pool.input[0]][0][1]
        outputs = shapes[path[0][0]][0]
        if outputs and channels == outputs[-1]:
            raise ExportError(
                f"cannot rewrite {src.name}: its classifier runs before the pooling (SqueezeNet style): "
                f"{' -> '.join(ops)} turns the {channels}-channel map '{pool.input[0]}' straight into the "
                f"{channels} outputs, so each class channel is itself the map; this version does not support "
                f"that, it needs {_NEEDS}"
            )
        raise refuse("no linear layer after the pooling")
    if len(linears) > 1:
        raise refuse("more than one linear layer (an MLP head)")
    linear = linears[0]

    quantized = any(op in _QUANTIZED_OPS for op in ops)
    requant_before: list[float] = []
    requant_after: list[float] = []
    if ops[0] in _QUANTIZED_POOLS:
        requant_before.append(index.scale(pool.input[3]))
    biases: list[onnx.NodeProto] = []
    logits, logits_quant = path[0][0], None
    state = "pooled"
    for node, op in zip(chain[1:], ops[1:], strict=True):
        if op in _GLUE or op in _QDQ:
            if op == "QuantizeLinear":
                (requant_before if state == "pooled" else requant_after).append(index.scale(node.input[1]))
        elif node is linear:
            state = "linear"
        elif state == "linear" and op in _BIAS:
            biases.append(node)
        elif state == "linear" and op in _SOFTMAX:
            logits, state = node.input[0], "softmax"
            if op == "QLinearSoftmax":  # X, X_scale, X_zero_point, Y_scale, Y_zero_point
                logits_quant = (node.input[1], node.input[2])
        elif state == "pooled":
            raise refuse(f"{op} between the pooling and the linear layer")
        else:
            raise refuse(f"{op} after the {'softmax' if state == 'softmax' else 'linear layer'}")

    weight, bias, after_scale = _linear_head(linear, index, shapes, refuse)
    if after_scale is not None:
        requant_after.append(after_scale)
    for node in biases:
        extra, after_scale = _bias_value(node, index, weight.shape[0], refuse)
        bias = bias + extra
        if after_scale is not None:
            requant_after.append(after_scale)
    quantized = quantized or any(index.producer.get(i) is not None and _op(index.producer[i]) == "DequantizeLinear"
                                 for i in linear.input if i)
    if logits_quant is None and shapes[logits][1] != TensorProto.FLOAT:
        raise refuse(f"its logits '{logits}' are {TensorProto.DataType.Name(shapes[logits][1])}, not float")
    feature_quant = None
    if ops[0] in _QUANTIZED_POOLS:  # X, x_scale, x_zero_point, y_scale, y_zero_point
        feature_quant = (pool.input[1], pool.input[2])
    return _Head(logits=logits, logits_quant=logits_quant, features=pool.input[0], feature_quant=feature_quant,
                 weight=weight, bias=bias, ops=ops, quantized=quantized, requant_before=requant_before,
                 requant_after=requant_after)


def _has_const_weight(node: onnx.NodeProto, index: _Index) -> bool:
    weight = 3 if _op(node).startswith("Q") else 1
    return len(node.input) > weight and index.is_const(node.input[weight])


def _pool_problem(pool: onnx.NodeProto, index: _Index, shapes: _Shapes) -> str | None:
    """Why ``pool`` is not a global average over the spatial axes of an NCHW map (None when it is)."""
    op = _op(pool)
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    in_shape = shapes[pool.input[0]][0]
    if op not in _POOLS:
        pooling_like = any(word in op for word in ("Pool", "Reduce"))
        return f"{op} is not a global average pooling" if pooling_like else "no global average pooling"
    if op in _QUANTIZED_POOLS and attrs.get("channels_last", 0):
        return f"{op} on a channels-last map"
    if op == "ReduceMean":
        axes = attrs.get("axes")
        if axes is None and len(pool.input) > 1 and pool.input[1]:
            value = index.value(pool.input[1])
            if value is None:
                return "ReduceMean over axes computed at run time"
            axes = value.reshape(-1).tolist()
        if not axes or sorted(int(a) % 4 for a in axes) != [2, 3]:
            return f"ReduceMean over axes {axes if axes else 'all'}, not the spatial axes [2, 3]"
    if op in ("AveragePool", "QLinearAveragePool"):
        kernel = list(attrs.get("kernel_shape", []))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if kernel != list(in_shape[2:]) or any(pads) or auto_pad not in ("NOTSET", "VALID"):
            return (f"{op} with kernel {kernel} (pads {pads}) over a {in_shape[2]}x{in_shape[3]} map, "
                    "not one average over the whole map")
    return None


def _linear_head(node: onnx.NodeProto, index: _Index, shapes: _Shapes,
                 refuse: Callable[[str], ExportError]) -> tuple[np.ndarray, np.ndarray, float | None]:
    """W [K, C], b [K] (float64) of the linear layer, and its output requantization scale if any."""
    op = _op(node)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    data = _data_input(index, node)
    if data is None or data[0] != 0:
        raise refuse(f"{op} whose first input is not the pooled features")

    def const(i: int, what: str) -> np.ndarray:
        value = index.value(node.input[i]) if len(node.input) > i and node.input[i] else None
        if value is None:
            raise refuse(f"{op} whose {what} is not a constant")
        return value

    def optional(i: int) -> np.ndarray | None:
        return const(i, "bias") if len(node.input) > i and node.input[i] else None

    after = None
    if op == "MatMul":
        weight_ck = const(1, "weight").astype(np.float64)
        if weight_ck.ndim != 2:
            raise refuse(f"MatMul with a {weight_ck.ndim}-D weight")
        weight, bias = weight_ck.T, np.zeros(weight_ck.shape[1])
    elif op == "Gemm":
        if attrs.get("transA", 0):
            raise refuse("Gemm with transA=1")
        b = const(1, "weight").astype(np.float64)
        weight = attrs.get("alpha", 1.0) * (b if attrs.get("transB", 0) else b.T)
        c = optional(2)
        bias = np.zeros(weight.shape[0]) if c is None else attrs.get("beta", 1.0) * _as_bias(c, weight.shape[0], refuse)
    elif op == "Conv":
        w = const(1, "weight").astype(np.float64)
        if w.ndim != 4 or w.shape[2:] != (1, 1) or attrs.get("group", 1) != 1 or shapes[node.input[0]][0][2:] != (1, 1):
            raise refuse(f"Conv with kernel {list(w.shape[2:])} (group {attrs.get('group', 1)}) after the pooling")
        c = optional(2)
        weight, bias = w[:, :, 0, 0], (np.zeros(w.shape[0]) if c is None else c.astype(np.float64).reshape(-1))
    elif op == "QLinearMatMul":
        # b [C, K] quantized per tensor or per column (axis 1).
        b = _dequantize(const(3, "weight"), const(4, "weight scale"), optional(5), axis=1)
        weight, bias = b.T, np.zeros(b.shape[1])
        after = index.scale(node.input[6])
    elif op == "QGemm":
        if attrs.get("transA", 0):
            raise refuse("QGemm with transA=1")
        trans_b = attrs.get("transB", 0)
        a_scale = float(const(1, "input scale").reshape(()))
        b_scale = const(4, "weight scale").astype(np.float64)
        # Per-column scales run along the output classes: axis 0 of B when it is stored transposed [K, C].
        b = _dequantize(const(3, "weight"), b_scale, optional(5), axis=0 if trans_b else 1)
        weight = attrs.get("alpha", 1.0) * (b if trans_b else b.T)
        c = optional(6)
        # The int32 bias is quantized with scale a_scale * b_scale and zero point 0.
        bias = np.zeros(weight.shape[0])
        if c is not None:
            bias = _as_bias(c, weight.shape[0], refuse) * a_scale * b_scale.reshape(-1)
        after = index.scale(node.input[7]) if len(node.input) > 7 and node.input[7] else None
    elif op == "QLinearConv":
        w = const(3, "weight")
        if w.ndim != 4 or w.shape[2:] != (1, 1) or attrs.get("group", 1) != 1 or shapes[node.input[0]][0][2:] != (1, 1):
            raise refuse(f"QLinearConv with kernel {list(w.shape[2:])} after the pooling")
        w_scale = const(4, "weight scale").astype(np.float64)
        weight = _dequantize(w, w_scale, optional(5), axis=0)[:, :, 0, 0]
        c = optional(8)
        x_scale = float(const(1, "input scale").reshape(()))
        bias = np.zeros(weight.shape[0])
        if c is not None:  # int32, quantized with scale x_scale * w_scale and zero point 0
            bias = c.astype(np.float64).reshape(-1) * x_scale * w_scale.reshape(-1)
        after = index.scale(node.input[6])
    else:  # pragma: no cover - _LINEAR lists exactly the ops above
        raise refuse(f"{op} as the linear layer")
    return np.ascontiguousarray(weight, np.float64), np.asarray(bias, np.float64), after


def _as_bias(value: np.ndarray, num_classes: int, refuse: Callable[[str], ExportError]) -> np.ndarray:
    """A constant added to [N, K] logits (shapes [K], [1, K], [1, K, 1, 1] or a scalar) as a [K] vector."""
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return np.full(num_classes, float(value.reshape(())))
    if value.size == num_classes and sorted(value.shape)[:-1] == [1] * (value.ndim - 1):
        return value.reshape(-1)
    raise refuse(f"a bias of shape {list(value.shape)} for {num_classes} classes")


def _bias_value(node: onnx.NodeProto, index: _Index, num_classes: int,
                refuse: Callable[[str], ExportError]) -> tuple[np.ndarray, float | None]:
    """The [K] constant an Add / QLinearAdd adds, and the output requantization scale of a QLinearAdd."""
    op = _op(node)
    data = _data_input(index, node)
    if op == "Add":
        other = node.input[1 - data[0]] if data and data[0] in (0, 1) else ""
        value = index.value(other) if other else None
        if value is None:
            raise refuse("an Add of two computed tensors after the linear layer")
        return _as_bias(value, num_classes, refuse), None
    # QLinearAdd: A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point
    if data is None or data[0] not in (0, 3):
        raise refuse("a QLinearAdd of two computed tensors after the linear layer")
    start = 3 if data[0] == 0 else 0
    values = [index.value(node.input[start + i]) if node.input[start + i] else None for i in range(3)]
    if values[0] is None or values[1] is None:
        raise refuse("a QLinearAdd of two computed tensors after the linear layer")
    bias = _dequantize(values[0], values[1], values[2])
    return _as_bias(bias, num_classes, refuse), index.scale(node.input[6])


# ----------------------------------------------------------------------------- rewriting the graph
def _rewire(model: onnx.ModelProto, head: _Head, image: onnx.ValueInfoProto, feature_chw: tuple[int, int, int],
            num_classes: int, logits_rank: int, fixed_hw: bool) -> None:
    """Route ``head.logits`` and ``head.features`` to the outputs ``logits`` and ``features``, drop the rest.

    New nodes read the existing tensors and nothing existing is renamed except names that clash with
    ``logits``/``features``, so the original computation (and onnxruntime's fusions of it) stays as it was.
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if (head.logits_quant or head.feature_quant) and opset < 10:
        raise ExportError(f"the model imports ONNX opset {opset}, which has no DequantizeLinear (needs 10 or later)")
    used = _tensor_names(graph)
    for name in (LOGITS, FEATURES):
        if name in used:
            new = _unique(f"{name}_orig", used)
            _rename(graph, name, new)
            used.add(new)
            head.logits = new if head.logits == name else head.logits
            head.features = new if head.features == name else head.features
    node_names = {n.name for n in graph.node}

    def dequantize(tensor: str, quant: tuple[str, str], out: str) -> onnx.NodeProto:
        # Per-tensor scale and zero point: valid from opset 10, the first with quantized ops.
        scale, zero_point = quant
        inputs = [tensor, scale] + ([zero_point] if zero_point else [])
        return helper.make_node("DequantizeLinear", inputs, [out], name=_unique(f"realtime_cam_{out}", node_names))

    new_nodes = []
    logits = head.logits
    if head.logits_quant is not None:  # QLinearSoftmax: its input is the quantized logits
        float_logits = LOGITS if logits_rank == 2 else _unique("realtime_cam_logits_float", used)
        new_nodes.append(dequantize(logits, head.logits_quant, float_logits))
        logits = float_logits
    if logits_rank != 2:  # e.g. [N, K, 1, 1] from a 1x1-conv head without a flatten
        new_nodes.append(helper.make_node("Flatten", [logits], [LOGITS], axis=1,
                                          name=_unique("realtime_cam_logits", node_names)))
    elif head.logits_quant is None:
        new_nodes.append(helper.make_node("Identity", [logits], [LOGITS],
                                          name=_unique("realtime_cam_logits", node_names)))
    producer = _Index(graph).producer.get(head.features)
    if head.feature_quant is not None:
        # QOperator: the map is quantized; dequantize it with the pooling's own input scale/zero point.
        features_node = dequantize(head.features, head.feature_quant, FEATURES)
    elif producer is not None and _op(producer) == "DequantizeLinear":
        # QDQ: a second DequantizeLinear of the same quantized tensor, so onnxruntime still fuses the
        # original DequantizeLinear -> pool -> QuantizeLinear into an integer pool (an Identity on the
        # DequantizeLinear's output would give it a second consumer).
        features_node = onnx.NodeProto()
        features_node.CopyFrom(producer)
        features_node.ClearField("output")
        features_node.output.append(FEATURES)
        features_node.name = _unique("realtime_cam_features", node_names)
    else:
        features_node = helper.make_node("Identity", [head.features], [FEATURES],
                                         name=_unique("realtime_cam_features", node_names))
    graph.node.extend([*new_nodes, features_node])

    batch = image.type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or "batch")
    c, h, w = feature_chw
    hw = [h, w] if fixed_hw else ["features_height", "features_width"]
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [batch_dim, num_classes]),
        helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [batch_dim, c, *hw]),
    ])
    _prune(graph)


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    names.discard("")
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears, subgraphs included."""
    for node in graph.node:
        for field_ in (node.input, node.output):
            for i, name in enumerate(field_):
                if name == old:
                    field_[i] = new
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename(sub, old, new)
    for container in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in container:
            if item.name == old:
                item.name = new


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read, which may come from the outer graph."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in sub.node:
                names.update(inner.input)
                names |= _subgraph_inputs(inner)
    return names


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes, initializers and value infos the new outputs no longer need (the old Softmax, ...)."""
    needed = {o.name for o in graph.output}
    dead = []
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in needed for o in node.output if o):
            needed.update(node.input)
            needed |= _subgraph_inputs(node)
        else:
            dead.append(i)
    for i in dead:  # descending, so the indices stay valid
        del graph.node[i]
    initializers = {i.name for i in graph.initializer}
    for container in (graph.initializer, graph.value_info):
        for i in range(len(container) - 1, -1, -1):
            if container[i].name not in needed:
                del container[i]
    # Old IR versions list initializers among the inputs too; the image input itself is always needed.
    for i in range(len(graph.input) - 1, -1, -1):
        if graph.input[i].name in initializers and graph.input[i].name not in needed:
            del graph.input[i]


# ----------------------------------------------------------------------------- checking
def _check(model: onnx.ModelProto, head: _Head, input_name: str, tests: list[np.ndarray],
           original: list[np.ndarray], src: Path) -> tuple[float, float, float]:
    """Run the rewritten model; check its logits against the original's and W @ GAP(features) + b against them.

    Returns:
        (max |logits - original logits|, max |W @ GAP(features) + b - logits|, the bound that error had).
    """
    # The head exactly as the runtime will read it from the file.
    _, weight, bias = read_contract(model)
    weight = weight.astype(np.float64)
    session = cpu_session(model.SerializeToString(), f"the rewritten {src.name}")
    # W @ GAP(features) + b equals the logits up to float rounding for float heads; quantized heads round at
    # every requantization. Round-to-nearest moves the pooled vector by at most s/2 per channel (s: its
    # scale), which reaches logit k through |W_k|_1, and each requantization after the linear layer moves
    # the logits by at most s/2. The bound allows a full step at each instead of half, for integer
    # requantizers that round differently from float; it holds as long as nothing saturates. On the shared
    # MobileNetV2 int8 model the measured error is 0.18 against a bound of 1.69.
    quant_bound = float(np.abs(weight).sum(axis=1).max()) * sum(head.requant_before) + sum(head.requant_after)
    diff = err = bound = 0.0
    for x, reference in zip(tests, original, strict=True):
        logits, features = session.run([LOGITS, FEATURES], {input_name: x})
        diff = max(diff, float(np.abs(logits - reference).max()))
        predicted = features.astype(np.float64).mean(axis=(2, 3)) @ weight.T + bias
        err = max(err, float(np.abs(predicted - logits).max()))
        bound = max(bound, float_tolerance(reference) + quant_bound)
    # The rewrite only adds outputs, so the logits must come out as the original's (exactly, in practice;
    # the margin is for onnxruntime choosing other float kernels for the new graph).
    if diff > 1e-5 * max(1.0, max(float(np.abs(r).max()) for r in original)):
        raise ExportError(f"the rewritten {src.name} does not reproduce its logits (max |diff| {diff:.3g}); "
                          "this is a bug in realtime-cam's rewrite")
    if err > bound:
        raise ExportError(
            f"{src.name}: W @ mean(features) + b misses the logits by {err:.3g} (allowed {bound:.3g}) for the "
            f"head {' -> '.join(head.ops)}; its map would not explain the prediction"
        )
    return diff, err, bound


def _original_logits(original_bytes: bytes, head: _Head, index: _Index, input_name: str, tests: list[np.ndarray],
                     src: Path) -> list[np.ndarray]:
    """The original model's logits on each test batch (its logits tensor exposed as an extra output if need be)."""
    model = onnx.ModelProto.FromString(original_bytes)
    if head.logits not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.ValueInfoProto(name=head.logits))
        original_bytes = model.SerializeToString()
    session = cpu_session(original_bytes, src.name)
    try:
        values = [session.run([head.logits], {input_name: x})[0] for x in tests]
    except Exception as exc:  # noqa: BLE001 - re-raised; onnxruntime raises its own Fail/InvalidArgument types
        raise ExportError(f"onnxruntime cannot run {src.name}: {str(exc).splitlines()[0][:300]}") from None
    if head.logits_quant is not None:
        scale, zero_point = (index.value(name) if name else None for name in head.logits_quant)
        values = [_dequantize(v, scale, zero_point).astype(np.float32) for v in values]
    return [v.reshape(v.shape[0], -1) for v in values]
