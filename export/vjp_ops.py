"""Vector-Jacobian products of ONNX ops, written as ONNX nodes: the ``VJPS`` registry.

A builder gets the :class:`~export.head_grad.Tape`, the forward node and the upstream gradient of each of
its outputs (None where nothing flows back), appends nodes, and returns the gradient of each input (None
for an input that gets none; the caller refuses the node when such an input depends on the features).
Forward tensors are read as they are: the builders never change the forward pass (MaxPool only gains
its Indices output).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from realtime_cam.errors import ExportError

if TYPE_CHECKING:
    from .head_grad import Tape

# (tape, forward node, upstream gradient per output) -> gradient per input; None: no gradient.
VjpBuilder = Callable[["Tape", onnx.NodeProto, list[str | None]], list[str | None]]
VJPS: dict[str, VjpBuilder] = {}
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})


def refusal(node: onnx.NodeProto, why: str = "") -> ExportError:
    """The one-line error for a node whose gradient cannot be built."""
    name = node.name or (node.output[0] if node.output else "?")
    tail = f": {why}" if why else ""
    return ExportError(f"cannot build the gradient of the head: no VJP for op '{node.op_type}' (node '{name}'){tail}")


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value (strings decoded), or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def vjp(*op_types: str) -> Callable[[VjpBuilder], VjpBuilder]:
    def register(builder: VjpBuilder) -> VjpBuilder:
        for op_type in op_types:
            VJPS[op_type] = builder
        return builder
    return register


def _input(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


# --- shape-only ops -----------------------------------------------------------------------------------------
@vjp("Identity", "Dropout", "DequantizeLinear")
def _identity(tape: Tape, node, dys):
    return [dys[0]]


# Quantized tensors carry gradients in real-value units, so quantizing is the identity (straight-through,
# rounding ignored) with one exception: ONNX Runtime's quantizer drops a ReLU (or Clip(0, ..)) that follows
# these ops and lets the quantized range, which then starts at real zero, clip instead. There the gradient
# is zero where the value sits at the bottom of that range, as the ReLU's was. Other saturation is ignored
# (a clipped top logit still gets its gradient).
RELU_FUSING = frozenset({"Conv", "Gemm", "MatMul", "Add", "QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd"})


def _fused_relu(tape: Tape, g: str, q: str, zero: str | None, fused_into: str) -> str:
    """``g`` with the gradient of a ReLU fused into the quantization of ``q`` (see RELU_FUSING)."""
    zv = tape.value(zero) if zero else np.zeros((), np.uint8)
    if fused_into not in RELU_FUSING or zv is None or zv.dtype.kind not in "iu":
        return g
    low = np.iinfo(zv.dtype).min
    if not np.all(zv == low):
        return g
    return tape.op("Where", [tape.op("Greater", [q, tape.const(low, zv.dtype)]), g, tape.scalar(0)])


@vjp("QuantizeLinear")
def _quantize(tape: Tape, node, dys):
    before = tape.producer.get(node.input[0])
    return [_fused_relu(tape, dys[0], node.output[0], _input(node, 2), before.op_type if before else "")]


@vjp("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(tape: Tape, node, dys):
    return [tape.op("Reshape", [dys[0], tape.shape(node.input[0])])]


@vjp("Cast")
def _cast(tape: Tape, node, dys):
    to = tape.elem_type(node.input[0])
    if to is None:
        raise refusal(node, "the type of its input is unknown")
    if to not in FLOAT_TYPES:  # an integer holding quantized real values: pass straight through
        return [dys[0]]
    out = tape.op("Cast", [dys[0]], to=to)
    tape.dtypes[out] = np.dtype(helper.tensor_dtype_to_np_dtype(to))
    return [out]


@vjp("Transpose")
def _transpose(tape: Tape, node, dys):
    perm = attr(node, "perm") or list(reversed(range(tape.rank(node.input[0], node))))
    return [tape.op("Transpose", [dys[0]], perm=[int(i) for i in np.argsort(perm)])]


@vjp("Expand")
def _expand(tape: Tape, node, dys):
    return [tape.unbroadcast(dys[0], node.input[0], tape.static_shape(node.output[0]))]


@vjp("Concat")
def _concat(tape: Tape, node, dys):
    axis = attr(node, "axis")
    sizes = []
    for x in node.input:
        shape = tape.static_shape(x)
        dim = shape[axis] if shape is not None else None
        sizes.append(tape.ints([dim]) if isinstance(dim, int) else
                     tape.op("Gather", [tape.shape(x), tape.ints([axis])], axis=0))
    parts = tape.op("Split", [dys[0], tape.op("Concat", sizes, axis=0)], n_out=len(node.input), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p if tape.needs(x) else None for p, x in zip(parts, node.input)]


@vjp("Split")
def _split(tape: Tape, node, dys):
    parts = [d if d is not None else tape.zeros(tape.shape(y)) for d, y in zip(dys, node.output)]
    return [tape.op("Concat", parts, axis=attr(node, "axis", 0))]


@vjp("Slice", "Gather", "GatherElements", "GatherND", "Tile")
def _select(tape: Tape, node, dys):
    # These ops only pick (or repeat) elements: run the same op on the elements' flat indices, then add
    # the gradient back at the picked indices.
    x = node.input[0]
    size = tape.op("Size", [x])
    index = tape.op("Reshape", [tape.op("Range", [tape.ints(0), size, tape.ints(1)]), tape.shape(x)])
    picked = tape.copy_of(node, [index, *node.input[1:]])
    flat = _scatter_add(tape, size, picked, dys[0])
    return [tape.op("Reshape", [flat, tape.shape(x)])]


def _scatter_add(tape: Tape, size: str, index: str, g: str) -> str:
    """zeros(size) with g added at index (both flattened)."""
    flat = [tape.op("Reshape", [t, tape.ints([-1])]) for t in (index, g)]
    zeros = tape.zeros(tape.op("Reshape", [size, tape.ints([1])]))
    return tape.op("ScatterElements", [zeros, *flat], axis=0, reduction="add")


@vjp("Pad")
def _pad(tape: Tape, node, dys):
    # Padding by p is cropping by -p (ONNX Pad takes negative pads), and the other way round.
    if attr(node, "mode", "constant") != "constant":
        raise refusal(node, f"mode '{attr(node, 'mode')}' (only constant padding)")
    pads, axes = node.input[1], _input(node, 3)
    value = tape.value(pads)
    back = tape.ints(-value) if value is not None else tape.op("Neg", [pads])
    return [tape.op("Pad", [dys[0], back] + (["", axes] if axes else []))]


# --- elementwise --------------------------------------------------------------------------------------------
@vjp("Add", "Sub", "Sum")
def _add(tape: Tape, node, dys):
    g, ys, out = dys[0], tape.static_shape(node.output[0]), []
    for i, x in enumerate(node.input):
        gi = tape.op("Neg", [g]) if node.op_type == "Sub" and i == 1 else g
        out.append(tape.unbroadcast(gi, x, ys) if tape.needs(x) else None)
    return out


@vjp("Mul")
def _mul(tape: Tape, node, dys):
    (a, b), g, ys = node.input, dys[0], tape.static_shape(node.output[0])
    return [tape.unbroadcast(tape.op("Mul", [g, b]), a, ys) if tape.needs(a) else None,
            tape.unbroadcast(tape.op("Mul", [g, a]), b, ys) if tape.needs(b) else None]


@vjp("Div")
def _div(tape: Tape, node, dys):
    (a, b), g, y, ys = node.input, dys[0], node.output[0], tape.static_shape(node.output[0])
    db = tape.op("Neg", [tape.op("Mul", [g, tape.op("Div", [y, b])])]) if tape.needs(b) else None
    return [tape.unbroadcast(tape.op("Div", [g, b]), a, ys) if tape.needs(a) else None,
            tape.unbroadcast(db, b, ys) if db else None]


@vjp("Pow")
def _pow(tape: Tape, node, dys):
    (a, b), g, y, ys = node.input, dys[0], node.output[0], tape.static_shape(node.output[0])
    out = [None, None]
    if tape.needs(a):
        bv = tape.value(b)
        if bv is not None:
            d = tape.op("Mul", [tape.const(bv, tape.dtype), tape.op("Pow", [a, tape.const(bv - 1, tape.dtype)])])
        else:
            bb = tape.op("CastLike", [b, a])
            d = tape.op("Mul", [bb, tape.op("Pow", [a, tape.op("Sub", [bb, tape.scalar(1)])])])
        out[0] = tape.unbroadcast(tape.op("Mul", [g, d]), a, ys)
    if tape.needs(b):
        out[1] = tape.unbroadcast(tape.op("Mul", [g, tape.op("Mul", [y, tape.op("Log", [a])])]), b, ys)
    return out


@vjp("Where")
def _where(tape: Tape, node, dys):
    (c, a, b), g, ys = node.input, dys[0], tape.static_shape(node.output[0])
    zero = tape.scalar(0)
    return [None, tape.unbroadcast(tape.op("Where", [c, g, zero]), a, ys) if tape.needs(a) else None,
            tape.unbroadcast(tape.op("Where", [c, zero, g]), b, ys) if tape.needs(b) else None]


def _times(tape: Tape, g: str, *factors: str) -> str:
    for f in factors:
        g = tape.op("Mul", [g, f])
    return g


def _unary(derivative: Callable[[Tape, str, str, onnx.NodeProto], str]) -> VjpBuilder:
    """A builder for y = f(x): dx = g * f'(x), with f' written from x and y."""
    def build(tape: Tape, node, dys):
        return [_times(tape, dys[0], derivative(tape, node.input[0], node.output[0], node))]
    return build


def _gelu(tape: Tape, x: str, y: str, node) -> str:
    sq = tape.op("Mul", [x, x])
    if attr(node, "approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = tape.op("Tanh", [_times(tape, tape.op("Add", [x, _times(tape, sq, x, tape.scalar(0.044715))]),
                                    tape.scalar(c))])
        du = tape.op("Add", [tape.scalar(c), _times(tape, sq, tape.scalar(3 * 0.044715 * c))])
        left = _times(tape, tape.op("Add", [tape.scalar(1), t]), tape.scalar(0.5))
        right = _times(tape, tape.op("Sub", [tape.scalar(1), tape.op("Mul", [t, t])]), du, x, tape.scalar(0.5))
        return tape.op("Add", [left, right])
    cdf = _times(tape, tape.op("Add", [tape.scalar(1), tape.op("Erf", [_times(tape, x, tape.scalar(math.sqrt(0.5)))])]),
                 tape.scalar(0.5))
    pdf = _times(tape, tape.op("Exp", [_times(tape, sq, tape.scalar(-0.5))]), tape.scalar(1 / math.sqrt(2 * math.pi)))
    return tape.op("Add", [cdf, tape.op("Mul", [x, pdf])])


def _hardswish(tape: Tape, x: str, y: str, node) -> str:
    middle = tape.op("Add", [_times(tape, x, tape.scalar(1 / 3)), tape.scalar(0.5)])
    upper = tape.op("Where", [tape.op("Greater", [x, tape.scalar(3)]), tape.scalar(1), middle])
    return tape.op("Where", [tape.op("Less", [x, tape.scalar(-3)]), tape.scalar(0), upper])


def _hardsigmoid(tape: Tape, x: str, y: str, node) -> str:
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    t = tape.op("Add", [_times(tape, x, tape.scalar(alpha)), tape.scalar(beta)])
    inside = tape.op("And", [tape.op("Greater", [t, tape.scalar(0)]), tape.op("Less", [t, tape.scalar(1)])])
    return tape.op("Where", [inside, tape.scalar(alpha), tape.scalar(0)])


def _positive(tape: Tape, x: str, other: str) -> str:
    """1 where x > 0, else ``other``."""
    return tape.op("Where", [tape.op("Greater", [x, tape.scalar(0)]), tape.scalar(1), other])


UNARY = {
    "Neg": lambda t, x, y, n: t.scalar(-1),
    "Relu": lambda t, x, y, n: _positive(t, x, t.scalar(0)),
    "LeakyRelu": lambda t, x, y, n: _positive(t, x, t.scalar(attr(n, "alpha", 0.01))),
    "PRelu": lambda t, x, y, n: _positive(t, x, n.input[1]),
    "Elu": lambda t, x, y, n: _positive(t, x, t.op("Add", [y, t.scalar(attr(n, "alpha", 1.0))])),
    "HardSigmoid": _hardsigmoid,
    "HardSwish": _hardswish,
    "Sigmoid": lambda t, x, y, n: t.op("Mul", [y, t.op("Sub", [t.scalar(1), y])]),
    "Tanh": lambda t, x, y, n: t.op("Sub", [t.scalar(1), t.op("Mul", [y, y])]),
    "Softplus": lambda t, x, y, n: t.op("Sigmoid", [x]),
    "Erf": lambda t, x, y, n: _times(t, t.op("Exp", [t.op("Neg", [t.op("Mul", [x, x])])]),
                                     t.scalar(2 / math.sqrt(math.pi))),
    "Gelu": _gelu,
    "Exp": lambda t, x, y, n: y,
    "Log": lambda t, x, y, n: t.op("Reciprocal", [x]),
    "Abs": lambda t, x, y, n: t.op("Sign", [x]),
    "Reciprocal": lambda t, x, y, n: t.op("Neg", [t.op("Mul", [y, y])]),
    "Sqrt": lambda t, x, y, n: t.op("Div", [t.scalar(0.5), y]),
}
for _name, _derivative in UNARY.items():
    VJPS[_name] = _unary(_derivative)


@vjp("Clip")
def _clip(tape: Tape, node, dys):
    x, low, high = node.input[0], _input(node, 1), _input(node, 2)
    inside = [tape.op(op, [x, b]) for op, b in (("GreaterOrEqual", low), ("LessOrEqual", high)) if b]
    if not inside:
        return [dys[0]]
    mask = inside[0] if len(inside) == 1 else tape.op("And", inside)
    return [tape.op("Where", [mask, dys[0], tape.scalar(0)])]


# --- normalisations and reductions --------------------------------------------------------------------------
@vjp("Softmax", "LogSoftmax")
def _softmax(tape: Tape, node, dys):
    g, y, axis = dys[0], node.output[0], [attr(node, "axis", -1)]
    if node.op_type == "Softmax":
        return [tape.op("Mul", [y, tape.op("Sub", [g, tape.reduce("ReduceSum", tape.op("Mul", [g, y]), axis)])])]
    return [tape.op("Sub", [g, tape.op("Mul", [tape.op("Exp", [y]), tape.reduce("ReduceSum", g, axis)])])]


@vjp("LayerNormalization")
def _layer_norm(tape: Tape, node, dys):
    x, scale, g = node.input[0], node.input[1], dys[0]
    axis = attr(node, "axis", -1)
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis, tape.rank(x, node)))

    def mean(t: str) -> str:
        return tape.reduce("ReduceMean", t, axes)

    centred = tape.op("Sub", [x, mean(x)])
    var = mean(tape.op("Mul", [centred, centred]))
    rstd = tape.op("Reciprocal", [tape.op("Sqrt", [tape.op("Add", [var, tape.scalar(attr(node, "epsilon", 1e-5))])])])
    xhat = tape.op("Mul", [centred, rstd])
    gy = tape.op("Mul", [g, scale])
    inner = tape.op("Sub", [tape.op("Sub", [gy, mean(gy)]), tape.op("Mul", [xhat, mean(tape.op("Mul", [gy, xhat]))])])
    return [tape.op("Mul", [rstd, inner])]


@vjp("BatchNormalization")
def _batch_norm(tape: Tape, node, dys):
    if attr(node, "training_mode", 0):
        raise refusal(node, "training_mode=1")
    x, scale, _, _, var = node.input[:5]
    eps = attr(node, "epsilon", 1e-5)
    sv, vv = tape.value(scale), tape.value(var)
    if sv is not None and vv is not None:
        k = tape.const(sv / np.sqrt(vv + eps), tape.dtype)
    else:
        k = tape.op("Div", [scale, tape.op("Sqrt", [tape.op("Add", [var, tape.scalar(eps)])])])
    k = tape.op("Reshape", [k, tape.ints([-1] + [1] * (tape.rank(x, node) - 2))])
    return [tape.op("Mul", [dys[0], k])]


def _extremes(tape: Tape, x: str, y: str, g: str, axes: str | None) -> str:
    """The gradient of a max/min: shared evenly by the elements equal to it."""
    hit = tape.op("Equal", [x, y])
    ties = tape.op("Cast", [hit], to=helper.np_dtype_to_tensor_dtype(tape.dtype))
    ties = tape.op("ReduceSum", [ties] + ([axes] if axes else []), keepdims=1)
    return tape.op("Where", [hit, tape.op("Div", [g, ties]), tape.scalar(0)])


@vjp("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin")
def _reduce(tape: Tape, node, dys):
    x, y, g = node.input[0], node.output[0], dys[0]
    axes = _input(node, 1)
    if axes is None and attr(node, "axes") is not None:
        axes = tape.ints(attr(node, "axes"))
    empty = axes is None or (tape.value(axes) is not None and tape.value(axes).size == 0)
    if empty and attr(node, "noop_with_empty_axes", 0):
        return [g]
    axes = None if empty else axes
    if not attr(node, "keepdims", 1) and axes is not None:
        g, y = (tape.op("Unsqueeze", [t, axes]) for t in (g, y))
    if node.op_type == "ReduceMean":
        g = tape.op("Div", [g, tape.ratio(x, node.output[0])])
    if node.op_type in ("ReduceMax", "ReduceMin"):
        return [_extremes(tape, x, y, g, axes)]
    return [tape.op("Expand", [g, tape.shape(x)])]


@vjp("GlobalAveragePool")
def _global_average(tape: Tape, node, dys):
    x = node.input[0]
    return [tape.op("Expand", [tape.op("Div", [dys[0], tape.ratio(x, node.output[0])]), tape.shape(x)])]


@vjp("GlobalMaxPool")
def _global_max(tape: Tape, node, dys):
    x = node.input[0]
    axes = tape.ints(list(range(2, tape.rank(x, node))))
    return [_extremes(tape, x, node.output[0], dys[0], axes)]


# --- linear layers, convolutions and pooling windows --------------------------------------------------------
def _rows(tape: Tape, weight_kc) -> str:
    """one_hot(class) @ W for the seed: row ``class`` of W [K, C], a gather instead of a matrix product."""
    return tape.op("Gather", [tape.const(weight_kc, tape.dtype), tape.classes], axis=0)


@vjp("Gemm")
def _gemm(tape: Tape, node, dys):
    a, b, c = node.input[0], node.input[1], _input(node, 2)
    g, alpha, beta = dys[0], attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    out = [None] * len(node.input)
    weight = tape.value(b)
    if tape.needs(a) and not ta and weight is not None and g == tape.seed:
        out[0] = _rows(tape, (weight if tb else weight.T) * alpha)
    elif tape.needs(a):
        out[0] = (tape.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1) if ta else
                  tape.op("Gemm", [g, b], alpha=alpha, transB=0 if tb else 1))
    if tape.needs(b):
        out[1] = (tape.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta) if tb else
                  tape.op("Gemm", [a, g], alpha=alpha, transA=0 if ta else 1))
    if c and tape.needs(c):
        gc = g if beta == 1.0 else tape.op("Mul", [g, tape.scalar(beta)])
        out[2] = tape.unbroadcast(gc, c, tape.static_shape(node.output[0]))
    return out


@vjp("MatMul")
def _matmul(tape: Tape, node, dys):
    (a, b), g, ys = node.input, dys[0], tape.static_shape(node.output[0])

    def swapped(t: str) -> str:  # t with its last two axes swapped
        value = tape.value(t)
        if value is not None:
            return tape.const(np.swapaxes(value, -1, -2))
        r = tape.rank(t, node)
        return tape.op("Transpose", [t], perm=list(range(r - 2)) + [r - 1, r - 2])

    def grad_shape(t: str) -> tuple | None:
        ts = tape.static_shape(t)
        return ys[:-2] + ts[-2:] if ys is not None and ts is not None and len(ys) >= 2 else None

    for t in (a, b):
        value, shape = tape.value(t), tape.static_shape(t)
        if (value.ndim if value is not None else len(shape) if shape is not None else 2) < 2:
            raise refusal(node, "1-D operands are not supported")
    weight = tape.value(b)
    if g == tape.seed and weight is not None and weight.ndim == 2 and len(tape.static_shape(a) or ()) == 2:
        return [_rows(tape, weight.T), None]
    return [tape.unbroadcast(tape.op("MatMul", [g, swapped(b)]), a, grad_shape(a)) if tape.needs(a) else None,
            tape.unbroadcast(tape.op("MatMul", [swapped(a), g]), b, grad_shape(b)) if tape.needs(b) else None]


def _spatial(tape: Tape, x: str, k: int) -> list[int] | None:
    shape = tape.static_shape(x)
    if shape is None or len(shape) != k + 2 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return list(shape[2:])


def _window(tape: Tape, node, x: str, kernel: list[int]):
    """strides, dilations, explicit pads (auto_pad resolved) and the static spatial size of x, if known."""
    k = len(kernel)
    strides, dilations = attr(node, "strides", [1] * k), attr(node, "dilations", [1] * k)
    pads, auto = list(attr(node, "pads", [0] * 2 * k)), attr(node, "auto_pad", "NOTSET")
    spatial = _spatial(tape, x, k)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if spatial is None:
            raise refusal(node, f"auto_pad {auto} needs the input's spatial size before run time")
        for i in range(k):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            small = total // 2
            pads[i] = small if auto == "SAME_UPPER" else total - small
            pads[i + k] = total - pads[i]
    elif auto == "VALID":
        pads = [0] * 2 * k
    return strides, dilations, pads, spatial


def _input_grad(tape: Tape, g, w, x, kernel, strides, dilations, pads, group, spatial) -> str:
    """d/dx of a convolution: ConvTranspose with the same weights, shaped to x exactly."""
    k = len(kernel)
    common = {"strides": strides, "dilations": dilations, "group": group, "kernel_shape": list(kernel)}
    if spatial is not None:  # the rows and columns the forward stride skipped at the end come back as padding
        extra = [(spatial[i] + pads[i] + pads[i + k] - (kernel[i] - 1) * dilations[i] - 1) % strides[i]
                 for i in range(k)]
        return tape.op("ConvTranspose", [g, w], pads=pads, output_padding=extra, **common)
    return tape.fit(tape.op("ConvTranspose", [g, w], pads=pads[:k] + [0] * k, **common), x, k)


@vjp("Conv")
def _conv(tape: Tape, node, dys):
    x, w = node.input[:2]
    wv, ws = tape.value(w), tape.static_shape(w)
    kernel = attr(node, "kernel_shape") or (list(wv.shape[2:]) if wv is not None else ws and list(ws[2:]))
    if not kernel or not all(isinstance(d, int) for d in kernel):
        raise refusal(node, "its kernel size is unknown")
    strides, dilations, pads, spatial = _window(tape, node, x, kernel)
    return [_input_grad(tape, dys[0], w, x, kernel, strides, dilations, pads, attr(node, "group", 1), spatial)]


@vjp("AveragePool")
def _average_pool(tape: Tape, node, dys):
    x, g, kernel = node.input[0], dys[0], attr(node, "kernel_shape")
    strides, dilations, pads, spatial = _window(tape, node, x, kernel)
    k = len(kernel)
    if attr(node, "ceil_mode", 0):
        sizes = [] if spatial is None else [spatial[i] + pads[i] + pads[i + k] - (kernel[i] - 1) * dilations[i] - 1
                                            for i in range(k)]
        if spatial is None or any(s % st for s, st in zip(sizes, strides)):
            raise refusal(node, "ceil_mode=1 where it changes the output size")
    ones = tape.const(np.ones([1, 1, *kernel]), tape.dtype)
    if attr(node, "count_include_pad", 0) or not any(pads):
        g = tape.op("Mul", [g, tape.scalar(1.0 / math.prod(kernel))])
    else:  # each window is divided by how many of its elements lie inside the input
        plane = tape.op("ConstantOfShape", [tape.op("Concat", [tape.ints([1, 1]), tape.shape(x, start=2)], axis=0)],
                        value=onnx.numpy_helper.from_array(np.ones(1, tape.dtype)))
        count = tape.op("Conv", [plane, ones], strides=strides, dilations=dilations, pads=pads, kernel_shape=kernel)
        g = tape.op("Div", [g, count])
    # Every channel is pooled alike: fold the channels into the batch and use one 1 -> 1 kernel of ones.
    flat = tape.op("Reshape", [g, tape.op("Concat", [tape.ints([-1, 1]), tape.shape(g, start=2)], axis=0)])
    dx = _input_grad(tape, flat, ones, x, kernel, strides, dilations, pads, 1, spatial)
    return [tape.op("Reshape", [dx, tape.shape(x)])]


@vjp("MaxPool")
def _max_pool(tape: Tape, node, dys):
    if attr(node, "storage_order", 0):
        raise refusal(node, "storage_order=1")
    if len(node.output) < 2 or not node.output[1]:
        del node.output[1:]
        node.output.append(tape.fresh("argmax"))  # the forward pass also says where each maximum was
    x = node.input[0]
    flat = _scatter_add(tape, tape.op("Size", [x]), node.output[1], dys[0])
    return [tape.op("Reshape", [flat, tape.shape(x)])]


# --- quantized ops: the float op's VJP at the dequantized values (straight-through on requantizing) --------
# op type -> (float op, (quantized input, its scale, its zero point, per-channel axis) per float input,
#             (scale, zero point) of the output or None). Axis None: QGemm's B, per transB.
QLINEAR = {
    "QLinearConv": ("Conv", [(0, 1, 2, 1), (3, 4, 5, 0)], (6, 7)),
    "QLinearMatMul": ("MatMul", [(0, 1, 2, 1), (3, 4, 5, -1)], (6, 7)),
    "QLinearAdd": ("Add", [(0, 1, 2, 1), (3, 4, 5, 1)], (6, 7)),
    "QLinearMul": ("Mul", [(0, 1, 2, 1), (3, 4, 5, 1)], (6, 7)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2, 1)], (3, 4)),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2, 1)], (3, 4)),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2, 1)], (3, 4)),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2, 1)], (3, 4)),
    "QLinearSoftmax": ("Softmax", [(0, 1, 2, 1)], (3, 4)),
    "QGemm": ("Gemm", [(0, 1, 2, 1), (3, 4, 5, None)], (7, 8)),
}


@vjp(*QLINEAR)
def _qlinear(tape: Tape, node, dys):
    float_op, inputs, out = QLINEAR[node.op_type]
    if attr(node, "channels_last", 0) or attr(node, "opset", 13) < 13:
        raise refusal(node, "channels_last=1 or an opset-12 softmax")
    real = []
    for q, scale, zero, axis in inputs:
        axis = (0 if attr(node, "transB", 0) else 1) if axis is None else axis
        real.append(tape.real(node.input[q], node.input[scale], _input(node, zero), axis))
    y = node.output[0]
    if out is not None and _input(node, out[0]):
        y = tape.real(y, node.input[out[0]], _input(node, out[1]))
    virtual = helper.make_node(float_op, real, [y], name=node.name or node.output[0])
    virtual.attribute.extend(a for a in node.attribute if a.name not in ("channels_last", "opset"))
    if out is not None:
        dys = [_fused_relu(tape, dys[0], node.output[0], _input(node, out[1]), node.op_type)]
    grads = [None] * len(node.input)
    for (q, *_), dv in zip(inputs, VJPS[float_op](tape, virtual, dys)):
        grads[q] = dv
    return grads


@vjp("QLinearConcat")
def _qlinear_concat(tape: Tape, node, dys):
    # Inputs: Y scale, Y zero point, then (X, scale, zero point) per input; Concat's VJP needs only shapes.
    virtual = helper.make_node("Concat", node.input[2::3], list(node.output), axis=attr(node, "axis"))
    grads = [None] * len(node.input)
    grads[2::3] = _concat(tape, virtual, dys)
    return grads
