"""`export --arch` for CNN heads that are not GAP + linear (an MLP head, a conv classifier before the pooling,
a LayerNorm after it): the file explains pytorch-grad-cam's target layer with in-graph gradients, and its
gradcam, gradcam++ and layercam maps equal pytorch-grad-cam's on the same torchvision model, weights, class
and target layer (seeded random weights, BatchNorm/LayerNorm statistics and scales set to random values)."""

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
from grad_parity import REFERENCES, assert_maps_match, assert_run_explains_a_video_with_gradcam  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

# arch -> (the target layer in torchvision's module, as pytorch-grad-cam's users write it). Each must be the
# layer the export explains (export/torchvision_graph.py GRAPH_FAMILIES).
TARGET_LAYERS = {
    "mobilenet_v3_small": (lambda m: m.features[-1], "model.features[-1]"),  # Conv-BN-Hardswish, 576x7x7
    "squeezenet1_1": (lambda m: m.features[-1], "model.features[-1]"),       # the last Fire module, 512x13x13
    "alexnet": (lambda m: m.features[-1], "model.features[-1]"),             # the last MaxPool, 256x6x6
    "convnext_tiny": (lambda m: m.features[-1], "model.features[-1]"),       # the last stage, 768x7x7
}
PHOTOS = ("darknet_dog.jpg", "skimage_chelsea.png")


def seeded_net(arch: str, seed: int = 1234) -> torch.nn.Module:
    """torchvision's ``arch`` with seeded random weights and non-trivial normalisation (torchvision starts
    them as the identity, and ConvNeXt's layer scales at 1e-6): BatchNorm running statistics measured on
    seeded random images, then BatchNorm/LayerNorm affine parameters and layer scales set to random values.
    With BatchNorm left at mean 0, variance 1, MobileNetV3's random activations vanish with depth and its
    logits do not depend on the image at all."""
    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, weights=None, **({"init_weights": True} if arch == "inception_v3" else {}))
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
            net.train()
            side = 299 if arch == "inception_v3" else 224
            for _ in range(2):
                net(torch.randn(4, 3, side, side, generator=g))
            for m in norms:
                m.momentum = 0.1
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if hasattr(m, "layer_scale"):  # ConvNeXt's CNBlock: 1e-6 would make every block the identity
                m.layer_scale.copy_(torch.empty(m.layer_scale.shape).uniform_(0.2, 1.0, generator=g))
    return net.eval()


@pytest.fixture(scope="module", params=sorted(TARGET_LAYERS))
def exported(request, tmp_path_factory):
    """(arch, the seeded torchvision net, its file exported by `realtime-cam export --arch ARCH --weights PTH`)."""
    arch = request.param
    net = seeded_net(arch)
    folder = tmp_path_factory.mktemp(arch)
    weights = folder / f"{arch}-seeded.pth"
    torch.save(net.state_dict(), weights)
    out = folder / f"{arch}.onnx"
    assert main(["export", "--arch", arch, "--weights", str(weights), "--output", str(out)]) == 0
    return arch, net, out


def test_the_file_is_a_graph_head_explaining_the_target_layer(exported):
    arch, net, out = exported
    model = onnx.load(str(out))
    info, weight, bias = read_contract(model)
    assert weight is None and bias is None
    assert [o.name for o in model.graph.output] == ["logits", "features", "grads", "grads_class"]
    assert TARGET_LAYERS[arch][1] in info.source and "seeded.pth" in info.source
    assert info.labels[281] == "tabby"
    methods = CamModel(out, device="cpu").methods
    assert "cam" not in methods and {"gradcam", "gradcam++", "layercam", "eigencam"} <= set(methods)
    # The features are the target layer's output in PyTorch.
    captured = {}
    TARGET_LAYERS[arch][0](net).register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_ref = net(x).numpy()
    logits, features = CamModel(out, device="cpu").forward(x.numpy())
    np.testing.assert_allclose(logits, logits_ref, atol=1e-3 * max(1.0, np.abs(logits_ref).max()))
    np.testing.assert_allclose(features, captured["f"].numpy(), atol=1e-3 * max(1.0, captured["f"].abs().max().item()))


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_maps_match_pytorch_grad_cam_at_the_same_target_layer(exported, method):
    arch, net, out = exported
    target_of, target_name = TARGET_LAYERS[arch]
    model = CamModel(out, device="cpu")
    for photo in PHOTOS:
        frame = cv2.imread(str(shared("images", photo)))
        assert_maps_match(model, net, target_of, target_name, arch, method, photo, frame, first=photo == PHOTOS[0])


def test_run_explains_a_video_with_gradcam(exported, tmp_path):
    _, _, out = exported
    assert_run_explains_a_video_with_gradcam(out, shared("videos", "bottle-detection.mp4"), tmp_path / "o.mp4", 20)


def test_inception_v3_exports_at_299_with_its_linear_head(tmp_path):
    """Inception v3 is GAP + linear after Mixed_7c (its auxiliary classifier runs only in training): the file
    keeps the linear head (cam and the closed forms) at torchvision's 299x299 input."""
    net = seeded_net("inception_v3")
    state = net.state_dict()
    assert any(k.startswith("AuxLogits.") for k in state)  # a checkpoint with the auxiliary head loads too
    weights, out = tmp_path / "inception_v3-seeded.pth", tmp_path / "inception_v3.onnx"
    torch.save(state, weights)
    assert main(["export", "--arch", "inception_v3", "--weights", str(weights), "--output", str(out)]) == 0
    model = CamModel(out, device="cpu")
    assert model.info.input_size_hw == (299, 299) and "cam" in model.methods
    np.testing.assert_array_equal(model.head_weight, state["fc.weight"].numpy())
    frame = cv2.imread(str(shared("images", PHOTOS[0])))
    prediction = model.predict(frame, method="gradcam")
    with GradCAM(model=net, target_layers=[net.Mixed_7c]) as reference:
        expected = reference(input_tensor=torch.from_numpy(model.prepare(frame)),
                             targets=[ClassifierOutputTarget(prediction.class_id)])[0]
    mine = normalize_map(cv2.resize(prediction.cam, (299, 299), interpolation=cv2.INTER_LINEAR))
    r = float(np.corrcoef(mine.ravel(), expected.ravel())[0, 1])
    assert expected.std() > 0 and r >= 0.99, r
