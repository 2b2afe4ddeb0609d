"""Any classifier head: the explained layer and the gradient of the class score, computed inside the graph.

When the head after the last spatial map is not global average pooling + one linear layer (an MLP, a conv
classifier before the pooling, max or attention pooling, ...), CAM is not defined, but the gradient methods
are: the contract file then carries ``features`` (that map, or the tensor ``--features`` names), ``logits``
and the gradient of one class score with respect to the features (export/head_grad.py), and no linear head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.contract import FEATURES, GRADS, GRADS_CLASS, LOGITS, TARGET_CLASS
from realtime_cam.errors import ExportError

from .head_grad import CLASS_OUTPUT, GRADS_OUTPUT, TARGET_INPUT, add_gradient_output
from .onnx_graph import DataPath, Shapes, prune, rename_tensor, tensor_names, unique_name
from .token_grid import TokenGrid, regrid

_SOFTMAX = ("Softmax", "LogSoftmax")


def explained_tensors(path: DataPath, shapes: Shapes, asked: str | None, src: Path,
                      produced: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(features, logits) for a graph head: the asked tensor (on the data path, or any of ``produced``: a
    block's inner tensor, off the residual path) or the last 4-D map with more than one position, and the
    output (the input of a final Softmax, whose gradient would explain probabilities instead)."""
    logits = path[0][0]
    producer = path[0][1]
    if producer is not None and producer.op_type in _SOFTMAX and producer.input:
        logits = producer.input[0]
    if asked is not None:
        if asked not in shapes and asked not in {t for t, _ in path} and asked not in produced:
            known = any(asked in node.output for _, node in path if node is not None)
            if not known:
                raise ExportError(f"--features {asked}: no tensor of that name on the path from {src.name}'s "
                                  "input to its output")
        return asked, logits
    for tensor, _ in path:
        shape = shapes.get(tensor, ((), 0))[0]
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            return tensor, logits
    raise ExportError(f"cannot explain {src.name}: no 4-D spatial map [N, C, h, w] before its output; name the "
                      "layer to explain with --features TENSOR")


def with_gradient_head(model: onnx.ModelProto, features: str, logits: str, log: Callable[[str], None],
                       why: str | None = None, grid: TokenGrid | None = None,
                       token_shape: tuple | None = None) -> onnx.ModelProto:
    """The model with the contract's outputs for a graph head: ``logits``, ``features``, ``grads``,
    ``grads_class``, and the input ``target_class`` defaulting to -1 (each frame's top-1), so that a run that
    feeds only the image works. With ``grid``, ``features`` is a token tensor (of static ``token_shape``):
    the gradient is taken w.r.t. it and both are made into maps [N, C, h, w] (export/token_grid.py)."""
    model, features, logits = _free_contract_names(model, features, logits)
    _require_float(model, features)
    model = add_gradient_output(model, features, logits)
    tokens = features
    if grid is not None:
        features = regrid(model, features, grid, token_shape)
    graph = model.graph
    names = {GRADS_OUTPUT: GRADS, CLASS_OUTPUT: GRADS_CLASS, TARGET_INPUT: TARGET_CLASS}
    if any(a != b for a, b in names.items()):  # the contract's names are the head builder's
        raise ExportError("the gradient builder's tensor names differ from the contract's")
    outputs = {o.name: o for o in graph.output}
    del graph.output[:]
    graph.node.append(helper.make_node("Identity", [logits], [LOGITS], name="realtime_cam/logits"))
    graph.node.append(helper.make_node("Identity", [features], [FEATURES], name="realtime_cam/features"))
    graph.output.extend([helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", "K"]),
                         helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", "C", "h", "w"]),
                         outputs[GRADS], outputs[GRADS_CLASS]])
    # A default for the target: ONNX Runtime lets a run override an initializer that is also an input.
    target = next(i for i in graph.input if i.name == TARGET_CLASS)
    target.type.tensor_type.shape.dim[0].dim_param = "targets"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), TARGET_CLASS))
    prune(graph)
    why = why or "the head is not global average pooling + one linear layer"
    if grid is not None:
        log(f"'{tokens}' is {grid.describe(token_shape)} inside the graph; its gradient flows back through "
            "every op between it and the logits")
    log(f"'{tokens}' explained with the gradient of the class score computed inside the graph ({why}): "
        "gradcam, gradcam++, xgradcam, layercam, hirescam and eigencam; no cam")
    return model


def _require_float(model: onnx.ModelProto, tensor: str) -> None:
    """Refuse a quantized (integer) map: the runtime's maps are computed on float features."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference is only a help; the export's own run checks the rest
        return
    integer = any(info.name == tensor and info.type.tensor_type.elem_type not in (
                      0, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
                  for info in (*inferred.value_info, *inferred.output, *inferred.input))
    # ONNX's inference does not type the outputs of ONNX Runtime's own quantized ops (com.microsoft QLinear*):
    # what such an op or a QuantizeLinear writes is an integer tensor.
    producer = next((node for node in model.graph.node if tensor in node.output), None)
    if integer or (producer is not None and (producer.op_type == "QuantizeLinear"
                                             or producer.op_type.startswith("QLinear"))):
        raise ExportError(f"cannot explain '{tensor}': it is a quantized (integer) tensor; name a float tensor "
                          "with --features (a DequantizeLinear's output), or export the float model and quantize "
                          "it with --int8 later")


def _free_contract_names(model: onnx.ModelProto, features: str, logits: str) -> tuple[onnx.ModelProto, str, str]:
    """A copy of the model in which no tensor is already called ``logits`` or ``features`` (a classifier whose
    output is named 'logits' is common), with the two names updated."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    used = tensor_names(copy.graph)
    for name in (LOGITS, FEATURES):
        if name in used:
            new = unique_name(f"{name}_orig", used)
            rename_tensor(copy.graph, name, new)
            features = new if features == name else features
            logits = new if logits == name else logits
    return copy, features, logits
