"""The torchvision export: parity with PyTorch, the contract, and every way to get weights."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from realtime_cam.cli import main
from realtime_cam.contract import read_contract

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def test_export_matches_torchvision_resnet18_with_the_same_weights(resnet18_onnx, resnet18_state_dict):
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(torch.load(resnet18_state_dict, weights_only=True))
    net.eval()
    feats = {}
    net.layer4.register_forward_hook(lambda m, i, o: feats.__setitem__("layer4", o))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits_ref = net(x).numpy()
    session = ort.InferenceSession(str(resnet18_onnx), providers=["CPUExecutionProvider"])
    logits, features = session.run(["logits", "features"], {"input": x.numpy()})
    assert logits.shape == (3, 1000) and features.shape == (3, 512, 7, 7)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-3 * max(1, np.abs(logits_ref).max()))
    np.testing.assert_allclose(features, feats["layer4"].numpy(), atol=1e-3 * feats["layer4"].abs().max().item())
    # The CAM from the ONNX outputs equals the PyTorch reference: fc weight times the layer4 map.
    w = net.fc.weight.detach().numpy()
    c = int(logits_ref[0].argmax())
    ref_cam = np.einsum("k,khw->hw", w[c], feats["layer4"][0].numpy())
    np.testing.assert_allclose(np.einsum("k,khw->hw", w[c], features[0]), ref_cam, atol=1e-3)


def test_exported_file_is_self_contained(resnet18_onnx):
    model = onnx.load(str(resnet18_onnx))
    onnx.checker.check_model(model, full_check=True)
    info, weight, bias = read_contract(model)
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, "batch dimension must be dynamic"
    assert weight.shape == (1000, 512) and bias.shape == (1000,)
    assert info.labels[281] == "tabby" and info.input_size_hw == (224, 224)
    assert info.channel_order == "RGB" and info.mean == pytest.approx((0.485, 0.456, 0.406))
    assert not list(resnet18_onnx.parent.glob("*.data")), "no external data files"


def test_weights_none_says_it_is_random(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="realtime_cam")
    out = tmp_path / "r.onnx"
    assert main(["export", "--weights", "none", "--output", str(out)]) == 0
    assert "random weights" in caplog.text and "tests and benchmarks only" in caplog.text
    assert "max |logits diff|" in caplog.text
    assert out.exists() and not list(tmp_path.glob(".*partial*"))


def test_default_weights_come_from_the_torch_home_cache_offline(tmp_path, monkeypatch, resnet18_state_dict):
    # The export looks in $TORCH_HOME/hub/checkpoints before downloading, as torchvision's weights API does.
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # Named after its own sha256 (the hash is checked), and the URL says so (never contacted: the file is cached).
    data = resnet18_state_dict.read_bytes()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (checkpoints / name).write_bytes(data)
    monkeypatch.setenv("REALTIME_CAM_WEIGHTS_URL", f"http://127.0.0.1:9/{name}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    out = tmp_path / "r.onnx"
    assert main(["export", "--output", str(out)]) == 0
    info, weight, _ = read_contract(onnx.load(str(out)))
    expected = torch.load(resnet18_state_dict, weights_only=True)["fc.weight"].numpy()
    np.testing.assert_array_equal(weight, expected)
    assert "IMAGENET1K_V1" in info.source


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 half a zip file"])
def test_a_damaged_file_in_the_weights_cache_is_one_line_saying_what_to_do(tmp_path, monkeypatch, capsys, content):
    """A half-finished manual download (the offline advice asks for one) must not be a torch.load traceback."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(content)
    assert main(["export", "--output", str(tmp_path / "r.onnx")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"realtime-cam: error: the cached weights file {checkpoint} is damaged")
    assert not (tmp_path / "r.onnx").exists()


def test_a_pth_holding_pickled_code_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this code must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload()}, path)
    assert main(["export", "--weights", str(path), "--output", str(tmp_path / "r.onnx")]) == 2
    captured = capsys.readouterr()
    assert "this code must never run" not in captured.out
    assert "refused to load" in captured.err and "weights_only=True" in captured.err


def test_a_state_dict_of_another_network_is_refused(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    assert main(["export", "--weights", str(path), "--output", str(tmp_path / "r.onnx")]) == 2
    assert "does not fit torchvision's resnet18" in capsys.readouterr().err


@pytest.mark.parametrize("arch,why", [("no_such_net", "no classification model")])
def test_architectures_that_cannot_be_exported_are_refused(tmp_path, capsys, arch, why):
    assert main(["export", "--arch", arch, "--weights", "none", "--output", str(tmp_path / "x.onnx")]) == 2
    assert why in capsys.readouterr().err
