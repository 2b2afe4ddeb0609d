"""CamModel: an ONNX Runtime session over a contract file, its head, labels and preprocessing."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .cams import METHODS, compute_map, normalize_map, softmax, top_k_ids
from .cliutil import whole_number
from .contract import FEATURES, LOGITS, read_contract
from .errors import CamError, DeviceError, ModelError
from .preprocess import Preprocessor, as_bgr
from .temporal import TemporalFilter

log = logging.getLogger("realtime_cam")

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True, eq=False)
class Prediction:
    """What the model says about one frame, and where it looked.

    Attributes:
        class_id: the explained class (the top-1 unless a class was asked for).
        label: its name.
        probability: its softmax probability.
        topk: the k most probable classes as (class_id, label, probability), most probable first.
        cam: float32 [h, w] at feature resolution, min-max normalised to [0, 1].
        method: the map method used (a key of ``realtime_cam.cams.METHODS``).
        probabilities: float32 [K] softmax over all classes (smoothed over time in a smoothed run).
        pinned: True when the class was chosen by the user rather than by the ranking.
    """

    class_id: int
    label: str
    probability: float
    topk: tuple[tuple[int, str, float], ...]
    cam: np.ndarray = field(repr=False)
    method: str = "cam"
    probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))
    pinned: bool = False


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The head copy is an initializer no node reads; ORT would warn about it on every load.
    options.log_severity_level = 3
    # Idle inference threads sleep instead of spinning, so decode/render/encode threads get the CPU between
    # frames. Measured with `bench` on 2 cores: inference alone ~2% slower, file to file ~5% faster; on a
    # 16-core host, spinning threads starved the encoder (p95 30 ms per frame).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _providers(device: str) -> list[str]:
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        # onnxruntime-gpu installed with pip finds the pip-installed CUDA/cuDNN libraries this way.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            try:
                preload()
            except Exception as exc:  # a missing library shows up again, clearly, when the session starts
                log.debug("onnxruntime.preload_dlls failed: %s", exc)
        return [CUDA, CPU]
    if device == "cuda":
        raise DeviceError(
            f"--device cuda: this onnxruntime offers no CUDA provider (it has {', '.join(available)}); "
            "install the GPU build: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
            "'onnxruntime-gpu[cuda,cudnn]' (see the README's install section)"
        )
    return [CPU]


def load_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with a one-line error for every way that can fail."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelError(f"model path is a directory, not an .onnx file: {p}")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError... for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {p} as an ONNX model ({reason})") from None


class CamModel:
    """A classifier that also says where it looked.

    Args:
        path: a realtime-cam contract file (see ``realtime_cam.contract``).
        device: "auto" (CUDA when it really runs, else CPU), "cpu", or "cuda" (an error if it cannot run).

    Attributes:
        info: labels, input size and normalisation from the file's metadata.
        provider: the ONNX Runtime execution provider that actually runs the model.
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto") -> None:
        self.path = Path(path)
        proto = load_model_proto(self.path)
        self.info, self.head_weight, self.head_bias = read_contract(proto)
        providers = _providers(device)
        del proto
        try:
            self._session = ort.InferenceSession(
                str(self.path), sess_options=_session_options(), providers=providers
            )
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
        self._check_shapes()
        self._batch_runs: dict[int, bool] = {}  # batch size -> the model runs it (see batch_size)
        self._preprocess = Preprocessor(
            self.info.input_size_hw, self.info.mean, self.info.std, self.info.channel_order
        )

    def _check_shapes(self) -> None:
        """Run once on a blank input and check what comes out (declared shapes can be missing or wrong)."""
        h, w = self.info.input_size_hw
        blank = np.zeros((1, 3, h, w), np.float32)
        try:
            logits, features = self._session.run([LOGITS, FEATURES], {self._input_name: blank})
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"{self.path} does not run on a {h}x{w} input ({reason[:200]})") from None
        k, c = self.head_weight.shape
        if features.ndim != 4:
            raise ModelError(f"'features' must be [N, C, h, w]; the model gives {list(features.shape)}")
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
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    @property
    def num_classes(self) -> int:
        return len(self.info.labels)

    def class_id_for(self, name_or_id: str | int) -> int:
        """A class id from an id or a label (exact, then case-insensitive, then a unique prefix)."""
        text = str(name_or_id).strip()
        number = whole_number(text)
        if number is not None:
            self._check_class(number)
            return number
        lowered = [label.lower() for label in self.labels]
        for candidates in (
            [i for i, label in enumerate(self.labels) if label == text],
            [i for i, label in enumerate(lowered) if label == text.lower()],
            [i for i, label in enumerate(lowered) if label.startswith(text.lower())],
        ):
            if len(candidates) == 1:
                return candidates[0]
            if len(candidates) > 1:
                names = ", ".join(self.labels[i] for i in candidates[:5])
                raise CamError(f"class {text!r} is ambiguous: {names}, ...")
        raise CamError(f"no class named {text!r} in this model's {self.num_classes} labels")

    def _check_class(self, class_id: int) -> None:
        if not 0 <= class_id < self.num_classes:
            raise CamError(f"class id {class_id} is out of range 0..{self.num_classes - 1}")

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

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on a prepared batch: (logits [N, K], features [N, C, h, w]), float32."""
        logits, features = self._session.run([LOGITS, FEATURES], {self._input_name: batch})
        return logits, features

    def resident_forward(self, batches: Sequence[np.ndarray]) -> Callable[[int], list[ort.OrtValue]]:
        """A runner that times the network without the copies in and out that :meth:`forward` makes.

        The prepared batches are copied once onto the device that runs the model; ``run(i)`` then runs
        ``batches[i]`` through ONNX Runtime's IO binding with the outputs left on that device, waits for them
        and returns them (logits, features) as OrtValues there. That is the most IO binding could save over
        ``forward`` here: the map is computed on the host, so the loop itself needs the features copied back
        whatever the binding.
        """
        device = "cuda" if self.provider == CUDA else "cpu"
        on_device = [ort.OrtValue.ortvalue_from_numpy(batch, device, 0) for batch in batches]
        binding = self._session.io_binding()

        def run(index: int) -> list[ort.OrtValue]:
            binding.bind_ortvalue_input(self._input_name, on_device[index])
            for name in (LOGITS, FEATURES):  # bound anew: outputs kept from a call keep that call's batch size
                binding.bind_output(name, device, 0)
            self._session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return binding.get_outputs()

        return run

    def infer(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on one frame: (logits [K], features [C, h, w]), both float32."""
        logits, features = self.forward(self.prepare(frame_bgr))
        return logits[0], features[0]

    def explain(
        self,
        logits: np.ndarray,
        features_chw: np.ndarray,
        class_id: int | None = None,
        method: str = "cam",
        topk: int = 5,
        rank: int = 0,
        temporal: TemporalFilter | None = None,
    ) -> Prediction:
        """Turn one frame's network outputs into a Prediction with its [0, 1] map.

        Args:
            class_id: explain this class (pinned) instead of the ranking's choice.
            rank: which of the top-k to explain when no class is given (0: the top-1).
            temporal: a video's filter: smooths probabilities and maps over frames and holds the shown
                top-1 (hysteresis); None treats the frame on its own.
        """
        if method not in METHODS:
            raise CamError(f"unknown map method {method!r}; choose from {', '.join(METHODS)}")
        probabilities = softmax(logits)
        if temporal is not None:
            probabilities = temporal.probabilities(probabilities)
        ranking = [int(i) for i in top_k_ids(probabilities, topk)]
        if temporal is not None:
            leader = temporal.leader(probabilities)
            if ranking[0] != leader:  # hysteresis keeps the shown top-1 until a challenger has led long enough
                ranking = [leader, *[i for i in ranking if i != leader]][: len(ranking)]
        pinned = class_id is not None
        if pinned:
            class_id = int(class_id)
            self._check_class(class_id)
        else:
            class_id = ranking[min(max(0, rank), len(ranking) - 1)]
        raw = compute_map(method, features_chw, self.head_weight, class_id)
        if temporal is None:
            shown = normalize_map(raw)
        else:
            shown = temporal.map(raw, (class_id if METHODS[method].class_specific else None, method))
        return Prediction(
            class_id=class_id,
            label=self.labels[class_id],
            probability=float(probabilities[class_id]),
            topk=tuple((i, self.labels[i], float(probabilities[i])) for i in ranking),
            cam=shown,
            method=method,
            probabilities=probabilities,
            pinned=pinned,
        )

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
        logits, features = self.infer(frame_bgr)
        return self.explain(logits, features, class_id=class_id, method=method, topk=topk)
