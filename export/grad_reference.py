"""pytorch-grad-cam's GradCAM loop, timed: what `realtime-cam bench --grad-reference ARCH` compares realtime-cam's
gradcam loop with (needs torch, torchvision and grad-cam)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from torch import nn

from realtime_cam.errors import ExportError
from realtime_cam.timing import fps_of

from .from_torchvision import FAMILIES, family_of
from .torchvision_graph import GRAPH_FAMILIES, graph_family_of, to_map


class _Logits(nn.Module):
    """head(mean_hw(backbone(x))): a GAP + linear family with its backbone as one module to hook."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))


def check_arch(arch: str) -> None:
    """A one-line error for an arch torchvision does not have (before any measurement)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ExportError(f"--grad-reference: torchvision has no classification model {arch!r}")


def reference_network(arch: str) -> tuple[nn.Module, nn.Module, object]:
    """(network, target layer, reshape_transform): the layer ``export --arch`` explains, random weights."""
    check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.get_model(arch, weights=None).eval()
    family = graph_family_of(arch)
    if family is not None:
        layer = GRAPH_FAMILIES[family]
        grid = layer.grid
        return net, layer.module(net), (None if grid is None else (lambda t: to_map(t, grid)))
    backbone, head = FAMILIES[family_of(arch)](net, arch)
    wrapped = _Logits(backbone, head).eval()
    return wrapped, wrapped.backbone, None


def time_grad_cam(arch: str, input_size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                  frames: list[np.ndarray], warmup: int) -> dict:
    """Frames per second of: resize + normalise (torch), GradCAM for the top-1 class (forward + backward),
    the map resized to the frame and blended as a JET overlay (OpenCV), on the CPU; the first ``warmup``
    frames untimed."""
    net, target, reshape = reference_network(arch)
    h, w = input_size_hw
    mean_t, std_t = torch.tensor(list(mean)).view(1, 3, 1, 1), torch.tensor(list(std)).view(1, 3, 1, 1)
    cam = GradCAM(model=net, target_layers=[target], reshape_transform=reshape)

    def one(frame: np.ndarray) -> np.ndarray:
        rgb = cv2.cvtColor(cv2.resize(frame, (w, h)), cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float().div(255.0)
        grayscale = cam(input_tensor=(x - mean_t) / std_t, targets=None)[0]  # None: the top-1 class
        heat = cv2.applyColorMap(np.uint8(255 * cv2.resize(grayscale, (frame.shape[1], frame.shape[0]))),
                                 cv2.COLORMAP_JET)
        return cv2.addWeighted(frame, 0.5, heat, 0.5, 0)

    with cam:
        for f in frames[:warmup]:
            one(f)
        stamps = [time.perf_counter()]
        for f in frames[warmup:]:
            one(f)
            stamps.append(time.perf_counter())
    return {"arch": arch, "fps": fps_of(stamps), "frames": len(stamps) - 1, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "weights": "random (speed does not depend on them)"}
