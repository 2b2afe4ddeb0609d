"""Rewriting existing ONNX classifiers into the contract (realtime_cam.export.from_onnx).

Real models: the ONNX Model Zoo MobileNetV2 int8 (QOperator) and its float twin from ../shared/data.
Small models: tiny torch networks exported with torch.onnx (float, QDQ and QOperator int8 through
onnxruntime.quantization), and heads built directly with onnx.helper for the refusals.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.contract import FEATURES, LOGITS, load_labels, read_contract
from realtime_cam.errors import ExportError
from realtime_cam.export.from_onnx import RewriteReport, rewrite_onnx_classifier

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INT8 = SHARED / "models" / "mobilenetv2-12-int8.onnx"
FLOAT_TWIN = SHARED / "models" / "mobilenetv2-12-float-from-int8.onnx"
needs_shared = pytest.mark.skipif(not INT8.is_file() or not FLOAT_TWIN.is_file(),
                                  reason=f"shared test models not found under {SHARED / 'models'}")

CAT_IDS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
BALD_EAGLE = 22
PHOTOS = {"skimage_chelsea.png": CAT_IDS, "darknet_eagle.jpg": (BALD_EAGLE,)}
MEAN_RGB = np.float32([0.485, 0.456, 0.406])
STD_RGB = np.float32([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- helpers
class Contract:
    """A rewritten file opened the way the runtime will: onnx for the head, onnxruntime for the graph."""

    def __init__(self, path: Path) -> None:
        model = onnx.load(str(path))
        self.outputs = [o for o in model.graph.output]
        self.info, self.weight, self.bias = read_contract(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run([LOGITS, FEATURES], {self.input_name: x})
        return logits, features

    def cams(self, features: np.ndarray) -> np.ndarray:
        """[N, K, h, w]: every class's map, W @ features."""
        return np.einsum("kc,nchw->nkhw", self.weight.astype(np.float64), features.astype(np.float64))


def preprocess(path: Path) -> np.ndarray:
    """The model zoo's preprocessing, written independently of realtime_cam: RGB, 224x224, /255, ImageNet."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_LINEAR)
    x = (rgb.astype(np.float32) / 255.0 - MEAN_RGB) / STD_RGB
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def rewrite(src: Path, out: Path, **kwargs) -> tuple[RewriteReport, list[str]]:
    lines: list[str] = []
    report = rewrite_onnx_classifier(src, out, log=lines.append, **kwargs)
    return report, lines


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> tuple[Contract, RewriteReport, list[str]]:
    if not INT8.is_file():
        pytest.skip(f"shared test model not found: {INT8}")
    out = tmp_path_factory.mktemp("from_onnx") / "mnv2-int8-cam.onnx"
    report, lines = rewrite(INT8, out)
    return Contract(out), report, lines


@pytest.fixture(scope="module")
def float_twin(tmp_path_factory) -> tuple[Contract, RewriteReport, list[str]]:
    if not FLOAT_TWIN.is_file():
        pytest.skip(f"shared test model not found: {FLOAT_TWIN}")
    out = tmp_path_factory.mktemp("from_onnx") / "mnv2-float-cam.onnx"
    report, lines = rewrite(FLOAT_TWIN, out)
    return Contract(out), report, lines


# ----------------------------------------------------------------------------- the real int8 model
@needs_shared
def test_int8_model_becomes_a_contract_file(int8):
    contract, report, lines = int8
    assert [o.name for o in contract.outputs] == [LOGITS, FEATURES]
    for o in contract.outputs:
        assert o.type.tensor_type.elem_type == TensorProto.FLOAT
    dims = [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in contract.outputs]
    assert dims[0][1:] == [1000] and dims[1][1:] == [1280, 7, 7]
    assert contract.weight.shape == (1000, 1280) and contract.bias.shape == (1000,)
    assert contract.weight.dtype == np.float32
    info = contract.info
    assert info.labels == load_labels() and info.labels[BALD_EAGLE] == "bald eagle"
    assert info.input_size_hw == (224, 224) and info.channel_order == "RGB"
    assert info.mean == pytest.approx(MEAN_RGB) and info.std == pytest.approx(STD_RGB)
    assert "mobilenetv2-12-int8.onnx" in info.source

    assert report.num_classes == 1000 and report.feature_shape_chw == (1280, 7, 7) and report.quantized
    assert report.head_kind == ("QLinearGlobalAveragePool -> Reshape -> QLinearMatMul -> QLinearAdd "
                                "-> DequantizeLinear")
    assert report.logits_max_abs_diff == 0.0
    # Measured 0.18 on the seeded noise (0.15-0.17 on the photos) against a rounding bound of 1.7.
    assert 0.0 < report.head_max_abs_error <= report.head_error_bound < 2.0
    assert info.head_tolerance == pytest.approx(report.head_max_abs_error)
    assert len(lines) == 2 and "QLinearGlobalAveragePool" in lines[0]
    assert f"{report.head_max_abs_error:.3g}" in lines[1] and "original" in lines[1]

    # Batch 3 (the check ran 1 and 2): the dynamic batch survived, and logits are the original output.
    x = np.concatenate([preprocess(SHARED / "images" / name) for name in ("skimage_chelsea.png",
                                                                           "darknet_eagle.jpg", "darknet_dog.jpg")])
    original = ort.InferenceSession(str(INT8), providers=["CPUExecutionProvider"]).run(["output"], {"input": x})[0]
    logits, features = contract.run(x)
    np.testing.assert_array_equal(logits, original)
    predicted = features.astype(np.float64).mean(axis=(2, 3)) @ contract.weight.T.astype(np.float64) + contract.bias
    assert np.abs(predicted - logits).max() <= report.head_error_bound


@needs_shared
@pytest.mark.parametrize("name", PHOTOS)
def test_int8_model_classifies_photos(int8, name):
    contract, _, _ = int8
    logits, _ = contract.run(preprocess(SHARED / "images" / name))
    assert int(logits[0].argmax()) in PHOTOS[name]


@needs_shared
def test_int8_model_pointing_game(int8):
    """The ground-truth class's map peaks inside one of its boxes (17/20 here; an independent run gets 85%)."""
    contract, _, _ = int8
    folder = SHARED / "imagenet-val-20"
    boxes: dict[str, list[tuple[int, list[float]]]] = {}
    with open(folder / "annotations.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            box = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
            boxes.setdefault(row["file"], []).append((int(row["class_id"]), box))
    assert len(boxes) == 20
    hits = 0
    for name, rows in boxes.items():
        image = cv2.imread(str(folder / name))
        height, width = image.shape[:2]
        _, features = contract.run(preprocess(folder / name))
        class_id = rows[0][0]
        c, h, w = features.shape[1:]
        cam = (contract.weight[class_id] @ features[0].reshape(c, h * w)).reshape(h, w)
        upsampled = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        y, x = np.unravel_index(int(upsampled.argmax()), upsampled.shape)
        hits += any(x0 <= x <= x1 and y0 <= y <= y1 for _, (x0, y0, x1, y1) in rows)
    assert hits / len(boxes) >= 0.80, f"pointing game {hits}/{len(boxes)}"


# ----------------------------------------------------------------------------- its float twin
@needs_shared
def test_float_twin_rewritten_and_agrees_with_int8(int8, float_twin):
    contract, report, _ = float_twin
    assert report.head_kind == "GlobalAveragePool -> Reshape -> MatMul -> Add" and not report.quantized
    assert report.logits_max_abs_diff == 0.0 and report.head_max_abs_error < 1e-4
    assert contract.info.head_tolerance == 0.0 and contract.info.labels == load_labels()
    q_contract = int8[0]
    for name, expected in PHOTOS.items():
        x = preprocess(SHARED / "images" / name)
        logits, features = contract.run(x)
        assert int(logits[0].argmax()) in expected, name
        q_logits, q_features = q_contract.run(x)
        class_id = int(q_logits[0].argmax())
        r = correlation(contract.cams(features)[0, class_id], q_contract.cams(q_features)[0, class_id])
        assert r >= 0.95, (name, r)  # 0.976 (chelsea) and 0.991 (eagle) here


# ----------------------------------------------------------------------------- tiny torch networks
def _torch_model(head: str):
    """A small conv net (3 conv layers, 8x8 map at 32x32 input) whose head has the asked-for ONNX form."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            )
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            f = self.body(x)
            if head == "gemm":  # GlobalAveragePool -> Flatten -> Gemm
                return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))
            if head == "matmul":  # GlobalAveragePool -> Flatten -> MatMul -> Add
                return torch.flatten(F.adaptive_avg_pool2d(f, 1), 1) @ self.fc.weight.t() + self.fc.bias
            if head == "conv1x1":  # GlobalAveragePool -> Conv 1x1 -> Flatten
                pooled = F.adaptive_avg_pool2d(f, 1)
                return torch.flatten(F.conv2d(pooled, self.fc.weight[:, :, None, None], self.fc.bias), 1)
            if head == "reducemean":  # ReduceMean(axes) -> Gemm
                return self.fc(f.mean(dim=(2, 3)))
            if head == "avgpool":  # AveragePool over the whole 8x8 map -> Flatten -> Gemm
                return self.fc(torch.flatten(F.avg_pool2d(f, 8), 1))
            if head == "softmax":  # ... -> Gemm -> Softmax
                return torch.softmax(self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)), dim=1)
            raise ValueError(head)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.fc.bias.uniform_(-1.0, 1.0)
    return torch, net


def _export(torch, net, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=opset, dynamo=False)


def _reference(torch, net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's pre-pooling features (forward hook) and every class's map fc.weight @ features."""
    grabbed = []
    handle = net.body.register_forward_hook(lambda module, args, out: grabbed.append(out.detach()))
    with torch.no_grad():
        net(torch.from_numpy(x))
    handle.remove()
    features = grabbed[0].numpy().astype(np.float64)
    weight = net.fc.weight.detach().numpy().astype(np.float64)
    return features, np.einsum("kc,nchw->nkhw", weight, features)


def _calibration_reader(n: int = 8):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self._batches = iter([{"input": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self._batches, None)

    return Reader()


FLOAT_HEADS = {  # head -> (opset, the ops the rewrite must find)
    "gemm": (17, "GlobalAveragePool -> Flatten -> Gemm"),
    "matmul": (17, "GlobalAveragePool -> Flatten -> MatMul -> Add"),
    "conv1x1": (17, "GlobalAveragePool -> Conv -> Flatten"),
    "reducemean": (13, "ReduceMean -> Gemm"),  # axes as an attribute
    "reducemean18": (18, "ReduceMean -> Gemm"),  # axes as an input
    "avgpool": (17, "AveragePool -> Flatten -> Gemm"),
    "softmax": (17, "GlobalAveragePool -> Flatten -> Gemm -> Softmax"),
}


@pytest.mark.parametrize("head", FLOAT_HEADS)
def test_float_torch_heads_match_pytorch(tmp_path, head):
    opset, ops = FLOAT_HEADS[head]
    torch, net = _torch_model(head.replace("18", ""))
    _export(torch, net, tmp_path / "net.onnx", opset)
    report, _ = rewrite(tmp_path / "net.onnx", tmp_path / "cam.onnx")
    assert report.head_kind == ops and not report.quantized
    assert report.num_classes == 5 and report.feature_shape_chw == (16, 8, 8)

    contract = Contract(tmp_path / "cam.onnx")
    assert contract.info.labels == tuple(f"class {i}" for i in range(5))
    assert contract.info.input_size_hw == (32, 32) and contract.info.head_tolerance == 0.0
    np.testing.assert_allclose(contract.weight, net.fc.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(contract.bias, net.fc.bias.detach().numpy(), rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    logits, features = contract.run(x)
    ref_features, ref_cams = _reference(torch, net, x)
    np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(contract.cams(features), ref_cams, rtol=1e-4, atol=1e-4 * np.abs(ref_cams).max())
    with torch.no_grad():
        ref_logits = net.fc(net.body(torch.from_numpy(x)).mean(dim=(2, 3))).numpy()
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)  # pre-softmax, also for "softmax"


QUANTIZED_HEADS = {  # (head, format) -> the ops the rewrite must find
    ("gemm", "QDQ"): "GlobalAveragePool -> QuantizeLinear -> DequantizeLinear -> Flatten -> QuantizeLinear "
                     "-> DequantizeLinear -> Gemm -> QuantizeLinear -> DequantizeLinear",
    ("gemm", "QOperator"): "QLinearGlobalAveragePool -> Flatten -> QGemm -> DequantizeLinear",
    ("matmul", "QOperator"): None,
    ("conv1x1", "QOperator"): None,
    ("conv1x1", "QDQ"): None,
}


@pytest.mark.parametrize(("head", "fmt"), QUANTIZED_HEADS)
def test_quantized_torch_heads_follow_pytorch(tmp_path, head, fmt):
    torch, net = _torch_model(head)
    from onnxruntime.quantization import QuantFormat, quantize_static

    _export(torch, net, tmp_path / "net.onnx", 17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(tmp_path / "net.onnx"), str(tmp_path / "int8.onnx"), _calibration_reader(),
                        quant_format=getattr(QuantFormat, fmt), per_channel=True)
    report, _ = rewrite(tmp_path / "int8.onnx", tmp_path / "cam.onnx")
    expected = QUANTIZED_HEADS[(head, fmt)]
    if expected is not None:
        assert report.head_kind == expected
    assert report.quantized and report.logits_max_abs_diff == 0.0
    assert report.head_max_abs_error <= report.head_error_bound

    contract = Contract(tmp_path / "cam.onnx")
    assert contract.info.head_tolerance == pytest.approx(report.head_max_abs_error)
    weight = net.fc.weight.detach().numpy()
    # Dequantized per-channel int8 weights: within half a step of the float ones.
    assert np.abs(contract.weight - weight).max() <= np.abs(weight).max(axis=1).max() / 127
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    _, features = contract.run(x)
    _, ref_cams = _reference(torch, net, x)
    cams = contract.cams(features)
    for n in range(x.shape[0]):
        class_id = int(ref_cams[n].mean(axis=(1, 2)).argmax())
        assert correlation(cams[n, class_id], ref_cams[n, class_id]) >= 0.95
