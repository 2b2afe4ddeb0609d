"""The commands for several live streams: ``run`` with two or more sources (a mosaic window, a folder of
recordings), and ``serve`` (the streams in a browser). Heavy imports stay inside the functions."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .errors import CamError, SinkError

log = logging.getLogger("realtime_cam")

# The options of `run` that `serve` takes as they are (their help included).
SERVE_FROM_RUN = ("model", "source", "reconnect", "device", "class_name", "topk", "method", "box", "box_threshold",
                  "smooth", "hysteresis", "scale", "colormap", "alpha", "batch_timeout_ms", "loop")
MOSAIC_REFRESH_S = 0.04


def add_stream_options(parser: argparse.ArgumentParser) -> None:
    """Options of `run` that only several sources use."""
    from .streams import DEFAULT_BATCH_TIMEOUT_MS

    parser.add_argument("--batch-timeout-ms", type=_non_negative_ms, default=DEFAULT_BATCH_TIMEOUT_MS, metavar="MS",
                        help="several sources: once one stream has a frame, wait at most this long for the others "
                             "before the batch is explained (a slow or dead stream never stalls the rest)")
    parser.add_argument("--loop", action="store_true",
                        help="several sources: a video file plays again from the start when it ends")


def add_serve_parser(sub: argparse._SubParsersAction, run: argparse.ArgumentParser, fmt: type) -> None:
    """The ``serve`` subcommand: run's options that make sense for it, and where to listen."""
    serve = sub.add_parser(
        "serve", formatter_class=fmt,
        help="explain one or more live streams and show them in a web browser (MJPEG, JSON, controls)",
        description="Explain every --source in one process, their frames batched together, and serve a page that shows each one live, "
                    "with controls per stream (pin a class, method, box, alpha, pause, snapshot), and a JSON "
                    "endpoint (/api/streams) with each stream's current prediction. Video files play at their own "
                    "frame rate. Ctrl-C stops it.",
    )
    for action in run._actions:
        if action.dest in SERVE_FROM_RUN:
            serve._add_action(action)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; anything but loopback requires a token (--token, or one is "
                            "made up and printed)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free one)")
    serve.add_argument("--token", default=None,
                       help="every request must carry it (?token=..., an X-Token header, or the page's cookie); "
                            "without it a request is refused (403)")


def _non_negative_ms(text: str) -> float:
    from .cliutil import non_negative_float

    return non_negative_float(text)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {port}")
    return port


def stream_counts(text: str) -> tuple[int, ...]:
    """``bench --streams 1,2,4,8``: stream counts, each 1..64."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of stream counts: {text!r} (e.g. 1,2,4,8)") from None
    if not counts or any(not 1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(f"stream counts are 1..64: {text!r}")
    return counts


def stream_specs(given: Sequence[str] | None, files_too: bool = False) -> list[str] | None:
    """The sources of a multi-stream run, or None for a single-source run: two or more --source, or one
    ``.txt`` file listing sources. For ``run``, a list of files only is a collection (every frame of each file,
    see ``collection``), not streams: None; ``serve`` (``files_too``) plays them live."""
    from .streams import is_live_spec, read_source_list

    specs = list(given or ["0"])
    if len(specs) > 1:
        return specs
    path = Path(specs[0])
    if path.suffix.lower() == ".txt" and path.is_file():
        listed = read_source_list(path)
        if files_too or any(is_live_spec(spec) for spec in listed):
            return listed
    return None


def _load_model(args: argparse.Namespace):
    """The model, the view every stream starts with, and the run options (as `run` builds them)."""
    from .cli import load_run_model
    from .overlay import COLORMAPS
    from .pipeline import RunOptions
    from .temporal import TemporalOptions
    from .view import ViewState

    model, method, class_id = load_run_model(args)
    options = RunOptions(
        view=ViewState(method=method, pinned_class=class_id, topk=args.topk, show_box=args.box, alpha=args.alpha),
        temporal=TemporalOptions(smooth=args.smooth, hysteresis=args.hysteresis, scale=args.scale),
        colormap=COLORMAPS[args.colormap], box_threshold=args.box_threshold,
        max_frames=getattr(args, "max_frames", None), live_source=True,
    )
    return model, options


def _open_sources(specs: Sequence[str], args: argparse.Namespace, stack: contextlib.ExitStack) -> list:
    from .streams import open_live

    return [stack.enter_context(open_live(spec, reconnect=args.reconnect, loop=args.loop)) for spec in specs]


def recording_paths(folder: Path, names: Sequence[str]) -> list[Path]:
    """One .mp4 per stream in ``folder``, named after the stream (``00-car.mp4``)."""
    paths = []
    for i, name in enumerate(names):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem if "." in name else name).strip("_") or "stream"
        paths.append(folder / f"{i:02d}-{stem}.mp4")
    return paths


def _check_output_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise SinkError(f"--output with several sources is a folder (one recording per stream); {folder} is a file")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise SinkError(f"output folder's parent does not exist: {folder.parent}")
        folder.mkdir()


def _report(multi, stopped: str) -> None:
    result = multi.result(stopped)
    for name, s in result.streams.items():
        latency = s["latency_ms"]
        lat = f", capture to overlay {latency['median_ms']:.0f} ms (p95 {latency['p95_ms']:.0f})" if latency else ""
        log.info("%s: %d frames at %.1f FPS%s%s", name, s["frames"], s["fps"], lat,
                 f"; ended: {s['error']}" if s["error"] else "")
    sizes = result.batch_sizes
    if sizes:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(sizes).items()))
        log.info("%d inference calls, %.2f streams each on average (streams per call: calls = %s)",
                 len(sizes), sum(sizes) / len(sizes), hist)


def cmd_run_streams(args: argparse.Namespace, specs: Sequence[str]) -> int:
    """``run`` with several sources: one batched session, a mosaic window, a folder of recordings."""
    from .sources import check_source
    from .streams import stream_name

    for spec in specs:
        check_source(spec)
    if args.output is not None:
        _check_output_folder(args.output)
    model, options = _load_model(args)
    names: list[str] = []
    for spec in specs:
        names.append(stream_name(spec, names))
    sinks_by_stream: list[list] = []
    try:
        multi, stopped = _run_streams(args, specs, names, model, options, sinks_by_stream)
    except KeyboardInterrupt:  # every recording is finalised by now: say what each holds
        from .cli import _report_interrupted

        _report_interrupted([sink for sinks in sinks_by_stream for sink in sinks])
        raise
    if multi.error is not None:
        raise CamError(f"inference failed: {multi.error}")
    _report(multi, stopped)
    for sinks in sinks_by_stream:
        for sink in sinks:
            if sink.complete:
                log.info("wrote %s (%d frames)", sink.path, sink.frames_written)
            else:
                log.info("%s was not written: no frame was explained", sink.path)
    return 0


def _run_streams(args: argparse.Namespace, specs: Sequence[str], names: Sequence[str], model, options,
                 sinks_by_stream: list[list]):
    """The multi-stream run itself, until every stream ends or the window is quit; returns the loop and how it
    stopped. The recordings are closed (finalised) when it returns or raises."""
    from dataclasses import replace

    from .sinks import SnapshotSink, WindowSink, check_not_an_input, open_file_sink
    from .streams import MultiStream
    from .view import MOSAIC_KEY_HELP

    stopped = "end"
    with contextlib.ExitStack() as stack:
        sources = _open_sources(specs, args, stack)
        if args.output is not None:
            for path, source, spec in zip(recording_paths(args.output, names), sources, specs):
                check_not_an_input(path, [spec])
                sinks_by_stream.append([stack.enter_context(
                    open_file_sink(path, source.fps or 25.0, source.size_wh, source.kind, True))])
        window = None if args.no_display else stack.enter_context(WindowSink(f"realtime-cam: {len(specs)} streams"))
        snapshots: list[SnapshotSink] = []
        if window is not None:  # s and r of each stream, each into a folder of its own
            options = replace(options, key_help=tuple(MOSAIC_KEY_HELP.items()))
            snapshots = [stack.enter_context(SnapshotSink(path.with_suffix(""), source.fps or 30.0,
                                                          real_time=options.live_source))
                         for path, source in zip(recording_paths(args.snapshot_dir, names), sources)]
        outputs = [[*(sinks_by_stream[i] if sinks_by_stream else ()), *snapshots[i:i + 1]] for i in range(len(sources))]
        multi = stack.enter_context(MultiStream(model, sources, names, options, outputs,
                                                args.batch_timeout_ms / 1000.0))
        log.info("%d streams, %s%s", len(sources), multi.describe(),
                 "" if window is None else "; in the window 1-9 or Tab select a stream, the single view's keys act "
                 "on it (h lists them), q or Esc quits")
        try:
            if window is not None:
                stopped = _serve_mosaic(window, multi, snapshots)
            else:
                while not multi.wait(0.2):
                    pass
        finally:
            multi.close()  # before the recordings close: no frame is written into a closed file
    for path in (path for sink in snapshots for path in sink.written):  # complete now: every sink is closed
        log.info("saved %s", path)
    return multi, stopped


def _serve_mosaic(window, multi, snapshots: Sequence) -> str:
    """Show the mosaic and act on its keys until a key or the window stops the run ("quit", "window-closed"),
    or every stream ends ("end"). Keys other than the selection's act on the selected stream's view through
    ``Stream.set_view``, the path the web page's controls take."""
    from .mosaic import Tile, mosaic
    from .view import QUIT, RECORD, SNAPSHOT, mosaic_key

    selected = 0
    while not multi.done:
        tiles = [Tile(s.shown.overlay if s.shown else None, s.name, s.rate.shown, s.slot.ended, s.slot.error)
                 for s in multi.streams]
        window.write(mosaic(tiles, selected=selected))
        stream = multi.streams[selected]
        shown = stream.shown
        selected, changes, action = mosaic_key([s.view for s in multi.streams], selected, window.last_key,
                                               shown.prediction.class_id if shown else None, multi.model.methods)
        if changes:
            stream.set_view(**changes)
        if action == QUIT:
            return "quit"
        if action == SNAPSHOT and shown is not None:
            snapshots[stream.id].snapshot(shown.overlay, shown.frame, shown.prediction, shown.box_xyxy)
        elif action == RECORD and shown is not None:
            snapshots[stream.id].toggle_recording(shown.frame)
        if window.closed:
            return "window-closed"
        time.sleep(MOSAIC_REFRESH_S)
    return "end"


def cmd_serve(args: argparse.Namespace) -> int:
    """``realtime-cam serve``: the streams on a web page until Ctrl-C or SIGTERM."""
    from .sources import check_source
    from .streams import MultiStream, stream_name
    from .web.server import StreamServer, resolve_token

    specs = stream_specs(args.source, files_too=True) or list(args.source or ["0"])
    for spec in specs:
        check_source(spec)
    token, generated = resolve_token(args.host, args.token)
    model, options = _load_model(args)
    names: list[str] = []
    for spec in specs:
        names.append(stream_name(spec, names))
    with contextlib.ExitStack() as stack:
        sources = _open_sources(specs, args, stack)
        multi = stack.enter_context(MultiStream(model, sources, names, options,
                                                batch_timeout_s=args.batch_timeout_ms / 1000.0))
        server = stack.enter_context(StreamServer(multi, args.host, args.port, token))
        if generated:
            log.info("listening on %s, not loopback: every request needs this token: %s", args.host, token)
        log.info("serving %d stream%s, %s; open %s (Ctrl-C stops)", len(sources), "s" * (len(sources) > 1),
                 multi.describe(), server.url)
        print(server.url, flush=True)
        said_done = False
        while True:
            if multi.wait(0.5) and not said_done:
                said_done = True
                log.info("every stream has ended; the page stays up until Ctrl-C")
