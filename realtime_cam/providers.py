"""Devices and ONNX Runtime's execution providers: which to ask for (the session says which started).

The choices are importable without onnxruntime, for the command line's help.
"""

from __future__ import annotations

import logging

from .errors import DeviceError

log = logging.getLogger("realtime_cam")

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def providers_for(device: str) -> list[str]:
    """The providers to ask ONNX Runtime for, best first; a one-line error when the device cannot run."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        # onnxruntime-gpu installed with pip finds the pip-installed CUDA/cuDNN libraries this way.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as exc:  # a missing library shows up again, clearly, when the session starts
                log.debug("onnxruntime.preload_dlls failed: %s", exc)
        return [CUDA, CPU]
    if device == "cuda":
        raise DeviceError(
            f"--device cuda: this onnxruntime offers no CUDA provider (it has {', '.join(available)}); "
            "install the GPU build: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
            "'onnxruntime-gpu[cuda,cudnn]' (see the README's install section)"
        )
    return [CPU]
