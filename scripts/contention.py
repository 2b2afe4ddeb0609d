"""How much another busy process slows the two sides of `bench`'s loop/seed ratio.

The seed approach (PyTorch eager) and ONNX Runtime inference alone, each on a quiet machine and then with
one busy-looping process beside it. Usage: python scripts/contention.py MODEL.onnx VIDEO
(docs/bench/contention.log: ResNet18 from `export --weights none`, bottle-detection.mp4, 2 cores).
"""
import os
import subprocess
import sys
import time

from realtime_cam.bench import bench_inference, load_frames
from realtime_cam.export.seed_baseline import time_seed_approach
from realtime_cam.model import CamModel

model_path, video = sys.argv[1], sys.argv[2]
print("load average before (1, 5, 15 min):", " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
frames = load_frames(video, 120)
model = CamModel(model_path, "cpu")
mean, std = model.info.mean, model.info.std
for rep in range(3):
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5)
            seed = time_seed_approach((224, 224), mean, std, frames, "cpu", 20)["fps"]
            ort = bench_inference(model, frames, 20)["fps"]
        finally:
            if hog:
                hog.kill()
                hog.wait()
        print(f"{'one busy process beside' if busy else 'quiet':24s} seed {seed:6.1f} FPS   onnxruntime inference {ort:6.1f} FPS",
              flush=True)
