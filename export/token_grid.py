"""Token tensors made into maps [N, C, h, w] inside the graph (pytorch-grad-cam's ``reshape_transform``).

A transformer's layer outputs tokens: ViT/DeiT [N, extra + h*w, C] (a class token first), Swin [N, h, w, C]
(channels last). The gradient is built with respect to the token tensor itself (through the attention, MLP
and norms that follow it) and then the same reshape is applied to the tokens and to their gradient. The
reshape only drops and moves elements, so the moved gradient is the gradient of the class score with
respect to the map, and the runtime only ever sees [N, C, h, w].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.contract import PREFIX
from realtime_cam.errors import ExportError

from .head_grad import GRADS_OUTPUT
from .onnx_graph import tensor_names, unique_name

LAYOUTS = ("tokens", "nhwc")


@dataclass(frozen=True)
class TokenGrid:
    """How a token tensor becomes a map.

    Attributes:
        layout: "tokens" for [N, extra + h*w, C] (row-major patches after ``extra`` leading tokens), "nhwc"
            for [N, h, w, C].
        extra: the leading tokens dropped ("tokens" only): 1 for a class token, 2 for DeiT's distilled form.
    """

    layout: str
    extra: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS or self.extra < 0 or (self.layout == "nhwc" and self.extra):
            raise ExportError(f"unknown token layout {self.layout!r} (extra {self.extra})")

    def map_shape(self, shape: Sequence, what: str) -> tuple[int, int, int]:
        """(C, h, w) of the map for a token tensor of static ``shape`` (batch first)."""
        dims = list(shape)[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise ExportError(f"the token tensor {what} has no static shape after the batch: {list(shape)}")
        if self.layout == "nhwc":
            if len(dims) != 3:
                raise ExportError(f"the token tensor {what} is {list(shape)}, not [N, h, w, C]")
            return dims[2], dims[0], dims[1]
        if len(dims) != 2:
            raise ExportError(f"the token tensor {what} is {list(shape)}, not [N, T, C]")
        side = math.isqrt(dims[0] - self.extra) if dims[0] > self.extra else 0
        if side * side != dims[0] - self.extra or side < 2:
            raise ExportError(f"the token tensor {what} has {dims[0]} tokens: {dims[0]} - {self.extra} is not a "
                              "square grid of patches")
        return dims[1], side, side

    def describe(self, shape: Sequence) -> str:
        c, h, w = self.map_shape(shape, "")
        if self.layout == "nhwc":
            return f"[N, {h}, {w}, {c}] channels-last tokens transposed to [N, {c}, {h}, {w}]"
        dropped = f", {self.extra} leading token{'s' if self.extra > 1 else ''} dropped" if self.extra else ""
        return f"[N, {self.extra + h * w}, {c}] tokens{dropped}, reshaped to [N, {c}, {h}, {w}]"


def guess_grid(shape: Sequence) -> TokenGrid | None:
    """The grid of a [N, T, C] token tensor: the largest square of patches, the rest leading tokens (at most
    8: a class token, distillation or register tokens); None for any other rank or a count that fits none."""
    if len(shape) != 3 or not isinstance(shape[1], int) or shape[1] < 5:
        return None
    side = math.isqrt(shape[1])
    extra = shape[1] - side * side
    return TokenGrid("tokens", extra) if extra <= 8 else None


def grid_nodes(tokens: str, out: str, grid: TokenGrid, shape: Sequence, used: set[str]):
    """(nodes, initializers) computing the map ``out`` [N, C, h, w] from ``tokens`` of static ``shape``."""
    c, h, w = grid.map_shape(shape, f"'{tokens}'")
    if grid.layout == "nhwc":
        return [helper.make_node("Transpose", [tokens], [out], perm=[0, 3, 1, 2], name=unique_name(out, used))], []

    def const(hint: str, values) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(values, np.int64), unique_name(f"{out}/{hint}", used))

    starts, ends, axes = const("start", [grid.extra]), const("end", [grid.extra + h * w]), const("axis", [1])
    size = const("shape", [0, h, w, c])  # 0: the batch, copied from the input
    patches, hwc = unique_name(f"{out}/patches", used), unique_name(f"{out}/nhwc", used)
    nodes = [helper.make_node("Slice", [tokens, starts.name, ends.name, axes.name], [patches],
                              name=unique_name(patches, used)),
             helper.make_node("Reshape", [patches, size.name], [hwc], name=unique_name(hwc, used)),
             helper.make_node("Transpose", [hwc], [out], perm=[0, 3, 1, 2], name=unique_name(out, used))]
    return nodes, [starts, ends, axes, size]


def regrid(model: onnx.ModelProto, tokens: str, grid: TokenGrid, shape: Sequence) -> str:
    """Make the map of ``tokens`` and of the gradient output (added by add_gradient_output, w.r.t. the
    tokens) in ``model``, in place: ``grads`` becomes [N, C, h, w]. Returns the map's tensor name."""
    graph = model.graph
    used = tensor_names(graph) | {n.name for n in graph.node}
    c, h, w = grid.map_shape(shape, f"'{tokens}'")
    grads_tokens = unique_name(f"{GRADS_OUTPUT}/tokens", used)
    for node in graph.node:
        node.output[:] = [grads_tokens if o == GRADS_OUTPUT else o for o in node.output]
    feature_map = unique_name(f"{tokens}/map", used)
    for src, dst in ((tokens, feature_map), (grads_tokens, GRADS_OUTPUT)):
        nodes, inits = grid_nodes(src, dst, grid, shape, used)
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
    out = next(o for o in graph.output if o.name == GRADS_OUTPUT)
    elem = out.type.tensor_type.elem_type or TensorProto.FLOAT
    batch = out.type.tensor_type.shape.dim[0] if out.type.tensor_type.shape.dim else None
    dims = [batch.dim_param or batch.dim_value if batch is not None else "N", c, h, w]
    out.CopyFrom(helper.make_tensor_value_info(GRADS_OUTPUT, elem, dims))
    return feature_map


# The metadata keys record() writes (under the contract's prefix).
TOKEN_GRID_KEYS = ("features_tokens", "features_layout", "tokens_dropped")


def record(model: onnx.ModelProto, tokens: str, grid: TokenGrid) -> None:
    """Metadata: which token tensor the map is made from and how many leading tokens it drops."""
    for key, value in zip(TOKEN_GRID_KEYS, (tokens, grid.layout, str(grid.extra)), strict=True):
        model.metadata_props.add(key=PREFIX + key, value=value)
