"""Rewriting existing ONNX classifiers into the contract (realtime_cam.export.from_onnx).

Real models: the ONNX Model Zoo MobileNetV2 int8 (QOperator) and its float twin from ../shared/data.
Small models: tiny torch networks exported with torch.onnx (float, QDQ and QOperator int8 through
onnxruntime.quantization), and heads built directly with onnx.helper for the refusals.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import SHARED
from onnx import TensorProto, helper, numpy_helper

from realtime_cam.contract import FEATURES, LOGITS, load_labels, read_contract
from realtime_cam.errors import ExportError
from realtime_cam.export.from_onnx import RewriteReport, rewrite_onnx_classifier

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
        self.outputs = list(model.graph.output)
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


def rewrite_shared(src: Path, name: str, tmp_path_factory) -> tuple[Contract, RewriteReport, list[str]]:
    """A shared-data classifier rewritten into a contract file (skips when the file is absent)."""
    if not src.is_file():
        pytest.skip(f"shared test model not found: {src}")
    out = tmp_path_factory.mktemp("from_onnx") / name
    report, lines = rewrite(src, out)
    return Contract(out), report, lines


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> tuple[Contract, RewriteReport, list[str]]:
    return rewrite_shared(INT8, "mnv2-int8-cam.onnx", tmp_path_factory)


@pytest.fixture(scope="module")
def float_twin(tmp_path_factory) -> tuple[Contract, RewriteReport, list[str]]:
    return rewrite_shared(FLOAT_TWIN, "mnv2-float-cam.onnx", tmp_path_factory)


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


QUANTIZED_HEADS = {  # (head, onnxruntime quantization format) -> the ops the rewrite must find
    ("gemm", "QDQ"): "GlobalAveragePool -> QuantizeLinear -> DequantizeLinear -> Flatten -> QuantizeLinear "
                     "-> DequantizeLinear -> Gemm -> QuantizeLinear -> DequantizeLinear",
    ("conv1x1", "QDQ"): "GlobalAveragePool -> QuantizeLinear -> DequantizeLinear -> Conv -> QuantizeLinear "
                        "-> DequantizeLinear -> Flatten -> QuantizeLinear -> DequantizeLinear",
    ("gemm", "QOperator"): "QLinearGlobalAveragePool -> Flatten -> QGemm -> DequantizeLinear",
    ("matmul", "QOperator"): "QLinearGlobalAveragePool -> Flatten -> QLinearMatMul -> QLinearAdd -> DequantizeLinear",
    ("conv1x1", "QOperator"): "QLinearGlobalAveragePool -> QLinearConv -> Flatten -> DequantizeLinear",
    ("reducemean", "QOperator"): "ReduceMean -> QuantizeLinear -> QGemm -> DequantizeLinear",
    ("avgpool", "QOperator"): "QLinearAveragePool -> Flatten -> QGemm -> DequantizeLinear",
    ("softmax", "QOperator"): "QLinearGlobalAveragePool -> Flatten -> QGemm -> QLinearSoftmax -> DequantizeLinear",
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
    assert report.head_kind == QUANTIZED_HEADS[(head, fmt)]
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


# ----------------------------------------------------------------------------- heads built with onnx.helper
def _helper_model(head_nodes: list, head_inits: list, num_classes: int, channels: int = 4,
                  input_dims: tuple = ("batch", 3, 8, 8), map_name: str = "map",
                  output_name: str = "output") -> onnx.ModelProto:
    """input -> Conv 3x3 -> Relu -> ``map_name`` [N, channels, 8, 8] -> head_nodes -> ``output_name``."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3), dtype=np.float32), "conv.w"),
             *head_inits]
    nodes = [helper.make_node("Conv", ["input", "conv.w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], [map_name]), *head_nodes]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_dims))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [input_dims[0], num_classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _array(name: str, *shape: int, seed: int = 4) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), name)


GRAPH_HEADS = {  # name -> (head nodes, head initializers, classes, channels, words of the old refusal)
    "mlp": ([helper.make_node("GlobalAveragePool", ["map"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["hidden"], transB=1),
             helper.make_node("Relu", ["hidden"], ["act"]),
             helper.make_node("Gemm", ["act", "fc2.w", "fc2.b"], ["output"], transB=1)],
            [_array("fc1.w", 6, 4), _array("fc1.b", 6), _array("fc2.w", 3, 6), _array("fc2.b", 3)], 3, 4,
            ["MLP head", "GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm", "'map' [1, 4, 8, 8]"]),
    "squeezenet": ([helper.make_node("Conv", ["map", "cls.w", "cls.b"], ["cls"]),
                    helper.make_node("Relu", ["cls"], ["cls_relu"]),
                    helper.make_node("GlobalAveragePool", ["cls_relu"], ["pooled"]),
                    helper.make_node("Flatten", ["pooled"], ["logits_"]),
                    helper.make_node("Softmax", ["logits_"], ["output"], axis=1)],
                   [_array("cls.w", 5, 4, 1, 1), _array("cls.b", 5)], 5, 4,
                   ["before the pooling", "SqueezeNet", "5-channel map 'cls_relu'", "not support"]),
    "no pooling": ([helper.make_node("Flatten", ["map"], ["flat"]),
                    helper.make_node("Gemm", ["flat", "fc.w"], ["output"], transB=1)],
                   [_array("fc.w", 3, 256)], 3, 4,
                   ["no global average pooling", "'map' [1, 4, 8, 8] the graph does Flatten -> Gemm"]),
    "max pooling": ([helper.make_node("GlobalMaxPool", ["map"], ["pooled"]),
                     helper.make_node("Flatten", ["pooled"], ["flat"]),
                     helper.make_node("Gemm", ["flat", "fc.w"], ["output"], transB=1)],
                    [_array("fc.w", 3, 4)], 3, 4, ["GlobalMaxPool is not a global average pooling"]),
    "channel mean": ([helper.make_node("ReduceMean", ["map"], ["pooled"], axes=[1], keepdims=0),
                      helper.make_node("Flatten", ["pooled"], ["flat"]),
                      helper.make_node("Gemm", ["flat", "fc.w"], ["output"], transB=1)],
                     [_array("fc.w", 3, 64)], 3, 4, ["ReduceMean over axes [1], not the spatial axes"]),
    "attention pooling": ([
        helper.make_node("Reshape", ["map", "tokens.shape"], ["tokens_cn"]),
        helper.make_node("Transpose", ["tokens_cn"], ["tokens"], perm=[0, 2, 1]),  # [N, 64, 4]
        helper.make_node("ReduceMean", ["tokens"], ["query"], axes=[1], keepdims=1),  # [N, 1, 4]
        helper.make_node("MatMul", ["query", "tokens_cn"], ["scores"]),  # [N, 1, 64]
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "tokens"], ["attended"]),  # [N, 1, 4]
        helper.make_node("Reshape", ["attended", "pooled.shape"], ["pooled"]),
        helper.make_node("Gemm", ["pooled", "fc.w"], ["output"], transB=1)],
        [numpy_helper.from_array(np.int64([0, 4, 64]), "tokens.shape"),
         numpy_helper.from_array(np.int64([0, 4]), "pooled.shape"), _array("fc.w", 3, 4)], 3, 4,
        ["no global average pooling",
         "Reshape -> Transpose -> ReduceMean -> MatMul -> Softmax -> MatMul -> Reshape -> Gemm"]),
}


@pytest.mark.parametrize("name", GRAPH_HEADS)
def test_heads_without_a_cam_are_explained_by_in_graph_gradients(tmp_path, name):
    """Heads that are not GAP + linear (once refused): the file carries the gradient of the class score with
    respect to the last spatial map, which must equal central finite differences of the original head."""
    from realtime_cam.cli import main
    from realtime_cam.model import CamModel

    nodes, inits, num_classes, channels, _ = GRAPH_HEADS[name]
    src = tmp_path / "model.onnx"
    original = _helper_model(nodes, inits, num_classes, channels)
    onnx.save(original, str(src))
    report, _ = rewrite(src, tmp_path / "cam.onnx")
    assert report.head_kind.startswith("graph (gradients w.r.t. ")
    explained = report.head_kind[len("graph (gradients w.r.t. "):-1]
    model = CamModel(report.path, device="cpu")
    assert "cam" not in model.methods and "gradcam" in model.methods and model.head_weight is None
    frame = np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = model.run(model.prepare(frame), np.array([1])).row(0)
    assert int(out.grads_class) == 1 and out.grads.shape == out.features.shape
    # The head alone, from the explained map to the logits (before a final Softmax), by finite differences.
    logits_name = next(n.input[0] for n in original.graph.node if n.output[0] == "output") \
        if original.graph.node[-1].op_type == "Softmax" else "output"
    head = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(original)).extract_model([explained], [logits_name])
    session = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    base = out.features[None].astype(np.float32)
    numeric = np.zeros(base.size)
    eps = 1e-2
    for i in range(base.size):
        step = np.zeros(base.size, np.float32)
        step[i] = eps
        up = session.run(None, {explained: base + step.reshape(base.shape)})[0].reshape(-1)[1]
        down = session.run(None, {explained: base - step.reshape(base.shape)})[0].reshape(-1)[1]
        numeric[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(out.grads.reshape(-1), numeric, rtol=2e-2, atol=2e-3)
    # cam is not defined for such a head: one line, exit 2
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), frame)
    assert main(["run", "--model", str(report.path), "--source", str(image), "--no-display", "--method", "cam"]) == 2
    assert main(["run", "--model", str(report.path), "--source", str(image), "--no-display",
                 "--method", "layercam", "--output", str(tmp_path / "o.png")]) == 0
    assert main(["run", "--model", str(report.path), "--source", str(image), "--no-display"]) == 0  # gradcam


def _gemm_head(num_classes: int = 3, channels: int = 4, map_name: str = "map") -> tuple[list, list]:
    return ([helper.make_node("GlobalAveragePool", [map_name], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["output"], transB=1, alpha=0.5, beta=2.0)],
            [_array("fc.w", num_classes, channels), _array("fc.b", num_classes, seed=5)])


def test_gemm_alpha_beta_labels_bgr_and_clashing_names(tmp_path):
    """A fixed batch of 1, Gemm's alpha/beta folded into W and b, a labels file, BGR defaults, and a model
    whose own tensors are already called 'features' and 'logits'."""
    nodes, inits = _gemm_head(map_name="features")
    nodes[-1].output[0] = "logits"
    model = _helper_model(nodes, inits, 3, input_dims=(1, 3, 8, 8), map_name="features", output_name="logits")
    onnx.save(model, str(tmp_path / "model.onnx"))
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    report, _ = rewrite(tmp_path / "model.onnx", tmp_path / "cam.onnx", labels_path=str(tmp_path / "labels.txt"),
                        bgr=True)
    assert report.head_kind == "GlobalAveragePool -> Flatten -> Gemm" and report.logits_max_abs_diff == 0.0
    contract = Contract(tmp_path / "cam.onnx")
    assert contract.info.labels == ("cat", "dog", "bird") and contract.info.channel_order == "BGR"
    assert contract.info.mean == pytest.approx(MEAN_RGB[::-1]) and contract.info.std == pytest.approx(STD_RGB[::-1])
    w, b = (numpy_helper.to_array(i) for i in inits)
    np.testing.assert_allclose(contract.weight, 0.5 * w, rtol=1e-6)
    np.testing.assert_allclose(contract.bias, 2.0 * b, rtol=1e-6)
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8), dtype=np.float32)
    logits, features = contract.run(x)
    model.graph.output.append(onnx.ValueInfoProto(name="features"))  # the original, its map exposed
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference_logits, reference_map = original.run(["logits", "features"], {"input": x})
    np.testing.assert_array_equal(logits, reference_logits)
    np.testing.assert_array_equal(features, reference_map)

    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    with pytest.raises(ExportError, match="2 names but the model has 3 classes"):
        rewrite(tmp_path / "model.onnx", tmp_path / "cam2.onnx", labels_path=str(tmp_path / "labels.txt"))


def test_dynamic_input_size_needs_to_be_given(tmp_path):
    nodes, inits = _gemm_head()
    onnx.save(_helper_model(nodes, inits, 3, input_dims=("batch", 3, "height", "width")), str(tmp_path / "m.onnx"))
    with pytest.raises(ExportError, match="--input-size H W"):
        rewrite(tmp_path / "m.onnx", tmp_path / "cam.onnx")
    assert not (tmp_path / "cam.onnx").exists()
    report, _ = rewrite(tmp_path / "m.onnx", tmp_path / "cam.onnx", input_size_hw=(16, 12))
    assert report.feature_shape_chw == (4, 16, 12)
    contract = Contract(tmp_path / "cam.onnx")
    assert contract.info.input_size_hw == (16, 12)
    _, features = contract.run(np.zeros((2, 3, 24, 20), np.float32))  # any size still runs
    assert features.shape == (2, 4, 24, 20)


def test_unreadable_model_is_an_export_error(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot read"):
        rewrite(tmp_path / "junk.onnx", tmp_path / "cam.onnx")
    with pytest.raises(ExportError, match="no ONNX model"):
        rewrite(tmp_path / "missing.onnx", tmp_path / "cam.onnx")


def test_an_input_too_small_for_the_network_names_the_real_cause(tmp_path):
    """A model with free spatial input sizes, asked for 8x8: the map before the pooling is 1x1. The message used
    to say 'no global average pooling' while the graph went on to show one."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(5, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[8, 8], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "free.onnx"
    onnx.save(model, str(src))
    with pytest.raises(ExportError) as caught:
        rewrite_onnx_classifier(src, tmp_path / "out.onnx", input_size_hw=(8, 8), log=lambda _: None)
    message = str(caught.value)
    assert "feature map before GlobalAveragePool" in message and "is 1x1" in message, message
    assert "--input-size" in message and "no global average pooling" not in message
    rewrite_onnx_classifier(src, tmp_path / "ok.onnx", input_size_hw=(64, 64), log=lambda _: None)  # 8x8 map: fine


@needs_shared
def test_real_mobilenet_v2_in_graph_gradients_equal_the_closed_forms(float_twin, tmp_path):
    """The float MobileNetV2 explained at its pre-pooling map with in-graph gradients (--features) gives the
    maps the closed forms of its GAP + linear head give, method by method."""
    from realtime_cam.model import CamModel

    _, closed_report, closed_lines = float_twin
    closed = CamModel(closed_report.path, device="cpu")
    assert any("features '627'" in line for line in closed_lines)  # the map the GAP + linear path explains
    report, _ = rewrite(FLOAT_TWIN, tmp_path / "graph.onnx", features="627")
    graph = CamModel(report.path, device="cpu")
    assert graph.head_weight is None and closed.head_weight is not None
    frame = cv2.imread(str(FLOAT_TWIN.parents[1] / "images" / "darknet_eagle.jpg"))
    for method in ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"):
        for class_id in (None, 7):
            a = closed.predict(frame, method=method, class_id=class_id)
            b = graph.predict(frame, method=method, class_id=class_id)
            assert a.class_id == b.class_id
            np.testing.assert_allclose(b.cam, a.cam, atol=2e-4, err_msg=method)
