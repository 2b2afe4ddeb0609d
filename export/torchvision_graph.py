"""torchvision classifiers whose head is not GAP + linear, explained at pytorch-grad-cam's target layer.

Token models (ViT, Swin) are explained at a token tensor made into a map inside the graph, as
pytorch-grad-cam's ``reshape_transform`` does (export/token_grid.py).

The network is exported whole with torch.onnx, with the target layer's output as a second graph output (so
its tensor has a known name), and handed to :func:`rewrite_onnx_classifier`, which builds the gradient of
the class score w.r.t. that tensor inside the graph (export/graph_head.py). The written file is then checked
against PyTorch: logits, the target layer's output and its autograd gradient.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from realtime_cam.contract import FEATURES, GRADS, GRADS_CLASS, LOGITS, ModelInfo, read_contract, write_contract
from realtime_cam.errors import ExportError

from .checks import cpu_session, float_tolerance, replace_atomically
from .target_layers import resolve_layer
from .token_grid import TokenGrid, guess_grid
from .token_grid import record as record_grid

TARGET_OUTPUT = "target_layer"


@dataclass(frozen=True)
class TargetLayer:
    """Where a family is explained.

    Attributes:
        module: the target layer in torchvision's module; its output is the explained map.
        grad_cam: the same layer as pytorch-grad-cam users name it (``target_layers=[...]``).
        head: what follows the layer, i.e. why CAM itself is not defined for the family.
        grid: how the layer's output, a token tensor, becomes the map [N, C, h, w]; None: it is one.
    """

    module: Callable[[nn.Module], nn.Module]
    grad_cam: str
    head: str
    grid: TokenGrid | None = None


# Family prefix -> its target layer: the last block of `features`, the layer pytorch-grad-cam's README and
# tutorials target for VGG, MobileNet and ConvNeXt (their map is 6x6..13x13 at 224x224 input).
GRAPH_FAMILIES: dict[str, TargetLayer] = {
    "alexnet": TargetLayer(lambda m: m.features[-1], "model.features[-1]",
                           "a 6x6 pooling and an MLP head (Linear-ReLU-Linear-ReLU-Linear)"),
    "vgg": TargetLayer(lambda m: m.features[-1], "model.features[-1]",
                       "a 7x7 pooling and an MLP head (Linear-ReLU-Linear-ReLU-Linear)"),
    "mobilenet_v3": TargetLayer(lambda m: m.features[-1], "model.features[-1]",
                                "an MLP head after pooling (Linear-Hardswish-Linear)"),
    "squeezenet": TargetLayer(lambda m: m.features[-1], "model.features[-1]",
                              "a 1x1-conv classifier and a ReLU before the pooling"),
    "convnext": TargetLayer(lambda m: m.features[-1], "model.features[-1]",
                            "a LayerNorm between the pooling and the linear layer"),
    # Token models, at the layers of pytorch-grad-cam's tutorial: the input of the last block's attention.
    # ViT: tokens [N, 1 + h*w, C]; the head reads the class token after that block's attention and MLP.
    "vit_": TargetLayer(lambda m: m.encoder.layers[-1].ln_1, "model.encoder.layers[-1].ln_1",
                        "the last encoder block (self-attention, MLP) and a linear layer on the class token",
                        TokenGrid("tokens", extra=1)),
    # Swin (v1 and v2): [N, h, w, C] channels last; the block's window attention and MLP, a LayerNorm, pooling.
    "swin_": TargetLayer(lambda m: m.features[-1][-1].norm1, "model.features[-1][-1].norm1",
                         "the last block's window attention and MLP, a LayerNorm, pooling and a linear layer",
                         TokenGrid("nhwc")),
    # MaxViT: the last MaxViT block's output (MBConv, block and grid attention), already [N, C, h, w].
    "maxvit": TargetLayer(lambda m: m.blocks[-1].layers[-1], "model.blocks[-1].layers[-1]",
                          "pooling, a LayerNorm and an MLP head (Linear-Tanh-Linear)"),
}


def graph_family_of(arch: str) -> str | None:
    return next((prefix for prefix in GRAPH_FAMILIES if arch.startswith(prefix)), None)


class WithTarget(nn.Module):
    """(logits, the target layer's output): the network unchanged, its target layer's output exposed."""

    def __init__(self, net: nn.Module, target: nn.Module) -> None:
        super().__init__()
        self.net = net
        self._seen: list[torch.Tensor] = []
        target.register_forward_hook(lambda module, args, out: self._seen.append(out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._seen.clear()
        logits = self.net(x)
        if len(self._seen) != 1:
            raise ExportError(f"the target layer ran {len(self._seen)} times in one forward pass, not once")
        return logits, self._seen[0]


def torch_to_onnx(module: nn.Module, x: torch.Tensor, output_names: list[str], opset: int,
                  arch: str) -> onnx.ModelProto:
    """``module`` exported by torch.onnx's dynamo exporter: input 'input' with a dynamic batch, one file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (x,), dynamo=True, input_names=["input"], output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), opset_version=opset,
                external_data=False, verbose=False, report=False,
            )
        except Exception as exc:  # the exporter's own errors are long; the first line says what failed
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed for {arch} at opset {opset}: {first}") from None
    return program.model_proto


@dataclass(frozen=True)
class GraphExport:
    """What :func:`export_graph_head` wrote and how far ONNX Runtime is from PyTorch on the test batch."""

    num_classes: int
    feature_shape: tuple[int, ...]
    max_abs_diff_logits: float
    max_abs_diff_features: float
    max_abs_diff_grads: float


def export_graph_head(model: nn.Module, info: ModelInfo, arch: str, output: Path, opset: int,
                      labels_path: str | None, log: Callable[[str], None], features: str | None = None) -> GraphExport:
    """Write ``model`` as a "graph" contract file explaining its family's target layer (or the layer
    ``features`` names, see export/target_layers.py); check it against PyTorch.

    Args:
        info: what the file's metadata says (its labels are kept when ``labels_path`` is None and they fit).
        labels_path: class names, one per line.
    """
    from .from_onnx import rewrite_onnx_classifier

    family = graph_family_of(arch)
    layer = GRAPH_FAMILIES[family] if features is None else asked_layer(model, arch, features)
    wrapper = WithTarget(model, layer.module(model)).eval()
    h, w = info.input_size_hw
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_ref, target_ref = wrapper(x)
    if features is not None:
        layer = dataclasses.replace(layer, grid=_grid_of(target_ref, layer.module(model), family))
    if not isinstance(target_ref, torch.Tensor) or (target_ref.ndim != 4 and layer.grid is None):
        shape = list(target_ref.shape) if isinstance(target_ref, torch.Tensor) else type(target_ref).__name__
        raise ExportError(f"{arch}: the output of {layer.grad_cam} is {shape}, not a map [N, C, h, w] nor tokens "
                          "[N, T, C]; name another layer with --features")
    if features is None:
        log(f"{arch}: {layer.head} follow, so CAM is not defined; explaining {layer.grad_cam} (pytorch-grad-cam's "
            "target layer) with in-graph gradients")
    else:
        log(f"{arch}: explaining {layer.grad_cam} (--features) with in-graph gradients")
    proto = torch_to_onnx(wrapper, x, [LOGITS, TARGET_OUTPUT], opset, arch)
    del proto.graph.output[1:]  # the target tensor keeps its name inside the graph; rewrite names it features
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix=".realtime-cam-", dir=output.parent) as tmp:
        exported, rewritten = Path(tmp) / f"{arch}.onnx", Path(tmp) / f"{arch}-contract.onnx"
        onnx.save(proto, str(exported))
        del proto
        report = rewrite_onnx_classifier(exported, rewritten, labels_path=labels_path, input_size_hw=(h, w),
                                         mean=info.mean, std=info.std, features=TARGET_OUTPUT, grid=layer.grid,
                                         why=f"{layer.grad_cam}, " + ("named with --features" if features is not None
                                                                       else "pytorch-grad-cam's target layer"),
                                         log=log)
        contract = onnx.load(str(rewritten))
    names = read_contract(contract)[0].labels  # labels_path's, else the defaults for the class count
    if labels_path is None and len(info.labels) == report.num_classes:
        names = info.labels  # e.g. the categories of torchvision's weights
    write_contract(contract, dataclasses.replace(info, labels=names, source=f"{info.source}; explained at "
                                                 f"{layer.grad_cam} with in-graph gradients"), None, None)
    if layer.grid is not None:
        record_grid(contract, layer.grad_cam, layer.grid)

    def verify(path: Path) -> tuple[float, float, float]:
        onnx.checker.check_model(str(path))
        return _check_against_pytorch(path, wrapper, x, logits_ref, target_ref, layer.grid)

    diffs = replace_atomically(contract, output, verify)
    log("ONNX Runtime vs PyTorch: max |logits diff| {:.3g}, max |features diff| {:.3g}, max |grads diff| {:.3g} "
        "(autograd)".format(*diffs))
    return GraphExport(report.num_classes, report.feature_shape_chw, *diffs)


def asked_layer(model: nn.Module, arch: str, features: str) -> TargetLayer:
    """The layer ``--features`` names, as a target layer (its grid is set once its output is seen)."""
    module, name = resolve_layer(model, features, arch)
    return TargetLayer(lambda m: module, f"model.{name}", "the rest of the network")


def _grid_of(out: torch.Tensor, module: nn.Module, family: str | None) -> TokenGrid | None:
    """How the output of an asked layer becomes a map: [N, T, C] tokens as a square grid after at most 8
    leading tokens; 4-D channels-last in a family whose blocks work on [N, h, w, C] (Swin), except a conv's."""
    if not isinstance(out, torch.Tensor):
        return None
    if out.ndim == 3:
        return guess_grid(tuple(out.shape))
    default = GRAPH_FAMILIES[family].grid if family is not None else None
    if out.ndim == 4 and default is not None and default.layout == "nhwc" and not isinstance(module, nn.Conv2d):
        return default
    return None


def to_map(t: torch.Tensor, grid: TokenGrid | None) -> torch.Tensor:
    """The map [N, C, h, w] of a token tensor, in PyTorch (what the graph computes; pytorch-grad-cam's
    reshape_transform for ViT and Swin)."""
    if grid is None:
        return t
    if grid.layout == "tokens":
        c, h, w = grid.map_shape(tuple(t.shape), "")
        t = t[:, grid.extra:, :].reshape(t.shape[0], h, w, c)
    return t.permute(0, 3, 1, 2)


def _check_against_pytorch(path: Path, wrapper: WithTarget, x: torch.Tensor, logits_ref: torch.Tensor,
                           target_ref: torch.Tensor, grid: TokenGrid | None) -> tuple[float, float, float]:
    """Max |diff| of logits, features and grads between the file and PyTorch (autograd, same class per row)."""
    session = cpu_session(path, "the exported model")
    logits, features, grads, grads_class = session.run([LOGITS, FEATURES, GRADS, GRADS_CLASS], {"input": x.numpy()})
    with torch.enable_grad():
        out, target = wrapper(x)
        chosen = out.gather(1, torch.from_numpy(grads_class.astype(np.int64)).view(-1, 1)).sum()
        (grads_ref,) = torch.autograd.grad(chosen, target)
    target_ref, grads_ref = to_map(target_ref, grid), to_map(grads_ref, grid)
    diff_logits = float(np.abs(logits - logits_ref.numpy()).max())
    diff_features = float(np.abs(features - target_ref.numpy()).max())
    grads_ref = grads_ref.numpy()
    diff_grads = float(np.abs(grads - grads_ref).max())
    # Gradients are small numbers: compared relative to their own largest value, not with an absolute floor.
    grads_tol = 1e-3 * float(np.abs(grads_ref).max()) + 1e-9
    if (diff_logits > float_tolerance(logits_ref.numpy()) or diff_features > float_tolerance(target_ref.numpy())
            or diff_grads > grads_tol):
        raise ExportError(f"ONNX Runtime disagrees with PyTorch beyond float tolerance (max |logits diff| "
                          f"{diff_logits:.3g}, features {diff_features:.3g}, grads {diff_grads:.3g} of "
                          f"{grads_tol:.3g} allowed)")
    return diff_logits, diff_features, diff_grads
