"""CamModel: the public API a user scripts against."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import needs_shared, shared
from synthetic import plain_classifier

from realtime_cam import CamError, CamModel
from realtime_cam.bench import resident_runner
from realtime_cam.cams import cam, normalize_map
from realtime_cam.errors import DeviceError, ModelError


@pytest.fixture(scope="module", params=["tiny", "resnet18"])
def model(request):
    """The tiny onnx.helper model (runtime only), and a torchvision ResNet18 export (skipped without torch)."""
    return CamModel(request.getfixturevalue(f"{request.param}_onnx"), device="cpu")


def test_predict_returns_a_frozen_result_for_any_frame_size(model):
    rng = np.random.default_rng(0)
    for h, w in [(120, 160), (479, 641), (1, 1)]:
        p = model.predict(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert p.cam.shape == (7, 7) and p.cam.dtype == np.float32
        assert p.cam.min() == 0.0 and p.cam.max() == pytest.approx(1.0)
        assert p.class_id == p.topk[0][0] and p.label == model.labels[p.class_id]
        assert [t[2] for t in p.topk] == sorted((t[2] for t in p.topk), reverse=True)
        assert len(p.topk) == 5 and p.probabilities.sum() == pytest.approx(1.0, abs=1e-4)
        with pytest.raises(Exception):
            p.class_id = 3  # frozen


def test_cam_is_the_head_row_times_the_features(model):
    frame = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    logits, features = model.infer(frame)
    p = model.predict(frame)
    np.testing.assert_allclose(p.cam, normalize_map(cam(features, model.head_weight, p.class_id)), atol=1e-6)
    # The head really is the network's: W @ GAP(features) + b gives back the logits.
    np.testing.assert_allclose(model.head_weight @ features.mean(axis=(1, 2)) + model.head_bias, logits,
                               atol=1e-3 * max(1, np.abs(logits).max()))


def test_resident_runs_give_what_forward_gives(model):
    """bench times inference with inputs and outputs kept on the device (IO binding): it must be the same work."""
    rng = np.random.default_rng(3)
    batches = [model.prepare_batch([rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(n)])
               for n in (1, 3)]
    run = resident_runner(model, batches)
    for index in (1, 0, 1):  # any order, any batch size, more than once
        logits, features = (value.numpy() for value in run(index))
        expected_logits, expected_features = model.forward(batches[index])
        np.testing.assert_array_equal(logits, expected_logits)
        np.testing.assert_array_equal(features, expected_features)


def test_class_id_explains_that_class_instead(model):
    frame = np.random.default_rng(2).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    top = model.predict(frame)
    other = (top.class_id + 1) % model.num_classes
    p = model.predict(frame, class_id=other)
    assert p.class_id == other and p.label == model.labels[other]
    assert p.probability == pytest.approx(float(p.probabilities[other]))
    assert p.topk == top.topk
    with pytest.raises(CamError, match="out of range"):
        model.predict(frame, class_id=1000)


def test_class_names_resolve(model):
    assert model.class_id_for("tabby") == 281
    assert model.class_id_for("Egyptian cat") == 285
    assert model.class_id_for("281") == 281
    with pytest.raises(CamError, match="no class named"):
        model.class_id_for("unicorn")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_explicit_cuda_without_a_cuda_provider_is_an_error(tiny_onnx):
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        CamModel(tiny_onnx, device="cuda")
    assert CamModel(tiny_onnx, device="auto").provider == "CPUExecutionProvider"


def test_missing_and_non_onnx_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        CamModel(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf")
    with pytest.raises(ModelError, match="cannot read"):
        CamModel(junk)


@pytest.mark.parametrize("classifier", ["tiny", "mobilenetv2-12-float-from-int8.onnx"])
def test_a_plain_classifier_is_refused_with_the_command_to_fix_it(classifier, tmp_path):
    if classifier == "tiny":
        path = tmp_path / "plain.onnx"
        onnx.save(plain_classifier(), str(path))
    else:
        path = shared("models", classifier)
    with pytest.raises(ModelError, match="export --from-onnx"):
        CamModel(path)


@needs_shared
def test_real_pretrained_classifier_through_the_runtime(mnv2_int8_onnx):
    import cv2

    model = CamModel(mnv2_int8_onnx, device="cpu")
    cat = model.predict(cv2.imread(str(shared("images", "skimage_chelsea.png"))))
    assert cat.class_id in range(281, 286), cat.label       # a cat class
    eagle = model.predict(cv2.imread(str(shared("images", "darknet_eagle.jpg"))))
    assert eagle.label == "bald eagle"
    assert eagle.cam.shape == (7, 7) and eagle.cam.max() == pytest.approx(1.0)


@needs_shared
def test_bottle_video_map_follows_the_bottles(mnv2_int8_onnx):
    from realtime_cam.localize import upsample
    from realtime_cam.sources import open_source

    model = CamModel(mnv2_int8_onnx, device="cpu")
    labels, peaks_in_band = [], []
    with open_source(str(shared("videos", "bottle-detection.mp4"))) as src:
        for frame in src:
            if frame.index % 40:
                continue
            p = model.predict(frame.image_bgr)
            labels.append(p.label)
            up = upsample(p.cam, src.size_wh)
            y, _ = np.unravel_index(int(up.argmax()), up.shape)
            peaks_in_band.append(80 <= y <= 330)   # the bottles stand between y=100 and y=320 of 360
    assert sum("bottle" in label for label in labels) >= 0.8 * len(labels), labels
    assert np.mean(peaks_in_band) >= 0.9
