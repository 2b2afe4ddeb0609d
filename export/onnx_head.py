"""Finding a classifier's head: pooling -> linear layer -> (bias) -> (softmax), read back from the output.

The head forms accepted are listed in export/from_onnx.py. Each linear-layer form is one reader in
:data:`LINEAR_READERS` (op type -> W [K, C], b [K] in float64 and the output requantization scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from realtime_cam.errors import ExportError

from .onnx_graph import DataPath, GraphIndex, Shapes, data_input, dequantize

_MS = "com.microsoft"
_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool", "QLinearGlobalAveragePool", "QLinearAveragePool"}
_QUANTIZED_POOLS = {"QLinearGlobalAveragePool", "QLinearAveragePool"}
_GLUE = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_BIAS = {"Add", "QLinearAdd"}
_SOFTMAX = {"Softmax", "LogSoftmax", "QLinearSoftmax"}
_MS_OPS = {"QLinearGlobalAveragePool", "QLinearAveragePool", "QGemm", "QLinearAdd", "QLinearSoftmax"}
_QUANTIZED_OPS = _QDQ | _MS_OPS | {"QLinearMatMul", "QLinearConv"}
_NEEDS = ("global average pooling followed by exactly one linear layer (Gemm, MatMul(+Add) or 1x1 Conv), "
          "optionally a Softmax")


class InputTooSmall(ExportError):
    """The input size leaves a single position before the head's pooling: nothing to localise, any head."""


@dataclass
class Head:
    """What the backward walk found: where the map and the logits are, and the head W, b."""

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


def op_of(node: onnx.NodeProto) -> str:
    """The op type, with ops of an unexpected domain marked so they never match the tables."""
    domain = node.domain or ""
    if node.op_type in _MS_OPS:
        return node.op_type if domain == _MS else f"{domain}:{node.op_type}"
    if domain in ("", "ai.onnx") or (domain == _MS and node.op_type in _QDQ):
        return node.op_type
    return f"{domain}:{node.op_type}"


def _is_spatial(shapes: Shapes, tensor: str) -> bool:
    shape = shapes.get(tensor, ((), 0))[0]
    return len(shape) == 4 and shape[2] * shape[3] > 1


def find_head(index: GraphIndex, path: DataPath, shapes: Shapes, src: Path) -> Head:
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
    ops = [op_of(n) for n in chain]

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

    too_small = _pooled_map_too_small(chain, shapes)
    if too_small:  # the head is there, but the input leaves nothing to localise: say so, not what is "missing"
        raise InputTooSmall(f"cannot rewrite {src.name}: {too_small}")
    if spatial is None or not chain:
        raise refuse("no global average pooling over a feature map")
    pool = chain[0]
    reason = _pool_problem(pool, index, shapes)
    if reason:
        raise refuse(reason)

    # A linear layer multiplies by constant weights; a MatMul of two computed tensors (attention) is not one.
    linears = [n for n, op in zip(chain, ops, strict=True) if op in LINEAR_READERS and _has_const_weight(n, index)]
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
    quantized = quantized or any(index.producer.get(i) is not None and op_of(index.producer[i]) == "DequantizeLinear"
                                 for i in linear.input if i)
    if logits_quant is None and shapes[logits][1] != TensorProto.FLOAT:
        raise refuse(f"its logits '{logits}' are {TensorProto.DataType.Name(shapes[logits][1])}, not float")
    feature_quant = None
    if ops[0] in _QUANTIZED_POOLS:  # X, x_scale, x_zero_point, y_scale, y_zero_point
        feature_quant = (pool.input[1], pool.input[2])
    return Head(logits=logits, logits_quant=logits_quant, features=pool.input[0], feature_quant=feature_quant,
                weight=weight, bias=bias, ops=ops, quantized=quantized, requant_before=requant_before,
                requant_after=requant_after)


def _has_const_weight(node: onnx.NodeProto, index: GraphIndex) -> bool:
    weight = 3 if op_of(node).startswith("Q") else 1
    return len(node.input) > weight and index.is_const(node.input[weight])


def _pooled_map_too_small(chain: list[onnx.NodeProto], shapes: Shapes) -> str | None:
    """When a global pooling in the head reduces a map of a single position (the input is too small for the
    network's downsampling), why; else None."""
    for node in chain:
        if op_of(node) not in _POOLS:
            continue
        shape = shapes.get(node.input[0], ((), 0))[0]
        if len(shape) == 4 and shape[2] * shape[3] <= 1:
            return (f"at this input size the feature map before {op_of(node)} ('{node.input[0]}') is "
                    f"{shape[2]}x{shape[3]}: a single position, nothing to localise; use a larger --input-size")
    return None


def _pool_problem(pool: onnx.NodeProto, index: GraphIndex, shapes: Shapes) -> str | None:
    """Why ``pool`` is not a global average over the spatial axes of an NCHW map (None when it is)."""
    op = op_of(pool)
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


def _linear_head(node: onnx.NodeProto, index: GraphIndex, shapes: Shapes,
                 refuse: Callable[[str], ExportError]) -> tuple[np.ndarray, np.ndarray, float | None]:
    """W [K, C], b [K] (float64) of the linear layer, and its output requantization scale if any."""
    op = op_of(node)
    data = data_input(index, node)
    if data is None or data[0] != 0:
        raise refuse(f"{op} whose first input is not the pooled features")
    read = LINEAR_READERS.get(op)
    if read is None:  # pragma: no cover - find_head takes linear layers from LINEAR_READERS
        raise refuse(f"{op} as the linear layer")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight, bias, after = read(_Layer(node, op, attrs, index, shapes, refuse))
    return np.ascontiguousarray(weight, np.float64), np.asarray(bias, np.float64), after


@dataclass(frozen=True)
class _Layer:
    """The linear layer's node as a reader sees it: attributes, constant inputs, and how to refuse it."""

    node: onnx.NodeProto
    op: str
    attrs: dict[str, object]
    index: GraphIndex
    shapes: Shapes
    refuse: Callable[[str], ExportError]

    def const(self, i: int, what: str) -> np.ndarray:
        """Input ``i``, which must be a constant (``what`` names it in the refusal)."""
        name = self.node.input[i] if len(self.node.input) > i else ""
        value = self.index.value(name) if name else None
        if value is None:
            raise self.refuse(f"{self.op} whose {what} is not a constant")
        return value

    def optional(self, i: int) -> np.ndarray | None:
        """Optional input ``i`` (a bias or zero point): None when absent, else a constant."""
        return self.const(i, "bias") if len(self.node.input) > i and self.node.input[i] else None

    def scale(self, i: int) -> float:
        """The largest value of the quantization scale at input ``i``."""
        return self.index.scale(self.node.input[i])

    def is_1x1(self, weight: np.ndarray) -> bool:
        """A convolution that is a linear layer: 1x1 kernel, one group, over the 1x1 pooled map."""
        return (weight.ndim == 4 and weight.shape[2:] == (1, 1) and self.attrs.get("group", 1) == 1
                and self.shapes[self.node.input[0]][0][2:] == (1, 1))


# A reader returns W [K, C], b [K] and the output requantization scale (None for float layers).
_Linear = tuple[np.ndarray, np.ndarray, float | None]


def _matmul(layer: _Layer) -> _Linear:
    weight_ck = layer.const(1, "weight").astype(np.float64)
    if weight_ck.ndim != 2:
        raise layer.refuse(f"MatMul with a {weight_ck.ndim}-D weight")
    return weight_ck.T, np.zeros(weight_ck.shape[1]), None


def _gemm(layer: _Layer) -> _Linear:
    if layer.attrs.get("transA", 0):
        raise layer.refuse("Gemm with transA=1")
    b = layer.const(1, "weight").astype(np.float64)
    weight = layer.attrs.get("alpha", 1.0) * (b if layer.attrs.get("transB", 0) else b.T)
    c = layer.optional(2)
    if c is None:
        return weight, np.zeros(weight.shape[0]), None
    return weight, layer.attrs.get("beta", 1.0) * _as_bias(c, weight.shape[0], layer.refuse), None


def _conv(layer: _Layer) -> _Linear:
    w = layer.const(1, "weight").astype(np.float64)
    if not layer.is_1x1(w):
        group = layer.attrs.get("group", 1)
        raise layer.refuse(f"Conv with kernel {list(w.shape[2:])} (group {group}) after the pooling")
    c = layer.optional(2)
    return w[:, :, 0, 0], (np.zeros(w.shape[0]) if c is None else c.astype(np.float64).reshape(-1)), None


def _qlinear_matmul(layer: _Layer) -> _Linear:
    # b [C, K] quantized per tensor or per column (axis 1).
    b = dequantize(layer.const(3, "weight"), layer.const(4, "weight scale"), layer.optional(5), axis=1)
    return b.T, np.zeros(b.shape[1]), layer.scale(6)


def _qgemm(layer: _Layer) -> _Linear:
    if layer.attrs.get("transA", 0):
        raise layer.refuse("QGemm with transA=1")
    trans_b = layer.attrs.get("transB", 0)
    a_scale = float(layer.const(1, "input scale").reshape(()))
    b_scale = layer.const(4, "weight scale").astype(np.float64)
    # Per-column scales run along the output classes: axis 0 of B when it is stored transposed [K, C].
    b = dequantize(layer.const(3, "weight"), b_scale, layer.optional(5), axis=0 if trans_b else 1)
    weight = layer.attrs.get("alpha", 1.0) * (b if trans_b else b.T)
    c = layer.optional(6)
    # The int32 bias is quantized with scale a_scale * b_scale and zero point 0.
    bias = np.zeros(weight.shape[0])
    if c is not None:
        bias = _as_bias(c, weight.shape[0], layer.refuse) * a_scale * b_scale.reshape(-1)
    after = layer.scale(7) if len(layer.node.input) > 7 and layer.node.input[7] else None
    return weight, bias, after


def _qlinear_conv(layer: _Layer) -> _Linear:
    w = layer.const(3, "weight")
    if not layer.is_1x1(w):
        raise layer.refuse(f"QLinearConv with kernel {list(w.shape[2:])} after the pooling")
    w_scale = layer.const(4, "weight scale").astype(np.float64)
    weight = dequantize(w, w_scale, layer.optional(5), axis=0)[:, :, 0, 0]
    c = layer.optional(8)
    x_scale = float(layer.const(1, "input scale").reshape(()))
    bias = np.zeros(weight.shape[0])
    if c is not None:  # int32, quantized with scale x_scale * w_scale and zero point 0
        bias = c.astype(np.float64).reshape(-1) * x_scale * w_scale.reshape(-1)
    return weight, bias, layer.scale(6)


# The linear layers a head may have, op type -> reader; a new form is one reader and one line here.
LINEAR_READERS: dict[str, Callable[[_Layer], _Linear]] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "QLinearMatMul": _qlinear_matmul,
    "QGemm": _qgemm,
    "QLinearConv": _qlinear_conv,
}


def _as_bias(value: np.ndarray, num_classes: int, refuse: Callable[[str], ExportError]) -> np.ndarray:
    """A constant added to [N, K] logits (shapes [K], [1, K], [1, K, 1, 1] or a scalar) as a [K] vector."""
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return np.full(num_classes, float(value.reshape(())))
    if value.size == num_classes and sorted(value.shape)[:-1] == [1] * (value.ndim - 1):
        return value.reshape(-1)
    raise refuse(f"a bias of shape {list(value.shape)} for {num_classes} classes")


def _bias_value(node: onnx.NodeProto, index: GraphIndex, num_classes: int,
                refuse: Callable[[str], ExportError]) -> tuple[np.ndarray, float | None]:
    """The [K] constant an Add / QLinearAdd adds, and the output requantization scale of a QLinearAdd."""
    op = op_of(node)
    data = data_input(index, node)
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
    bias = dequantize(values[0], values[1], values[2])
    return _as_bias(bias, num_classes, refuse), index.scale(node.input[6])
