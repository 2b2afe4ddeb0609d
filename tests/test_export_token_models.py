"""`export --arch` for token models: ViT and Swin are explained at a token tensor made into a map inside the
graph (pytorch-grad-cam's reshape_transform), with the gradient flowing back through the rest of the last
block; MaxViT is explained at its last block's output, already a map. gradcam, gradcam++ and
layercam maps equal pytorch-grad-cam's on the same torchvision model, seeded random weights (random norm parameters), class, target layer and reshape
transform. Each model is exported once per test session (ViT-B/16 takes ~45 s on two cores)."""

import cv2
import numpy as np
import onnx
import pytest
from conftest import shared

from realtime_cam.cams import normalize_map
from realtime_cam.cli import main
from realtime_cam.contract import PREFIX, read_contract
from realtime_cam.model import CamModel

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")
from grad_parity import REFERENCES, assert_maps_match, assert_run_explains_a_video_with_gradcam  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from realtime_cam.export.torchvision_graph import WithTarget  # noqa: E402


def vit_reshape(tensor, height=14, width=14):
    """pytorch-grad-cam's reshape_transform for ViT (its tutorial): drop the class token, tokens to a grid."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(tensor):
    """torchvision's Swin blocks work on [N, H, W, C]: channels first for pytorch-grad-cam."""
    return tensor.permute(0, 3, 1, 2)


# arch -> (the target layer in torchvision's module, as pytorch-grad-cam's users write it, its reshape_transform,
# the photos compared). Each must be the layer the export explains (export/torchvision_graph.py GRAPH_FAMILIES).
TARGET_LAYERS = {
    "vit_b_16": (lambda m: m.encoder.layers[-1].ln_1, "model.encoder.layers[-1].ln_1", vit_reshape,
                 ("darknet_dog.jpg",)),  # [N, 197, 768] -> 768x14x14
    "swin_t": (lambda m: m.features[-1][-1].norm1, "model.features[-1][-1].norm1", swin_reshape,
               ("skimage_chelsea.png",)),  # [N, 7, 7, 768] -> 768x7x7
    "maxvit_t": (lambda m: m.blocks[-1].layers[-1], "model.blocks[-1].layers[-1]", None,
                 ("skimage_chelsea.png",)),  # already a map, 512x7x7 (its export takes ~3 minutes on two cores)
}


def seeded_net(arch: str, seed: int = 1234) -> torch.nn.Module:
    """torchvision's ``arch`` with seeded random weights: norm affine parameters random (torchvision starts them
    at the identity), ViT's zero-initialised head drawn at random, MaxViT's BatchNorm statistics measured."""
    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, weights=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            net.train()
            net(torch.randn(4, 3, 224, 224, generator=g))
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.Linear) and not m.weight.any():  # ViT's head
                m.weight.copy_(0.05 * torch.randn(m.weight.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="session")
def token_exports(tmp_path_factory):
    """arch -> (the seeded net, its file from `realtime-cam export --arch ARCH --weights PTH`, a CamModel of it),
    made on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            net = seeded_net(arch)
            folder = tmp_path_factory.mktemp(arch)
            weights = folder / f"{arch}-seeded.pth"
            torch.save(net.state_dict(), weights)
            out = folder / f"{arch}.onnx"
            assert main(["export", "--arch", arch, "--weights", str(weights), "--output", str(out)]) == 0
            made[arch] = net, out, CamModel(out, device="cpu")
        return made[arch]
    return get


@pytest.mark.parametrize("arch", sorted(TARGET_LAYERS))
def test_the_file_explains_the_target_layer_as_a_map(token_exports, arch):
    net, out, cam = token_exports(arch)
    target_of, target_name, reshape, _ = TARGET_LAYERS[arch]
    model = onnx.load(str(out))
    info, weight, _ = read_contract(model)
    assert weight is None and target_name in info.source
    assert [o.name for o in model.graph.output] == ["logits", "features", "grads", "grads_class"]
    meta = {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if reshape is not None:  # the token tensor and the dropped tokens are recorded
        assert meta["features_tokens"] == target_name
        assert meta["tokens_dropped"] == ("1" if arch.startswith("vit") else "0")
    assert "cam" not in cam.methods and {"gradcam", "gradcam++", "layercam", "eigencam"} <= set(cam.methods)
    captured = {}
    target_of(net).register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_ref = net(x).numpy()
    logits, features = cam.forward(x.numpy())
    expected = (reshape or (lambda t: t))(captured["f"]).numpy()
    np.testing.assert_allclose(logits, logits_ref, atol=1e-3 * max(1.0, np.abs(logits_ref).max()))
    assert features.shape == expected.shape and features.shape[2] * features.shape[3] > 1
    np.testing.assert_allclose(features, expected, atol=1e-3 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize("arch", sorted(TARGET_LAYERS))
def test_maps_match_pytorch_grad_cam_with_its_reshape_transform(token_exports, arch, method):
    net, _, model = token_exports(arch)
    target_of, target_name, reshape, photos = TARGET_LAYERS[arch]
    for photo in photos:
        frame = cv2.imread(str(shared("images", photo)))
        assert_maps_match(model, net, target_of, target_name, arch, method, photo, frame, reshape,
                          first=photo == photos[0])


def test_run_explains_a_video_with_gradcam(token_exports, tmp_path):
    arch = "vit_b_16"
    _, out, _ = token_exports(arch)
    assert_run_explains_a_video_with_gradcam(out, shared("videos", "bottle-detection.mp4"), tmp_path / "o.mp4", 8)


def tiny_vit_onnx(folder):
    """A 2-layer ViT on 32x32 input (4x4 patches of 8 pixels), exported by torch.onnx with its last block's ln_1
    tokens [N, 1 + 16, 16] as a second output named "tokens"; (the net, the ONNX file)."""
    torch.manual_seed(0)
    net = torchvision.models.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                                  num_heads=2, hidden_dim=16, mlp_dim=32)
    torch.nn.init.normal_(net.heads.head.weight)
    net.eval()
    src = folder / "tiny-vit.onnx"
    torch.onnx.export(WithTarget(net, net.encoder.layers[-1].ln_1).eval(), torch.randn(1, 3, 32, 32), str(src),
                      dynamo=False, input_names=["input"],
                      output_names=["scores", "tokens"], dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}})
    return net, src


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's tracer warnings
def test_from_onnx_reads_a_named_token_tensor_as_a_grid_after_its_class_token(tmp_path):
    """`export --from-onnx vit.onnx --features TENSOR` with a [N, 1 + 4*4, C] tensor: the class token dropped, the
    rest a 4x4 grid inside the graph, and the maps equal pytorch-grad-cam's with the same reshape."""
    net, src = tiny_vit_onnx(tmp_path)
    out = tmp_path / "tiny-vit-cam.onnx"
    assert main(["export", "--from-onnx", str(src), "--features", "tokens", "--output", str(out)]) == 0
    meta = {p.key[len(PREFIX):]: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["tokens_dropped"] == "1" and meta["features_tokens"] == "tokens"
    model = CamModel(out, device="cpu")
    frame = cv2.imread(str(shared("images", "skimage_chelsea.png")))
    assert model.infer(frame)[1].shape == (16, 4, 4)
    for method in sorted(REFERENCES):
        prediction = model.predict(frame, method=method)
        with REFERENCES[method](model=net, target_layers=[net.encoder.layers[-1].ln_1],
                                reshape_transform=lambda t: vit_reshape(t, 4, 4)) as reference:
            expected = reference(input_tensor=torch.from_numpy(model.prepare(frame)),
                                 targets=[ClassifierOutputTarget(prediction.class_id)])[0]
        mine = normalize_map(cv2.resize(prediction.cam, (32, 32), interpolation=cv2.INTER_LINEAR))
        r = float(np.corrcoef(mine.ravel(), expected.ravel())[0, 1])
        assert expected.std() > 0 and r >= 0.99, (method, r)


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's tracer warnings
def test_a_token_model_at_int8_keeps_its_grid_and_its_maps_and_fp16_is_refused(tmp_path, capsys):
    """`--int8` of a token model: the backbone quantized, the blocks after the explained tokens and the gradient
    kept float32, the token grid recorded as in the fp32 file; the maps follow the fp32 file's. `--fp16` is refused
    in one line: ONNX Runtime 1.32's CPU optimizer crashed the process on the float16 attention of this model."""
    _, src = tiny_vit_onnx(tmp_path)
    frame = cv2.imread(str(shared("images", "skimage_chelsea.png")))
    paths = {}
    for name, extra in (("fp32", []), ("int8", ["--int8", "--calibrate", str(shared("images"))])):
        paths[name] = tmp_path / f"tiny-vit-{name}.onnx"
        assert main(["export", "--from-onnx", str(src), "--features", "tokens", "--output", str(paths[name]),
                     *extra]) == 0
    grid_keys = ("features_tokens", "features_layout", "tokens_dropped")
    meta = {name: {p.key[len(PREFIX):]: p.value for p in onnx.load(str(path)).metadata_props
                   if p.key[len(PREFIX):] in grid_keys} for name, path in paths.items()}
    assert meta["fp32"] == meta["int8"] and meta["fp32"]["tokens_dropped"] == "1"
    ops = {name: {n.op_type for n in onnx.load(str(path)).graph.node} for name, path in paths.items()}
    assert "QuantizeLinear" in ops["int8"] and "QuantizeLinear" not in ops["fp32"]
    maps = {}
    for name, path in paths.items():
        model = CamModel(path, device="cpu")
        assert model.infer(frame)[1].shape == (16, 4, 4)
        maps[name] = model.predict(frame, class_id=0, method="gradcam").cam
        assert maps[name].std() > 0
    r = float(np.corrcoef(maps["int8"].ravel(), maps["fp32"].ravel())[0, 1])
    assert r >= 0.9, r
    capsys.readouterr()
    fp16 = tmp_path / "tiny-vit-fp16.onnx"
    assert main(["export", "--from-onnx", str(src), "--features", "tokens", "--output", str(fp16), "--fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("realtime-cam: error: ") and "--fp16 is not supported for it" in err[-1]
    assert not fp16.exists()
