"""Command line: parse, call the library, map errors to one-line messages and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .cliutil import (
    ArgumentParser,
    HelpFormatter,
    add_debug_flag,
    batch_count,
    device_list,
    finite_float,
    fraction,
    input_side,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    smooth_weight,
)
from .errors import CamError
from .paths import default_model_path

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("realtime_cam")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that every context manager cleans up."""


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    # The registries the choices come from, imported here: the module itself stays light to import, so that
    # a Ctrl-C in the first moments of a command is already handled by main().
    from .cams import METHODS
    from .encoders import VIDEO_CODECS
    from .export.options import (
        CALIBRATIONS,
        DEFAULT_ARCH,
        DEFAULT_CALIBRATION,
        DEFAULT_CALIBRATION_FRAMES,
        DEFAULT_OPSET,
        DEFAULT_WEIGHTS,
        OPSETS,
        TORCH_FREE_ARCHES,
    )
    from .images import WRITABLE_IMAGE_EXTENSIONS
    from .overlay import COLORMAPS
    from .pipeline import DEFAULT_BATCH
    from .providers import DEVICES
    from .temporal import SCALES
    from .view import keys_help_text

    fmt = HelpFormatter
    parser = ArgumentParser(  # its subcommands' parsers are of the same class
        prog="realtime-cam",
        description="Live Class Activation Maps: where a CNN looks when it classifies what a camera sees.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> the command's parser, for its own error lines

    run = sub.add_parser(
        "run", formatter_class=fmt,
        help="show the CAM live (webcam, stream, video or image), or write it to a file",
        description="Classify each frame and draw the class activation map over it.\n\n" + keys_help_text(),
    )
    run.add_argument("--model", type=Path, default=None,
                     help=f"realtime-cam model file (default: {default_model_path()}, exported on first use "
                          "from torchvision's ResNet18 weights, downloaded once and hash-checked; no torch needed)")
    run.add_argument("--source", action="append", default=None,
                     help="webcam index, video file, image file, or a URL OpenCV opens (rtsp://, http://); "
                          "repeat it (or give a .txt file listing webcams and URLs, one per line) to explain "
                          "several live streams at once, their frames batched together; a folder, a quoted glob or a .txt list of "
                          "files is a collection: every frame of each file into the --output folder (default: 0)")
    run.add_argument("--reconnect", type=non_negative_int, default=3, metavar="N",
                     help="live sources: reopen a camera or stream that stops, up to N times with backoff")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="where the model runs; auto uses CUDA when its provider really starts")
    run.add_argument("--output", type=Path, default=None,
                     help=f"write the overlay: a video ({' '.join(VIDEO_CODECS)}) with the source's size, frame "
                          "times and audio (.mp4: H.264 that browsers play), or an image "
                          f"({' '.join(sorted(WRITABLE_IMAGE_EXTENSIONS))}) for an image source")
    run.add_argument("--codec", default=None, metavar="NAME",
                     help="video output: an FFmpeg encoder (default by container: "
                          + ", ".join(f"{k} {v}" for k, v in VIDEO_CODECS.items())
                          + "; with --device cuda, h264_nvenc when it opens)")
    run.add_argument("--crf", type=non_negative_int, default=None, metavar="N",
                     help="video output: the encoder's constant quality (lower: better and larger; libx264 "
                          "default 23, VP9 32)")
    run.add_argument("--no-display", action="store_true", help="no window (headless; use with --output)")
    run.add_argument("--max-frames", type=positive_int, default=None, help="stop after N frames")
    run.add_argument("--batch", type=batch_count, default=DEFAULT_BATCH, metavar="N",
                     help="--no-display on a video file: frames per inference call (more frames per second; "
                          "1 = frame by frame). Live sources and the window always go one frame at a time")
    run.add_argument("--class", dest="class_name", default=None, metavar="NAME|ID",
                     help="pin the explained class (a label, a unique prefix of one, or an id) instead of the top-1")
    run.add_argument("--topk", type=positive_int, default=3, help="how many classes to list (n/p step through them)")
    run.add_argument("--method", choices=list(METHODS), default=None,
                     help="map method (default: cam, or gradcam for a model whose head has no CAM): "
                          + "; ".join(f"{k}: {m.summary}" for k, m in METHODS.items()))
    run.add_argument("--box", action="store_true", help="draw the paper's localization box (b toggles it)")
    run.add_argument("--box-threshold", type=fraction, default=0.2,
                     help="box rule: keep the map above this fraction of its max, take the largest component")
    run.add_argument("--smooth", type=smooth_weight, default=0.0, metavar="ALPHA",
                     help="temporal smoothing: shown = ALPHA * previous + (1 - ALPHA) * new, for the map and the "
                          "probabilities (0 = off); the map's average restarts when the explained class or the "
                          "method changes")
    run.add_argument("--hysteresis", type=positive_int, default=3, metavar="N",
                     help="the explained top-1 changes only after another class led N frames in a row (1 = off); "
                          "meanwhile it is marked [held] and the list stays ranked by probability")
    run.add_argument("--scale", choices=SCALES, default="frame",
                     help="map colours: per-frame min-max, or a slowly decaying running max (no 'breathing')")
    run.add_argument("--colormap", choices=sorted(COLORMAPS), default="jet", help="OpenCV colormap")
    run.add_argument("--alpha", type=fraction, default=0.5,
                     help="heatmap weight in the blend: (1-alpha)*frame + alpha*heatmap (+/- change it live)")
    run.add_argument("--snapshot-dir", type=Path, default=Path("realtime-cam-snapshots"),
                     help="where s (snapshot: PNG + map .npy + JSON) and r (recording) write; with several "
                          "sources, into a folder per stream (00-NAME/, 01-NAME/, ...)")
    from .collection import add_collection_options

    add_collection_options(run)
    from .streams_cli import add_serve_parser, add_stream_options, stream_counts

    add_stream_options(run)

    bench = sub.add_parser(
        "bench", formatter_class=fmt,
        help="frames per second on CPU vs GPU: inference, loop, file to file, per stage, vs the seed approach",
        description="Measure, in one run, each model on each device that really runs it. Models after the first "
                    "are also compared with the first (top-1 agreement, map Pearson r).",
    )
    bench.add_argument("--model", type=Path, action="append", default=None,
                       help=f"contract file; repeat to compare (default: {default_model_path()})")
    bench.add_argument("--source", default=None,
                       help="video file to take frames from (default: a synthetic 640x360 clip)")
    bench.add_argument("--device", type=device_list, default="cpu,cuda",
                       help="comma-separated devices; one that cannot run is reported as skipped")
    bench.add_argument("--frames", type=positive_int, default=300, help="frames per measurement")
    bench.add_argument("--warmup", type=positive_int, default=20, help="untimed frames before each measurement")
    bench.add_argument("--batch", type=batch_count, default=DEFAULT_BATCH, metavar="N",
                       help="frames per inference call in the loop and file measurements (as `run` batches a "
                            "file); inference alone is measured frame by frame and at N")
    bench.add_argument("--json", type=Path, default=None, help="write the full report as JSON")
    bench.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG)")
    bench.add_argument("--no-seed", action="store_true", help="skip the PyTorch seed-approach baseline")
    bench.add_argument("--collection", default=None, metavar="DIR",
                       help="instead: files and frames per second over this collection (a folder, 'GLOB' or "
                            "LIST.txt) in-process, on Ray with 1 worker (holding every CPU, then one CPU) and with "
                            "--workers, and Ray's overhead per file")
    bench.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="--collection: the Ray workers of the many-worker run (default: one per CPU)")
    bench.add_argument("--streams", type=stream_counts, default=None, metavar="N,N,...",
                       help="instead: explain N live streams at once for each N (1,2,4,8): total frames per second "
                            "and each stream's capture-to-overlay latency")
    bench.add_argument("--grad-reference", default=None, metavar="ARCH",
                       help="also time pytorch-grad-cam's GradCAM loop on torchvision's ARCH (the network the "
                            "model was exported from; random weights: speed does not depend on them)")

    _add_evaluate_parser(sub)
    add_serve_parser(sub, run, fmt)

    export = sub.add_parser(
        "export", formatter_class=fmt,
        help="make a realtime-cam model file (torchvision backbone, or an existing ONNX classifier)",
        description="Write one self-contained .onnx file with outputs 'logits' and 'features' and the metadata "
                    "the runtime needs. torchvision's ResNets are exported without torch; other torchvision "
                    "backbones need the export extra (torch, torchvision).",
    )
    export.add_argument("--arch", default=DEFAULT_ARCH,
                        help=f"torchvision builder name (resnet18, densenet121, ...); {', '.join(TORCH_FREE_ARCHES)} "
                             "need no torch")
    export.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="DEFAULT or a torchvision weights name (downloaded to $TORCH_HOME/hub/checkpoints; "
                             "the sha256 in its name is checked, cached or not), a state-dict file (read without "
                             "running code in it; needs --output), or 'none' (random: tests only; needs --output)")
    export.add_argument("--output", type=Path, default=None,
                        help="where to write (default: the cache file `run` looks for, "
                             f"{default_model_path()}; for --from-onnx, the classifier's name there)")
    export.add_argument("--opset", type=int, choices=OPSETS, default=DEFAULT_OPSET, metavar="N",
                        help="ONNX opset for the torchvision export (13..21)")
    export.add_argument("--labels", default=None, help="class names, one per line (default: ImageNet-1k "
                                                       "for 1000 classes, else numbered)")
    export.add_argument("--from-onnx", type=Path, default=None, metavar="CLASSIFIER.onnx",
                        help="rewrite this ONNX classifier (GAP + linear head, float or quantized) instead")
    export.add_argument("--input-size", type=input_side, nargs=2, metavar=("H", "W"), default=None,
                        help="--from-onnx: input size when the model's is not fixed")
    export.add_argument("--mean", type=finite_float, nargs=3, default=None,
                        help="--from-onnx: per-channel mean on the 0..1 scale (default ImageNet's)")
    export.add_argument("--std", type=positive_float, nargs=3, default=None,
                        help="--from-onnx: per-channel std on the 0..1 scale (default ImageNet's)")
    export.add_argument("--bgr", action="store_true", help="--from-onnx: the model takes BGR channel order")
    export.add_argument("--features", default=None, metavar="TENSOR",
                        help="the tensor (--from-onnx) or layer (--arch, e.g. features[-2] or layer3: pytorch-grad-cam's "
                             "target layer) to explain (default: the map before a GAP + linear head, else the "
                             "family's target layer or the last spatial map); explained with gradients computed "
                             "inside the graph")
    precision = export.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true",
                           help="write a static int8 model for the CPU (QDQ, per-channel weights, head kept fp32); "
                                "needs --calibrate")
    precision.add_argument("--fp16", action="store_true",
                           help="write a float16 model for the CUDA provider (head and I/O kept fp32); "
                                "needs onnxconverter-common")
    export.add_argument("--calibrate", action="append", default=None, metavar="SOURCE",
                        help="--int8: video files, image files or folders whose frames calibrate the activation "
                             "ranges (repeatable); use frames like the ones you will run on")
    export.add_argument("--calibration-frames", type=positive_int, default=DEFAULT_CALIBRATION_FRAMES,
                        help="--int8: at most this many")
    export.add_argument("--calibration", choices=sorted(CALIBRATIONS), default=DEFAULT_CALIBRATION,
                        help="--int8: how activation ranges are chosen")
    export.add_argument("--check", action="append", default=None, metavar="SOURCE",
                        help="--int8/--fp16: frames NOT used for calibration on which to report top-1 agreement "
                             "and map correlation with the fp32 model (repeatable)")
    for subparser in sub.choices.values():
        add_debug_flag(subparser)
    return parser


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand's parser."""
    from .cams import METHODS
    from .evaluation.metrics import CROPS
    from .providers import DEVICES

    parser = subparsers.add_parser(
        "evaluate", formatter_class=HelpFormatter,
        help="classification and localization accuracy of the maps on images with ground-truth boxes",
        description=(
            "Score the maps against ground-truth boxes: top-1/top-k accuracy, GT-known, top-1 and top-k "
            "localization (the paper's box rule), MaxBoxAcc and MaxBoxAccV2 (wsolevaluation's), the pointing game, "
            "and a centre-box baseline. Each image is resized to the model's input size directly (no crop), so "
            "the boxes map linearly and the maps are scored on the original image; --crop center instead "
            "resizes so the input is 224/256 of the shorter side and centre-crops (ImageNet evaluation), and "
            "scores in crop coordinates with the boxes moved, clipped to the crop, and dropped when outside it."
        ),
    )
    parser.add_argument("--model", type=Path, default=None,
                        help=f"realtime-cam model file (default: {default_model_path()})")
    parser.add_argument("--images", type=Path, required=True, metavar="DIR",
                        help="folder the annotations' file names are relative to (or a 'GLOB' or LIST.txt of "
                             "images, named by their path relative to it)")
    parser.add_argument("--boxes", type=Path, required=True, metavar="FILE",
                        help="CSV with a header naming file,class_id,x0,y0,x1,y1 (any case, extra columns "
                             "allowed; 0-based pixel indices, x1/y1 included; optional width,height are "
                             "checked), or a folder of PASCAL VOC / ImageNet XML files (1-based, <name> a class "
                             "id, one of the model's labels, or a WordNet id with --wnids). An image with several "
                             "classes is scored once per class")
    parser.add_argument("--method", choices=sorted(METHODS), default="cam", help="map method")
    parser.add_argument("--box-threshold", type=fraction, default=0.2, metavar="T",
                        help="the paper's box rule: keep pixels >= T times the maximum of the min-max normalised "
                             "map (i.e. T of the way from its minimum to its maximum), box of the largest "
                             "connected component; 0.2 is the paper's 20%%. MaxBoxAcc ignores it: it sweeps "
                             "0.00..0.99")
    parser.add_argument("--topk", type=positive_int, default=5, metavar="K",
                        help="k of the top-k accuracy and localization (JSON keys top{K}, top{K}_loc)")
    parser.add_argument("--crop", choices=CROPS, default="none",
                        help="none: resize the whole image to the input; center: ImageNet resize + centre crop")
    parser.add_argument("--pointing-tolerance", type=non_negative_float, default=0.0, metavar="PX",
                        help="pointing game: a peak within PX pixels of a box also hits (15 is common)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="write the metrics, the settings and per-image rows as JSON")
    parser.add_argument("--save-dir", type=Path, default=None, metavar="DIR",
                        help="write one overlay per image: the map, ground truth (green), the box (red)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs")
    parser.add_argument("--wnids", type=Path, default=None, metavar="FILE",
                        help="XML whose <name> is a WordNet id (ImageNet): the ids in class order, one per line "
                             "(ImageNet's LOC_synset_mapping.txt)")
    parser.add_argument("--max-images", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N annotated images")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="score the images on Ray with N workers (needs the ray extra; the numbers equal the "
                             "in-process run's)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="score the images on this Ray cluster (implies Ray)")
    return parser


# ----------------------------------------------------------------------------- commands
def _export_missing_default(path: Path) -> None:
    """``run`` without --model and no cached model: export torchvision's ResNet18 (no torch needed)."""
    from .export.build import export_default_model

    export_default_model(path, log=log.info)


def run_model_path(given: Path | None) -> Path:
    """``--model``, or the default model (exported the first time it is needed)."""
    if given is not None:
        return given
    path = default_model_path()
    if not path.exists():
        _export_missing_default(path)
    return path


def run_method(model, asked: str | None) -> str:
    """The map method ``run`` uses: the one asked for, else the model's first (cam where its head has one, else
    gradcam); one line when the model cannot give it."""
    method = asked or model.methods[0]
    if method not in model.methods:
        raise CamError(f"--method {method}: this model cannot give it (its head is not global average "
                       f"pooling + one linear layer); it offers {', '.join(model.methods)}")
    return method


def load_run_model(args: argparse.Namespace):
    """The model of ``run`` and ``serve``, the method and the pinned class (or None), said as they are chosen."""
    from .model import CamModel

    model_path = run_model_path(args.model)
    model = CamModel(model_path, device=args.device)
    method = run_method(model, args.method)
    class_id = model.class_id_for(args.class_name) if args.class_name is not None else None
    log.info("model %s (%d classes) on %s", model_path, model.num_classes, model.provider)
    if class_id is not None:  # a prefix or an id may name another class than the user thinks
        typed, label = args.class_name.strip(), model.labels[class_id]
        how = "" if typed.lower() in (label.lower(), str(class_id)) else f" (the one label that starts with {typed!r})"
        log.info("--class %s: explaining class %d, %r, on every frame%s", typed, class_id, label, how)
    if model.info.random_weights:
        log.warning("random weights: this model's maps mean nothing")
    return model, method, class_id


def cmd_run(args: argparse.Namespace) -> int:
    from .collection import is_collection, run_collection
    from .encoders import VideoSettings, check_codec
    from .overlay import COLORMAPS
    from .pipeline import RunOptions, hold_window, run_loop
    from .progress import Progress
    from .providers import CUDA
    from .sinks import FILE_SINKS, WindowSink, check_output_path, open_file_sink
    from .sources import check_source, open_source
    from .streams_cli import cmd_run_streams, stream_specs
    from .temporal import TemporalOptions
    from .view import ViewState

    if args.codec is not None:
        check_codec(args.codec)
    specs = stream_specs(args.source)
    if specs is not None:  # several live streams in one batched session
        return cmd_run_streams(args, specs)
    args.source = (args.source or ["0"])[0]
    if is_collection(args.source):  # a folder, a glob or a list of files: every frame of each, to a folder
        return run_collection(args)
    check_source(args.source)  # a typo is reported before a model is loaded (or exported the first time)
    if args.output is not None:  # refuse an unwritable output before any work is done
        check_output_path(args.output, FILE_SINKS, inputs=(args.source, args.model))
    if args.no_display and args.output is None:
        log.info("--no-display without --output: frames are processed and dropped (a dry run)")
    model, method, class_id = load_run_model(args)

    sinks: list = []
    try:
        with open_source(args.source, reconnect=args.reconnect) as source, contextlib.ExitStack() as outputs:
            # Every output is a context manager: on Ctrl-C or an error each video is finalised and renamed.
            if args.output is not None:
                settings = VideoSettings(codec=args.codec, crf=args.crf, hardware=model.provider == CUDA,
                                         audio_from=args.source if source.kind == "video" and not source.live
                                         and Path(args.source).is_file() else None)
                sinks.append(outputs.enter_context(
                    open_file_sink(args.output, source.fps, source.size_wh, source.kind, source.live, settings)))
            window = None if args.no_display else outputs.enter_context(WindowSink(f"realtime-cam: {args.source}"))
            options = RunOptions(
                view=ViewState(method=method, pinned_class=class_id, topk=args.topk, show_box=args.box,
                               alpha=args.alpha, paused=window is not None and source.kind == "image"),
                temporal=TemporalOptions(smooth=args.smooth, hysteresis=args.hysteresis, scale=args.scale),
                colormap=COLORMAPS[args.colormap], box_threshold=args.box_threshold, max_frames=args.max_frames,
                show_fps=window is not None and source.kind != "image", snapshot_dir=args.snapshot_dir,
                record_fps=source.fps or 30.0, pace_fps=source.fps if source.kind == "video" else 0.0,
                live_source=source.live, batch=args.batch,
            )
            progress = None
            if not source.live and source.kind != "image":
                progress = Progress(source.frame_count, estimate=not source.frame_count_exact,
                                    recount=lambda: source.frame_count if source.frame_count_exact else None)
            result = run_loop(model, source, sinks=sinks, window=window, options=options, progress=progress)
            if window is not None and source.kind == "image" and result.stopped_by == "end":
                hold_window(window)
    except KeyboardInterrupt:
        _report_interrupted(sinks)
        raise
    if result.last is not None:
        rate = f"{result.frames} frames at {result.fps:.1f} FPS" if result.frames > 1 else "1 frame"
        log.info("%s; last: %s %.1f%%", rate, result.last.label, 100 * result.last.probability)
    if result.flicker is not None:
        log.info("map flicker (mean |change| of the shown map between frames): %.4f", result.flicker)
    for path in result.snapshots:
        log.info("saved %s", path)
    for sink in sinks:
        if sink.complete:
            log.info("wrote %s (%d frame%s)", sink.path, sink.frames_written, "" if sink.frames_written == 1 else "s")
        else:
            log.info("%s was not written: no frame was explained", sink.path)
    return EXIT_OK


def _report_interrupted(sinks: Sequence) -> None:
    """After Ctrl-C or SIGTERM, once the outputs are closed: what each one holds."""
    for sink in sinks:
        if sink.complete:
            log.info("%s is finalised with %d frames: every frame explained before the interrupt (later ones "
                     "were not)", sink.path, sink.frames_written)
        elif not sink.frames_written:
            log.info("%s was not written: no frame was explained before the interrupt", sink.path)


def cmd_export(args: argparse.Namespace) -> int:
    from .export.build import export_model

    export_model(
        args.output, arch=args.arch, weights=args.weights, opset=args.opset, from_onnx=args.from_onnx,
        labels=args.labels, input_size_hw=args.input_size, mean=args.mean, std=args.std, bgr=args.bgr,
        features=args.features, int8=args.int8, fp16=args.fp16, calibrate=args.calibrate, calibration_frames=args.calibration_frames,
        calibration=args.calibration, check=args.check, log=log.info,
    )
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.streams is not None:
        from .streams_bench import cmd_bench_streams

        return cmd_bench_streams(args)
    from .bench import BenchConfig, format_table, plot_report, run_bench
    from .sinks import check_output_path, write_json

    if args.collection is not None:
        from .collection.bench import cmd_bench_collection

        return cmd_bench_collection(args, log=log.info)

    for path, kinds in ((args.json, {".json"}), (args.plot, {".png"})):
        if path is not None:
            check_output_path(path, kinds)
    models = tuple(args.model) if args.model else (default_model_path(),)
    for path in models:
        if not path.exists():
            raise CamError(f"model file not found: {path} (make one with `realtime-cam export`)")
    if args.grad_reference:
        from .grad_bench import check_reference
        check_reference(args.grad_reference)
    config = BenchConfig(models=models, source=args.source, devices=args.device, frames=args.frames,
                         warmup=args.warmup, seed_baseline=not args.no_seed, batch=args.batch,
                         grad_reference=args.grad_reference)
    report = run_bench(config, log=log.info)
    print(format_table(report))
    if args.json is not None:
        write_json(report, args.json)
        log.info("wrote %s", args.json)
    if args.plot is not None:
        plot_report(report, args.plot)
        log.info("wrote %s", args.plot)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``realtime-cam evaluate``; returns the exit code (errors are raised as CamError)."""
    from .evaluation.run import EvaluateConfig, format_table, report_dict, run_evaluate
    from .progress import Progress
    from .sinks import check_output_path, write_json

    if args.json is not None:
        check_output_path(args.json, {".json"})
    model_path = args.model if args.model is not None else default_model_path()
    if not Path(model_path).exists():
        raise CamError(f"model file not found: {model_path} (make one with `realtime-cam export`)")
    config = EvaluateConfig(
        model=Path(model_path), images=args.images, boxes=args.boxes, method=args.method,
        box_threshold=args.box_threshold, topk=args.topk, crop=args.crop,
        pointing_tolerance=args.pointing_tolerance, device=args.device, save_dir=args.save_dir,
        max_images=args.max_images, wnids=args.wnids,
    )
    runner = None
    if args.workers is not None or args.ray_address is not None:  # the same per-image work, on Ray
        from .collection.evaluate import ray_runner
        from .collection.on_ray import ray_available

        if not ray_available():
            raise CamError("--workers and --ray-address need Ray, which is not installed: "
                           "pip install 'realtime-cam[ray]'")
        runner = ray_runner(args.workers, args.ray_address)
    report = run_evaluate(config, progress=lambda total: Progress(total, label="images"), runner=runner)
    print(format_table(report))
    partial = " (partial: interrupted)" if report.interrupted is not None else ""
    if args.json is not None:
        write_json(report_dict(report), args.json)
        log.info("wrote %s%s", args.json, partial)
    if args.save_dir is not None:
        log.info("wrote %d overlays to %s%s", len(report.results), args.save_dir, partial)
    if report.interrupted is not None:
        raise report.interrupted
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .streams_cli import cmd_serve as serve

    return serve(args)


COMMANDS = {"run": cmd_run, "export": cmd_export, "bench": cmd_bench, "evaluate": cmd_evaluate, "serve": cmd_serve}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (so redirection and test capture work)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _configure_logging() -> None:
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("realtime-cam: %(message)s"))
        log.addHandler(handler)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``realtime-cam`` and ``python -m realtime_cam``; returns the exit code.

    SIGTERM is handled like Ctrl-C from the first line on, and both end in one line (never a traceback),
    also while the parser's registries and the command's modules are being imported.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    debug = False
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv
        if not argv:  # a first try with no command: what the commands are
            parser.print_help()
            return EXIT_ERROR
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, whose help lists the options that do exist
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        debug = args.debug
        _configure_logging()
        if not debug:  # FFmpeg's own error lines ("moov atom not found") beside ours; read when FFmpeg first runs
            os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "0")
        else:  # PyAV keeps FFmpeg's log off unless asked
            import av

            av.logging.set_level(av.logging.WARNING)
        from . import sources

        sources.QUIET_OPENCV_ON_OPEN = not args.debug
        return COMMANDS[args.command](args)
    except CamError as exc:
        if debug:
            raise
        print(f"realtime-cam: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        if debug:
            raise
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"\nrealtime-cam: {what}", file=sys.stderr)
        return EXIT_INTERRUPTED if not isinstance(exc, Terminated) else 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        if "sources" in locals():
            sources.QUIET_OPENCV_ON_OPEN = True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
