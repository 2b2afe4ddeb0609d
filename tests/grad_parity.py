"""realtime-cam's maps against pytorch-grad-cam's on the same torchvision network and target layer (imported by
the export tests after their ``pytest.importorskip`` of torch and pytorch_grad_cam)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from realtime_cam.cams import normalize_map
from realtime_cam.cli import main

REFERENCES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}


def assert_maps_match(model, net, target_of: Callable, target_name: str, arch: str, method: str, photo: str,
                      frame: np.ndarray, reshape: Callable | None = None, first: bool = True) -> None:
    """``model``'s map of ``frame`` (its top-1, and on the ``first`` photo also its third class, fed to the graph as
    its target) against pytorch-grad-cam's ``method`` on ``net`` at ``target_of(net)``: Pearson r >= 0.99 each."""
    h, w = model.info.input_size_hw
    batch = model.prepare(frame)  # the model file's size, mean and std, for both
    predictions = [model.predict(frame, method=method)]
    if first:  # also a class fed to the graph as its target: the third most probable
        predictions.append(model.predict(frame, class_id=predictions[0].topk[2][0], method=method))
    for prediction in predictions:
        with REFERENCES[method](model=net, target_layers=[target_of(net)], reshape_transform=reshape) as reference:
            expected = reference(input_tensor=torch.from_numpy(batch),
                                 targets=[ClassifierOutputTarget(prediction.class_id)])[0]
        mine = normalize_map(cv2.resize(prediction.cam, (w, h), interpolation=cv2.INTER_LINEAR))
        assert expected.shape == mine.shape == (h, w)
        assert expected.std() > 0 and mine.std() > 0, (arch, method, photo, "a constant map tests nothing")
        r = float(np.corrcoef(mine.ravel(), expected.ravel())[0, 1])
        print(f"parity {arch} {target_name} {method} {photo} class {prediction.class_id}: 1 - r = {1 - r:.1e}")
        assert r >= 0.99, (arch, target_name, method, photo, prediction.class_id, r)


def assert_run_explains_a_video_with_gradcam(model_path: Path, video: Path, result: Path, frames: int) -> None:
    """`realtime-cam run --method gradcam` from a video to a file with the exported model: exit 0, a file written."""
    assert main(["run", "--model", str(model_path), "--method", "gradcam", "--source", str(video), "--output",
                 str(result), "--no-display", "--max-frames", str(frames)]) == 0
    assert result.stat().st_size > 0
