"""The map math against independent references, including degenerate input."""

import numpy as np
import pytest

from realtime_cam.cams import METHODS, cam, normalize_map, softmax


def reference_cam(features, weight, class_id):
    # Zhou et al. eq. 2 written as the paper states it: M_c(x, y) = sum_k w_k^c f_k(x, y), by loops.
    c, h, w = features.shape
    out = np.zeros((h, w), np.float64)
    for k in range(c):
        out += float(weight[class_id, k]) * features[k].astype(np.float64)
    return out


def test_cam_matches_the_papers_sum():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((512, 7, 7)).astype(np.float32)
    weight = rng.standard_normal((1000, 512)).astype(np.float32)
    for class_id in (0, 281, 999):
        np.testing.assert_allclose(cam(features, weight, class_id), reference_cam(features, weight, class_id),
                                   rtol=1e-4, atol=1e-3)


def test_cam_of_gap_equals_logit_minus_bias():
    # GAP is linear: the mean of the CAM is W[c] @ mean(features), i.e. the class logit without its bias.
    rng = np.random.default_rng(1)
    features = rng.random((64, 5, 9)).astype(np.float32)
    weight = rng.standard_normal((10, 64)).astype(np.float32)
    logits = weight @ features.mean(axis=(1, 2))
    for c in range(10):
        assert cam(features, weight, c).mean() == pytest.approx(logits[c], rel=1e-4, abs=1e-5)


def test_normalize_spans_zero_to_one():
    raw = np.array([[-2.0, 0.0], [1.0, 6.0]], np.float32)
    out = normalize_map(raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.375, 1.0]])


@pytest.mark.parametrize("raw", [np.full((7, 7), 3.5, np.float32), np.zeros((7, 7), np.float32),
                                 np.full((1, 1), -1.0, np.float32)])
def test_constant_or_single_cell_map_gives_zeros_not_nan(raw):
    out = normalize_map(raw)
    assert out.shape == raw.shape
    assert not np.isnan(out).any()
    assert (out == 0).all()


def test_softmax_is_stable_and_sums_to_one():
    p = softmax(np.array([1000.0, 1001.0, 999.0], np.float32))
    assert np.isfinite(p).all()
    assert p.sum() == pytest.approx(1.0)
    assert p.argmax() == 1


def test_every_registered_method_returns_a_map_at_feature_resolution():
    rng = np.random.default_rng(2)
    features = rng.random((16, 3, 4)).astype(np.float32)
    weight = rng.standard_normal((5, 16)).astype(np.float32)
    for name, method in METHODS.items():
        out = method(features, weight, 2)
        assert out.shape == (3, 4), name
        assert np.isfinite(out).all(), name
