"""The map math against independent references, including degenerate input."""

import numpy as np
import pytest

from realtime_cam.cams import METHODS, cam, compute_map, eigencam, normalize_map, softmax


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


def test_normalized_maps_never_exceed_one():
    """The README promises maps in [0, 1]: multiplying by the span's reciprocal gave 1.0000001 at the peak of
    about one random map in 18. The lowest cell is 0 and the peak exactly 1."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        out = normalize_map((rng.random((7, 7)) * rng.uniform(0.01, 100)).astype(np.float32))
        assert out.min() == 0.0 and out.max() == 1.0


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
    for name in METHODS:
        out = compute_map(name, features, weight, 2)
        assert out.shape == (3, 4), name
        assert np.isfinite(out).all(), name


def test_gradcam_equals_relu_cam_over_hw_for_a_gap_linear_head():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((32, 6, 5)).astype(np.float32)
    weight = rng.standard_normal((7, 32)).astype(np.float32)
    for c in range(7):
        expected = np.maximum(cam(features, weight, c), 0) / 30.0
        np.testing.assert_allclose(compute_map("gradcam", features, weight, c), expected, rtol=1e-5, atol=1e-6)


def test_gradcam_pp_matches_its_published_formula_written_out():
    # Chattopadhay et al. eq. 19 with dY/dA = w/(hw), second and third powers of it, written by loops.
    rng = np.random.default_rng(4)
    features = rng.random((8, 3, 3)).astype(np.float64)
    weight = rng.standard_normal((2, 8))
    c, (k_, h, w) = 1, features.shape
    g = weight[c] / (h * w)
    alpha_w = np.zeros(k_)
    for k in range(k_):
        if g[k] == 0:
            continue
        a = g[k] ** 2 / (2 * g[k] ** 2 + features[k].sum() * g[k] ** 3 + 1e-6)
        alpha_w[k] = (a * max(g[k], 0)) * h * w
    expected = np.maximum(np.tensordot(alpha_w, features, axes=1), 0)
    np.testing.assert_allclose(compute_map("gradcam++", features.astype(np.float32), weight.astype(np.float32), c),
                               expected, rtol=1e-4, atol=1e-6)


def test_eigencam_is_the_first_principal_component_with_a_stable_sign():
    rng = np.random.default_rng(5)
    pattern = np.zeros((4, 4), np.float32)
    pattern[1:3, 1:3] = 1.0
    # Every channel is the same blob at a different strength, plus a little noise.
    features = (rng.random((16, 1, 1)) * pattern + 0.01 * rng.random((16, 4, 4))).astype(np.float32)
    out = eigencam(features, np.zeros((3, 16), np.float32), 0)
    assert np.corrcoef(out.ravel(), pattern.ravel())[0, 1] > 0.99  # hot where the blob is, not inverted
    x = features.reshape(16, 16).T - features.reshape(16, 16).T.mean(0)
    v1 = np.linalg.svd(x, full_matrices=False)[2][0]
    assert abs(np.corrcoef(out.ravel(), x @ v1)[0, 1]) > 0.9999
    assert (eigencam(np.ones((4, 3, 3), np.float32), None, 0) == 0).all()  # no variance: a zero map


def test_top_k_ties_are_ordered_by_id_whatever_k():
    from realtime_cam.cams import top_k_ids

    p = np.array([0.1, 0.3, 0.3, 0.2, 0.3], np.float32)
    assert top_k_ids(p, 1).tolist() == [1]
    assert top_k_ids(p, 3).tolist() == [1, 2, 4]
    assert top_k_ids(p, 9).tolist() == [1, 2, 4, 3, 0]


def test_gradient_methods_on_per_position_gradients_follow_their_formulas():
    """With gradients that vary over space (any head other than GAP + linear), written out by loops."""
    rng = np.random.default_rng(6)
    a = rng.random((5, 3, 4))
    g = rng.standard_normal((5, 3, 4))
    c_, h, w = a.shape
    layer = np.zeros((h, w))
    hires = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            layer[i, j] = sum(max(g[k, i, j], 0) * a[k, i, j] for k in range(c_))
            hires[i, j] = sum(g[k, i, j] * a[k, i, j] for k in range(c_))
    xw = np.array([(g[k] * a[k]).sum() / (a[k].sum() + 1e-7) for k in range(c_)])
    grad_w = np.array([g[k].mean() for k in range(c_)])
    expected = {"layercam": layer, "hirescam": hires, "xgradcam": np.tensordot(xw, a, axes=1),
                "gradcam": np.tensordot(grad_w, a, axes=1)}
    for name, want in expected.items():
        got = compute_map(name, a.astype(np.float32), None, 0, grads_chw=g.astype(np.float32))
        np.testing.assert_allclose(got, np.maximum(want, 0), rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_method_the_model_cannot_give_is_refused_in_one_line():
    from realtime_cam.errors import CamError

    a = np.ones((4, 2, 2), np.float32)
    with pytest.raises(CamError, match="--method cam needs a head of global average pooling"):
        compute_map("cam", a, None, 0, grads_chw=a)
    with pytest.raises(CamError, match="--method layercam needs the model's gradient output"):
        compute_map("layercam", a, None, 0)
    assert compute_map("eigencam", a, None, 0).shape == (2, 2)
