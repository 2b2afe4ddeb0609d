"""The export's choices and defaults, importable without onnx, onnxruntime or torch (the CLI's help reads them)."""

from __future__ import annotations

from dataclasses import dataclass

# What `export` makes when given nothing, and what `run` exports when no model is cached.
DEFAULT_ARCH = "resnet18"
DEFAULT_WEIGHTS = "DEFAULT"
# torchvision backbones export_resnet writes with numpy and onnx.helper, torch or not (resnet_numpy.py).
TORCH_FREE_ARCHES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_OPSET = 18
OPSETS = range(13, 22)
DEFAULT_CALIBRATION_FRAMES = 200
DEFAULT_CHECK_FRAMES = 100


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are chosen from the calibration frames.

    Attributes:
        method: the name of an ``onnxruntime.quantization.CalibrationMethod``.
        options: ``extra_options`` for ``quantize_static`` (its ``Calib*`` keys).
        summary: one line for the CLI's help.
    """

    method: str
    options: tuple[tuple[str, object], ...] = ()
    summary: str = ""


# One line per calibration; the CLI's choices read this.
CALIBRATIONS: dict[str, Calibration] = {
    "minmax": Calibration("MinMax", (), "the full range seen on the calibration frames"),
    # onnxruntime's percentile default makes the range symmetric around 0, which wastes half of a uint8
    # range on post-ReLU tensors; the plain (asymmetric) percentile keeps the zero point where it belongs.
    "percentile": Calibration(
        "Percentile", (("CalibPercentile", 99.99), ("CalibTensorRangeSymmetric", False)),
        "clip each range at the 99.99th percentile of the values seen",
    ),
    "entropy": Calibration("Entropy", (), "the range that minimises KL divergence of the histogram"),
}
DEFAULT_CALIBRATION = "percentile"
