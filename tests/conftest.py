"""Shared fixtures: real media and models from ../shared/data, a ResNet18 exported once per session, and a
tiny contract model that needs neither."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REALTIME_CAM_SHARED_DATA", ROOT.parent / "shared" / "data"))
HAVE_SHARED = SHARED.is_dir()

# CI sets this so that a missing ../shared/data fails the run instead of skipping the tests that need it.
REQUIRE_SHARED = os.environ.get("REALTIME_CAM_REQUIRE_SHARED") == "1"
if REQUIRE_SHARED and not HAVE_SHARED:
    raise pytest.UsageError(f"REALTIME_CAM_REQUIRE_SHARED=1 but the shared test data is missing: {SHARED}")

needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason=f"shared test data not found at {SHARED}")


def shared(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test when the file is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if REQUIRE_SHARED:
            pytest.fail(f"shared test data missing: {path}")
        pytest.skip(f"shared test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def resnet18_state_dict(tmp_path_factory) -> Path:
    """A seeded random torchvision resnet18 state dict saved as a .pth file."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1234)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def resnet18_onnx(resnet18_state_dict, tmp_path_factory) -> Path:
    """That state dict exported through the CLI: a contract file with random (but known) weights."""
    from realtime_cam.cli import main

    out = tmp_path_factory.mktemp("models") / "resnet18.onnx"
    assert main(["export", "--weights", str(resnet18_state_dict), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def mnv2_int8_onnx(tmp_path_factory) -> Path:
    """The real pretrained ImageNet MobileNetV2 (int8, ONNX Model Zoo) rewritten into the contract."""
    from realtime_cam.cli import main

    src = shared("models", "mobilenetv2-12-int8.onnx")
    out = tmp_path_factory.mktemp("models") / "mnv2-int8.onnx"
    assert main(["export", "--from-onnx", str(src), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A small seeded conv net in the contract, built with onnx.helper: needs neither torch nor ../shared."""
    import onnx
    from synthetic import tiny_contract_model

    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    onnx.save(tiny_contract_model(), str(path))
    return path


@pytest.fixture(scope="session")
def chromium():
    """One headless chromium (Debian's, driven by Playwright) for the whole test session."""
    from browser import HAVE_BROWSER, launched_chromium

    if not HAVE_BROWSER:
        pytest.skip("needs Debian's chromium and pip's playwright")
    with launched_chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 2 CPUs, started once for every test that needs one (loopback, no dashboard, no auth),
    shut down at the end of the session. Collections run in the test process find it initialised and use it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from realtime_cam.collection.on_ray import RAY_ENV

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import logging

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
