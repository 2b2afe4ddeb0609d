"""evaluate under faults and odd annotations (issue 15, items 12-14)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import needs_shared, shared

from realtime_cam.cli import main


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@needs_shared
@pytest.mark.parametrize("where", ["under-a-file", "unmakeable"])
def test_a_save_dir_that_cannot_be_made_is_one_line_before_any_work(mnv2_int8_onnx, tmp_path, capsys, where):
    a_file = write(tmp_path / "a-file", "x")
    save_dir = a_file / "overlays" if where == "under-a-file" else tmp_path / ("x" * 300) / "overlays"
    code = main(["evaluate", "--model", str(mnv2_int8_onnx), "--images", str(shared("imagenet-val-20")),
                 "--boxes", str(shared("imagenet-val-20", "annotations.csv")), "--save-dir", str(save_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"realtime-cam: error: cannot make --save-dir {save_dir}")


@needs_shared
def test_boxes_wholly_outside_their_image_are_listed_not_counted_as_misses(mnv2_int8_onnx, tmp_path, capsys):
    folder = shared("imagenet-val-20")
    csv = write(tmp_path / "b.csv", "file,class_id,x0,y0,x1,y1\n"
                                    "ILSVRC2012_val_00000011.JPEG,109,600,450,700,500\n"   # the image is 500x400
                                    "ILSVRC2012_val_00004646.JPEG,109,0,0,500,375\n")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(mnv2_int8_onnx), "--images", str(folder), "--boxes", str(csv),
                 "--device", "cpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 1 and doc["boxes"] == 1 and doc["partial"] is False
    assert doc["left_out_outside_image"] == [{"file": "ILSVRC2012_val_00000011.JPEG", "class_id": 109}]
    assert ("1 (image, class) row(s) left out: every box of the class lies outside its image, check the "
            "annotation: ILSVRC2012_val_00000011.JPEG class 109") in capsys.readouterr().out


@needs_shared
def test_ctrl_c_during_evaluate_writes_what_was_scored_marked_partial(mnv2_int8_onnx, tmp_path):
    folder = shared("imagenet-val-20")
    rows = (folder / "annotations.csv").read_text().splitlines()
    # The 20 images many times over, each row with an overlay: long enough to be interrupted in the middle.
    csv = write(tmp_path / "many.csv", "\n".join([rows[0], *rows[1:] * 200]) + "\n")
    out, overlays = tmp_path / "r.json", tmp_path / "overlays"
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "evaluate", "--model", str(mnv2_int8_onnx),
                             "--images", str(folder), "--boxes", str(csv), "--device", "cpu", "--json", str(out),
                             "--save-dir", str(overlays)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (overlays.is_dir() and len(list(overlays.iterdir())) >= 5) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and 0 < doc["images"] < 20 * 200
    assert f"wrote {out} (partial: interrupted)" in err
    assert "interrupted: these figures cover only the" in stdout
