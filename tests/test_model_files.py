"""Model files that could hang or kill a run (issue 15, items 8 and 10)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from realtime_cam.errors import ModelError
from realtime_cam.model import CamModel

EXTERNAL = """
import sys, numpy as np, onnx
from pathlib import Path
from realtime_cam.model import CamModel
src, folder = Path(sys.argv[1]), Path(sys.argv[2])
onnx.save(onnx.load(str(src)), str(folder / "m.onnx"), save_as_external_data=True,
          all_tensors_to_one_file=True, location="m.data", size_threshold=0)
model = CamModel(folder / "m.onnx", device="cpu")
frame = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
before = model.infer(frame)[0]
(folder / "m.data").write_bytes(b"\\0" * 10)      # the data file overwritten during the run
print(np.array_equal(before, model.infer(frame)[0]))
"""


def test_a_model_whose_external_data_is_overwritten_during_a_run_keeps_running(tiny_onnx, tmp_path):
    """ONNX Runtime maps external data given a path: overwriting it killed the process with SIGBUS (135)."""
    done = subprocess.run([sys.executable, "-c", EXTERNAL, str(tiny_onnx), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_a_fifo_as_model_is_refused_at_once(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="not a regular file"):
        CamModel(fifo)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_fifo_as_source_that_nobody_writes_to_can_be_interrupted(tiny_onnx, tmp_path, signum, code):
    """Opening a named pipe blocks until a writer comes; Ctrl-C and SIGTERM must still end the run."""
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "realtime_cam", "run", "--model", str(tiny_onnx),
                             "--source", str(fifo), "--no-display"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("realtime-cam: model "):  # the model is loaded: the source opens next
            line = proc.stderr.readline()
            assert line, "the run ended before it loaded the model"
        time.sleep(1.0)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code and "Traceback" not in err, err
