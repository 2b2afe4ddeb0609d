"""CamModel: an ONNX Runtime session over a contract file, its head, labels and preprocessing.

Explaining the outputs is ``explain.py``'s job; this module runs the network."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .cams import METHODS
from .contract import FEATURES, GRADS, GRADS_CLASS, LOGITS, TARGET_CLASS, read_contract
from .errors import DeviceError, ModelError
from .explain import Request, explain
from .labels import class_id_for
from .preprocess import Preprocessor, as_bgr
from .providers import CPU, CUDA, providers_for
from .types import Prediction

log = logging.getLogger("realtime_cam")

def _session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:  # several sessions sharing a machine (a collection's workers): a share of the cores each
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The head copy is an initializer no node reads; ORT would warn about it on every load.
    options.log_severity_level = 3
    # Idle inference threads sleep instead of spinning, so decode/render/encode threads get the CPU between
    # frames. Measured with `bench` on 2 cores: inference alone ~2% slower, file to file ~5% faster; on a
    # 16-core host, spinning threads starved the encoder (p95 30 ms per frame).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with a one-line error for every way that can fail."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelError(f"model path is a directory, not an .onnx file: {p}")
    if not p.is_file():  # a FIFO would block in open() until something writes to it
        raise ModelError(f"model path is not a regular file (a pipe or a device?): {p}")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError... for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {p} as an ONNX model ({reason})") from None


@dataclass(frozen=True, eq=False)
class Outputs:
    """What one run gives for a batch (or, from :meth:`row`, for one frame of it).

    Attributes:
        logits: [N, K].
        features: [N, C, h, w], the explained layer.
        grads: [N, C, h, w], d logits[n, grads_class[n]] / d features[n], from a model file with a gradient
            output whose head needs it (not GAP + linear); else None.
        grads_class: [N], the class each row of ``grads`` is for; None without ``grads``.
    """

    logits: np.ndarray
    features: np.ndarray
    grads: np.ndarray | None = None
    grads_class: np.ndarray | None = None

    def row(self, i: int) -> Outputs:
        if self.grads is None:
            return Outputs(self.logits[i], self.features[i])
        return Outputs(self.logits[i], self.features[i], self.grads[i], self.grads_class[i])


class CamModel:
    """A classifier that also says where it looked.

    Args:
        path: a realtime-cam contract file (see ``realtime_cam.contract``).
        device: "auto" (CUDA when it really runs, else CPU), "cpu", or "cuda" (an error if it cannot run).
        threads: ONNX Runtime's intra-op threads (None: its default, one per physical core).

    Attributes:
        info: labels, input size and normalisation from the file's metadata.
        provider: the ONNX Runtime execution provider that actually runs the model.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
        self.path = Path(path)
        self.device = device
        proto = load_model_proto(self.path)
        self.info, self.head_weight, self.head_bias = read_contract(proto)
        providers = providers_for(device)
        # The session is built from the model in memory, external data included (onnx.load read it in): given
        # the path, ONNX Runtime maps external data files, and one overwritten during a run kills the process
        # (SIGBUS).
        try:
            model_bytes = proto.SerializeToString()
        except ValueError:  # protobuf's 2 GB limit
            raise ModelError(f"{self.path} is over 2 GB with its external data; realtime-cam loads a model into "
                             "memory whole, which protobuf limits to 2 GB") from None
        del proto
        try:
            self._session = ort.InferenceSession(model_bytes, sess_options=_session_options(threads), providers=providers)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"ONNX Runtime cannot load {self.path} ({reason})") from None
        started = self._session.get_providers()
        self.provider = started[0]
        if CUDA in providers and CUDA not in started:
            if device == "cuda":
                raise DeviceError(
                    "--device cuda: the CUDA provider is installed but did not start (check the CUDA and "
                    "cuDNN libraries onnxruntime-gpu needs); use --device cpu"
                )
            log.warning("CUDA provider is installed but did not start; running on CPU")
        self._input_name = self._session.get_inputs()[0].name
        outputs = {o.name for o in self._session.get_outputs()}
        inputs = {i.name for i in (*self._session.get_inputs(), *self._session.get_overridable_initializers())}
        # A GAP + linear head has its gradients in closed form (cams.head_gradients): the graph's are fetched
        # only for other heads.
        self._fetch_grads = self.head_weight is None and {GRADS, GRADS_CLASS} <= outputs
        self._takes_target = TARGET_CLASS in inputs
        self._check_shapes()
        self._batch_runs: dict[int, bool] = {}  # batch size -> the model runs it (see batch_size)
        self._preprocess = Preprocessor(
            self.info.input_size_hw, self.info.mean, self.info.std, self.info.channel_order
        )

    def copy(self, threads: int | None = None) -> CamModel:
        """The same model file in a session of its own, on the provider this one runs on, with ``threads``
        intra-op threads: for another thread to run side by side with this one (each on its share of the
        cores, without sharing a session's thread pool or the preprocessing buffer)."""
        return CamModel(self.path, device="cpu" if self.provider == CPU else self.device, threads=threads)

    def _check_shapes(self) -> None:
        """Run once on a blank input and check what comes out (declared shapes can be missing or wrong)."""
        h, w = self.info.input_size_hw
        blank = np.zeros((1, 3, h, w), np.float32)
        try:
            logits, features = self._session.run([LOGITS, FEATURES], {self._input_name: blank})
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{self.path} does not run on a {h}x{w} input ({reason[:200]})") from None
        if features.ndim != 4:
            raise ModelError(f"'features' must be [N, C, h, w]; the model gives {list(features.shape)}")
        k = self.num_classes
        if self.head_weight is not None:
            k, c = self.head_weight.shape
            if features.shape[1] != c:
                raise ModelError(f"'features' has {features.shape[1]} channels but the head expects {c}")
        if logits.shape != (1, k):
            raise ModelError(f"'logits' must be [N, {k}] for this head; the model gives {list(logits.shape)}")

    def batch_size(self, wanted: int) -> int:
        """``wanted`` frames per forward when the model takes that many at once, else 1.

        A fixed batch dimension is 1 (a single frame ran at load). A dynamic one is tried once per size, on
        zeros, the first time that size is asked for, which also readies the runtime for that shape (on
        CUDA a new shape costs a search for the fastest convolutions): some graphs declare a dynamic batch
        but reshape to 1.
        """
        if wanted <= 1:
            return 1
        if wanted not in self._batch_runs:
            self._batch_runs[wanted] = self._runs_batch(wanted)
        return wanted if self._batch_runs[wanted] else 1

    def _runs_batch(self, n: int) -> bool:
        if isinstance(self._session.get_inputs()[0].shape[0], int):
            return False
        h, w = self.info.input_size_hw
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refusal is an answer here, not an error to print
        try:
            logits, features = self._session.run(
                [LOGITS, FEATURES], {self._input_name: np.zeros((n, 3, h, w), np.float32)}, quiet)
        except Exception as exc:  # the model is still usable one frame at a time
            log.debug("%s does not run on a batch of %d (%s): one frame at a time", self.path, n, exc)
            return False
        return logits.shape[0] == n and features.shape[0] == n

    @property
    def session(self) -> ort.InferenceSession:
        return self._session

    @property
    def input_name(self) -> str:
        return self._input_name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @property
    def num_classes(self) -> int:
        return len(self.info.labels)

    def class_id_for(self, name_or_id: str | int) -> int:
        """A class id from an id or a label (exact, then case-insensitive, then a unique prefix)."""
        return class_id_for(self.labels, name_or_id)

    def prepare(self, frame_bgr: np.ndarray) -> np.ndarray:
        """The model's input for one frame: [1, 3, H, W] float32 (a reused buffer)."""
        return self._preprocess(as_bgr(frame_bgr))

    def prepare_batch(self, frames_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """The model's input for several frames, in a new [N, 3, H, W] float32 array.

        For preprocessing ahead of inference in another thread, and for batched inference on files.
        """
        h, w = self.info.input_size_hw
        batch = np.empty((len(frames_bgr), 3, h, w), np.float32)
        for i, frame in enumerate(frames_bgr):
            self._preprocess(as_bgr(frame), out=batch[i:i + 1])
        return batch

    @property
    def methods(self) -> tuple[str, ...]:
        """The map methods this model can give (keys of METHODS): ``cam`` needs a GAP + linear head, the
        gradient methods that head or the model's gradient output."""
        has_grads = self.head_weight is not None or self._fetch_grads
        return tuple(name for name, m in METHODS.items()
                     if m.needs == "features" or (m.needs == "head" and self.head_weight is not None)
                     or (m.needs == "grads" and has_grads))

    def run(self, batch: np.ndarray, targets: np.ndarray | None = None) -> Outputs:
        """Run the network on a prepared batch, with the gradient output when the head needs it.

        Args:
            targets: [N] int64 class per frame whose gradient to compute (-1: the frame's top-1); None for
                all -1. Ignored by models that compute no gradient.
        """
        if not self._fetch_grads:
            logits, features = self.forward(batch)
            return Outputs(logits, features)
        feed = {self._input_name: batch}
        if self._takes_target:
            feed[TARGET_CLASS] = (np.full(len(batch), -1, np.int64) if targets is None
                                  else np.asarray(targets, np.int64).reshape(len(batch)))
        logits, features, grads, grads_class = self._session.run([LOGITS, FEATURES, GRADS, GRADS_CLASS], feed)
        return Outputs(logits, features, grads, grads_class)

    def gradients(self, frame_bgr: np.ndarray, class_id: int) -> np.ndarray | None:
        """d logits[class_id] / d features [C, h, w] for one frame, from the model's gradient output (another
        run); None when the model has none (a GAP + linear head: use the closed form)."""
        if not self._fetch_grads:
            return None
        return self.run(self.prepare(frame_bgr), np.array([class_id])).grads[0]

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on a prepared batch: (logits [N, K], features [N, C, h, w]), float32."""
        logits, features = self._session.run([LOGITS, FEATURES], {self._input_name: batch})
        return logits, features

    def infer(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on one frame: (logits [K], features [C, h, w]), both float32."""
        logits, features = self.forward(self.prepare(frame_bgr))
        return logits[0], features[0]

    def predict(
        self, frame_bgr: np.ndarray, class_id: int | None = None, method: str = "cam", topk: int = 5
    ) -> Prediction:
        """Classify an HxWx3 uint8 BGR frame of any size and map where the model looked.

        Args:
            frame_bgr: the frame (grayscale, BGRA and 16-bit frames are converted).
            class_id: explain this class instead of the top-1.
            method: a key of ``realtime_cam.cams.METHODS``.
            topk: how many classes ``Prediction.topk`` lists.
        """
        out = self.run(self.prepare(frame_bgr), None if class_id is None else np.array([class_id])).row(0)
        request = Request(method=method, class_id=class_id, topk=topk)
        return explain(out.logits, out.features, self.head_weight, self.labels, request,
                       gradients=self.gradient_source(frame_bgr, out))[0]

    def gradient_source(self, frame_bgr: np.ndarray, out: Outputs):
        """For :func:`explain`: the gradient of any class on this frame, from the run's output when it is that
        class's, else from another run; None for a GAP + linear head (closed form)."""
        if out.grads is None:
            return None
        return lambda c: out.grads if c == int(out.grads_class) else self.gradients(frame_bgr, c)
