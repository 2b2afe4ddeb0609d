"""``evaluate`` over a collection: the annotations' images found in a glob or a list, and the per-image work on
Ray (one task per image, an actor pool holding one model each) with exactly the results of the in-process run:
each worker runs the same per-row code (``evaluation.run._score_row``) and the rows come back in order.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path, PurePosixPath

from ..errors import CamError
from .discover import discover


def collection_resolver(images: Path) -> Callable:
    """For a glob or a list: the image file an annotation names, by its path relative to the collection
    (with or without its extension, as ImageNet's XML names it)."""
    items = discover(str(images))
    by_rel: dict[str, str] = {}
    for item in items:
        if item.kind == "image":
            by_rel.setdefault(item.rel, item.path)
            by_rel.setdefault(str(PurePosixPath(item.rel).with_suffix("")), item.path)

    def resolve(gt) -> Path:
        key = str(PurePosixPath(Path(gt.file).as_posix()))
        if key in by_rel:
            return Path(by_rel[key])
        raise CamError(f"image not found in {images}: {gt.file} (named in {gt.where})")

    return resolve


class _EvalWorker:
    """A Ray Data actor: one model; each call scores every row of one image."""

    config: dict = {}  # set on the subclass ray_runner makes
    threads: int | None = None

    def __init__(self) -> None:
        from ..evaluation.run import EvaluateConfig
        from ..model import CamModel

        config = dict(self.config)
        for key in ("model", "images", "boxes", "save_dir", "wnids"):
            config[key] = Path(config[key]) if config[key] is not None else None
        self._config = EvaluateConfig(**config)
        self._model, self._error = None, None
        try:  # an actor whose constructor fails is restarted by Ray without end: report it per image instead
            self._model = CamModel(self._config.model, self._config.device, self.threads)
        except CamError as exc:
            self._error = str(exc)

    def __call__(self, batch: dict) -> dict:
        if self._model is None:
            return {"out": [pickle.dumps([(-1, "error", self._error)]) for _ in batch["task"]]}
        return {"out": [pickle.dumps(score_image(self._model, self._config, *pickle.loads(task)))
                        for task in batch["task"]]}


def score_image(model, config, path: Path, rows: Sequence[tuple[int, object, Path | None]]) -> list[tuple]:
    """Every row of one image, as the in-process run scores it: (row index, "ok", result),
    (row index, "left", why) or (row index, "error", message)."""
    import cv2

    from ..evaluation.run import _ModelView, _score_row, draw_result
    from ..sinks import write_image

    out: list[tuple] = []
    try:
        view = _ModelView.of(path, model, config)
        for index, gt, overlay in rows:
            scored = _score_row(model, config, gt, path, view)
            if isinstance(scored, str):
                out.append((index, "left", scored))
                continue
            frame, prediction, result = scored
            if overlay is not None:
                write_image(overlay, draw_result(frame, prediction.cam, result, model.labels, config.box_threshold),
                            (cv2.IMWRITE_JPEG_QUALITY, 90))
            out.append((index, "ok", result))
    except CamError as exc:
        out.append((-1, "error", str(exc)))
    return out


def ray_runner(workers: int | None = None, ray_address: str | None = None) -> Callable:
    """A ``runner`` for ``run_evaluate``: the per-image work on Ray (started here, or joined at the address)."""

    def run(model, config, truths, paths, bar, on_image):
        import time

        import ray.data

        from ..evaluation.run import unique_overlay_path
        from .on_ray import _largest_node_cpus, ray_session, worker_error, worker_plan

        # The overlays' names, given out in row order as the in-process run does.
        used: set[Path] = set()
        inputs = {p.resolve() for p in paths}
        tasks: dict[Path, list] = {}
        for index, (gt, path) in enumerate(zip(truths, paths)):
            overlay = unique_overlay_path(config.save_dir, gt, used, inputs) if config.save_dir is not None else None
            tasks.setdefault(path, []).append((index, gt, overlay))
        outcomes: dict[int, tuple] = {}
        start = time.perf_counter()
        with ray_session(ray_address):
            import logging

            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            total = ray.cluster_resources().get("CPU", 1.0)
            actors, cpus, threads = worker_plan(total, workers, len(tasks), _largest_node_cpus(ray, False))
            config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
            worker = type("EvaluateWorker", (_EvalWorker,), {"config": config_dict, "threads": threads})
            ds = ray.data.from_items([{"task": pickle.dumps((path, rows))} for path, rows in tasks.items()],
                                     override_num_blocks=len(tasks))
            ds = ds.map_batches(worker, batch_size=1, num_cpus=cpus,
                                compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1))
            interrupted: BaseException | None = None
            try:
                for row in ds.iter_rows():
                    for index, status, value in pickle.loads(row["out"]):
                        if status == "error":
                            raise CamError(value)
                        outcomes[index] = (status, value)
                    if bar is not None and len(outcomes) < len(truths):
                        elapsed = time.perf_counter() - start
                        bar.update(len(outcomes), len(outcomes) / elapsed if elapsed > 0 else 0.0)
            except CamError:
                raise
            except KeyboardInterrupt as exc:  # as in-process: the rows scored so far are reported, marked partial
                if not any(status == "ok" for status, _ in outcomes.values()):
                    raise
                interrupted = exc
            except Exception as exc:  # a bug in a worker, a node lost for good
                raise CamError(f"a Ray worker failed: {worker_error(exc)}") from None
        results, left_out = [], {"outside crop": [], "outside image": []}
        for index, gt in enumerate(truths):
            if index not in outcomes:  # not scored before Ctrl-C
                continue
            status, value = outcomes[index]
            if status == "left":
                left_out[value].append((gt.file, gt.class_id))
            else:
                results.append(value)
                if on_image is not None:
                    on_image(value)
        return results, left_out, interrupted

    return run
