"""`bench` on a file with a gradient output: the same network with and without it (the variant made in memory),
and pytorch-grad-cam's GradCAM loop with --grad-reference (the figures are reported, never asserted)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from realtime_cam.cli import main
from realtime_cam.contract import FEATURES, GRADS, LOGITS, TARGET_CLASS
from realtime_cam.grad_bench import without_gradients


@pytest.fixture(scope="module")
def graph_model(tmp_path_factory):
    from synthetic import tiny_contract_model

    from realtime_cam.export.from_onnx import rewrite_onnx_classifier

    folder = tmp_path_factory.mktemp("graph")
    plain = folder / "plain.onnx"
    model = tiny_contract_model()
    del model.graph.output[1:]
    onnx.save(model, str(plain))
    out = folder / "graph.onnx"
    rewrite_onnx_classifier(plain, out, features="features", log=lambda _: None)
    return out


def test_the_variant_without_gradients_is_the_same_network_minus_the_gradient(graph_model):
    full = onnx.load(str(graph_model))
    lean = without_gradients(full)
    assert [o.name for o in lean.graph.output] == [LOGITS, FEATURES]
    assert TARGET_CLASS not in {i.name for i in lean.graph.input} | {t.name for t in lean.graph.initializer}
    assert len(lean.graph.node) < len(full.graph.node)
    onnx.checker.check_model(lean)
    x = np.random.default_rng(0).standard_normal((2, *[d.dim_value or 2 for d in
                                                       full.graph.input[0].type.tensor_type.shape.dim[1:]]))
    x = x.astype(np.float32)
    name = full.graph.input[0].name
    a = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(lean.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(b.run([LOGITS, FEATURES], {name: x}), a.run([LOGITS, FEATURES, GRADS], {name: x})[:2]):
        np.testing.assert_array_equal(got, want)


def test_bench_reports_what_the_gradient_costs(graph_model, tmp_path, capsys):
    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(graph_model), "--device", "cpu", "--frames", "8", "--warmup", "2",
                 "--batch", "1", "--no-seed", "--json", str(out_json)]) == 0
    cost = json.loads(out_json.read_text())["results"][0]["gradient_cost"]
    assert cost["fps_with_gradient"] > 0 and cost["fps_without_gradient"] > 0
    assert cost["gradient_share_of_frame_time"] == pytest.approx(
        1 - cost["fps_with_gradient"] / cost["fps_without_gradient"])
    assert "the gradient is" in capsys.readouterr().out


def test_grad_reference_times_pytorch_grad_cam_in_the_same_run(graph_model, tmp_path, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_grad_cam")
    out_json = tmp_path / "b.json"
    assert main(["bench", "--model", str(graph_model), "--device", "cpu", "--frames", "8", "--warmup", "2",
                 "--batch", "1", "--no-seed", "--grad-reference", "squeezenet1_1", "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    reference = report["grad_reference"]["cpu"]
    assert reference["arch"] == "squeezenet1_1" and reference["fps"] > 0 and reference["frames"] == 8
    assert report["results"][0]["gradcam_loop"]["fps"] > 0
    assert "pytorch-grad-cam GradCAM on squeezenet1_1" in capsys.readouterr().out


def test_an_unknown_reference_is_one_line_before_any_measurement(graph_model, capsys):
    pytest.importorskip("torchvision")
    assert main(["bench", "--model", str(graph_model), "--device", "cpu", "--no-seed",
                 "--grad-reference", "resnet_999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["realtime-cam: error: --grad-reference: torchvision has no classification model 'resnet_999'"]
