"""realtime-cam: live Class Activation Maps (Zhou et al. 2016) from ONNX classifiers.

>>> from realtime_cam import CamModel
>>> model = CamModel("resnet18.onnx")            # doctest: +SKIP
>>> prediction = model.predict(frame_bgr)        # doctest: +SKIP
>>> prediction.label, prediction.cam.shape       # doctest: +SKIP

Importing this package loads numpy, OpenCV, onnx and onnxruntime only: never torch.
"""

__version__ = "0.1.0"

__all__ = ["CamModel", "Prediction", "CamError", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import realtime_cam` (e.g. for __version__) stays cheap.
    if name == "CamModel":
        from .model import CamModel

        return CamModel
    if name == "Prediction":
        from .types import Prediction

        return Prediction
    if name == "CamError":
        from .errors import CamError

        return CamError
    raise AttributeError(f"module 'realtime_cam' has no attribute {name!r}")
