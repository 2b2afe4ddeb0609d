"""``realtime-cam evaluate``: its parser and the command, which runs :func:`run.run_evaluate` and writes the
table, the JSON and the overlays' log line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import CamError
from ..paths import default_model_path
from ..progress import Progress
from ..sinks import check_output_path, write_json
from .run import EvaluateConfig, format_table, report_dict, run_evaluate

log = logging.getLogger("realtime_cam")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to a subparsers object; returns its parser."""
    # Imported here, absolute, so that this function can move as one block to wherever the parsers live.
    from realtime_cam.cams import METHODS
    from realtime_cam.cliutil import HelpFormatter, fraction, non_negative_float, positive_int
    from realtime_cam.evaluation.run import CROPS
    from realtime_cam.model import DEVICES
    from realtime_cam.paths import default_model_path

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
                        help="folder the annotations' file names are relative to")
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
    return parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``realtime-cam evaluate``; returns the exit code (errors are raised as CamError)."""
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
    report = run_evaluate(config, progress=lambda total: Progress(total, label="images"))
    print(format_table(report))
    if args.json is not None:
        write_json(report_dict(report), args.json)
        log.info("wrote %s", args.json)
    if args.save_dir is not None:
        log.info("wrote %d overlays to %s", len(report.results), args.save_dir)
    return 0
