"""ResNets exported without torch: the state-dict reader and its restricted unpickler, and parity with the torch
export (tests that need torch skip without it)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from torch_format import state_dict_pickle, torch_save, torch_zip

from realtime_cam.cli import main
from realtime_cam.contract import read_contract
from realtime_cam.errors import ExportError
from realtime_cam.export.resnet_numpy import ARCHES, expected_shapes, export_resnet, random_state_dict
from realtime_cam.export.torch_weights import read_state_dict


def seeded_state(arch: str, seed: int = 1) -> dict[str, np.ndarray]:
    """torchvision's initialisation, with BatchNorms that are not the identity (running stats included)."""
    state = random_state_dict(arch, seed=seed)
    rng = np.random.default_rng(seed)
    for name, value in state.items():
        if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            state[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif name.endswith(("running_mean", "bias")) and not name.startswith("fc."):
            state[name] = (0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    return state


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- the reader
def test_the_reader_gives_back_what_was_saved(tmp_path):
    state = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array(7, np.int64),
             "c": np.ones((2, 0), np.float16), "d": np.linspace(0, 1, 6).reshape(2, 3)}
    path = tmp_path / "w.pth"
    path.write_bytes(torch_save(state))
    back = read_state_dict(path)
    assert back.keys() == state.keys()
    for name, array in state.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array), name


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # pickling only records the call; unpickling would make it
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    path.write_bytes(torch_zip(pickle.dumps({"fc.weight": Payload()}, protocol=2), []))
    with pytest.raises(ExportError, match=r"^refused to load .*evil\.pth: it is not a plain state dict of tensors "
                                          r"\(its pickle asks for posix\.system"):
        read_state_dict(path)
    assert main(["export", "--weights", str(path), "--output", str(tmp_path / "r.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refused to load" in err
    assert not marker.exists() and not (tmp_path / "r.onnx").exists()


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    state = {"a": np.zeros(4, np.float32)}
    path = tmp_path / "w.pth"
    path.write_bytes(torch_zip(state_dict_pickle(state, strides={"a": (1000,)}), [state["a"]]))
    with pytest.raises(ExportError, match="reaches past its storage"):
        read_state_dict(path)


def test_a_file_that_is_not_torch_saved_zip_is_refused(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ExportError, match="not the zip file torch.save writes"):
        read_state_dict(path)


def test_a_state_dict_of_another_resnet_does_not_fit(tmp_path):
    path = tmp_path / "r50.pth"
    path.write_bytes(torch_save(random_state_dict("resnet50")))
    with pytest.raises(ExportError, match=r"r50\.pth does not fit torchvision's resnet18: .*unexpected .*; "
                                          r"layer1\.0\.conv1\.weight is \[64, 64, 1, 1\], not \[64, 64, 3, 3\]"):
        export_resnet("resnet18", str(path), tmp_path / "r.onnx", log=lambda _: None)
    assert not (tmp_path / "r.onnx").exists()


# ----------------------------------------------------------------------------- against torch
def test_the_torch_free_export_equals_the_torch_export(tmp_path):
    """The reference: realtime_cam.export.from_torchvision on the same seeded weights, both files run in ORT."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from realtime_cam.export.from_torchvision import export_torchvision

    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in seeded_state("resnet18").items()}, strict=False)
    weights = tmp_path / "resnet18-seeded.pth"
    torch.save(net.state_dict(), weights)  # as torchvision's files are: num_batches_tracked, _metadata and all
    ours, theirs = tmp_path / "numpy.onnx", tmp_path / "torch.onnx"
    export_resnet("resnet18", str(weights), ours, log=lambda _: None)
    export_torchvision("resnet18", str(weights), theirs, log=lambda _: None)
    x = np.random.default_rng(5).standard_normal((3, 3, 224, 224)).astype(np.float32)
    (logits, features), (logits_ref, features_ref) = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits", "features"], {"input": x})
        for p in (ours, theirs))
    assert logits.shape == (3, 1000) and features.shape == (3, 512, 7, 7)
    assert relative(logits, logits_ref) <= 1e-5 and relative(features, features_ref) <= 1e-5
    (info, weight, bias), (info_ref, weight_ref, bias_ref) = (read_contract(onnx.load(str(p))) for p in (ours, theirs))
    assert info == info_ref  # labels, size, normalisation, and the same source line
    metadata = [{m.key: m.value for m in onnx.load(str(p)).metadata_props} for p in (ours, theirs)]
    assert metadata[0] == metadata[1]  # the head's initializers by the same names too
    np.testing.assert_array_equal(weight, weight_ref)
    np.testing.assert_array_equal(bias, bias_ref)


def test_bottleneck_resnets_equal_torchvision(tmp_path):
    """resnet50 (Bottleneck) against torchvision's eager network; every arch's state dict fits torchvision's."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    for arch in ARCHES:  # the shape table behind the graph, against torchvision's (built on the meta device: fast)
        with torch.device("meta"):
            names = getattr(torchvision.models, arch)(weights=None).state_dict()
        assert expected_shapes(arch, 1000) == {k: tuple(v.shape) for k, v in names.items()
                                               if not k.endswith("num_batches_tracked")}, arch
    state = seeded_state("resnet50")
    net = torchvision.models.resnet50(weights=None)
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    net.eval()
    features_ref = {}
    net.layer4.register_forward_hook(lambda m, i, o: features_ref.__setitem__("layer4", o.numpy()))
    x = np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        logits_ref = net(torch.from_numpy(x)).numpy()
    weights = tmp_path / "r50.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, weights)
    out = export_resnet("resnet50", str(weights), tmp_path / "r50.onnx", log=lambda _: None).path
    logits, features = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["logits", "features"], {"input": x})
    assert features.shape == (1, 2048, 7, 7)
    assert relative(logits, logits_ref) <= 1e-5 and relative(features, features_ref["layer4"]) <= 1e-5


def test_torch_reads_the_files_the_tests_write(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    path = tmp_path / "w.pth"
    path.write_bytes(torch_save(state))
    loaded = torch.load(path, weights_only=True)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())
