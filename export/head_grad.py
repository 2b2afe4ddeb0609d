"""Reverse-mode gradients of a classifier head, written into the model as ONNX nodes.

:func:`add_gradient_output` differentiates one class score per sample with respect to an intermediate
tensor (the explained features), so one session run gives logits, features and their gradients. The
vector-Jacobian product of each op comes from the ``VJPS`` registry (export/vjp_ops.py); :class:`Tape` is
what those builders write with. Tensors that do not depend on the features (weights, constants, shapes)
are constants of the gradient. Quantized tensors carry gradients in real-value units (straight-through).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.errors import ExportError

from .vjp_ops import VJPS, refusal

MIN_OPSET = 17
TARGET_INPUT, GRADS_OUTPUT, CLASS_OUTPUT = "target_class", "grads", "grads_class"
GRAD_DOMAINS = ("", "ai.onnx", "com.microsoft")  # op types are looked up by name in these domains only

# Ops whose outputs have a zero gradient (or no real-valued one): dependency stops at them.
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not",
    "And", "Or", "Xor", "NonZero", "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "EyeLike",
    "ConstantOfShape", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
})
# Ops (mostly com.microsoft) whose first output has the shape, or at least the rank, of their first input.
SAME_SHAPE = frozenset({"DequantizeLinear", "QuantizeLinear", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"})
SAME_RANK = frozenset({"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool"})
# Element types that never carry a gradient. int8/uint8 do: they hold quantized real values.
INDEX_TYPES = frozenset({TensorProto.BOOL, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT32,
                         TensorProto.UINT64, TensorProto.STRING})


class Tape:
    """Where VJP builders write: fresh names, constants, and what is known about tensors before run time.

    ``dtype`` is the numpy type of the gradient being built (set per node); ``dep`` holds the tensors that
    depend on the features (only those get gradients).
    """

    def __init__(self, model: onnx.ModelProto, info: onnx.GraphProto, dep: set[str]):
        graph = model.graph
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.dep = dep
        self.dtype = np.dtype(np.float32)
        self.dtypes: dict[str, np.dtype] = {}  # gradients whose type is not ``dtype`` (after a Cast)
        self.seed: str | None = None  # the logits' gradient, one_hot(classes): builders may gather instead
        self.classes = CLASS_OUTPUT
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._values = {t.name: t for t in graph.initializer}
        self.producer = {o: node for node in graph.node for o in node.output}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self._values[node.output[0]] = node
        self._types: dict[str, int] = {}
        self._shapes: dict[str, tuple | None] = {}
        for vi in [*info.input, *info.output, *info.value_info]:
            self._record(vi)
        for t in graph.initializer:
            self._types[t.name], self._shapes[t.name] = t.data_type, tuple(t.dims)
        self._guess_ranks(graph)
        self._taken = {n for node in graph.node for n in [*node.input, *node.output, node.name]}
        self._taken |= {v.name for v in [*graph.input, *graph.output, *graph.initializer, *graph.value_info]}
        self._origin: dict[str, str] = {}  # aliases: shapes are read from the tensor they re-encode
        self._count = 0
        self._cache: dict[tuple, str] = {}

    def _record(self, vi: onnx.ValueInfoProto) -> None:
        t = vi.type.tensor_type
        if t.elem_type:
            self._types[vi.name] = t.elem_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            self._shapes[vi.name] = tuple(dims)

    def _guess_ranks(self, graph: onnx.GraphProto) -> None:
        """Shapes through the quantized ops that ONNX shape inference has no schema for."""
        for node in graph.node:
            x, y = (node.input[0] if node.input else ""), (node.output[0] if node.output else "")
            shape = self._shapes.get(x)
            if y in self._shapes or shape is None:
                continue
            if node.op_type in SAME_SHAPE:
                self._shapes[y] = shape
            elif node.op_type in SAME_RANK:
                self._shapes[y] = shape[:1] + (None,) * (len(shape) - 1)

    # --- what is known before run time -------------------------------------------------------------------
    def elem_type(self, name: str) -> int | None:
        return self._types.get(name)

    def static_shape(self, name: str) -> tuple | None:
        """Dims as ints (known), strings (symbolic) or None (unknown); None when even the rank is unknown."""
        return self._shapes.get(name)

    def rank(self, name: str, node: onnx.NodeProto) -> int:
        shape = self.static_shape(name)
        if shape is None:
            raise refusal(node, f"the rank of '{name}' is unknown (shape inference could not tell)")
        return len(shape)

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node), else None."""
        found = self._values.get(name)
        if found is None:
            return None
        if isinstance(found, onnx.TensorProto):
            return numpy_helper.to_array(found)
        for a in found.attribute:
            v = helper.get_attribute_value(a)
            return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)
        return None

    def needs(self, name: str) -> bool:
        return bool(name) and name in self.dep

    def alias(self, new: str, like: str) -> None:
        """``new`` holds the same values as ``like`` in another encoding: same shape, same dependency."""
        if like in self._shapes:
            self._shapes[new] = self._shapes[like]
        if like in self.dep:
            self.dep.add(new)
        self._origin[new] = self._origin.get(like, like)

    # --- writing -----------------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._count += 1
            name = f"grad/{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        """Append one node; returns its output name (or the list of them when n_out > 1)."""
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def copy_of(self, node: onnx.NodeProto, inputs: list[str]) -> str:
        """The same op with the same attributes on other inputs; returns its first output."""
        out = self.fresh(node.op_type)
        self.nodes.append(helper.make_node(node.op_type, inputs, [out], name=self.fresh(node.op_type),
                                           domain=node.domain))
        self.nodes[-1].attribute.extend(node.attribute)
        return out

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype)
        key = ("const", array.dtype.str, array.shape, array.tobytes())
        if key not in self._cache:
            name = self.fresh("c")
            self.inits.append(numpy_helper.from_array(array, name))
            self._values[name], self._shapes[name] = self.inits[-1], array.shape
            self._cache[key] = name
        return self._cache[key]

    def scalar(self, value: float) -> str:
        """A scalar in the gradient's type."""
        return self.const(value, self.dtype)

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    def shape(self, name: str, start: int | None = None) -> str:
        name = self._origin.get(name, name)
        key = ("shape", name, start)
        if key not in self._cache:
            self._cache[key] = self.op("Shape", [name]) if start is None else self.op("Shape", [name], start=start)
        return self._cache[key]

    def zeros(self, shape: str) -> str:
        """Zeros in the gradient's type, of a run-time shape (a 1-D int64 tensor)."""
        return self.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, self.dtype)))

    def ratio(self, x: str, y: str) -> str:
        """Size(x) / Size(y) as a scalar in the gradient's type (elements averaged per output element)."""
        x, y = self._origin.get(x, x), self._origin.get(y, y)
        sizes = self.op("Div", [self.op("Size", [x]), self.op("Size", [y])])
        return self.op("Cast", [sizes], to=helper.np_dtype_to_tensor_dtype(self.dtype))

    def reduce(self, op_type: str, x: str, axes: list[int] | str | None, keepdims: int = 1) -> str:
        """A Reduce* node, with axes as an attribute or an input as this opset wants."""
        if axes is None:
            return self.op(op_type, [x], keepdims=keepdims)
        if op_type == "ReduceSum" or self.opset >= 18 or isinstance(axes, str):
            return self.op(op_type, [x, axes if isinstance(axes, str) else self.ints(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def unbroadcast(self, g: str, x: str, g_shape: tuple | None) -> str:
        """Sum ``g`` (of static shape ``g_shape``, if known) over the axes that broadcasting added to ``x``."""
        xs = self.static_shape(x)
        if xs is not None and g_shape is not None and len(g_shape) >= len(xs):
            lead = len(g_shape) - len(xs)
            axes, known = list(range(lead)), True
            for i, (a, b) in enumerate(zip(xs, g_shape[lead:])):
                if a == 1 and b != 1:
                    axes.append(lead + i)
                elif not (a == b and a is not None) and not (isinstance(a, int) and a > 1):
                    known = False
            if known:
                if not axes:
                    return g
                return self.op("Reshape", [self.reduce("ReduceSum", g, axes), self.shape(x)])
        # Shapes only known at run time: sum over every axis where x (padded with leading 1s) is 1.
        sx = self.shape(x)
        lead = self.op("Sub", [self.op("Size", [self.shape(g)]), self.op("Size", [sx])])
        ones = self.op("ConstantOfShape", [self.op("Reshape", [lead, self.ints([1])])],
                       value=numpy_helper.from_array(np.ones(1, np.int64)))
        padded = self.op("Concat", [ones, sx], axis=0)
        axes = self.op("Reshape", [self.op("NonZero", [self.op("Equal", [padded, self.ints(1)])]), self.ints([-1])])
        summed = self.op("ReduceSum", [g, axes], keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", [summed, sx])

    def fit(self, t: str, x: str, k: int) -> str:
        """Crop or zero-pad the last ``k`` (spatial) axes of ``t`` at their end to those of ``x``."""
        sx = self.shape(x, start=2)
        axes = self.ints(list(range(2, 2 + k)))
        t = self.op("Slice", [t, self.ints([0] * k), sx, axes])
        short = self.op("Sub", [sx, self.shape(t, start=2)])
        pads = self.op("Concat", [self.ints([0] * (2 + k + 2)), short], axis=0)
        return self.op("Pad", [t, pads])

    def real(self, q: str, scale: str, zero: str | None, axis: int = 1) -> str:
        """The real values of a quantized tensor: folded here when constant, else a DequantizeLinear."""
        qv, sv = self.value(q), self.value(scale)
        zv = self.value(zero) if zero else np.zeros((), np.int64)
        if qv is not None and sv is not None and zv is not None:
            if sv.ndim == 1 and sv.size > 1:
                shape = [1] * qv.ndim
                shape[axis] = sv.size
                sv, zv = sv.reshape(shape), (zv.reshape(shape) if zv.size > 1 else zv)
            return self.const((qv.astype(np.float64) - zv) * sv, sv.dtype)
        out = self.op("DequantizeLinear", [q, scale] + ([zero] if zero else []), axis=axis)
        self.alias(out, q)
        return out

    def finish(self, keep: set[str]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The nodes that something uses (``keep``: names needed outside) and the constants they read."""
        used, nodes = set(keep), []
        for node in reversed(self.nodes):
            if any(o in used for o in node.output):
                nodes.append(node)
                used.update(node.input)
        return nodes[::-1], [t for t in self.inits if t.name in used]


def add_gradient_output(model: onnx.ModelProto, features: str, logits: str) -> onnx.ModelProto:
    """A copy of ``model`` that also gives d logits[n, target_n] / d features[n].

    Adds input ``target_class`` [N] int64 (a value < 0: the row's top-1, chosen in the graph; others must
    be < K) and outputs ``grads`` (the shape and float type of ``features``; for quantized features,
    real-value units in the logits' type) and ``grads_class`` [N] int64 (the class each row of ``grads``
    is for). Samples are assumed independent (no op mixes the batch). A model older than opset 17 is
    converted to it first.

    Raises:
        ExportError: unknown tensor names, logits that do not depend on the features, or an op in between
            whose gradient cannot be built (the message names the op and the node).
    """
    model = _at_least_opset(model)
    graph = model.graph
    produced = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    for name, what in ((features, "features"), (logits, "logits")):
        if name not in produced:
            raise ExportError(f"cannot build the gradient of the head: no tensor named '{name}' ({what})")
    for name in (TARGET_INPUT, GRADS_OUTPUT, CLASS_OUTPUT):
        if name in produced or name in {o.name for o in graph.output}:
            raise ExportError(f"cannot build the gradient of the head: the model already has a tensor '{name}'")
    try:
        info = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # inference is only a help: without it shapes are found at run time
        info = graph
    tape = Tape(model, info, set())
    tape.dep.update(_dependents(graph, features, tape))
    path = _path(graph, tape.dep, logits)
    if features not in {i for node in path for i in node.input}:
        raise ExportError(f"cannot build the gradient of the head: '{logits}' does not depend on '{features}'")
    feat_shape = tape.static_shape(features)
    if feat_shape is None:
        raise ExportError(f"cannot build the gradient of the head: the rank of '{features}' is unknown")
    logits_type = tape.elem_type(logits) or TensorProto.FLOAT
    tape.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(logits_type))
    tape.seed = seed = _seed(tape, logits)
    grads = _backward(tape, path, logits, seed)
    dx = grads.total(tape, features)
    tape.nodes.append(helper.make_node("Identity", [dx], [GRADS_OUTPUT], name="grad/output"))
    nodes, inits = tape.finish({GRADS_OUTPUT, CLASS_OUTPUT})
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    batch = (tape.static_shape(logits) or ("N",))[0] or "N"
    graph.input.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, [batch]))
    grad_type = helper.np_dtype_to_tensor_dtype(grads.dtypes[features])
    graph.output.append(helper.make_tensor_value_info(GRADS_OUTPUT, grad_type, feat_shape))
    graph.output.append(helper.make_tensor_value_info(CLASS_OUTPUT, TensorProto.INT64, [batch]))
    return model


def _at_least_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ExportError("cannot build the gradient of the head: the model imports no ONNX opset")
    if version < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:
            raise ExportError(f"cannot build the gradient of the head: converting opset {version} to "
                              f"{MIN_OPSET} failed ({str(exc).splitlines()[0][:200]})") from None
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    model.ir_version = max(model.ir_version, 8)
    return model


def _dependents(graph: onnx.GraphProto, features: str, tape: Tape) -> set[str]:
    """Tensors computed from ``features`` through ops that carry a gradient."""
    dep = {features}
    for node in graph.node:
        if node.op_type in NON_DIFFERENTIABLE or not any(i in dep for i in node.input):
            continue
        dep.update(o for o in node.output if o and tape.elem_type(o) not in INDEX_TYPES)
    return dep


def _path(graph: onnx.GraphProto, dep: set[str], logits: str) -> list[onnx.NodeProto]:
    """The nodes on a path from the features to the logits, in graph (topological) order."""
    wanted, path = {logits}, []
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output) and any(i in dep for i in node.input):
            path.append(node)
            wanted.update(i for i in node.input if i in dep)
    return path[::-1]


def _seed(tape: Tape, logits: str) -> str:
    """one_hot(target, K) in the logits' type; target < 0 is replaced by the row's ArgMax."""
    top1 = tape.op("ArgMax", [logits], axis=1, keepdims=0)
    asked = TARGET_INPUT
    tape.nodes.append(helper.make_node("Where", [tape.op("Less", [asked, tape.ints(0)]), top1, asked],
                                       [CLASS_OUTPUT], name="grad/target"))
    shape = tape.static_shape(logits)
    if shape is not None and len(shape) != 2:
        raise ExportError(f"cannot build the gradient of the head: logits '{logits}' are not [N, K]")
    if shape is not None and isinstance(shape[1], int) and shape[1] > 0:
        classes = tape.ints(np.arange(shape[1]))
    else:
        k = tape.op("Gather", [tape.shape(logits), tape.ints(1)], axis=0)
        classes = tape.op("Range", [tape.ints(0), k, tape.ints(1)])
    hot = tape.op("Equal", [tape.op("Unsqueeze", [CLASS_OUTPUT, tape.ints([1])]), classes])
    return tape.op("Cast", [hot], to=helper.np_dtype_to_tensor_dtype(tape.dtype))


class _Grads:
    """Gradient contributions per tensor, summed when a tensor is used more than once."""

    def __init__(self):
        self.parts: dict[str, list[str]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self._totals: dict[str, str] = {}

    def add(self, tape: Tape, name: str, grad: str, dtype: np.dtype) -> None:
        first = self.dtypes.setdefault(name, dtype)
        if dtype != first:  # mixed precision: sum in the type of the first contribution
            grad = tape.op("Cast", [grad], to=helper.np_dtype_to_tensor_dtype(first))
        self.parts.setdefault(name, []).append(grad)

    def total(self, tape: Tape, name: str) -> str | None:
        """The summed gradient of ``name`` (None when nothing flows back to it); sums once."""
        if name not in self._totals and name in self.parts:
            parts = self.parts[name]
            self._totals[name] = parts[0] if len(parts) == 1 else tape.op("Sum", parts)
        return self._totals.get(name)


def _backward(tape: Tape, path: list[onnx.NodeProto], logits: str, seed: str) -> _Grads:
    """Walk the path backwards, calling each node's VJP builder."""
    grads = _Grads()
    grads.add(tape, logits, seed, tape.dtype)
    for node in reversed(path):
        dys = [grads.total(tape, o) if o else None for o in node.output]
        live = [o for o, d in zip(node.output, dys) if d is not None]
        if not live:
            continue
        builder = VJPS.get(node.op_type) if node.domain in GRAD_DOMAINS else None
        if builder is None:
            raise refusal(node)
        tape.dtype = grads.dtypes[live[0]]
        dxs = builder(tape, node, dys)
        for i, (name, dx) in enumerate(zip(node.input, list(dxs) + [None] * len(node.input))):
            if not tape.needs(name):
                continue
            if dx is None:
                raise refusal(node, f"its input {i} ('{name}') depends on the features")
            grads.add(tape, name, dx, tape.dtypes.get(dx, tape.dtype))
    return grads
