"""What the in-graph gradient costs, for `realtime-cam bench` (issue 14).

- ``gradient_cost``: the same network run with and without its gradient outputs (the variant without them is
  made in memory from the file: the outputs ``grads``/``grads_class`` and every node only they need are
  dropped), frames per second of each, and the share of the frame time the gradient takes.
- ``grad_reference``: pytorch-grad-cam's GradCAM loop (preprocess, forward, backward, map, overlay) on the
  torchvision network ``bench --grad-reference ARCH`` names, at the layer ``export --arch ARCH`` explains;
  random weights, since weights do not change speed. Needs the export extra and pytorch-grad-cam; run after
  the ONNX Runtime measurements, as the seed baseline is (torch's thread pools would disturb them).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort

from .contract import FEATURES, GRADS, GRADS_CLASS, LOGITS, TARGET_CLASS
from .model import CamModel, _session_options, load_model_proto
from .pipeline import RunOptions

ROUNDS = 10  # rounds that take the two variants in turn, so that a machine getting busier moves both alike
FRAMES = 100  # at most this many timed frames per variant


def without_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a contract model with only ``logits`` and ``features``: the gradient's nodes, constants and
    the ``target_class`` input removed."""
    lean = onnx.ModelProto()
    lean.CopyFrom(model)
    graph = lean.graph
    kept = [o for o in graph.output if o.name in (LOGITS, FEATURES)]
    del graph.output[:]
    graph.output.extend(kept)
    needed = {o.name for o in kept}
    nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    for field in (graph.initializer, graph.input):
        keep = [t for t in field if t.name in needed]
        del field[:]
        field.extend(keep)
    return lean


def gradient_cost(model: CamModel, frames: list[np.ndarray], warmup: int) -> dict | None:
    """Inference FPS of ``model`` with its gradient outputs (as ``run`` calls it for a gradient method) and of
    the same network without them; None for a file without a gradient output."""
    outputs = {o.name for o in model.session.get_outputs()}
    if not {GRADS, GRADS_CLASS} <= outputs:
        return None
    lean = ort.InferenceSession(without_gradients(load_model_proto(model.path)).SerializeToString(),
                                sess_options=_session_options(), providers=model.session.get_providers())
    takes_target = TARGET_CLASS in {i.name for i in (*model.session.get_inputs(),
                                                     *model.session.get_overridable_initializers())}
    target = np.full(1, -1, np.int64)

    def with_grads(x: np.ndarray) -> None:
        feed = {model.input_name: x, **({TARGET_CLASS: target} if takes_target else {})}
        model.session.run([LOGITS, FEATURES, GRADS, GRADS_CLASS], feed)

    def without(x: np.ndarray) -> None:
        lean.run([LOGITS, FEATURES], {model.input_name: x})

    variants = {"with_gradient": with_grads, "without_gradient": without}
    inputs = [model.prepare(f).copy() for f in frames[:warmup + FRAMES]]
    for run in variants.values():
        for x in inputs[:min(warmup, 10)]:
            run(x)
    timed = inputs[warmup:]
    seconds = dict.fromkeys(variants, 0.0)
    shares = []  # per round: on a shared machine the median of these moves less than the totals do
    size = -(-len(timed) // ROUNDS)
    for round_ in range(ROUNDS):
        part = timed[round_ * size:(round_ + 1) * size]
        took = {}
        for name in variants if round_ % 2 == 0 else list(variants)[::-1]:
            t0 = time.perf_counter()
            for x in part:
                variants[name](x)
            took[name] = time.perf_counter() - t0
            seconds[name] += took[name]
        if part:
            shares.append(1.0 - took["without_gradient"] / took["with_gradient"])
    fps = {name: len(timed) / s for name, s in seconds.items()}
    share = 1.0 - fps["with_gradient"] / fps["without_gradient"]
    return {"frames": len(timed), "fps_with_gradient": fps["with_gradient"],
            "fps_without_gradient": fps["without_gradient"], "gradient_share_of_frame_time": share,
            "gradient_share_median_of_rounds": float(np.median(shares))}


def gradcam_loop(model: CamModel, frames: list[np.ndarray], warmup: int, options: RunOptions) -> dict:
    """realtime-cam's loop with gradcam (frames in memory, output dropped), as bench measures its loop."""
    from .bench import bench_pipeline_memory

    return bench_pipeline_memory(model, frames, warmup, replace(options, view=replace(options.view, method="gradcam")))


def grad_reference(arch: str, model: CamModel, frames: list[np.ndarray], device: str, warmup: int) -> dict:
    """pytorch-grad-cam's GradCAM loop on torchvision's ``arch``, or {"left_out": why}."""
    if device != "cpu":
        return {"left_out": "measured on the CPU only"}
    try:
        from .export.grad_reference import time_grad_cam
    except ImportError as exc:
        return {"left_out": f"needs the export extra and grad-cam ({exc.name or exc} is missing)"}
    h, w = model.info.input_size_hw
    return time_grad_cam(arch, (h, w), model.info.mean, model.info.std, frames[:warmup + FRAMES], warmup)


def check_reference(arch: str) -> None:
    """Refuse, before any measurement, an arch that torchvision does not have (when torchvision is installed;
    without it the reference is left out and the report says why)."""
    try:  # torch lives with the export step, never in the runtime itself
        from .export.grad_reference import check_arch
    except ImportError:
        return
    check_arch(arch)


def table_lines(report: dict) -> list[str]:
    """Lines for bench's table: the gradient's share of the frame time, and the loop against pytorch-grad-cam."""
    lines = []
    for row in report["results"]:
        cost, name = row.get("gradient_cost"), row["model"].rsplit("/", 1)[-1]
        if cost:
            lines.append(f"  {name} [{row['device']}] inference with the gradient {cost['fps_with_gradient']:.1f} "
                         f"FPS, without {cost['fps_without_gradient']:.1f}: the gradient is "
                         f"{100 * cost['gradient_share_of_frame_time']:.1f}% of the frame time (median of "
                         f"{ROUNDS} rounds {100 * cost['gradient_share_median_of_rounds']:.1f}%)")
        loop, ref = row.get("gradcam_loop"), report.get("grad_reference", {}).get(row["device"])
        if loop and ref and "fps" in ref:
            lines.append(f"  {name} [{row['device']}] gradcam loop {loop['fps']:.1f} FPS, pytorch-grad-cam "
                         f"GradCAM on {ref['arch']} {ref['fps']:.1f} FPS: {loop['fps'] / ref['fps']:.2f}x")
    for device, ref in report.get("grad_reference", {}).items():
        if "left_out" in ref:
            lines.append(f"  pytorch-grad-cam reference left out [{device}]: {ref['left_out']}")
    return lines

