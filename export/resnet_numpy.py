"""torchvision's ResNets (18, 34, 50, 101, 152) to the realtime-cam contract with numpy and onnx.helper: no torch.

The graph is torchvision's forward in eval mode: conv1, bn1, relu, max pool, four stages of BasicBlock (18, 34)
or Bottleneck (50, 101, 152, stride on the 3x3 conv as torchvision has it), global average pooling, fc. Each
BatchNorm is folded into the conv before it (in float64); ``features`` is layer4's output. Before the file
gets its name, ONNX Runtime runs it against a numpy forward pass of the network with its BatchNorms unfolded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.contract import FEATURES, LOGITS, ModelInfo, default_labels, load_labels, write_contract
from realtime_cam.errors import ExportError

from . import hub
from .checks import check_contract_file, replace_atomically
from .options import DEFAULT_OPSET, TORCH_FREE_ARCHES
from .torch_weights import read_state_dict

__all__ = ["ARCHES", "Exported", "export_resnet", "forward", "random_state_dict", "resnet_graph"]

# arch -> (block, blocks per stage); torchvision's resnet.py.
ARCHES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
assert tuple(ARCHES) == TORCH_FREE_ARCHES
# arch -> (torchvision's DEFAULT, {weights name: file at BASE_URL}): the same files and hashes as its weights API.
BASE_URL = "https://download.pytorch.org/models/"
WEIGHTS: dict[str, tuple[str, dict[str, str]]] = {
    "resnet18": ("IMAGENET1K_V1", {"IMAGENET1K_V1": "resnet18-f37072fd.pth"}),
    "resnet34": ("IMAGENET1K_V1", {"IMAGENET1K_V1": "resnet34-b627a593.pth"}),
    "resnet50": ("IMAGENET1K_V2", {"IMAGENET1K_V1": "resnet50-0676ba61.pth", "IMAGENET1K_V2": "resnet50-11ad3fa6.pth"}),
    "resnet101": ("IMAGENET1K_V2", {"IMAGENET1K_V1": "resnet101-63fe2227.pth",
                                    "IMAGENET1K_V2": "resnet101-cd907fc2.pth"}),
    "resnet152": ("IMAGENET1K_V2", {"IMAGENET1K_V1": "resnet152-394f9c45.pth",
                                    "IMAGENET1K_V2": "resnet152-f82ba261.pth"}),
}
BN_EPS = 1e-5  # torchvision's BatchNorm2d default
INPUT_SIZE = 224


@dataclass(frozen=True)
class Conv:
    """One conv and the BatchNorm after it: state-dict names, shape, stride (padding is kernel // 2)."""

    weight: str
    bn: str
    cin: int
    cout: int
    kernel: int
    stride: int


@dataclass(frozen=True)
class Block:
    """A residual block: its convs in order, and the downsample conv of the shortcut (None: identity)."""

    convs: tuple[Conv, ...]
    downsample: Conv | None


def blocks(arch: str) -> Iterator[Block]:
    kind, counts = ARCHES[arch]
    expansion = 1 if kind == "basic" else 4
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(counts, (64, 128, 256, 512)), start=1):
        for i in range(count):
            p, stride, out = f"layer{stage}.{i}", (2 if stage > 1 and i == 0 else 1), planes * expansion
            if kind == "basic":
                shapes = ((inplanes, planes, 3, stride), (planes, planes, 3, 1))
            else:
                shapes = ((inplanes, planes, 1, 1), (planes, planes, 3, stride), (planes, out, 1, 1))
            convs = tuple(Conv(f"{p}.conv{j}.weight", f"{p}.bn{j}", *s) for j, s in enumerate(shapes, start=1))
            down = None
            if stride != 1 or inplanes != out:
                down = Conv(f"{p}.downsample.0.weight", f"{p}.downsample.1", inplanes, out, 1, stride)
            yield Block(convs, down)
            inplanes = out


STEM = Conv("conv1.weight", "bn1", 3, 64, 7, 2)


def _all_convs(arch: str) -> Iterator[Conv]:
    yield STEM
    for block in blocks(arch):
        yield from block.convs
        if block.downsample is not None:
            yield block.downsample


def feature_channels(arch: str) -> int:
    return 512 if ARCHES[arch][0] == "basic" else 2048


def expected_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor torchvision's ``arch`` has in its state dict (but num_batches_tracked), with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for conv in _all_convs(arch):
        shapes[conv.weight] = (conv.cout, conv.cin, conv.kernel, conv.kernel)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{conv.bn}.{name}"] = (conv.cout,)
    shapes["fc.weight"] = (num_classes, feature_channels(arch))
    shapes["fc.bias"] = (num_classes,)
    return shapes


def random_state_dict(arch: str, seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """A state dict initialised as torchvision initialises ``arch`` (He-normal convs, identity BatchNorms)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(arch, num_classes).items():
        if len(shape) == 4:  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
            state[name] = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])), shape)
        elif name.startswith("fc."):  # nn.Linear's uniform(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / np.sqrt(feature_channels(arch))
            state[name] = rng.uniform(-bound, bound, shape)
        else:
            state[name] = np.ones(shape) if name.endswith(("weight", "running_var")) else np.zeros(shape)
    return {k: v.astype(np.float32) for k, v in state.items()}


def check_state_dict(state: dict[str, np.ndarray], arch: str, source: str) -> int:
    """The class count of a state dict that fits torchvision's ``arch``; an ExportError naming what does not."""
    fc = state.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1000
    expected = expected_shapes(arch, num_classes)
    present = {k for k in state if not k.endswith("num_batches_tracked")}
    problems = []
    if missing := sorted(expected.keys() - present):
        problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} ({len(missing)})")
    if unexpected := sorted(present - expected.keys()):
        problems.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''} "
                        f"({len(unexpected)})")
    for name in sorted(expected.keys() & present):
        if tuple(state[name].shape) != expected[name]:
            problems.append(f"{name} is {list(state[name].shape)}, not {list(expected[name])}")
    if problems:
        raise ExportError(f"{source} does not fit torchvision's {arch}: {'; '.join(problems)[:400]}")
    bad = [k for k in expected if not np.issubdtype(state[k].dtype, np.floating) or not np.isfinite(state[k]).all()]
    if bad:
        raise ExportError(f"{source}: {', '.join(bad[:4])} hold non-float or non-finite values")
    return num_classes


def _folded(state: dict[str, np.ndarray], conv: Conv) -> tuple[np.ndarray, np.ndarray]:
    """The conv's weight and bias with its BatchNorm folded in, computed in float64."""
    bn = {k: state[f"{conv.bn}.{k}"].astype(np.float64) for k in ("weight", "bias", "running_mean", "running_var")}
    scale = bn["weight"] / np.sqrt(bn["running_var"] + BN_EPS)
    weight = state[conv.weight].astype(np.float64) * scale[:, None, None, None]
    return weight.astype(np.float32), (bn["bias"] - bn["running_mean"] * scale).astype(np.float32)


def resnet_graph(arch: str, state: dict[str, np.ndarray], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX graph of ``arch`` with these weights: input [N, 3, 224, 224], outputs logits and features."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def conv(x: str, c: Conv, relu: bool = True) -> str:
        weight, bias = _folded(state, c)
        name = c.weight[: -len(".weight")]
        inits.extend([numpy_helper.from_array(weight, c.weight), numpy_helper.from_array(bias, f"{name}.bias")])
        pad = c.kernel // 2
        nodes.append(helper.make_node("Conv", [x, c.weight, f"{name}.bias"], [f"{name}.out"],
                                      kernel_shape=[c.kernel] * 2, strides=[c.stride] * 2, pads=[pad] * 4))
        if not relu:
            return f"{name}.out"
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"]))
        return f"{name}.relu"

    x = conv("input", STEM)
    nodes.append(helper.make_node("MaxPool", [x], ["maxpool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x = "maxpool"
    block_list = list(blocks(arch))
    for i, block in enumerate(block_list):
        y = x
        for c in block.convs[:-1]:
            y = conv(y, c)
        y = conv(y, block.convs[-1], relu=False)
        shortcut = x if block.downsample is None else conv(x, block.downsample, relu=False)
        prefix = block.convs[0].weight.rsplit(".", 2)[0]
        nodes.append(helper.make_node("Add", [y, shortcut], [f"{prefix}.add"]))
        x = FEATURES if i == len(block_list) - 1 else f"{prefix}.relu"
        nodes.append(helper.make_node("Relu", [f"{prefix}.add"], [x]))
    # fc is named head.* as in the torch export, whose wrapper calls it head: the two files name the same things.
    fc_weight, fc_bias = state["fc.weight"].astype(np.float32), state["fc.bias"].astype(np.float32)
    inits.extend([numpy_helper.from_array(fc_weight, "head.weight"), numpy_helper.from_array(fc_bias, "head.bias")])
    nodes.extend([helper.make_node("GlobalAveragePool", [FEATURES], ["pooled"]),
                  helper.make_node("Flatten", ["pooled"], ["flat"]),
                  helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], [LOGITS], transB=1)])
    side = INPUT_SIZE // 32
    graph = helper.make_graph(
        nodes, arch,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", fc_weight.shape[0]]),
         helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", fc_weight.shape[1], side, side])],
        inits)
    return helper.make_model(graph, producer_name="realtime-cam", opset_imports=[helper.make_opsetid("", opset)])


# ----------------------------------------------------------------------------- the numpy reference
def _conv2d(x: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    k = weight.shape[-1]
    pad = k // 2
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.tensordot(windows, weight, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)


def _conv_bn(x: np.ndarray, state: dict[str, np.ndarray], c: Conv, relu: bool = True) -> np.ndarray:
    y = _conv2d(x, state[c.weight], c.stride)
    g = {k: state[f"{c.bn}.{k}"][:, None, None] for k in ("weight", "bias", "running_mean", "running_var")}
    y = (y - g["running_mean"]) / np.sqrt(g["running_var"] + np.float32(BN_EPS)) * g["weight"] + g["bias"]
    return np.maximum(y, 0) if relu else y


def forward(arch: str, state: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, layer4's features) of ``arch`` on x [N, 3, H, W], in float32 numpy, BatchNorms as they are."""
    y = _conv_bn(x.astype(np.float32), state, STEM)
    y = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    y = np.lib.stride_tricks.sliding_window_view(y, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))
    for block in blocks(arch):
        z = y
        for c in block.convs[:-1]:
            z = _conv_bn(z, state, c)
        z = _conv_bn(z, state, block.convs[-1], relu=False)
        shortcut = y if block.downsample is None else _conv_bn(y, state, block.downsample, relu=False)
        y = np.maximum(z + shortcut, 0)
    logits = y.mean(axis=(2, 3)) @ state["fc.weight"].T + state["fc.bias"]
    return logits.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- the export
@dataclass(frozen=True)
class Exported:
    """What :func:`export_resnet` wrote, and how closely ONNX Runtime reproduced the numpy forward pass."""

    path: Path
    info: ModelInfo
    max_abs_diff_logits: float
    max_abs_diff_features: float


def load_weights(arch: str, weights: str, log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], str]:
    """The state dict ``--weights`` asks for and where it came from: "none" (random, seeded), a file, or a
    torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), fetched into torch's cache and hash-checked."""
    if weights.lower() == "none":
        log(f"{arch}: random weights (--weights none): for tests and benchmarks only, its maps mean nothing")
        return random_state_dict(arch, seed=0), f"torchvision {arch}, random weights (seed 0)"
    if hub.is_weights_file(weights):
        return read_state_dict(weights), f"torchvision {arch}, weights {Path(weights).name}"
    default, files = WEIGHTS[arch]
    name = default if weights.upper() == "DEFAULT" else weights
    if name not in files:
        raise ExportError(f"{arch} has no weights {weights!r}; choose DEFAULT, {', '.join(files)}, none, or a file "
                          "path")
    enum = f"ResNet{arch[len('resnet'):]}_Weights.{name}"
    path = hub.fetch(hub.weights_url(BASE_URL + files[name]), f"{arch} weights {enum}", log=log)
    return read_state_dict(path), f"torchvision {arch}, weights {enum}"


def export_resnet(
    arch: str = "resnet18",
    weights: str = "DEFAULT",
    output: str | os.PathLike = "resnet18.onnx",
    *,
    opset: int = DEFAULT_OPSET,
    labels_path: str | None = None,
    log: Callable[[str], None] = print,
) -> Exported:
    """Export torchvision's ``arch`` with ``weights`` (see :func:`load_weights`) to one contract file.

    Raises:
        ExportError: weights that cannot be had, read or fitted, or a file ONNX Runtime does not run as numpy does.
    """
    if arch not in ARCHES:
        raise ExportError(f"{arch} is not one of the ResNets exported without torch ({', '.join(ARCHES)})")
    state, source = load_weights(arch, weights, log=log)
    num_classes = check_state_dict(state, arch, weights if hub.is_weights_file(weights) else source)
    state = {k: v.astype(np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    random = weights.lower() == "none"
    named = not random and not hub.is_weights_file(weights)  # torchvision's files: its ImageNet categories
    labels = load_labels() if named and labels_path is None else default_labels(num_classes, labels_path)
    info = ModelInfo(labels=labels, input_size_hw=(INPUT_SIZE, INPUT_SIZE), source=source, random_weights=random)
    proto = write_contract(resnet_graph(arch, state, opset), info, state["fc.weight"], state["fc.bias"])
    x = np.random.default_rng(0).standard_normal((2, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    logits_ref, features_ref = forward(arch, state, x)
    output = Path(output)
    diffs = replace_atomically(proto, output, lambda p: check_contract_file(p, x, logits_ref, features_ref))
    log(f"ONNX Runtime vs numpy: max |logits diff| {diffs[0]:.3g}, max |features diff| {diffs[1]:.3g}")
    return Exported(output, info, *diffs)
