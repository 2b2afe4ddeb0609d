"""What the int8 and float16 copies of a contract file share.

The fp32 file they start from (refusing one that is already lowered), the head they keep in float32, the
metadata they carry over, the checks of what they wrote, and the fidelity measured against the fp32 file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from realtime_cam.contract import (
    FEATURES,
    GRADS,
    HEAD_BIAS_COPY,
    HEAD_WEIGHT_COPY,
    LOGITS,
    PREFIX,
    ModelInfo,
    read_contract,
)
from realtime_cam.errors import CamError, ExportError, SourceError
from realtime_cam.fidelity import fidelity, format_fidelity
from realtime_cam.model import CamModel

from .checks import cpu_session, float_tolerance
from .frames import Sources, sample_frames
from .token_grid import TOKEN_GRID_KEYS

_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "MatMulInteger",
                  "ConvInteger"}


def load_fp32_contract(path: str | os.PathLike
                       ) -> tuple[onnx.ModelProto, ModelInfo, np.ndarray | None, np.ndarray | None]:
    """The float32 contract file: the model, its metadata and its head W, b (None, None for a graph head:
    one explained with in-graph gradients)."""
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
    """Refuse a model that is already quantized or float16: lowering starts from the fp32 file."""
    quantized = sorted({n.op_type for n in model.graph.node
                        if n.op_type in _QUANTIZED_OPS or n.op_type.startswith("QLinear")})
    if quantized:
        raise ExportError(f"{name} is already quantized ({', '.join(quantized)}); give the float32 contract file")
    if any(init.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) for init in model.graph.initializer):
        raise ExportError(f"{name} already holds float16 weights; give the float32 contract file")


def head_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices of the nodes that ``features`` does not depend on, which stay float32: for a GAP + linear head
    the pooling, glue and the linear layer; for a graph head also the rest of the network after the explained
    layer and the nodes that compute the gradient."""
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

    return sorted(set(range(len(graph.node))) - upstream(FEATURES))


def drop_unused_head_copies(model: onnx.ModelProto) -> None:
    """Remove the contract's head copies when no node reads them; write_contract adds them again as float32."""
    used = {name for node in model.graph.node for name in node.input}
    for i in range(len(model.graph.initializer) - 1, -1, -1):
        name = model.graph.initializer[i].name
        if name in (HEAD_WEIGHT_COPY, HEAD_BIAS_COPY) and name not in used:
            del model.graph.initializer[i]
    for i in range(len(model.graph.input) - 1, -1, -1):
        if model.graph.input[i].name in (HEAD_WEIGHT_COPY, HEAD_BIAS_COPY):
            del model.graph.input[i]


def keep_token_grid(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give ``model`` (after write_contract) the source's record of the token tensor its map is made from."""
    keys = {PREFIX + key for key in TOKEN_GRID_KEYS}
    model.metadata_props.extend(p for p in source.metadata_props if p.key in keys)


def describe_kept(kept: list[str], graph_head: bool) -> str:
    """What stayed float32, for the log line: a linear head's node names, or how many nodes a graph head (one
    explained with in-graph gradients) keeps."""
    if not graph_head:
        return f"head {', '.join(kept)} kept float32"
    return f"the {len(kept)} nodes after the explained layer (the rest of the network, its head and the gradient) " \
           "kept float32"


def keep_metadata(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give ``model`` the source model's metadata other than the contract's (write_contract adds that)."""
    del model.metadata_props[:]
    model.metadata_props.extend(p for p in source.metadata_props if not p.key.startswith(PREFIX))
    model.doc_string = source.doc_string


def with_note(info: ModelInfo, note: str) -> ModelInfo:
    """``info`` whose ``source`` also says how this copy was made."""
    return dataclasses.replace(info, source=f"{info.source}; {note}" if info.source else note)


def check_outputs(path: Path, batches: list[np.ndarray], weight: np.ndarray | None, bias: np.ndarray | None,
                  what: str) -> list[np.ndarray]:
    """Check a written file: onnx.checker, float32 ``logits`` and ``features``, and a float head (W, b explain
    the logits; for a graph head, W is None: a float32 gradient of the map's shape, finite).

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
        if weight is None:
            logits, features, grads = session.run([LOGITS, FEATURES, GRADS], {name: batch})
            if grads.dtype != np.float32 or grads.shape != features.shape or not np.isfinite(grads).all():
                raise ExportError(f"the {what} model's gradient is {grads.dtype} {list(grads.shape)}, not a finite "
                                  f"float32 tensor the map's shape {list(features.shape)}; this is a bug in "
                                  "realtime-cam")
            all_logits.append(logits)
            continue
        logits, features = session.run([LOGITS, FEATURES], {name: batch})
        # The head stayed float32, so the map must explain the logits to float rounding, as in the fp32 file.
        predicted = features.astype(np.float64).mean(axis=(2, 3)) @ weight.T.astype(np.float64) + bias
        error = float(np.abs(predicted - logits).max())
        if error > float_tolerance(logits):
            raise ExportError(f"the {what} model's W @ mean(features) + b misses its logits by {error:.3g}; "
                              "this is a bug in realtime-cam")
        all_logits.append(logits)
    return all_logits


def sample_check_frames(check: Sources | None, max_frames: int) -> Iterator[np.ndarray] | None:
    """The check frames (opened and checked now, read lazily), or None when no check set is given."""
    try:
        return sample_frames(check, max_frames) if check is not None else None
    except SourceError as exc:
        raise ExportError(f"check source: {exc}") from None


def fidelity_to_fp32(fp32_path: Path, output: Path, frames: Iterator[np.ndarray] | None, what: str,
                     log: Callable[[str], None]) -> dict | None:
    """:func:`fidelity` of ``output`` against the fp32 file on the check frames, logged; None without frames."""
    if frames is None:
        return None
    result = fidelity(CamModel(fp32_path, device="cpu"), CamModel(output, device="cpu"), frames)
    log(f"{what} vs fp32: {format_fidelity(result)}")
    return result
