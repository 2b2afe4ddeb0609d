"""One file of a collection: its overlay, its per-frame rows and its summary, in this process.

Built from the pieces ``run`` uses (open_source, open_file_sink, run_loop): a file explained here is explained
exactly as ``realtime-cam run --source FILE --output OUT --no-display`` explains it. A :class:`FileWorker`
holds one model and explains files one after another: the in-process runner has one, each Ray actor one.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CamError, SinkError
from ..pipeline import DEFAULT_BATCH
from .discover import Item
from .results import FILE_COLUMNS, FRAME_COLUMNS, write_table

log = logging.getLogger("realtime_cam")

STATE_DIR = ".realtime-cam"  # in the output folder: each file's results, beside the overlays
OK, SKIPPED, ERROR = "ok", "skipped-complete", "error"


@dataclass(frozen=True)
class JobOptions:
    """Everything a worker needs to explain a file as ``run`` would (plain values: it crosses to Ray actors).

    ``method`` and ``class_id`` are resolved once, before any work (see :func:`resolve`).
    """

    model: str
    output_dir: str
    table_format: str
    device: str = "auto"
    threads: int | None = None
    method: str = "cam"
    class_id: int | None = None
    topk: int = 3
    box: bool = False
    box_threshold: float = 0.2
    smooth: float = 0.0
    hysteresis: int = 3
    scale: str = "frame"
    colormap: str = "jet"
    alpha: float = 0.5
    batch: int = DEFAULT_BATCH
    max_frames: int | None = None
    overwrite: bool = False
    codec: str | None = None
    crf: int | None = None


def output_paths(options: JobOptions, item: Item) -> tuple[Path, Path, Path]:
    """(overlay, per-frame rows, summary JSON) of one input under the output folder."""
    out = Path(options.output_dir)
    state = out / STATE_DIR / item.output_rel
    rows = state.with_name(state.name + f".rows.{options.table_format}")
    return out / item.output_rel, rows, state.with_name(state.name + ".summary.json")


# The options that shape a file's overlay and rows: a file done with other values of them is done again.
# (--device, --batch and the threads change only the speed; --overwrite says what to do.)
SHAPING = ("method", "class_id", "topk", "box", "box_threshold", "smooth", "hysteresis", "scale", "colormap",
           "alpha", "max_frames", "codec", "crf")


def made_with(options: JobOptions) -> dict:
    """What a file's outputs were made with, kept in its summary: the shaping options and the model file (its
    path, size and modification time: a model exported again to the same path counts as another)."""
    model = Path(options.model)
    try:
        stat = model.stat()
        model_id = {"path": str(model.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        model_id = {"path": str(model)}
    return {"model": model_id, **{name: getattr(options, name) for name in SHAPING}}


def _stored(options: JobOptions, item: Item) -> dict | None:
    """The stored summary of an input whose overlay and results are all there and complete, else None."""
    overlay, rows, summary = output_paths(options, item)
    if not (overlay.is_file() and rows.is_file() and summary.is_file()):
        return None
    try:
        stored = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("status") == OK else None


def completed(options: JobOptions, item: Item) -> dict | None:
    """The stored summary of an input whose overlay and results are complete and were made with these options
    (see made_with), else None."""
    stored = _stored(options, item)
    return stored if stored is not None and stored.get("made_with") == made_with(options) else None


def changed_options(options: JobOptions, item: Item) -> list[str]:
    """What differs between these options and those a complete earlier output of ``item`` was made with
    ("model", "method", ...; "an earlier version" when it does not say); empty when there is none or they match."""
    stored = _stored(options, item)
    if stored is None:
        return []
    before, now = stored.get("made_with"), made_with(options)
    if not isinstance(before, dict):
        return ["an earlier version"]
    return [name for name in now if before.get(name) != now[name]]


def error_summary(item: Item, reason: str, seconds: float = 0.0) -> dict:
    return {"file": item.rel, "output": item.output_rel, "kind": item.kind, "status": ERROR, "reason": reason,
            "frames": 0, "dominant_class": None, "dominant_label": None, "mean_flicker": None,
            "seconds": round(seconds, 3), "node": _node(), "pid": os.getpid()}


def _node() -> str:
    """The Ray node this runs on (its id) when in a Ray worker, else the host name."""
    ray = sys.modules.get("ray")  # never imported here for this: in-process, that cost 0.5 s
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def frame_row(file: str, fps: float, frame, shown) -> dict:
    """One frame's row of the results table (see results.FRAME_COLUMNS)."""
    p = shown.prediction
    h, w = frame.image_bgr.shape[:2]
    mh, mw = p.cam.shape
    flat = int(p.cam.argmax())
    my, mx = divmod(flat, mw)
    box = shown.box_xyxy
    time_s = frame.time_s if frame.time_s is not None else (frame.index / fps if fps > 0 else None)
    return {
        "file": file, "frame": frame.index, "time_s": time_s,
        "topk_ids": [int(c) for c, _, _ in p.topk], "topk_labels": [name for _, name, _ in p.topk],
        "topk_probs": [float(q) for _, _, q in p.topk],
        "class_id": int(p.class_id), "label": p.label, "probability": float(p.probability), "method": p.method,
        "box_x0": None if box is None else float(box[0]), "box_y0": None if box is None else float(box[1]),
        "box_x1": None if box is None else float(box[2]), "box_y1": None if box is None else float(box[3]),
        # the centre of the map's hottest cell, in frame pixels
        "peak_x": int((mx + 0.5) * w / mw), "peak_y": int((my + 0.5) * h / mh),
    }


class FileWorker:
    """One model, explaining files one after another."""

    def __init__(self, options: JobOptions, model=None) -> None:
        from ..model import CamModel

        self.options = options
        self.model = model if model is not None else CamModel(options.model, options.device, options.threads)
        self._encoder_said = False  # which encoder writes the videos is said for the first one only

    def __call__(self, item: Item, on_frames: Callable[[int], None] | None = None) -> dict:
        """Explain one file unless its results are complete (and not --overwrite); its summary row.

        An error that concerns this file (unreadable, undecodable, unwritable output) is its summary's
        reason; Ctrl-C and bugs propagate.
        """
        if not self.options.overwrite:
            stored = completed(self.options, item)
            if stored is not None:
                return {**stored, "status": SKIPPED, "node": _node(), "pid": os.getpid()}
        start = time.perf_counter()
        try:
            return self._explain(item, on_frames, start)
        except (CamError, OSError) as exc:
            return error_summary(item, one_line(exc), time.perf_counter() - start)
        except Exception as exc:  # a decoder or encoder failing on one file must not stop the others
            import av
            import cv2

            if isinstance(exc, cv2.error):
                return error_summary(item, f"OpenCV: {one_line(exc)}", time.perf_counter() - start)
            if isinstance(exc, av.FFmpegError):
                return error_summary(item, f"FFmpeg: {one_line(exc)}", time.perf_counter() - start)
            raise

    def _explain(self, item: Item, on_frames: Callable[[int], None] | None, start: float) -> dict:
        from ..encoders import VideoSettings
        from ..overlay import COLORMAPS
        from ..pipeline import RunOptions, run_loop
        from ..providers import CUDA
        from ..sinks import check_not_an_input, open_file_sink
        from ..sources import open_source
        from ..temporal import TemporalOptions
        from ..view import ViewState

        o = self.options
        overlay, rows_path, summary_path = output_paths(o, item)
        for folder in {overlay.parent, rows_path.parent}:
            folder.mkdir(parents=True, exist_ok=True)
        check_not_an_input(overlay, (item.path, o.model))
        rows: list[dict] = []
        with open_source(item.path, reconnect=0) as source:
            fps = source.fps

            def observe(frame, shown) -> None:
                rows.append(frame_row(item.rel, fps, frame, shown))
                if on_frames is not None:
                    on_frames(1)

            options = RunOptions(
                view=ViewState(method=o.method, pinned_class=o.class_id, topk=o.topk, show_box=o.box,
                               alpha=o.alpha),
                temporal=TemporalOptions(smooth=o.smooth, hysteresis=o.hysteresis, scale=o.scale),
                colormap=COLORMAPS[o.colormap], box_threshold=o.box_threshold, max_frames=o.max_frames,
                record_fps=source.fps or 30.0, batch=o.batch,
            )
            settings = VideoSettings(codec=o.codec, crf=o.crf, hardware=self.model.provider == CUDA,
                                     audio_from=item.path if source.kind == "video" else None,
                                     announce=not self._encoder_said)
            self._encoder_said = self._encoder_said or source.kind == "video"
            with open_file_sink(overlay, source.fps, source.size_wh, source.kind, False, settings) as sink:
                try:
                    result = run_loop(self.model, source, sinks=[sink], options=options, observe=observe)
                except KeyboardInterrupt:
                    log.info("%s: interrupted after %d frame(s); the next run of the command redoes it (its "
                             "results are not marked complete)", item.rel, len(rows))
                    raise
        if not sink.complete:
            raise SinkError(f"{overlay} was not written: no frame was explained")
        counts = collections.Counter(row["class_id"] for row in rows)
        dominant = counts.most_common(1)[0][0] if counts else None
        summary = {
            "file": item.rel, "output": item.output_rel, "kind": item.kind, "status": OK, "reason": None,
            "frames": result.frames, "dominant_class": dominant,
            "dominant_label": self.model.labels[dominant] if dominant is not None else None,
            "mean_flicker": result.flicker, "seconds": round(time.perf_counter() - start, 3),
            "node": _node(), "pid": os.getpid(),
        }
        write_table(rows, rows_path, FRAME_COLUMNS, o.table_format)
        from ..sinks import write_json

        write_json({**{k: summary.get(k) for k in FILE_COLUMNS}, "made_with": made_with(o)},
                   summary_path)  # last: it marks the file complete
        return summary


def options_dict(options: JobOptions) -> dict:
    return asdict(options)
