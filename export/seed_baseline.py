"""The seed approach, timed: what `realtime-cam bench` compares the pipeline with (needs torch)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torchvision

from realtime_cam.timing import fps_of


def time_seed_approach(input_size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                       frames: list[np.ndarray], device: str, warmup: int) -> dict | None:
    """The seed approach: a PyTorch eager ResNet18 forward with a hook, numpy CAM, OpenCV overlay.

    Weights do not change speed, so it uses torchvision's resnet18 with random weights at the given input
    size. The first ``warmup`` frames are run untimed. None when ``device`` is cuda and torch has no GPU.
    """
    dev = "cuda" if device == "cuda" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        return None
    net = torchvision.models.resnet18(weights=None).eval().to(dev)
    feats: dict = {}
    net.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
    weight = net.fc.weight.detach().cpu().numpy()
    h, w = input_size_hw
    mean_t = torch.tensor(list(mean), device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), device=dev).view(1, 3, 1, 1)

    def one(frame: np.ndarray) -> np.ndarray:
        rgb = cv2.cvtColor(cv2.resize(frame, (w, h)), cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(rgb).to(dev).permute(2, 0, 1).unsqueeze(0).float().div(255.0)
        with torch.no_grad():
            logits = net((x - mean_t) / std_t)
        c = int(logits.argmax())
        f = feats["f"][0].cpu().numpy()
        cam = np.tensordot(weight[c], f, axes=1)
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-12)
        heat = cv2.applyColorMap(np.uint8(255 * cv2.resize(cam, (frame.shape[1], frame.shape[0]))),
                                 cv2.COLORMAP_JET)
        return cv2.addWeighted(frame, 0.5, heat, 0.5, 0)

    for f in frames[:warmup]:
        one(f)
    stamps = []
    for f in frames[warmup:]:
        one(f)
        stamps.append(time.perf_counter())
    seed = {"fps": fps_of(stamps), "torch": torch.__version__, "device": dev, "threads": torch.get_num_threads()}
    if dev == "cuda":
        seed["gpu"] = torch.cuda.get_device_name(0)
    return seed
