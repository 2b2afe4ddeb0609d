"""Reading and editing an ONNX graph for the classifier rewrite (export/from_onnx.py).

Constants folded through Identity/Cast/Transpose/DequantizeLinear, DequantizeLinear in numpy (per tensor,
per axis, blocked), the activation's path back from an output, the shapes along it, and the edits a rewrite
makes: unique names, renaming a tensor everywhere, pruning what the new outputs no longer need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from realtime_cam.errors import ExportError

from .checks import cpu_session

# How far back from the output the head search looks; heads are a handful of ops, this only bounds the
# walk through models that have no pooling at all.
_MAX_WALK = 64
# (tensor, the node producing it) from the graph output backwards; (shape, ONNX elem type) per tensor.
DataPath = list[tuple[str, "onnx.NodeProto | None"]]
Shapes = dict[str, tuple[tuple[int, ...], int]]


class GraphIndex:
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
        return dequantize(inputs[0], inputs[1], zero_point, attrs.get("axis", 1), attrs.get("block_size", 0))

    def scale(self, name: str) -> float:
        value = self.value(name)
        if value is None:
            raise ExportError(f"the quantization scale '{name}' is not a constant")
        return float(np.abs(value).max())


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
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


def data_input(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, str] | None:
    """The input a node's activation flows through: its first non-constant input."""
    for i, name in enumerate(node.input):
        if name and not index.is_const(name):
            return i, name
    return None


def data_path(index: GraphIndex, output: str) -> DataPath:
    """(tensor, its producer) from the output backwards along the activation, at most _MAX_WALK ops."""
    path: DataPath = []
    tensor: str | None = output
    while tensor is not None and len(path) <= _MAX_WALK:
        node = index.producer.get(tensor)
        path.append((tensor, node))
        found = data_input(index, node) if node is not None else None
        tensor = found[1] if found else None
    return path


def tensor_shapes(model: onnx.ModelProto, path: DataPath, input_name: str, x: np.ndarray, src: Path) -> Shapes:
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
    shapes: Shapes = {}
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


def tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph uses (inputs, initializers, outputs, node inputs and outputs)."""
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    names.discard("")
    return names


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... if taken; the name returned is added to ``taken``."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears, subgraphs included."""
    for node in graph.node:
        for field_ in (node.input, node.output):
            for i, name in enumerate(field_):
                if name == old:
                    field_[i] = new
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                rename_tensor(sub, old, new)
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


def prune(graph: onnx.GraphProto) -> None:
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
