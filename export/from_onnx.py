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
The head is found in onnx_head.py (one reader per linear-layer op); onnx_graph.py reads and edits the graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from realtime_cam.contract import (
    FEATURES,
    GRADS,
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
from .graph_head import explained_tensors, with_gradient_head
from .onnx_graph import (
    DataPath,
    GraphIndex,
    Shapes,
    data_path,
    dequantize,
    prune,
    rename_tensor,
    tensor_names,
    tensor_shapes,
    unique_name,
)
from .onnx_head import Head, InputTooSmall, find_head, op_of
from .token_grid import TokenGrid, guess_grid
from .token_grid import record as record_grid

__all__ = ["RewriteReport", "rewrite_onnx_classifier"]

_TEST_SEED = 0


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


def rewrite_onnx_classifier(
    src: str | Path,
    output: str | Path,
    *,
    labels_path: str | None = None,
    input_size_hw: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bgr: bool = False,
    features: str | None = None,
    grid: TokenGrid | None = None,
    why: str | None = None,
    log: Callable[[str], None] = print,
) -> RewriteReport:
    """Rewrite an ONNX classifier into a contract file: with its linear head when the head is GAP + linear
    (float or quantized), else with the gradient of the class score computed inside the graph.

    Args:
        src: the classifier (.onnx); it is read, never modified.
        output: where to write the contract file (written to a temporary name, then renamed).
        labels_path: class names, one per line (default: ImageNet-1k for 1000 classes, else numbered).
        input_size_hw: the input size, needed when the model's input height/width are not fixed.
        mean: per-channel mean on the 0..1 scale in the model's channel order (default ImageNet's).
        std: per-channel std on the 0..1 scale in the model's channel order (default ImageNet's).
        bgr: the model takes BGR input (the ImageNet defaults are then given in BGR order).
        features: the tensor to explain (pytorch-grad-cam's target layer); None: the map before a GAP +
            linear head, else the last spatial map. Naming one always explains with in-graph gradients.
        grid: how the ``features`` tensor, a token tensor, becomes a map (export/token_grid.py); None: a
            [N, T, C] tensor is read as a square grid of patches after at most 8 leading tokens.
        why: why ``features`` is explained with gradients, for the log line (default: "as asked" when named).
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
    index = GraphIndex(graph)
    path = data_path(index, graph.output[0].name)
    shapes = tensor_shapes(model, path, image_input.name, tests[0], src)
    try:
        head = None if features is not None else find_head(index, path, shapes, src)
    except InputTooSmall:
        raise
    except ExportError:  # not GAP + linear: the gradient methods still explain it
        head = None
    if head is None:
        return _rewrite_graph_head(model, original_bytes, path, shapes, (features, grid), image_input.name, tests,
                                   ModelInfo(labels=("?",), input_size_hw=size_hw, mean=mean_t, std=std_t,
                                             channel_order=order),
                                   labels_path, Path(output), src, log, why)

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


def _rewrite_graph_head(model: onnx.ModelProto, original_bytes: bytes, path: DataPath, shapes: Shapes,
                        asked_grid: tuple[str | None, TokenGrid | None], input_name: str, tests: list[np.ndarray],
                        base: ModelInfo, labels_path: str | None, output: Path, src: Path,
                        log: Callable[[str], None], why: str | None = None) -> RewriteReport:
    """A contract file without a linear head: ``features``, ``logits`` and their gradient (see graph_head.py)."""
    asked, grid = asked_grid
    produced = frozenset(o for node in model.graph.node for o in node.output)
    features, logits = explained_tensors(path, shapes, asked, src, produced)
    token_shape = None
    if asked is not None:  # a token tensor becomes a map inside the graph
        token_shape = (shapes.get(features) or tensor_shapes(model, [(features, None)], input_name, tests[0],
                                                            src)[features])[0]
        grid = grid or guess_grid(token_shape)
    model = with_gradient_head(model, features, logits, log, grid=grid,
                               why=why or ("as asked" if asked is not None else None),
                               token_shape=token_shape)
    original = _tensor_values(original_bytes, logits, input_name, tests, src)
    num_classes = int(original[0].shape[-1])
    try:
        info = dataclasses.replace(base, labels=default_labels(num_classes, labels_path),
                                   source=f"{src.name} rewritten by realtime-cam (gradients w.r.t. {features})")
    except CamError as exc:
        raise ExportError(str(exc)) from None
    write_contract(model, info, None, None)
    if grid is not None:
        record_grid(model, features, grid)
    session = cpu_session(model.SerializeToString(), src.name)
    diff = 0.0
    for x, want in zip(tests, original, strict=True):
        got_logits, got_features, grads = session.run([LOGITS, FEATURES, GRADS], {input_name: x})
        if got_features.ndim != 4 or grads.shape != got_features.shape:
            raise ExportError(f"cannot explain {src.name}: '{features}' is {list(got_features.shape)}, not a map "
                              "[N, C, h, w]; name another layer with --features")
        diff = max(diff, float(np.abs(got_logits.reshape(want.shape) - want).max()))
    if diff > max(float_tolerance(v) for v in original):
        raise ExportError(f"the rewritten {src.name} gives logits {diff:.3g} away from the original's")

    def verify(saved: Path) -> None:
        onnx.checker.check_model(str(saved))

    replace_atomically(model, output, verify)
    c, h, w = (int(v) for v in got_features.shape[1:])
    log(f"check on seeded random input: logits equal the original model's to {diff:.3g}; features '{features}' "
        f"[{c}x{h}x{w}], {num_classes} classes")
    return RewriteReport(path=output, num_classes=num_classes, feature_shape_chw=(c, h, w),
                         head_kind=f"graph (gradients w.r.t. {features})", quantized=False, logits_max_abs_diff=diff,
                         head_max_abs_error=0.0, head_error_bound=0.0)


def _tensor_values(original_bytes: bytes, tensor: str, input_name: str, tests: list[np.ndarray],
                   src: Path) -> list[np.ndarray]:
    """A tensor of the original model on each test batch (exposed as an extra output if need be)."""
    model = onnx.ModelProto.FromString(original_bytes)
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    session = cpu_session(model.SerializeToString(), src.name)
    try:
        return [session.run([tensor], {input_name: x})[0] for x in tests]
    except Exception as exc:  # noqa: BLE001 - re-raised; onnxruntime raises its own Fail/InvalidArgument types
        raise ExportError(f"onnxruntime cannot run {src.name}: {str(exc).splitlines()[0][:300]}") from None


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


# ----------------------------------------------------------------------------- rewriting the graph
def _rewire(model: onnx.ModelProto, head: Head, image: onnx.ValueInfoProto, feature_chw: tuple[int, int, int],
            num_classes: int, logits_rank: int, fixed_hw: bool) -> None:
    """Route ``head.logits`` and ``head.features`` to the outputs ``logits`` and ``features``, drop the rest.

    New nodes read the existing tensors and nothing existing is renamed except names that clash with
    ``logits``/``features``, so the original computation (and onnxruntime's fusions of it) stays as it was.
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if (head.logits_quant or head.feature_quant) and opset < 10:
        raise ExportError(f"the model imports ONNX opset {opset}, which has no DequantizeLinear (needs 10 or later)")
    used = tensor_names(graph)
    for name in (LOGITS, FEATURES):
        if name in used:
            new = unique_name(f"{name}_orig", used)
            rename_tensor(graph, name, new)
            used.add(new)
            head.logits = new if head.logits == name else head.logits
            head.features = new if head.features == name else head.features
    node_names = {n.name for n in graph.node}

    def dequantize_node(tensor: str, quant: tuple[str, str], out: str) -> onnx.NodeProto:
        # Per-tensor scale and zero point: valid from opset 10, the first with quantized ops.
        scale, zero_point = quant
        inputs = [tensor, scale] + ([zero_point] if zero_point else [])
        return helper.make_node("DequantizeLinear", inputs, [out], name=unique_name(f"realtime_cam_{out}", node_names))

    new_nodes = []
    logits = head.logits
    if head.logits_quant is not None:  # QLinearSoftmax: its input is the quantized logits
        float_logits = LOGITS if logits_rank == 2 else unique_name("realtime_cam_logits_float", used)
        new_nodes.append(dequantize_node(logits, head.logits_quant, float_logits))
        logits = float_logits
    if logits_rank != 2:  # e.g. [N, K, 1, 1] from a 1x1-conv head without a flatten
        new_nodes.append(helper.make_node("Flatten", [logits], [LOGITS], axis=1,
                                          name=unique_name("realtime_cam_logits", node_names)))
    elif head.logits_quant is None:
        new_nodes.append(helper.make_node("Identity", [logits], [LOGITS],
                                          name=unique_name("realtime_cam_logits", node_names)))
    producer = GraphIndex(graph).producer.get(head.features)
    if head.feature_quant is not None:
        # QOperator: the map is quantized; dequantize it with the pooling's own input scale/zero point.
        features_node = dequantize_node(head.features, head.feature_quant, FEATURES)
    elif producer is not None and op_of(producer) == "DequantizeLinear":
        # QDQ: a second DequantizeLinear of the same quantized tensor, so onnxruntime still fuses the
        # original DequantizeLinear -> pool -> QuantizeLinear into an integer pool (an Identity on the
        # DequantizeLinear's output would give it a second consumer).
        features_node = onnx.NodeProto()
        features_node.CopyFrom(producer)
        features_node.ClearField("output")
        features_node.output.append(FEATURES)
        features_node.name = unique_name("realtime_cam_features", node_names)
    else:
        features_node = helper.make_node("Identity", [head.features], [FEATURES],
                                         name=unique_name("realtime_cam_features", node_names))
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
    prune(graph)


# ----------------------------------------------------------------------------- checking
def _check(model: onnx.ModelProto, head: Head, input_name: str, tests: list[np.ndarray],
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


def _original_logits(original_bytes: bytes, head: Head, index: GraphIndex, input_name: str, tests: list[np.ndarray],
                     src: Path) -> list[np.ndarray]:
    """The original model's logits on each test batch (its logits tensor exposed as an extra output if need be)."""
    values = _tensor_values(original_bytes, head.logits, input_name, tests, src)
    if head.logits_quant is not None:
        scale, zero_point = (index.value(name) if name else None for name in head.logits_quant)
        values = [dequantize(v, scale, zero_point).astype(np.float32) for v in values]
    return [v.reshape(v.shape[0], -1) for v in values]
