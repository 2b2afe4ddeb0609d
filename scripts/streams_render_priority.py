"""The multi-stream render thread at normal priority against lowered (as the single stream's is), in one
process, N streams fed from frames in memory, rounds interleaved.

Usage: python scripts/streams_render_priority.py MODEL.onnx VIDEO N FRAMES [ROUNDS]
(docs/streams.md: MobileNetV2 int8, bottle-detection.mp4, N=4 and N=1, 300 frames, 4 rounds, 2 cores).
"""
import os
import statistics
import sys

from realtime_cam import streams_bench
from realtime_cam.bench import load_frames
from realtime_cam.model import CamModel
from realtime_cam.pipeline import RunOptions
from realtime_cam.streams import MultiStream
from realtime_cam.threads import lower_this_threads_priority


class Lowered(MultiStream):
    def _render_loop(self):
        lower_this_threads_priority()
        super()._render_loop()


model_path, video, n, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 4
print("load average before (1, 5, 15 min):", " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
model = CamModel(model_path, device="cpu")
images = load_frames(video, 60)
fps: dict[str, list[float]] = {"normal": [], "lowered": []}
for _ in range(rounds):
    for name, cls in (("normal", MultiStream), ("lowered", Lowered)):
        streams_bench.MultiStream = cls
        row = streams_bench.bench_streams(model, images, n, frames, 20, 0.015, RunOptions(live_source=True))
        fps[name].append(round(row["fps_total"], 1))
for name, values in fps.items():
    print(f"{n} streams, render thread {name}: total FPS per round {values}, median {statistics.median(values)}")
