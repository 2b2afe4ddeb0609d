"""`export --arch`: every supported torchvision family gives the contract and the same CAM as PyTorch."""

import numpy as np
import onnxruntime as ort
import pytest

from realtime_cam.cli import main
from realtime_cam.contract import read_contract

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import onnx  # noqa: E402

# arch -> how to reach the map right before pooling in torchvision's own module, for the reference hook.
PRE_POOL = {
    "resnet34": lambda m: m.layer4,
    "resnet50": lambda m: m.layer4,
    "densenet121": lambda m: m.features,          # + the ReLU torchvision applies functionally
    "mobilenet_v2": lambda m: m.features,
    "efficientnet_b0": lambda m: m.features,
    "googlenet": lambda m: m.inception5b,
    "shufflenet_v2_x0_5": lambda m: m.conv5,
    "regnet_y_400mf": lambda m: m.trunk_output,
    "mnasnet0_5": lambda m: m.layers,
}


def head_of(model):
    for name in ("fc", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head[-1] if isinstance(head, torch.nn.Sequential) else head
    raise AssertionError("no head")


@pytest.mark.parametrize("arch", sorted(PRE_POOL))
def test_family_exports_to_the_contract_with_pytorch_identical_cam(arch, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, weights=None).eval()
    weights = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / f"{arch}.onnx"
    assert main(["export", "--arch", arch, "--weights", str(weights), "--output", str(out)]) == 0

    captured = {}
    PRE_POOL[arch](net).register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_ref = net(x).numpy()
    features_ref = captured["f"]
    if arch.startswith("densenet"):
        features_ref = torch.nn.functional.relu(features_ref)
    features_ref = features_ref.numpy()[0]
    fc = head_of(net).weight.detach().numpy()

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, features = session.run(["logits", "features"], {"input": x.numpy()})
    info, weight, bias = read_contract(onnx.load(str(out)))
    np.testing.assert_array_equal(weight, fc)
    tol = 1e-3 * max(1.0, np.abs(logits_ref).max())
    np.testing.assert_allclose(logits[0], logits_ref[0], atol=tol)
    c = int(logits_ref[0].argmax())
    cam_ref = np.tensordot(fc[c], features_ref, axes=1)
    cam_onnx = np.tensordot(weight[c], features[0], axes=1)
    np.testing.assert_allclose(cam_onnx, cam_ref, atol=1e-3 * max(1.0, np.abs(cam_ref).max()))


@pytest.mark.parametrize("aux", [True, False])
def test_googlenet_state_dict_with_or_without_aux_heads_loads(aux, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    state = net.state_dict()
    if not aux:
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    path = tmp_path / "g.pth"
    torch.save(state, path)
    out = tmp_path / "g.onnx"
    assert main(["export", "--arch", "googlenet", "--weights", str(path), "--output", str(out)]) == 0
    _, weight, _ = read_contract(onnx.load(str(out)))
    np.testing.assert_array_equal(weight, state["fc.weight"].numpy())


def test_a_fine_tuned_head_keeps_its_class_count_and_labels(tmp_path):
    net = torchvision.models.resnet18(weights=None, num_classes=3)
    path = tmp_path / "r3.pth"
    torch.save(net.state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = tmp_path / "r3.onnx"
    assert main(["export", "--weights", str(path), "--labels", str(labels), "--output", str(out)]) == 0
    info, weight, _ = read_contract(onnx.load(str(out)))
    assert weight.shape == (3, 512) and info.labels == ("cat", "dog", "bird")
