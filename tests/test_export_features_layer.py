"""`export --arch ARCH --features LAYER`: another layer than the family's default, named as pytorch-grad-cam's
users name target layers, explained with in-graph gradients; an unknown name is refused in one line."""

import cv2
import numpy as np
import onnx
import pytest
from conftest import shared

from realtime_cam.cams import normalize_map
from realtime_cam.cli import main
from realtime_cam.contract import read_contract
from realtime_cam.model import CamModel

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from realtime_cam.export.target_layers import resolve_layer  # noqa: E402


@pytest.mark.parametrize("arch, spec, name", [
    ("resnet18", "model.layer3[-1]", "layer3.1"),
    ("resnet18", "layer4.0.conv2", "layer4.0.conv2"),
    ("vit_b_16", "encoder.layers[-1].ln_1", "encoder.layers.encoder_layer_11.ln_1"),
    ("swin_t", "features[-1][-1].norm1", "features.7.1.norm1"),
    ("mobilenet_v3_small", "features.11", "features.11"),
])
def test_layer_names_in_both_forms_resolve(arch, spec, name):
    net = torchvision.models.get_model(arch, weights=None)
    module, found = resolve_layer(net, spec, arch)
    assert found == name and module is net.get_submodule(name)


@pytest.mark.parametrize("spec", ["layer9", "layer4[7]", "fc.weight", "layer4..0", "model"])
def test_an_unknown_layer_is_refused_in_one_line_with_examples(spec, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["export", "--arch", "resnet18", "--weights", "none", "--features", spec, "--output", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"realtime-cam: error: --features {spec}: resnet18 has no layer")
    assert "layer4.1" in err[0] and not out.exists()


def test_an_earlier_block_is_explained_like_pytorch_grad_cam(resnet18_state_dict, tmp_path):
    out = tmp_path / "r18-layer3.onnx"
    assert main(["export", "--arch", "resnet18", "--weights", str(resnet18_state_dict), "--features", "layer3[-1]",
                 "--output", str(out)]) == 0
    info, weight, _ = read_contract(onnx.load(str(out)))
    assert weight is None and "model.layer3.1" in info.source  # a graph head: the layer is not before the GAP
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(torch.load(resnet18_state_dict, weights_only=True))
    net.eval()
    model = CamModel(out, device="cpu")
    frame = cv2.imread(str(shared("images", "darknet_dog.jpg")))
    prediction = model.predict(frame, method="gradcam")
    assert model.infer(frame)[1].shape == (256, 14, 14)
    with GradCAM(model=net, target_layers=[net.layer3[-1]]) as reference:
        expected = reference(input_tensor=torch.from_numpy(model.prepare(frame)),
                             targets=[ClassifierOutputTarget(prediction.class_id)])[0]
    mine = normalize_map(cv2.resize(prediction.cam, (224, 224), interpolation=cv2.INTER_LINEAR))
    r = float(np.corrcoef(mine.ravel(), expected.ravel())[0, 1])
    assert expected.std() > 0 and r >= 0.99, r
