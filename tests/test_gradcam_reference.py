"""The gradient methods against pytorch-grad-cam on the same torchvision weights, class and target layer
(ResNet18, layer4[-1]: the features the contract file outputs)."""

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from realtime_cam.cams import compute_map, normalize_map

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


@pytest.mark.parametrize("ours,theirs", [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("xgradcam", XGradCAM),
                                         ("layercam", LayerCAM), ("hirescam", HiResCAM)])
def test_matches_pytorch_grad_cam(ours, theirs, resnet18_onnx, resnet18_state_dict):
    import onnx

    from realtime_cam.contract import read_contract

    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(torch.load(resnet18_state_dict, weights_only=True))
    net.eval()
    _, weight, _ = read_contract(onnx.load(str(resnet18_onnx)))
    session = ort.InferenceSession(str(resnet18_onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for trial in range(3):
        x = torch.from_numpy(rng.standard_normal((1, 3, 224, 224)).astype(np.float32))
        logits, features = session.run(["logits", "features"], {"input": x.numpy()})
        for class_id in (int(logits[0].argmax()), int(logits[0].argmin())):
            with theirs(model=net, target_layers=[net.layer4[-1]]) as reference:
                expected = reference(input_tensor=x, targets=[ClassifierOutputTarget(class_id)])[0]
            mine = normalize_map(compute_map(ours, features[0], weight, class_id))
            mine = normalize_map(cv2.resize(mine, (224, 224), interpolation=cv2.INTER_LINEAR))
            if expected.std() == 0 and mine.std() == 0:
                continue
            r = np.corrcoef(mine.ravel(), expected.ravel())[0, 1]
            assert r >= 0.99, (ours, trial, class_id, r)
