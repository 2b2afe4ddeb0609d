"""The model-file contract: one self-contained ONNX file that the runtime needs nothing else to use.

A contract file has
- an input of shape [N, 3, H, W] (float32, normalised as its metadata says);
- an output named ``logits`` [N, K] and an output named ``features`` [N, C, h, w]: the map right before
  the global average pooling, so that ``logits == W @ mean_hw(features) + b`` for the head (W, b);
- float32 initializers holding the head's W [K, C] and b [K] (a dequantized copy for quantized heads), when
  the head is global average pooling + one linear layer ("gap_linear"); other heads ("graph") have none;
- optionally (contract version 2) the gradient of one class score w.r.t. the features, computed inside the
  graph: an input ``target_class`` [N] int64 with a default of -1 (the frame's top-1) and outputs ``grads``
  [N, C, h, w] and ``grads_class`` [N]; a "graph" head always has them;
- ``metadata_props`` under the ``realtime_cam.`` prefix: labels, input size, normalisation, the names of
  the head initializers, where the model came from, and whether its weights are random.

Both ways in (``export`` from torchvision, ``export --from-onnx`` from an existing classifier) write it
with :func:`write_contract`; the runtime reads it with :func:`read_contract`. Only ``onnx`` and numpy
are needed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError

CONTRACT_VERSION = "1"  # GAP + linear head, no gradient output: what every version of the runtime reads
GRADIENT_CONTRACT_VERSION = "2"  # a gradient output, and maybe no linear head
SUPPORTED_VERSIONS = (CONTRACT_VERSION, GRADIENT_CONTRACT_VERSION)
PREFIX = "realtime_cam."
LOGITS = "logits"
FEATURES = "features"
GRADS = "grads"
GRADS_CLASS = "grads_class"
TARGET_CLASS = "target_class"
HEAD_WEIGHT_COPY = "realtime_cam.head.weight"
HEAD_BIAS_COPY = "realtime_cam.head.bias"

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a contract file, besides its graph.

    Attributes:
        labels: one name per class, in logit order.
        input_size_hw: the model's input (height, width) in pixels.
        mean: per-channel mean on the 0..1 pixel scale, in the model's channel order.
        std: per-channel standard deviation on the 0..1 pixel scale, in the model's channel order.
        channel_order: "RGB" or "BGR": the order the model's input channels are in.
        source: a short human-readable note of where the model came from.
        head_tolerance: the largest |W @ GAP(features) + b - logits| the export measured (0 for float
            heads); quantized heads reproduce the logits only up to quantization error.
        random_weights: the network has random weights (``export --weights none``): its maps mean nothing.
    """

    labels: tuple[str, ...]
    input_size_hw: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std: tuple[float, float, float] = IMAGENET_STD_RGB
    channel_order: str = "RGB"
    source: str = ""
    head_tolerance: float = 0.0
    random_weights: bool = False

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ModelError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError("mean and std need three values each")
        if any(s <= 0 for s in self.std):
            raise ModelError(f"std values must be positive, got {list(self.std)}")
        h, w = self.input_size_hw
        if h < 1 or w < 1:
            raise ModelError(f"input size must be positive, got {h}x{w}")


def load_labels(path: str | None = None) -> tuple[str, ...]:
    """Class names, one per line, from ``path``; the shipped ImageNet-1k names when ``path`` is None."""
    if path is None:
        from importlib.resources import files

        text = files("realtime_cam").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ModelError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ModelError(f"labels file {path} is not a UTF-8 text file (one class name per line)") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise ModelError(f"labels file {path} holds no names")
    return labels


def default_labels(num_classes: int, labels_path: str | None = None) -> tuple[str, ...]:
    """Labels for a K-class model: from a file, ImageNet-1k for K=1000, else 'class 0', 'class 1', ..."""
    if labels_path is not None:
        labels = load_labels(labels_path)
        if len(labels) != num_classes:
            raise ModelError(
                f"labels file {labels_path} has {len(labels)} names but the model has {num_classes} classes"
            )
        return labels
    if num_classes == 1000:
        return load_labels()
    return tuple(f"class {i}" for i in range(num_classes))


def _find_initializer(graph: onnx.GraphProto, array: np.ndarray) -> str | None:
    """The name of a float32 initializer holding exactly ``array`` (same shape and values), if any."""
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or tuple(init.dims) != array.shape:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if np.array_equal(numpy_helper.to_array(init), array):
            return init.name
    return None


def write_contract(
    model: onnx.ModelProto,
    info: ModelInfo,
    head_weight: np.ndarray | None,
    head_bias: np.ndarray | None,
) -> onnx.ModelProto:
    """Attach the head and the metadata to a graph that already has ``logits`` and ``features`` outputs.

    The head is referenced by name when the graph already holds it as a float32 [K, C] / [K] initializer;
    otherwise a float32 copy is added (quantized heads, MatMul heads stored as [C, K]). A head that is not
    GAP + linear passes None for both, and the graph must then carry the gradient output.

    Returns:
        The same ModelProto, modified in place.
    """
    outputs = [o.name for o in model.graph.output]
    if outputs[:2] != [LOGITS, FEATURES]:
        raise ModelError(f"a contract graph's first outputs must be {LOGITS!r}, {FEATURES!r}; got {outputs}")
    has_grads = GRADS in outputs
    meta = {
        "contract": GRADIENT_CONTRACT_VERSION if has_grads or head_weight is None else CONTRACT_VERSION,
        "labels": json.dumps(list(info.labels)),
        "input_size_hw": json.dumps(list(info.input_size_hw)),
        "mean": json.dumps([float(v) for v in info.mean]),
        "std": json.dumps([float(v) for v in info.std]),
        "channel_order": info.channel_order,
        "head": "graph" if head_weight is None else "gap_linear",
        "source": info.source,
        "head_tolerance": repr(float(info.head_tolerance)),
    }
    if info.random_weights:
        meta["random_weights"] = "true"
    if head_weight is None:
        if not has_grads:
            raise ModelError(f"a head that is not GAP + linear needs the {GRADS!r} output (add_gradient_output)")
    else:
        meta["head_weight"], meta["head_bias"] = _head_names(model, info, head_weight, head_bias)
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        model.metadata_props.add(key=PREFIX + key, value=value)
    return model


def _head_names(model: onnx.ModelProto, info: ModelInfo, head_weight: np.ndarray,
                head_bias: np.ndarray | None) -> list[str]:
    """The initializers holding W [K, C] and b [K] as float32 (found, or added as copies)."""
    weight = np.ascontiguousarray(head_weight, dtype=np.float32)
    bias = np.ascontiguousarray(head_bias, dtype=np.float32).reshape(-1)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ModelError(f"head weight must be [K, C] and bias [K]; got {weight.shape} and {bias.shape}")
    if len(info.labels) != weight.shape[0]:
        raise ModelError(f"{len(info.labels)} labels for a head with {weight.shape[0]} classes")
    names = []
    for array, copy_name in ((weight, HEAD_WEIGHT_COPY), (bias, HEAD_BIAS_COPY)):
        name = _find_initializer(model.graph, array)
        if name is None:
            model.graph.initializer.append(numpy_helper.from_array(array, copy_name))
            name = copy_name
        names.append(name)
    return names


def read_contract(model: onnx.ModelProto) -> tuple[ModelInfo, np.ndarray | None, np.ndarray | None]:
    """Read the metadata and the head (W [K, C] float32, b [K] float32; None for a "graph" head) of a
    contract file.

    Raises:
        ModelError: naming what is missing or inconsistent, and what to run to make a contract file.
    """
    meta = {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    how = "make one with `realtime-cam export` or `realtime-cam export --from-onnx CLASSIFIER.onnx`"
    outputs = [o.name for o in model.graph.output]
    if LOGITS not in outputs or FEATURES not in outputs:
        raise ModelError(
            f"the model has outputs {outputs}, not {LOGITS!r} and {FEATURES!r}: it is not a realtime-cam "
            f"model file; {how}"
        )
    if "contract" not in meta:
        raise ModelError(f"the model has no realtime-cam metadata; {how}")
    if meta["contract"] not in SUPPORTED_VERSIONS:
        raise ModelError(f"model contract version {meta['contract']} is not supported (expected one of "
                         f"{', '.join(SUPPORTED_VERSIONS)}): update realtime-cam")
    try:
        info = ModelInfo(
            labels=tuple(json.loads(meta["labels"])),
            input_size_hw=tuple(int(v) for v in json.loads(meta["input_size_hw"])),
            mean=tuple(float(v) for v in json.loads(meta["mean"])),
            std=tuple(float(v) for v in json.loads(meta["std"])),
            channel_order=meta["channel_order"],
            source=meta.get("source", ""),
            head_tolerance=float(meta.get("head_tolerance", "0")),
            # Files exported before the key existed say so only in their source.
            random_weights=meta.get("random_weights") == "true"
            or meta.get("source", "").startswith("torchvision ") and "random weights" in meta.get("source", ""),
        )
        graph_head = meta.get("head") == "graph"
        weight_name, bias_name = (None, None) if graph_head else (meta["head_weight"], meta["head_bias"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"the model's realtime-cam metadata is incomplete or malformed ({exc}); {how}") from None
    if graph_head:
        if GRADS not in outputs:
            raise ModelError(f"the model's head is not GAP + linear but it has no {GRADS!r} output; {how}")
        return info, None, None
    inits = {i.name: i for i in model.graph.initializer}
    try:
        weight = numpy_helper.to_array(inits[weight_name]).astype(np.float32, copy=False)
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32, copy=False)
    except KeyError as exc:
        raise ModelError(f"the model's head initializer {exc} is missing; {how}") from None
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ModelError(f"the model's head must be W [K, C] and b [K]; got {weight.shape} and {bias.shape}")
    if len(info.labels) != weight.shape[0]:
        raise ModelError(
            f"the model has {len(info.labels)} labels but its head has {weight.shape[0]} classes"
        )
    return info, weight, bias
