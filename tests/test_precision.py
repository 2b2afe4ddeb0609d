"""int8 and float16 copies of a contract file (realtime_cam.export.int8, .fp16, .frames), and the fidelity measure.

The real model is the shared float MobileNetV2 (ImageNet weights), rewritten into the contract once per
module. The int8 copy is calibrated on frames of the two shared videos and judged on the shared still
images, none of which it saw. Speed is the benchmark command's business, never a unit test's.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import needs_shared, shared
from onnx import TensorProto, numpy_helper

from realtime_cam.contract import FEATURES, LOGITS, PREFIX, read_contract
from realtime_cam.errors import CamError, ExportError
from realtime_cam.export.fp16 import convert_fp16
from realtime_cam.export.frames import sample_frames
from realtime_cam.export.from_onnx import rewrite_onnx_classifier
from realtime_cam.export.int8 import quantize_int8
from realtime_cam.export.options import CALIBRATIONS, DEFAULT_CALIBRATION
from realtime_cam.fidelity import fidelity
from realtime_cam.model import CamModel

QDQ = {"QuantizeLinear", "DequantizeLinear"}


def quiet(_: str) -> None:
    pass


def videos() -> list[Path]:
    return [shared("videos", "bottle-detection.mp4"), shared("videos", "car-detection.mp4")]


def stills() -> list[Path]:
    return [shared("imagenet-val-20"), shared("images")]


def head_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes between ``features`` and ``logits``, found independently of the module under test."""
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}

    def upstream(tensor: str) -> set[int]:
        found: set[int] = set()
        stack = [tensor]
        while stack:
            i = producer.get(stack.pop())
            if i is not None and i not in found:
                found.add(i)
                stack.extend(nodes[i].input)
        return found

    return [nodes[i] for i in sorted(upstream(LOGITS) - upstream(FEATURES))]


def assert_same_contract(fp32_path: Path, other_path: Path, note: str) -> onnx.ModelProto:
    """The other file is a contract file with float outputs, the fp32 file's head and metadata."""
    fp32, other = onnx.load(str(fp32_path)), onnx.load(str(other_path))
    onnx.checker.check_model(other)
    assert [o.name for o in other.graph.output][:2] == [LOGITS, FEATURES]
    assert [o.type.tensor_type.elem_type for o in other.graph.output][:2] == [TensorProto.FLOAT] * 2
    assert other.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    info_ref, w_ref, b_ref = read_contract(fp32)
    info, w, b = read_contract(other)
    assert w.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(b, b_ref)
    assert info.labels == info_ref.labels and info.input_size_hw == info_ref.input_size_hw
    assert (info.mean, info.std, info.channel_order) == (info_ref.mean, info_ref.std, info_ref.channel_order)
    assert info.source.startswith(info_ref.source) and note in info.source
    others = {p.key: p.value for p in other.metadata_props if not p.key.startswith(PREFIX)}
    assert others == {p.key: p.value for p in fp32.metadata_props if not p.key.startswith(PREFIX)}
    # The head itself runs in float32 on float32 weights equal to the fp32 file's.
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    inits = {i.name: i for i in other.graph.initializer}
    head = head_nodes(other)
    assert head and not any(node.op_type in QDQ for node in head)
    for node in head:
        for name in node.input:
            if name in inits and inits[name].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
                assert inits[name].data_type == TensorProto.FLOAT, f"{node.op_type} reads {name} as float16"
                np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), fp32_inits[name])
    return other


# ----------------------------------------------------------------------------- the real MobileNetV2
@pytest.fixture(scope="module")
def mnv2_fp32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precision") / "mnv2-fp32.onnx"
    rewrite_onnx_classifier(shared("models", "mobilenetv2-12-float-from-int8.onnx"), out, log=quiet)
    return out


@pytest.fixture(scope="module")
def mnv2_int8(mnv2_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "mnv2-int8.onnx"
    lines: list[str] = []
    report = quantize_int8(mnv2_fp32, out, videos(), max_frames=100, check=stills(), log=lines.append)
    return out, report, lines


@needs_shared
def test_int8_is_a_contract_file_with_the_fp32_head_and_metadata(mnv2_fp32, mnv2_int8):
    path, report, lines = mnv2_int8
    model = assert_same_contract(mnv2_fp32, path, "int8 QDQ per-channel")
    ops = {node.op_type for node in model.graph.node}
    assert QDQ <= ops
    # Per-channel int8 weights: DequantizeLinear of int8 initializers with one scale per output channel.
    inits = {i.name: i for i in model.graph.initializer}
    constant_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {inits[n.input[0]].data_type for n in constant_dq} == {TensorProto.INT8, TensorProto.INT32}  # W, b
    weight_dq = [n for n in constant_dq if inits[n.input[0]].data_type == TensorProto.INT8]
    assert len(weight_dq) == sum(n.op_type == "Conv" for n in model.graph.node)
    assert all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)
    info, _, _ = read_contract(model)
    assert "calibrated on 100 frames of bottle-detection.mp4, car-detection.mp4" in info.source
    assert report.path == path and report.calibration_frames == 100
    assert report.method == DEFAULT_CALIBRATION and report.activation_type == "uint8"
    assert report.excluded_nodes and any("GlobalAveragePool" in n for n in report.excluded_nodes)
    assert any("int8 vs fp32" in line for line in lines)
    CamModel(path, device="cpu")  # the runtime takes it as it is


@needs_shared
def test_int8_keeps_maps_and_classes_on_frames_it_was_not_calibrated_on(mnv2_int8):
    _, report, _ = mnv2_int8
    result = report.fidelity
    assert result["frames"] == 30  # every still image; the calibration saw only video frames
    assert result["top1_agreement_pct"] >= 90.0, result
    assert result["map_r_median"] >= 0.98, result


@needs_shared
def test_fp16_is_a_contract_file_that_agrees_on_top1(mnv2_fp32, tmp_path):
    out = tmp_path / "mnv2-fp16.onnx"
    report = convert_fp16(mnv2_fp32, out, check=[shared("images")], log=quiet)
    model = assert_same_contract(mnv2_fp32, out, "float16")
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert report.logits_max_abs_diff <= report.logits_bound
    assert report.fidelity["frames"] == 10
    assert report.fidelity["top1_agreement_pct"] == 100.0, report.fidelity
    assert report.fidelity["map_r_median"] >= 0.999, report.fidelity


@pytest.fixture(scope="module")
def mnv2_graph_fp32(tmp_path_factory) -> Path:
    """The real MobileNetV2 with a graph head: its map '627' named, so explained with in-graph gradients."""
    out = tmp_path_factory.mktemp("precision") / "mnv2-graph-fp32.onnx"
    rewrite_onnx_classifier(shared("models", "mobilenetv2-12-float-from-int8.onnx"), out, features="627", log=quiet)
    return out


def assert_gradient_is_its_float_heads(path: Path, fp32_path: Path) -> None:
    """The file's in-graph gradient, at its own features, is that of the fp32 file's float head: for GAP + linear,
    d score_c / d features = W[c] / (h w), whatever the backbone's precision (the head and gradient stayed float32).
    W is read from the fp32 file's Gemm/MatMul weight."""
    fp32 = onnx.load(str(fp32_path))
    weights = [a if a.shape[0] == 1000 else a.T for a in map(numpy_helper.to_array, fp32.graph.initializer)
               if a.ndim == 2 and 1000 in a.shape]  # [K, C]: the forward's, and any copy the gradient reads
    assert weights and all(np.array_equal(w, weights[0]) for w in weights)
    weight = weights[0]
    model = CamModel(path, device="cpu")
    assert "cam" not in model.methods and "gradcam" in model.methods
    frame = cv2.imread(str(shared("images", "skimage_chelsea.png")))
    outputs = model.run(model.prepare(frame)).row(0)
    _, h, w = outputs.features.shape
    class_id = int(np.argmax(outputs.logits))
    np.testing.assert_allclose(outputs.grads, np.broadcast_to(weight[class_id][:, None, None] / (h * w),
                                                              outputs.grads.shape), rtol=1e-5, atol=1e-9)


@needs_shared
def test_a_graph_head_quantizes_to_int8_with_its_gradient_kept_float(mnv2_graph_fp32, tmp_path):
    out = tmp_path / "mnv2-graph-int8.onnx"
    lines: list[str] = []
    report = quantize_int8(mnv2_graph_fp32, out, videos(), max_frames=30, check=stills(), log=lines.append)
    model = onnx.load(str(out))
    info, weight, _ = read_contract(model)
    assert weight is None and "int8 QDQ per-channel" in info.source
    assert [o.name for o in model.graph.output] == [LOGITS, FEATURES, "grads", "grads_class"]
    assert QDQ <= {node.op_type for node in model.graph.node}
    kept = set(report.excluded_nodes)
    assert kept and not any(node.op_type in QDQ for node in model.graph.node if node.name in kept)
    assert any("the gradient) kept float32" in line for line in lines)
    assert_gradient_is_its_float_heads(out, mnv2_graph_fp32)
    assert report.fidelity["top1_agreement_pct"] >= 85.0, report.fidelity  # gradcam maps, as the GAP file's cam
    assert report.fidelity["map_r_median"] >= 0.98, report.fidelity


@needs_shared
def test_a_graph_head_converts_to_fp16_with_its_gradient_kept_float32(mnv2_graph_fp32, tmp_path):
    out = tmp_path / "mnv2-graph-fp16.onnx"
    report = convert_fp16(mnv2_graph_fp32, out, check=[shared("images")], log=quiet)
    model = onnx.load(str(out))
    assert read_contract(model)[1] is None
    assert [o.name for o in model.graph.output] == [LOGITS, FEATURES, "grads", "grads_class"]
    assert [o.type.tensor_type.elem_type for o in model.graph.output[:3]] == [TensorProto.FLOAT] * 3
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert_gradient_is_its_float_heads(out, mnv2_graph_fp32)
    assert report.fidelity["top1_agreement_pct"] == 100.0, report.fidelity
    assert report.fidelity["map_r_median"] >= 0.999, report.fidelity


@needs_shared
def test_the_quantizers_own_logging_leaves_no_handler_that_prints_our_lines_twice(mnv2_fp32, tmp_path, monkeypatch):
    """onnxruntime's quantizer logs through the root logger on some models (convnext_tiny): with no handler there
    yet, logging gives it one, and every later line of realtime-cam's logger was printed twice."""
    import logging

    from realtime_cam.export import int8

    real = int8.ortq.quantize_static

    def noisy(*args, **kwargs):
        logging.warning("a note from the quantizer")
        return real(*args, **kwargs)

    monkeypatch.setattr(int8.ortq, "quantize_static", noisy)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in the command: nothing on the root logger
    quantize_int8(mnv2_fp32, tmp_path / "q.onnx", [shared("images")], max_frames=2, log=quiet)
    assert logging.getLogger().handlers == []


@needs_shared
def test_fidelity_of_a_model_with_itself_is_perfect(mnv2_fp32):
    model = CamModel(mnv2_fp32, device="cpu")
    frames = [cv2.imread(str(shared("images", name))) for name in ("skimage_chelsea.png", "darknet_dog.jpg")]
    frames.append(np.full((40, 30, 3), 128, np.uint8))
    result = fidelity(model, CamModel(mnv2_fp32, device="cpu"), frames)
    assert result["frames"] == 3 and result["top1_agreement_pct"] == 100.0
    assert result["top1_agree"] == (True, True, True)
    np.testing.assert_allclose(result["map_r"], 1.0, atol=1e-12)
    assert result["map_r_median"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(CamError, match="at least one frame"):
        fidelity(model, model, [])


@needs_shared
def test_already_quantized_input_is_refused(mnv2_int8, mnv2_int8_onnx, tmp_path):
    for quantized in (mnv2_int8[0], mnv2_int8_onnx):
        with pytest.raises(ExportError, match="already quantized"):
            quantize_int8(quantized, tmp_path / "again.onnx", shared("images"), log=quiet)
        with pytest.raises(ExportError, match="already quantized"):
            convert_fp16(quantized, tmp_path / "again16.onnx", log=quiet)
    assert not list(tmp_path.iterdir())


@needs_shared
def test_bad_calibration_sources_are_export_errors(mnv2_fp32, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    broken = tmp_path / "photo.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out" / "int8.onnx"
    cases = [
        (tmp_path / "missing.mp4", "not found"),
        (empty, "no images"),
        (garbage, "cannot open|no frame"),
        (broken, "cannot decode"),
        ([], "no frame sources"),
        ("0", "not found"),  # a webcam index is no calibration set
    ]
    for source, match in cases:
        with pytest.raises(ExportError, match=f"calibration source: .*({match})"):
            quantize_int8(mnv2_fp32, out, source, log=quiet)
    with pytest.raises(ExportError, match="check source: .*not found"):
        quantize_int8(mnv2_fp32, out, shared("images"), check=tmp_path / "nope", log=quiet)
    with pytest.raises(ExportError, match="unknown calibration"):
        quantize_int8(mnv2_fp32, out, shared("images"), method="median", log=quiet)
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


# ----------------------------------------------------------------------------- the torchvision export
def test_resnet18_export_quantizes_and_converts_with_its_head_by_name(resnet18_onnx, tmp_path):
    # Random weights: only the file's structure is checked here; fidelity on random weights means nothing.
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.png"), cv2.resize(rng.integers(0, 256, (8, 8, 3), np.uint8), (96, 64)))
    int8 = tmp_path / "r18-int8.onnx"
    report = quantize_int8(resnet18_onnx, int8, images, method="minmax", log=quiet)
    assert report.calibration_frames == 4
    assert_same_contract(resnet18_onnx, int8, "calibrated on 4 frames of images/")
    fp16 = tmp_path / "r18-fp16.onnx"
    assert convert_fp16(resnet18_onnx, fp16, log=quiet).top1_agreement_pct == 100.0
    assert_same_contract(resnet18_onnx, fp16, "float16")
    # Both heads are the exported Gemm's own float32 initializers, not copies.
    _, head_weight_name = next((p.key, p.value) for p in onnx.load(str(int8)).metadata_props
                               if p.key == PREFIX + "head_weight")
    assert head_weight_name == "head.weight"


# ----------------------------------------------------------------------------- frame sampling
def test_frames_are_spread_over_a_video_and_shared_with_images(tmp_path):
    video = tmp_path / "count.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (32, 24))
    for i in range(50):
        writer.write(np.full((24, 32, 3), 5 * i, np.uint8))
    writer.release()
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.full((10, 10, 3), 255, np.uint8))

    frames = list(sample_frames(video, 5))
    assert [round(float(f.mean()) / 5) for f in frames] == [0, 12, 24, 37, 49]
    # Images are planned first; the video gets what they leave: 1 + 5 of a budget of 6.
    frames = list(sample_frames([video, image], 6))
    assert len(frames) == 6 and float(frames[0].mean()) == 255.0
    assert len(list(sample_frames(video, 500))) == 50


def test_a_folder_of_clips_and_images_shares_the_budget_between_them(tmp_path):
    """export --calibrate clips/: each video in a folder is a source of its own, the folder's images one more."""
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, level in (("a.avi", 10), ("b.avi", 100)):
        writer = cv2.VideoWriter(str(clips / name), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (32, 24))
        for _ in range(20):
            writer.write(np.full((24, 32, 3), level, np.uint8))
        writer.release()
    cv2.imwrite(str(clips / "still.png"), np.full((10, 10, 3), 255, np.uint8))
    (clips / "notes.txt").write_text("not a frame source")
    (clips / "._a.avi").write_bytes(b"macOS resource fork, not a video")  # hidden files are not sources

    levels = [round(float(f.mean()), -1) for f in sample_frames(clips, 9)]
    assert sorted(levels) == [10.0] * 4 + [100.0] * 4 + [260.0]  # the still (255) once, 4 + 4 from the clips
    (clips / "still.png").unlink()
    assert len(list(sample_frames(clips, 6))) == 6
    # a clip the budget does not reach is not even opened: one frame from each of a.avi and b.avi
    (clips / "zz-broken.avi").write_bytes(b"not a video at all")
    assert sorted(round(float(f.mean()), -1) for f in sample_frames(clips, 2)) == [10.0, 100.0]


def test_every_calibration_names_an_onnxruntime_method():
    from onnxruntime.quantization import CalibrationMethod

    assert DEFAULT_CALIBRATION in CALIBRATIONS
    for calibration in CALIBRATIONS.values():
        assert CalibrationMethod[calibration.method] is not None
        assert calibration.summary


@needs_shared
def test_export_int8_and_fp16_from_the_command_line(tmp_path, capsys):
    from realtime_cam.cli import main

    source = shared("models", "mobilenetv2-12-float-from-int8.onnx")
    int8, fp16 = tmp_path / "m-int8.onnx", tmp_path / "m-fp16.onnx"
    assert main(["export", "--from-onnx", str(source), "--int8", "--calibrate", str(shared("images")),
                 "--calibration-frames", "6", "--calibration", "minmax", "--output", str(int8)]) == 0
    err = capsys.readouterr().err
    # the messages name the model it was made from, not a temporary file, and say once what was written
    assert f"calibrating {source.name} on 6 frames" in err
    assert err.count(f"wrote {int8}") == 1
    assert main(["export", "--from-onnx", str(source), "--fp16", "--output", str(fp16)]) == 0
    assert capsys.readouterr().err.count(f"wrote {fp16}") == 1
    for path in (int8, fp16):
        assert CamModel(path, device="cpu").num_classes == 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-fp16.onnx", "m-int8.onnx"]  # no temporary left
