"""Export a torchvision classifier to the realtime-cam contract: a backbone with a pooling + linear head as
(features, logits) with the head's weights; any other CNN head through in-graph gradients (torchvision_graph.py).

Needs the ``export`` extra (torch, torchvision, onnxscript). The runtime never imports this module
except to export a missing default model on ``realtime-cam run``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from realtime_cam.contract import ModelInfo, default_labels, write_contract
from realtime_cam.errors import ExportError

from .checks import check_contract_file, replace_atomically
from .hub import fetch, is_weights_file
from .torchvision_graph import export_graph_head, graph_family_of, torch_to_onnx


class TwoOutputs(nn.Module):
    """features = backbone(x); logits = head(mean_hw(features)): the CAM form of a GAP + linear network."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.head(features.mean(dim=(2, 3))), features


class _InputTransformBackbone(nn.Module):
    """A network's input transform (on when built with pretrained weights), then its named layers in order:
    GoogLeNet up to inception5b, Inception v3 up to Mixed_7c (its auxiliary classifier only runs in training)."""

    def __init__(self, net: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.net = net
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net._transform_input(x)
        for name in self.layers:
            x = getattr(self.net, name)(x)
        return x


_GOOGLENET_LAYERS = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
                     "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
                     "inception5a", "inception5b")
_INCEPTION_V3_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                        "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                        "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


def _only_linear(classifier: nn.Module, arch: str) -> nn.Linear:
    """The single Linear of a classifier that is (Dropout...) + Linear; refuse anything more."""
    layers = list(classifier.children()) if isinstance(classifier, nn.Sequential) else [classifier]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    others = [type(m).__name__ for m in layers if not isinstance(m, (nn.Linear, nn.Dropout))]
    if len(linears) != 1 or others or not isinstance(layers[-1], nn.Linear):
        found = " -> ".join(type(m).__name__ for m in layers)
        raise ExportError(f"{arch}: its head after pooling is {found}, not one linear layer; CAM needs GAP + linear")
    return linears[0]


def _split_children(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    # resnet*, resnext*, wide_resnet*, regnet_*: [..., avgpool, fc]
    children = list(model.children())
    return nn.Sequential(*children[:-2]), _only_linear(model.fc, arch)


def _split_features_classifier(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    # mobilenet_v2, efficientnet_*: features -> avgpool -> flatten -> classifier (Dropout, Linear)
    return model.features, _only_linear(model.classifier, arch)


def _split_densenet(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    # DenseNet applies ReLU functionally between features and pooling.
    return nn.Sequential(model.features, nn.ReLU(inplace=False)), _only_linear(model.classifier, arch)


def _split_googlenet(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    return _InputTransformBackbone(model, _GOOGLENET_LAYERS), _only_linear(model.fc, arch)


def _split_inception_v3(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    return _InputTransformBackbone(model, _INCEPTION_V3_LAYERS), _only_linear(model.fc, arch)


def _split_shufflenet(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    backbone = nn.Sequential(model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4, model.conv5)
    return backbone, _only_linear(model.fc, arch)


def _split_mnasnet(model: nn.Module, arch: str) -> tuple[nn.Module, nn.Linear]:
    return model.layers, _only_linear(model.classifier, arch)


# Family prefix -> how to split the network into (pre-pooling backbone, linear head).
FAMILIES: dict[str, Callable[[nn.Module, str], tuple[nn.Module, nn.Linear]]] = {
    "resnet": _split_children,
    "resnext": _split_children,
    "wide_resnet": _split_children,
    "regnet_": _split_children,
    "densenet": _split_densenet,
    "mobilenet_v2": _split_features_classifier,
    "efficientnet_": _split_features_classifier,
    "googlenet": _split_googlenet,
    "inception_v3": _split_inception_v3,
    "shufflenet_v2": _split_shufflenet,
    "mnasnet": _split_mnasnet,
}

# Input sizes other than 224x224, for random weights and state-dict files (torchvision's weights say their own).
INPUT_SIZES = {"inception_v3": (299, 299)}


def supported_arches() -> list[str]:
    """The torchvision classification builders this exporter writes (GAP + linear, or in-graph gradients)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if family_of(n) is not None or graph_family_of(n) is not None)


def family_of(arch: str) -> str | None:
    """The GAP + linear family of ``arch`` (a key of FAMILIES), or None."""
    for prefix in FAMILIES:
        if arch.startswith(prefix):
            return prefix
    return None


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how well it checks out."""

    path: Path
    arch: str
    weights: str
    num_classes: int
    feature_shape: tuple[int, ...]
    max_abs_diff_logits: float
    max_abs_diff_features: float
    max_abs_diff_grads: float | None = None


def _check_arch(arch: str) -> None:
    if family_of(arch) is not None or graph_family_of(arch) is not None:
        return
    if arch in torchvision.models.list_models(module=torchvision.models):
        raise ExportError(f"{arch}: not a family this exporter knows; supported: {', '.join(supported_arches())}")
    raise ExportError(f"torchvision has no classification model {arch!r}")


def _state_dict_from(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"weights file not found: {path}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"refused to load {path}: it is not a plain state dict of tensors (it holds pickled code or "
            f"objects, which torch.load(weights_only=True) will not run: {first[:160]})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for files it cannot read
        raise ExportError(f"cannot read {path} as PyTorch weights ({str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _head_classes(state: dict, arch: str) -> int | None:
    """The class count of the head in a state dict: the out-features of its last 2-D '*.weight' (or of
    SqueezeNet's 1x1-conv classifier), auxiliary heads ignored."""
    candidates = [k for k, v in state.items() if k.endswith("weight") and not k.lower().startswith("aux")
                  and (v.ndim == 2 or (v.ndim == 4 and k.startswith("classifier.")))]
    return int(state[candidates[-1]].shape[0]) if candidates else None


def _no_zero_layers(model: nn.Module, log: Callable[[str], None]) -> None:
    """Draw the linear layers torchvision starts at zero (ViT's head) from N(0, 0.02^2): with a zero head no
    class score depends on the image, and every gradient map would be zero."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            with torch.no_grad():
                nn.init.normal_(module.weight, std=0.02)
            log(f"{name}: torchvision starts it at zero; drawn from N(0, 0.02^2) so that the maps are not all zero")


def build_model(arch: str, weights: str, log: Callable[[str], None] = print) -> tuple[nn.Module, ModelInfo]:
    """A torchvision network with the asked-for weights, in eval mode, and what the contract needs about it.

    Args:
        weights: "DEFAULT" or a weights enum name (torchvision's API; downloaded into
            ``$TORCH_HOME/hub/checkpoints`` and hash-checked), a path to a state dict, or "none".
    """
    _check_arch(arch)
    mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), INPUT_SIZES.get(arch, (224, 224))
    if weights.lower() == "none":
        log(f"{arch}: random weights (--weights none): for tests and benchmarks only, its maps mean nothing")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same 'random' network every time, so two exports can be compared
            kwargs = {"init_weights": True} if arch.startswith(("googlenet", "inception_v3")) else {}
            model = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
            _no_zero_layers(model, log)
        return model, ModelInfo(labels=default_labels(1000), input_size_hw=size,
                                source=f"torchvision {arch}, random weights (seed 0)", random_weights=True)
    if is_weights_file(weights):
        state = _state_dict_from(weights)
        num_classes = _head_classes(state, arch) or 1000
        kwargs = {"num_classes": num_classes}
        if arch.startswith(("googlenet", "inception_v3")):
            has_aux = any(k.startswith(("aux1.", "aux2.", "AuxLogits.")) for k in state)
            kwargs.update(aux_logits=has_aux, init_weights=False)
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise ExportError(f"{weights} does not fit torchvision's {arch}: {detail}") from None
        return model.eval(), ModelInfo(labels=default_labels(num_classes), input_size_hw=size,
                                       source=f"torchvision {arch}, weights {Path(weights).name}")
    try:
        enum = torchvision.models.get_model_weights(arch)
        chosen = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        raise ExportError(f"{arch} has no weights {weights!r}; choose DEFAULT, {names}, none, or a file path") from None
    # Downloaded, or found in the cache, and hash-checked either way (torch.hub checks only a download); torchvision
    # then loads it from the cache. torch.hub.set_dir is never called, so both name the same folder.
    checkpoint = fetch(chosen.url, f"{arch} weights {chosen}", log=log)
    try:
        model = torchvision.models.get_model(arch, weights=chosen)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise ExportError(f"torchvision cannot load the weights file {checkpoint} ({reason})") from None
    transforms = chosen.transforms()
    crop = getattr(transforms, "crop_size", [224])
    size = (int(crop[0]), int(crop[-1]))
    mean = tuple(getattr(transforms, "mean", mean))
    std = tuple(getattr(transforms, "std", std))
    labels = tuple(chosen.meta.get("categories") or default_labels(1000))
    return model.eval(), ModelInfo(labels=labels, input_size_hw=size, mean=mean, std=std,
                                   source=f"torchvision {arch}, weights {chosen}")


def export_torchvision(
    arch: str = "resnet18",
    weights: str = "DEFAULT",
    output: str | os.PathLike = "resnet18.onnx",
    opset: int = 18,
    labels_path: str | None = None,
    log: Callable[[str], None] = print,
    features: str | None = None,
) -> ExportReport:
    """Export ``arch`` to one self-contained contract file and check it against PyTorch.

    ``features`` names the layer to explain (export/target_layers.py); the file then has a graph head.

    Raises:
        ExportError: weights that cannot be had or loaded, an unsupported head, or a failed check.
    """
    model, info = build_model(arch, weights, log=log)
    if family_of(arch) is None or features is not None:  # explained at a target layer with in-graph gradients
        done = export_graph_head(model, info, arch, Path(output), opset, labels_path, log, features=features)
        return ExportReport(path=Path(output), arch=arch, weights=info.source, num_classes=done.num_classes,
                            feature_shape=done.feature_shape, max_abs_diff_logits=done.max_abs_diff_logits,
                            max_abs_diff_features=done.max_abs_diff_features, max_abs_diff_grads=done.max_abs_diff_grads)
    backbone, head = FAMILIES[family_of(arch)](model, arch)
    wrapper = TwoOutputs(backbone, head).eval()
    if labels_path is not None:
        info = ModelInfo(**{**info.__dict__, "labels": default_labels(head.out_features, labels_path)})
    h, w = info.input_size_hw
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, h, w, generator=generator)
    with torch.no_grad():
        logits_ref, features_ref = wrapper(x)
        original = model(x)
        original = original[0] if isinstance(original, tuple) else original
    # The split must reproduce the network: otherwise the map would explain some other function.
    split_diff = float((logits_ref - original).abs().max())
    if split_diff > 1e-3 * max(1.0, float(original.abs().max())):
        raise ExportError(f"{arch}: backbone + head does not reproduce the network (max diff {split_diff:.3g})")
    if features_ref.ndim != 4:
        raise ExportError(f"{arch}: the features before pooling are not a [N, C, h, w] map")

    proto = torch_to_onnx(wrapper, x, ["logits", "features"], opset, arch)
    write_contract(
        proto, info,
        head.weight.detach().numpy().astype(np.float32),
        head.bias.detach().numpy().astype(np.float32) if head.bias is not None
        else np.zeros(head.out_features, np.float32),
    )
    output = Path(output)

    def verify(path: Path) -> tuple[float, float]:
        return check_contract_file(path, x.numpy(), logits_ref.numpy(), features_ref.numpy())

    diff_logits, diff_features = replace_atomically(proto, output, verify)
    log(f"ONNX Runtime vs PyTorch: max |logits diff| {diff_logits:.3g}, max |features diff| {diff_features:.3g}")
    return ExportReport(
        path=output, arch=arch, weights=info.source, num_classes=head.out_features,
        feature_shape=tuple(features_ref.shape[1:]), max_abs_diff_logits=diff_logits,
        max_abs_diff_features=diff_features,
    )
