"""export_model, the library call behind `realtime-cam export`: its usage checks, and one real export."""

from __future__ import annotations

import onnx
import pytest
from conftest import needs_shared, shared

from realtime_cam.contract import read_contract
from realtime_cam.errors import ExportError
from realtime_cam.export.build import export_model


@pytest.mark.parametrize(("options", "message"), [
    ({"int8": True, "fp16": True}, "--int8 and --fp16 exclude each other; choose one"),
    ({"int8": True}, "--int8 needs --calibrate SOURCE: frames (videos, images, folders) to set activation ranges"),
    ({"check": "clip.mp4"}, "--calibrate and --check go with --int8 (or --check with --fp16)"),
    ({"int8": True, "calibrate": "clip.mp4", "calibration": "median"},
     "unknown calibration 'median'; choose from minmax, percentile, entropy"),
])
def test_usage_mistakes_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(ExportError) as raised:
        export_model(tmp_path / "new" / "m.onnx", weights="none", **options)
    assert str(raised.value) == message
    assert not (tmp_path / "new").exists()


def test_output_must_be_an_onnx_file(tmp_path):
    with pytest.raises(ExportError, match=r"^--output must name an \.onnx file; got m\.txt$"):
        export_model(tmp_path / "m.txt", weights="none")


@needs_shared
def test_from_onnx_writes_the_contract_and_says_so(tmp_path):
    lines: list[str] = []
    out = tmp_path / "models" / "mnv2.onnx"
    assert export_model(out, from_onnx=shared("models", "mobilenetv2-12-float-from-int8.onnx"),
                        log=lines.append) == out
    info, weight, _ = read_contract(onnx.load(str(out)))
    assert weight.shape == (1000, 1280) and len(info.labels) == 1000
    assert lines[-1] == f"wrote {out}"
