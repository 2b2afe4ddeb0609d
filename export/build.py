"""``realtime-cam export`` as a library call: a torchvision backbone or an ONNX classifier -> one contract file,
float32, int8 or float16.

torchvision's ResNets (options.TORCH_FREE_ARCHES) are always exported without torch (resnet_numpy.py, tested
equal to the torch export); other backbones need the export extra. Importing this module is cheap: onnx,
onnxruntime's quantizer and torch load only when an export needs them.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from realtime_cam.errors import ExportError
from realtime_cam.paths import default_model_path

from .options import (
    CALIBRATIONS,
    DEFAULT_ARCH,
    DEFAULT_CALIBRATION,
    DEFAULT_CALIBRATION_FRAMES,
    DEFAULT_OPSET,
    DEFAULT_WEIGHTS,
    TORCH_FREE_ARCHES,
)

__all__ = ["export_default_model", "export_model", "torchvision_exporter"]

PathLike = str | os.PathLike


def export_model(
    output: PathLike | None = None,
    *,
    arch: str = DEFAULT_ARCH,
    weights: str = DEFAULT_WEIGHTS,
    opset: int = DEFAULT_OPSET,
    from_onnx: PathLike | None = None,
    labels: PathLike | None = None,
    input_size_hw: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bgr: bool = False,
    features: str | None = None,
    int8: bool = False,
    fp16: bool = False,
    calibrate: PathLike | Sequence[PathLike] | None = None,
    calibration_frames: int = DEFAULT_CALIBRATION_FRAMES,
    calibration: str = DEFAULT_CALIBRATION,
    check: PathLike | Sequence[PathLike] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a realtime-cam model file; lower precisions are made from a float32 one that is not kept.

    Args:
        output: the .onnx file to write (default: the cache file ``run`` looks for, named after ``arch``, or
            after the classifier for ``from_onnx``; not for random weights or weights from a file, which never
            become a default model); its folder is made when missing.
        arch, weights, opset: the torchvision builder, its weights (a torchvision weights name, a state-dict
            file, or "none"), and the ONNX opset to export at.
        from_onnx: rewrite this ONNX classifier (GAP + linear head, float or quantized) instead.
        labels: class names, one per line (default: ImageNet-1k for 1000 classes, else numbered).
        input_size_hw, mean, std, bgr: ``from_onnx`` only; see
            :func:`~realtime_cam.export.from_onnx.rewrite_onnx_classifier`.
        features: the tensor (``from_onnx``) or layer (``arch``, export/target_layers.py) to explain with
            in-graph gradients.
        int8: write a static int8 model for the CPU, calibrated on the frames of ``calibrate``.
        fp16: write a float16 model for the CUDA provider.
        calibrate, calibration_frames, calibration: ``int8``: the frame sources (videos, images, folders),
            at most how many frames, and a key of :data:`~realtime_cam.export.options.CALIBRATIONS`.
        check: ``int8``/``fp16``: frames not used for calibration to measure fidelity to the fp32 model on.
        log: where the human-readable progress and summary lines go.

    Returns:
        The path written.

    Raises:
        CamError: bad options or output (before any work), or an export that fails (an ExportError).
    """
    if output is None:
        if from_onnx is None:
            _refuse_unverified_default(weights)
        output = default_model_path(Path(from_onnx).stem if from_onnx is not None else arch)
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise ExportError(f"--output must name an .onnx file; got {output.name}")
    if int8 and fp16:
        raise ExportError("--int8 and --fp16 exclude each other; choose one")
    if int8 and not calibrate:
        raise ExportError("--int8 needs --calibrate SOURCE: frames (videos, images, folders) to set activation ranges")
    if (calibrate or check) and not (int8 or fp16):
        raise ExportError("--calibrate and --check go with --int8 (or --check with --fp16)")
    if int8 and calibration not in CALIBRATIONS:
        raise ExportError(f"unknown calibration {calibration!r}; choose from {', '.join(CALIBRATIONS)}")
    # After the checks above, so that a usage mistake leaves no new folder behind.
    _check_output(output, inputs=(from_onnx, weights, labels))

    def export_fp32(path: Path) -> None:
        if from_onnx is not None:
            from .from_onnx import rewrite_onnx_classifier

            rewrite_onnx_classifier(
                from_onnx, path, labels_path=labels, input_size_hw=tuple(input_size_hw) if input_size_hw else None,
                mean=mean, std=std, bgr=bgr, features=features, log=log,
            )
        elif arch in TORCH_FREE_ARCHES and features is None:
            from .resnet_numpy import export_resnet

            export_resnet(arch, weights, path, opset=opset, labels_path=labels, log=log)
        else:
            more = {"features": features} if features is not None else {}
            torchvision_exporter()(arch, weights, path, opset=opset, labels_path=labels, log=log, **more)

    if not (int8 or fp16):
        export_fp32(output)
        log(f"wrote {output}")
        return output
    with tempfile.TemporaryDirectory(prefix=".realtime-cam-", dir=output.parent) as tmp:
        # Named after what it was made from: the messages of the steps below name it.
        name = Path(from_onnx).name if from_onnx is not None else re.sub(r"[^\w.-]", "_", arch) + ".onnx"
        fp32 = Path(tmp) / name
        export_fp32(fp32)
        if int8:  # each says what it wrote
            from .int8 import quantize_int8

            quantize_int8(fp32, output, calibrate, max_frames=calibration_frames, method=calibration, check=check,
                          log=log)
        else:
            from .fp16 import convert_fp16

            convert_fp16(fp32, output, check=check, log=log)
    return output


def export_default_model(path: PathLike, *, log: Callable[[str], None] = print) -> Path:
    """The model ``run`` uses when given none and none is cached: torchvision's pretrained resnet18 at ``path``,
    exported without torch from its weights file (in torch's cache, or downloaded there; hash-checked).

    Raises:
        ExportError: the weights cannot be had (the message says where to put the file offline), or the export
            fails.
    """
    from .resnet_numpy import export_resnet

    log(f"no model at {path} yet: exporting torchvision {DEFAULT_ARCH} with its ImageNet weights (once)")
    export_resnet(DEFAULT_ARCH, DEFAULT_WEIGHTS, path, log=log)
    return Path(path)


def _refuse_unverified_default(weights: str) -> None:
    """Only torchvision's hash-checked weights may go to a default path, where ``run`` would use them unasked."""
    from .hub import is_weights_file

    if weights.lower() == "none":
        raise ExportError("random weights need --output: they never become the default model "
                          "(realtime-cam export --weights none --output random.onnx)")
    if is_weights_file(weights):
        raise ExportError(f"weights from a file need --output: the default model holds torchvision's hash-checked "
                          f"weights only (realtime-cam export --weights {weights} --output FILE.onnx)")


def torchvision_exporter() -> Callable[..., object]:
    """``export_torchvision``, or an ExportError saying what to install when torch/torchvision are missing or broken."""
    try:
        from .from_torchvision import export_torchvision
    except ImportError as exc:
        raise ExportError(f"exporting a torchvision model needs the export extra ({exc.name or exc} is missing): "
                          "pip install 'realtime-cam[export]'") from None
    except Exception as exc:  # e.g. a torchvision built for another torch: "operator torchvision::nms ..."
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch/torchvision do not import together ({first}); reinstall the export extra: "
                          "pip install --force-reinstall 'realtime-cam[export]'") from None
    return export_torchvision


def _check_output(output: Path, inputs: Sequence[object]) -> None:
    """Refuse, before any work, a model file that could not be written where it is asked for, or that is one
    of the inputs. Unlike other outputs, its folder is made when missing (the default is in a cache)."""
    from realtime_cam.sinks import check_output_path

    if output.is_dir():
        raise ExportError(f"--output {output} is a folder; name the .onnx file to write")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot make the folder for {output}: {exc.strerror or exc}") from None
    check_output_path(output, {".onnx"}, inputs=inputs)
