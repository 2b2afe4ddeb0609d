"""Where realtime-cam keeps files it makes for the user."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$REALTIME_CAM_CACHE``, else ``$XDG_CACHE_HOME/realtime-cam``, else ``~/.cache/realtime-cam``."""
    explicit = os.environ.get("REALTIME_CAM_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "realtime-cam"


def default_model_path(arch: str = "resnet18") -> Path:
    """Where ``export`` writes, and ``run`` looks for, the exported torchvision model by default."""
    return cache_dir() / f"{arch}.onnx"
