"""Float16 copy of a contract file for the CUDA provider.

The backbone runs in float16; inputs, outputs and the head (pooling + linear layer) stay float32 and the
metadata is the fp32 file's, so the runtime is unchanged. Needs onnxconverter-common; never torch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from realtime_cam.contract import FEATURES, LOGITS, PREFIX, ModelInfo, write_contract
from realtime_cam.errors import ExportError
from realtime_cam.preprocess import Preprocessor

from .checks import cpu_session, replace_atomically
from .frames import Sources
from .lowering import (
    check_outputs,
    drop_unused_head_copies,
    fidelity_to_fp32,
    head_nodes,
    keep_metadata,
    keep_token_grid,
    load_fp32_contract,
    sample_check_frames,
    with_note,
)
from .options import DEFAULT_CHECK_FRAMES
from .token_grid import TOKEN_GRID_KEYS

__all__ = ["Fp16Report", "convert_fp16"]


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
        fidelity: ``realtime_cam.fidelity.fidelity`` against the fp32 file on the check frames, or None when
            none were given.
    """

    path: Path
    checked_inputs: int
    top1_agreement_pct: float
    logits_max_abs_diff: float
    logits_bound: float
    fidelity: dict | None = None


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
    head_index = set(head_nodes(graph))
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
    outputs = [o for o in model.graph.output if o.name not in head_outputs]  # features (and what feeds it)
    backbone.graph.ClearField("output")
    backbone.graph.output.extend(outputs)
    converted = convert(backbone, min_positive_val=_FP16_TINY, max_finite_val=_FP16_MAX, keep_io_types=True)
    _cast_to_what_is_declared(converted.graph)

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
    converted.graph.ClearField("output")
    converted.graph.output.extend(model.graph.output)  # float32 all, in the contract's order, as in the fp32 file
    return converted


def _cast_to_what_is_declared(graph: onnx.GraphProto) -> None:
    """A model's own Cast-to-float32 nodes (torch.onnx writes them in attention) cast to float16 where the
    converter declared their output float16: onnxconverter-common retypes the tensor but not the Cast, which
    ONNX Runtime then refuses to load."""
    declared = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    for node in graph.node:
        if node.op_type != "Cast" or declared.get(node.output[0]) != TensorProto.FLOAT16:
            continue
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16


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
    check_frames: int = DEFAULT_CHECK_FRAMES,
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
        check: frames to measure fidelity on right away, in the CPU provider (optional).
        check_frames: at most this many check frames.
        log: where the human-readable summary lines go.

    Raises:
        ExportError: a model that is not a contract file, onnxconverter-common missing, or a converted
            model that fails its checks.
    """
    fp32_path, output = Path(fp32_path), Path(output)
    source_model, info, weight, bias = load_fp32_contract(fp32_path)
    if any(p.key == PREFIX + TOKEN_GRID_KEYS[0] for p in source_model.metadata_props):
        # Seen with a ViT: ONNX Runtime 1.32's CPU graph optimizer (NchwcTransformer with MatmulTransposeFusion)
        # crashes the process on its float16 attention, in this check and in every later run.
        raise ExportError(f"{fp32_path.name} is explained at a token tensor (a transformer): --fp16 is not "
                          "supported for it (ONNX Runtime 1.32's CPU optimizer crashed on a ViT's float16 "
                          "attention); export it in float32, or with --int8")
    convert = _float16_converter()
    check_iter = sample_check_frames(check, check_frames)
    model = onnx.ModelProto()
    model.CopyFrom(source_model)
    drop_unused_head_copies(model)
    try:
        with warnings.catch_warnings(record=True) as clamped:
            warnings.simplefilter("always")
            model = _to_fp16_with_fp32_head(model, convert)
    except Exception as exc:  # noqa: BLE001 - the converter raises ValueError, KeyError, ... on odd graphs
        raise ExportError(f"float16 conversion of {fp32_path.name} failed ({str(exc).splitlines()[0][:200]})") from None
    if clamped:
        log(f"{len(clamped)} weights outside float16's range (magnitudes {_FP16_TINY:g} to {_FP16_MAX:g}) "
            "were clamped into it")
    keep_metadata(model, source_model)
    note = "float16 (float32 input, outputs and head)"
    info = with_note(info, note)
    write_contract(model, info, weight, bias)
    keep_token_grid(model, source_model)

    inputs = _test_inputs(info, 4)
    reference = cpu_session(fp32_path, "the fp32 model")
    name = reference.get_inputs()[0].name
    expected = [reference.run([LOGITS], {name: x})[0] for x in inputs]

    def verify(saved: Path) -> tuple[float, float, float]:
        got = check_outputs(saved, inputs, weight, bias, "float16")
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
    result = fidelity_to_fp32(fp32_path, output, check_iter, "float16", log)
    return Fp16Report(path=output, checked_inputs=len(inputs), top1_agreement_pct=agreement,
                      logits_max_abs_diff=diff, logits_bound=bound, fidelity=result)
