"""The default model without torch: torchvision's weights file fetched into torch's cache and hash-checked
(cached or downloaded, from a server on 127.0.0.1), `run` exporting it, and random weights kept out of it."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from synthetic import tiny_contract_model, write_photo
from test_resnet_numpy import seeded_state
from torch_format import torch_save, write_checkpoint

from realtime_cam.cli import main
from realtime_cam.contract import ModelInfo, load_labels, read_contract, write_contract
from realtime_cam.errors import ExportError
from realtime_cam.export import hub

DEFAULT_FILE = "resnet18-f37072fd.pth"  # torchvision's resnet18 IMAGENET1K_V1


@pytest.fixture(scope="module")
def weights_bytes() -> bytes:
    """A well-formed resnet18 state dict (seeded; not torchvision's weights), as torch.save writes it."""
    return torch_save(seeded_state("resnet18"))


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch and realtime-cam caches under tmp_path; no proxy for 127.0.0.1."""
    for name in ("TORCH_HOME", "REALTIME_CAM_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv(hub.URL_ENV, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return tmp_path / "torch_home" / "hub" / "checkpoints", tmp_path / "realtime_cam_cache"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """(folder, base URL): an HTTP server on 127.0.0.1 serving the folder."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url(name: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


# ----------------------------------------------------------------------------- the hash in the name
def test_a_wrong_file_under_torchvisions_name_is_refused_and_nothing_is_exported(caches, weights_bytes, capsys):
    checkpoints, cache = caches
    checkpoints.mkdir(parents=True)
    (checkpoints / DEFAULT_FILE).write_bytes(weights_bytes)  # well-formed, but not the file its name says
    found = hashlib.sha256(weights_bytes).hexdigest()[:8]
    for argv in (["export"], ["run", "--no-display"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"realtime-cam: error: the cached weights file {checkpoints / DEFAULT_FILE} is damaged or not "
                       f"the file its name says: its sha256 begins {found}, its name says f37072fd; delete it and the "
                       "next run downloads it again (or put a complete copy of "
                       f"https://download.pytorch.org/models/{DEFAULT_FILE} there)")
    assert not (cache / "resnet18.onnx").exists()


def test_a_download_is_checked_against_its_name_and_a_wrong_one_is_not_kept(caches, server, weights_bytes):
    checkpoints, _ = caches
    root, base = server
    (root / "resnet18-00000000.pth").write_bytes(weights_bytes)
    with pytest.raises(ExportError, match=r"^downloaded http://127\.0\.0\.1:\d+/resnet18-00000000\.pth, but its sha256 "
                                          rf"begins {hashlib.sha256(weights_bytes).hexdigest()[:8]} where its name "
                                          r"says 00000000: not kept"):
        hub.fetch(base + "resnet18-00000000.pth", "resnet18 weights", log=lambda _: None, stream=io.StringIO())
    assert not checkpoints.exists() or not list(checkpoints.iterdir())


def test_a_download_with_the_right_hash_is_kept_and_exported(caches, server, weights_bytes, monkeypatch, capsys):
    checkpoints, cache = caches
    root, base = server
    served = write_checkpoint(root, "resnet18", weights_bytes)
    monkeypatch.setenv(hub.URL_ENV, base + served.name)
    out = cache / "resnet18.onnx"
    assert main(["export"]) == 0
    assert (checkpoints / served.name).read_bytes() == weights_bytes
    assert [p.name for p in checkpoints.iterdir()] == [served.name]  # no partial file left
    err = capsys.readouterr().err
    assert f"downloading {base + served.name} into {checkpoints}" in err
    assert re.search(rf"\n{served.name} (\d+\.\d)/\1 MB \(100%\)\n", err)  # the progress line's last state
    info, weight, _ = read_contract(onnx.load(str(out)))
    np.testing.assert_array_equal(weight, seeded_state("resnet18")["fc.weight"])
    assert info.source == "torchvision resnet18, weights ResNet18_Weights.IMAGENET1K_V1" and not info.random_weights
    assert info.labels == load_labels()
    # Found in the cache the next time: checked, not downloaded again.
    monkeypatch.setenv(hub.URL_ENV, base + "gone/" + served.name)
    assert hub.fetch(base + "gone/" + served.name, "resnet18 weights", log=pytest.fail) == checkpoints / served.name


def test_offline_with_an_empty_cache_says_where_to_put_the_file(caches, monkeypatch, capsys):
    checkpoints, cache = caches
    monkeypatch.setenv(hub.URL_ENV, closed_port_url(DEFAULT_FILE))
    assert main(["run", "--no-display"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("realtime-cam: error: could not get resnet18 weights ResNet18_Weights.IMAGENET1K_V1 (")
    assert f"put it at {checkpoints / DEFAULT_FILE} (TORCH_HOME sets the folder)" in err
    assert not (cache / "resnet18.onnx").exists() and not list(checkpoints.iterdir())


# ----------------------------------------------------------------------------- run with no model, without torch
def test_run_without_a_model_exports_resnet18_without_torch(tmp_path, weights_bytes):
    """In a subprocess with its own TORCH_HOME, cache and HOME: the weights file in torch's cache becomes the
    default model, and torch is never imported (in a runtime-only venv it is not even installed)."""
    checkpoint = write_checkpoint(tmp_path / "torch" / "hub" / "checkpoints", "resnet18", weights_bytes)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "TORCH_HOME", "REALTIME_CAM_CACHE")}
    env.update(TORCH_HOME=str(tmp_path / "torch"), REALTIME_CAM_CACHE=str(tmp_path / "cache"),
               HOME=str(tmp_path / "home"), **{hub.URL_ENV: closed_port_url(checkpoint.name)})  # never contacted
    photo, out = write_photo(tmp_path / "photo.jpg"), tmp_path / "o.png"
    code = ("import sys; from realtime_cam.cli import main; "
            f"rc = main(['run', '--source', {str(photo)!r}, '--output', {str(out)!r}, '--no-display']); "
            "assert 'torch' not in sys.modules, 'imported torch'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    model = tmp_path / "cache" / "resnet18.onnx"
    assert f"no model at {model} yet: exporting torchvision resnet18" in res.stderr
    assert "ONNX Runtime vs numpy: max |logits diff|" in res.stderr and out.exists()
    _, weight, _ = read_contract(onnx.load(str(model)))
    np.testing.assert_array_equal(weight, seeded_state("resnet18")["fc.weight"])
    # Nothing went to HOME's caches (onnxruntime writes a telemetry id under ~/.cache/Microsoft: not ours).
    assert not (tmp_path / "home" / ".cache" / "torch").exists()
    assert not (tmp_path / "home" / ".cache" / "realtime-cam").exists()


# ----------------------------------------------------------------------------- random weights
@pytest.mark.parametrize("weights, message", [
    ("none", "random weights need --output: they never become the default model "
             "(realtime-cam export --weights none --output random.onnx)"),
    ("mine.pth", "weights from a file need --output: the default model holds torchvision's hash-checked weights "
                 "only (realtime-cam export --weights mine.pth --output FILE.onnx)"),
])
def test_random_or_unverified_weights_never_become_the_default_model(caches, capsys, weights, message):
    _, cache = caches
    assert main(["export", "--weights", weights]) == 2
    assert capsys.readouterr().err == f"realtime-cam: error: {message}\n"
    assert not cache.exists()


def test_random_weights_are_recorded_and_run_says_so_once(tmp_path, caches, capsys):
    out = tmp_path / "random.onnx"
    assert main(["export", "--weights", "none", "--output", str(out)]) == 0
    info, _, _ = read_contract(onnx.load(str(out)))
    assert info.random_weights and info.source == "torchvision resnet18, random weights (seed 0)"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["realtime_cam.random_weights"] == "true"
    # A file exported before the key existed says so only in its source: run warns for it too.
    old = tiny_contract_model()
    info, weight, bias = read_contract(old)
    write_contract(old, ModelInfo(labels=info.labels, source="torchvision resnet18, random weights (seed 0)"),
                   weight, bias)
    onnx.save(old, str(tmp_path / "old.onnx"))
    onnx.save(tiny_contract_model(), str(tmp_path / "tiny.onnx"))
    photo = write_photo(tmp_path / "photo.jpg")
    capsys.readouterr()
    for model, warned in ((tmp_path / "old.onnx", 1), (tmp_path / "tiny.onnx", 0)):
        assert main(["run", "--model", str(model), "--source", str(photo), "--no-display"]) == 0
        assert capsys.readouterr().err.count("random weights: this model's maps mean nothing") == warned


def test_the_overlay_of_a_random_weights_model_says_so(tmp_path):
    """The HUD, not only the console: an overlay shared without the log must not pass for an explanation."""
    import numpy as np
    import onnx
    from synthetic import tiny_contract_model

    from realtime_cam.contract import PREFIX
    from realtime_cam.model import CamModel
    from realtime_cam.pipeline import RunOptions, run_loop
    from realtime_cam.sinks import Sink
    from realtime_cam.types import Frame

    model = tiny_contract_model()
    onnx.save(model, str(tmp_path / "trained.onnx"))
    model.metadata_props.add(key=PREFIX + "random_weights", value="true")
    onnx.save(model, str(tmp_path / "random.onnx"))

    class Keep(Sink):
        def write(self, image_bgr):
            self.image = image_bgr

    overlays = {}
    for name in ("trained", "random"):
        cam_model = CamModel(tmp_path / f"{name}.onnx", device="cpu")
        assert cam_model.info.random_weights == (name == "random")
        sink = Keep()
        run_loop(cam_model, iter([Frame(0, np.full((240, 320, 3), 90, np.uint8), 0.0)]), sinks=[sink],
                 options=RunOptions(batch=1))
        overlays[name] = sink.image
    corner = (slice(200, 240), slice(160, 320))  # the HUD's place: bottom-right
    assert not np.array_equal(overlays["trained"][corner], overlays["random"][corner])
