"""Test inputs made on the spot, so the runtime's tests need neither torch nor ../shared/data.

- :func:`tiny_contract_model`: a small seeded conv net built with onnx.helper and written into the contract
  with the library's own :func:`realtime_cam.contract.write_contract`; :func:`plain_classifier`: the same
  net as an ordinary classifier, not in the contract.
- :func:`write_photo` and :func:`moving_frames`: images drawn with OpenCV.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.contract import FEATURES, LOGITS, ModelInfo, load_labels, write_contract
from realtime_cam.sources import Frame

# (in channels, out channels, kernel, stride, padding): 224 -> 56 -> 28 -> 14 -> 7, like ResNet18's 7x7 map.
TINY_LAYERS = ((3, 8, 5, 4, 2), (8, 16, 3, 2, 1), (16, 32, 3, 2, 1), (32, 32, 3, 2, 1))


def tiny_contract_model(seed: int = 0) -> onnx.ModelProto:
    """A contract file: 224x224 RGB input (dynamic batch), 1000 ImageNet labels, features [N, 32, 7, 7].

    Four Conv+Relu layers with seeded He-initialised weights make the features; GlobalAveragePool ->
    Flatten -> Gemm (head.weight [1000, 32], head.bias [1000]) makes the logits, so
    ``logits == W @ mean_hw(features) + b`` holds exactly as the contract says.
    """
    rng = np.random.default_rng(seed)
    labels = load_labels()
    inits, nodes = [], []
    x = "input"
    for i, (cin, cout, k, stride, pad) in enumerate(TINY_LAYERS):
        weight = rng.standard_normal((cout, cin, k, k)).astype(np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k)))
        bias = rng.uniform(-0.1, 0.1, cout).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"conv{i}.weight"), numpy_helper.from_array(bias, f"conv{i}.bias")]
        y = FEATURES if i == len(TINY_LAYERS) - 1 else f"relu{i}"
        nodes += [helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                   kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4),
                  helper.make_node("Relu", [f"conv{i}"], [y])]
        x = y
    channels = TINY_LAYERS[-1][1]
    head_weight = rng.standard_normal((len(labels), channels)).astype(np.float32) / np.float32(np.sqrt(channels))
    head_bias = rng.uniform(-0.5, 0.5, len(labels)).astype(np.float32)
    inits += [numpy_helper.from_array(head_weight, "head.weight"), numpy_helper.from_array(head_bias, "head.bias")]
    nodes += [helper.make_node("GlobalAveragePool", [FEATURES], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], [LOGITS], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny-cam",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", len(labels)]),
         helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", channels, 7, 7])],
        inits)
    model = helper.make_model(graph, producer_name="realtime-cam tests",
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    info = ModelInfo(labels=labels, source=f"tests: tiny seeded conv net (seed {seed})")
    return write_contract(model, info, head_weight, head_bias)


def plain_classifier(seed: int = 0) -> onnx.ModelProto:
    """The tiny net as an ordinary classifier: one output ``output`` [N, 1000] and no contract metadata."""
    model = tiny_contract_model(seed)
    del model.metadata_props[:]
    del model.graph.output[1:]
    for node in model.graph.node:
        node.output[:] = ["output" if name == LOGITS else name for name in node.output]
    model.graph.output[0].name = "output"
    onnx.checker.check_model(model, full_check=True)
    return model


def photo(size_wh: tuple[int, int] = (451, 300), seed: int = 0) -> np.ndarray:
    """A brownish-grey BGR 'photo' with soft shapes in it: little colour, so a heatmap over it stands out."""
    w, h = size_wh
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grey = 90 + 60 * (xx / max(w - 1, 1)) + 30 * np.sin(yy / 17.0)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * min(w, h) + 1
        grey += rng.uniform(-50, 50) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    grey += rng.normal(0, 4, grey.shape)
    tint = np.float32([0.92, 1.0, 1.08])  # B, G, R: a little brown, like an indoor photo
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)


def write_photo(path: Path, size_wh: tuple[int, int] = (451, 300), seed: int = 0) -> Path:
    """:func:`photo` written to ``path`` (the extension picks the format)."""
    if not cv2.imwrite(str(path), photo(size_wh, seed)):
        raise OSError(f"OpenCV could not write {path}")
    return path


def moving_frames(n: int, size_wh: tuple[int, int] = (320, 240)) -> list[Frame]:
    """n frames of a bright disc crossing a photo, as a video source yields them."""
    w, h = size_wh
    background = photo(size_wh)
    frames = []
    for i in range(n):
        image = background.copy()
        cx = int((0.2 + 0.6 * i / max(n - 1, 1)) * w)
        cv2.circle(image, (cx, h // 2), max(4, min(w, h) // 6), (40, 200, 230), -1)
        frames.append(Frame(i, image, time.perf_counter()))
    return frames
