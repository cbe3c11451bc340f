"""The defended pipeline: the one object every door (HTTP, gRPC, TorchServe, in-process
evaluation) calls. Nothing else decodes, defends or postprocesses.

    bytes --decode/fit--> uint8 (B,3,H,W) ---.
    UINT8 / FP32 array --from_array----------+--> predict: to device -> float [0,1]
        -> DEFENSE (per-sample draws) -> normalize (unless in the graph) -> runtime
        -> softmax -> Prediction(probs, labels, defense)
    with --detect, the undefended batch and the detectors' views of it (transforms/detectors.py)
        go through the same runtime call -> trigger scores (margins over the calibrated
        thresholds, serve/detection.py) and the suspected flags, in the same Prediction

The shape follows KServe's Model (load / preprocess / predict / postprocess), but
every step is synchronous and thread-safe for one caller at a time, so the
asyncio batcher can run ``predict`` in a worker thread.

The defense is the server's: ``predict(defense=...)`` is honoured only on a model
loaded with ``lab=True`` (the evaluation lab); otherwise asking for any other
defense raises ``DefenseNotAllowed``. The defense's randomness comes from the
server (torch's global generator, or a generator passed in-process); a client can
never choose it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bdserve.card import CARD_FILE, ModelCard
from bdserve.serve.detection import CLASSIFY_CHUNK, Detection, load_detection
from bdserve.serve.errors import DefenseNotAllowed, InvalidInput
from bdserve.serve.images import COVER, DEFAULT_MAX_PIXELS, FitPolicy, Fitted, decode_batch, describe_fits
from bdserve.serve.runtimes import Runtime, open_runtime
from bdserve.serve import tracing
from bdserve.settings import pick_device
from bdserve.transforms import create_defense
from bdserve.transforms.base import Transform
from bdserve.transforms.detectors import score_batch

log = logging.getLogger(__name__)

# FP32 inputs must lie in [0, 1]; allow float rounding from clients that divided by 255.
_RANGE_SLACK = 1e-3
_MAX_CACHED_DEFENSES = 32


@dataclass
class Prediction:
    probs: np.ndarray  # float32 (B, C)
    label_ids: np.ndarray  # int64 (B,)
    labels: list[str]
    defense: str  # spec of the defense applied
    suspected: np.ndarray | None = None  # bool (B,): a calibrated detector flags the image (--detect)
    trigger_score: np.ndarray | None = None  # float32 (B,): max of the detectors' margins; > 0 = suspected
    detector_scores: np.ndarray | None = None  # float32 (B, M): each detector's margin (0 = its threshold)
    detector_methods: tuple[str, ...] = ()  # the M detectors, in detector_scores' column order
    fit: str | None = None  # how encoded images were fitted, e.g. "print (area)"; None for raw tensors
    timings: dict[str, float] = field(default_factory=dict)  # seconds: defense, inference (whole batch)

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> "Prediction":
        """Images start..stop: every per-image field is cut, per-request fields are shared
        (all of them: the prediction itself, e.g. a request that had its batch to itself)."""
        n = len(self)
        if start <= 0 and stop >= n:
            return self
        cut = {f.name: v[start:stop] if isinstance(v, (np.ndarray, list)) and len(v) == n else v
               for f in fields(self) for v in [getattr(self, f.name)]}
        return Prediction(**cut)

    def detector_score(self, method: str) -> np.ndarray | None:
        """One detector's margins (B,), or None when it did not run."""
        if self.detector_scores is None or method not in self.detector_methods:
            return None
        return self.detector_scores[:, self.detector_methods.index(method)]

    # One per-image output per detector (oip.PER_IMAGE_OUTPUTS reads these by name).
    trigger_score_consistency = property(lambda self: self.detector_score("consistency"))
    trigger_score_strip = property(lambda self: self.detector_score("strip"))
    trigger_score_scaleup = property(lambda self: self.detector_score("scaleup"))


class DefendedModel:
    """A classifier wrapped with its test-time defense. Build it with ``DefendedModel.load``."""

    def __init__(self, card: ModelCard, runtime: Runtime, *, defense: str | None = None,
                 device: torch.device | None = None, lab: bool = False, detection: Detection | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, fit: FitPolicy = COVER):
        """``defense`` None: the card's; ``device`` None: where the runtime runs. In-process
        evaluation is ``DefendedModel(card, TorchRuntime(module), lab=True).predict(...)``.
        ``detection``: calibrated trigger detectors (serve/detection.py), scored in every batch."""
        self.card = card
        self.runtime = runtime
        # Served under these (set by the model repository: the directory's name, the version
        # directory's number); the card's name and version otherwise.
        self.served_name: str | None = None
        self.served_version: str | None = None
        device = runtime.device if device is None else device
        defense = card.defense if defense is None else defense
        self.device = device
        self.lab = lab
        self.detection = detection
        self.max_pixels = max_pixels
        self.fit = fit  # the server's fit policy for encoded images (bdserve.serve.images)
        # Where JPEGs decode: on the GPU (nvjpeg) when the model's device is one, else Pillow on the CPU.
        self.decode_device: torch.device | None = device if device.type == "cuda" else None
        c, h, w = card.input_shape
        self.channels = int(c)
        self.input_size = (int(h), int(w))
        if not card.normalization_in_graph and not (
                len(card.mean) == len(card.std) == self.channels and all(s > 0 for s in card.std)):
            raise ValueError(f"model {card.name}: mean/std need {self.channels} values each and std > 0 "
                             f"(got mean {card.mean}, std {card.std})")
        self._defenses: dict[str, torch.nn.Module] = {}
        self._defense = self._build_defense(defense)
        self.defense_spec: str = self._defense.spec
        self._mean = torch.tensor(card.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(card.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        lo, hi = card.input_range
        self._range = None if (lo, hi) == (0.0, 1.0) else (float(lo), float(hi))

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_dir: str | Path, *, defense: str | None = None, backend: str = "auto",
             device: str | torch.device = "auto", lab: bool = False, detect: str | Sequence[str] | None = None,
             class_names: list[str] | None = None, mean: list[float] | None = None,
             std: list[float] | None = None, input_size: tuple[int, int] | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
             name: str | None = None, version: str | None = None, fit: FitPolicy = COVER) -> "DefendedModel":
        """Open a model directory (model.onnx or model.pt, card.json optional).

        ``defense`` None means the card's. Without a card the input shape comes from
        the ONNX graph (or ``input_size``), class names from ``class_names`` (else
        ``class_0 ..``) and normalisation from ``mean``/``std`` (else none: the graph
        is assumed to take [0, 1] input). Arguments given override the card. ``detect``
        names calibrated detectors ("consistency,strip"); NotCalibrated if the card lacks them.
        The model is served as ``name`` (default: the directory's name) and ``version``
        (default: the card's).
        """
        model_dir = Path(model_dir)
        dev = device if isinstance(device, torch.device) else pick_device(device)
        runtime = open_runtime(model_dir, backend, dev, threads)
        given = ModelCard.load(model_dir) if (model_dir / CARD_FILE).exists() else None
        try:
            card = ModelCard.from_runtime(runtime, given, name=model_dir.name, input_size=input_size,
                                          classes=class_names, mean=mean, std=std)
        except ValueError as e:
            raise ValueError(f"{model_dir}: {e}") from None
        model = cls(card, runtime, defense=defense, device=dev, lab=lab, max_pixels=max_pixels, fit=fit)
        model.served_name = name or model_dir.name
        model.served_version = version
        if detect:
            model.detection = load_detection(model_dir, card, detect, defense=model.defense_spec)
        log.info("loaded %s v%s: %s, defense %s", card.name, card.version, runtime.describe(), model.defense_spec)
        return model

    # -------------------------------------------------------------- properties
    @property
    def name(self) -> str:
        return self.served_name or self.card.name

    @property
    def version(self) -> str:
        return self.served_version or str(self.card.version)

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def detect(self) -> bool:
        return self.detection is not None

    @property
    def detect_methods(self) -> list[str]:
        return [] if self.detection is None else self.detection.methods

    @property
    def backend(self) -> str:
        return self.runtime.name

    @property
    def runtime_device(self) -> str:
        """Where inference really runs (ONNX Runtime may have fallen back to the CPU)."""
        return str(self.runtime.device)

    # ----------------------------------------------------------- preprocessing
    def decode(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded images -> uint8 (B, 3, H, W) at the model's input size, by the server's fit policy
        (``self.fit``: cover, or find the print; see bdserve.serve.images). On a CUDA model, JPEGs
        cover-fit on the GPU and the tensor is returned there."""
        return self.decode_fitted(blobs)[0]

    def decode_fitted(self, blobs: list[bytes]) -> tuple[torch.Tensor, str]:
        """``decode``, and what the response says about the fit, e.g. ``print (area)`` or
        ``cover (area; no print found)``."""
        x, how = self.decode_with_fits(blobs)
        return x, self.describe_fits(how)

    def decode_with_fits(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[Fitted]]:
        """``decode``, and how each image was fitted (``Fitted`` without its pixels): the batcher
        decodes a split request piece by piece and describes the fits of the whole request once."""
        return decode_batch(blobs, self.input_size, self.max_pixels, self.decode_device, self.fit)

    def describe_fits(self, how: list[Fitted]) -> str:
        """What a response says about the fit of its images (see ``decode_fitted``)."""
        return describe_fits(self.fit, how)

    def from_array(self, arr: np.ndarray) -> torch.Tensor:
        """A raw UINT8 (0..255) or FP32 ([0, 1]) array (B, 3, H, W) -> tensor, validated.

        The size must equal the model's input size: raw tensors are not resized
        (a client sending tensors has already decided the pixels; send an encoded
        image to have the server fit it).
        """
        if not isinstance(arr, np.ndarray):
            raise InvalidInput("expected an array")
        if arr.dtype not in (np.uint8, np.float32):
            raise InvalidInput(f"datatype {arr.dtype} not accepted: send UINT8 (0..255) or FP32 ([0, 1])")
        want = (self.channels, *self.input_size)
        if arr.ndim != 4:
            raise InvalidInput(f"expected a batch of rank 4 [B,{want[0]},{want[1]},{want[2]}], got rank {arr.ndim} {list(arr.shape)}")
        if arr.shape[0] < 1:
            raise InvalidInput("empty batch")
        if tuple(arr.shape[1:]) != want:
            raise InvalidInput(f"expected shape [B,{want[0]},{want[1]},{want[2]}] (model {self.name}), got {list(arr.shape)}")
        if arr.dtype == np.float32:
            if not np.isfinite(arr).all():
                raise InvalidInput("input contains NaN or Inf")
            lo, hi = float(arr.min()), float(arr.max())
            if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
                raise InvalidInput(f"FP32 input must lie in [0, 1], got values in [{lo:g}, {hi:g}] (send UINT8 for 0..255)")
            arr = np.clip(arr, 0.0, 1.0)
        if not arr.flags.writeable:  # a view of the request's bytes; torch wants to own writable memory
            arr = arr.copy()
        return torch.from_numpy(np.ascontiguousarray(arr))

    # ---------------------------------------------------------------- defenses
    def _build_defense(self, spec: str) -> torch.nn.Module:
        try:
            d = create_defense(spec)
        except ValueError as e:
            raise InvalidInput(f"bad defense {spec!r}: {e}") from None
        d = d.to(self.device).eval()
        try:  # e.g. shrinkpad:40 on a 32x32 model: refuse now, not halfway through a batch
            with torch.inference_mode():
                d(torch.zeros((1, self.channels, *self.input_size), device=self.device))
        except (ValueError, RuntimeError) as e:
            raise InvalidInput(f"defense {d.spec!r} cannot run on this model's {self.input_size[0]}x"
                               f"{self.input_size[1]} input: {e}") from None
        if len(self._defenses) >= _MAX_CACHED_DEFENSES:  # lab clients may name endless variants
            return self._defenses.get(d.spec, d)
        return self._defenses.setdefault(d.spec, d)

    def resolve_defense(self, spec: str | None) -> Transform:
        """The defense a request gets: the server's, or (lab mode only) the one it asks for."""
        if spec is not None and not isinstance(spec, str):
            raise InvalidInput("parameter 'defense' must be a string, e.g. \"flip\"")
        if spec is None or spec == self.defense_spec:
            return self._defense
        d = self._defenses.get(spec)
        if d is None:
            d = self._build_defense(spec)
        if d.spec != self.defense_spec and not self.lab:
            raise DefenseNotAllowed(
                f"this server applies defense {self.defense_spec!r} and does not let requests choose "
                f"(asked for {d.spec!r}; start the server with --lab for evaluation)"
            )
        return d

    # ---------------------------------------------------------------- predict
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [0, 1] on self.device -> logits (model-space scaling happens here)."""
        if not self.card.normalization_in_graph:
            x = (x - self._mean) / self._std
        elif self._range is not None:
            x = self._range[0] + x * (self._range[1] - self._range[0])
        return self.runtime(x)

    def _check(self, x: torch.Tensor) -> None:
        want = (self.channels, *self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise InvalidInput(f"expected shape [B,{want[0]},{want[1]},{want[2]}], got {list(x.shape)}")
        if x.shape[0] < 1:
            raise InvalidInput("empty batch")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise InvalidInput(f"datatype {x.dtype} not accepted: send uint8 or float in [0, 1]")

    def predict(self, x: torch.Tensor, *, defense: str | Transform | None = None,
                generator: torch.Generator | None = None) -> Prediction:
        """Defend and classify a batch: uint8 (0..255) or float ([0, 1]) (B, 3, H, W) on any device.

        ``defense``: None (the server's), a spec (resolved here, lab rules apply), or a Transform
        that ``resolve_defense`` already returned (what the server's batcher passes)."""
        self._check(x)
        d = defense if isinstance(defense, Transform) else self.resolve_defense(defense)
        x = x.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        with torch.inference_mode():
            t0 = time.perf_counter()
            with tracing.span("defense", {"bdserve.defense": d.spec}):
                xd = d(x, generator)
            t1 = time.perf_counter()
            with tracing.span("inference", {"bdserve.backend": self.backend, "bdserve.images": int(x.shape[0])}):
                if self.detection is None:
                    probs = self.classify(xd)
                else:
                    # The detectors' views of the undefended batch ride in the same batched call.
                    (probs,), raw = score_batch(self.detection.detectors, x, self.classify, also=[xd])
            t2 = time.perf_counter()
        ids_np = probs.argmax(1).numpy()
        pred = Prediction(probs=probs.numpy(), label_ids=ids_np, labels=[self.classes[i] for i in ids_np],
                          defense=d.spec, timings={"defense": t1 - t0, "inference": t2 - t1})
        if self.detection is not None:
            per, pred.trigger_score, pred.suspected = self.detection.judge(raw)
            pred.detector_methods = tuple(per)
            pred.detector_scores = np.stack(list(per.values()), axis=1)
        return pred

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """float [0, 1] batch on self.device -> probabilities on the host, in runtime calls of
        bounded size (the detectors' views multiply a batch by tens)."""
        if len(x) <= CLASSIFY_CHUNK:
            return _to_probs(self._forward(x))
        return torch.cat([_to_probs(self._forward(c)) for c in torch.split(x, CLASSIFY_CHUNK)])

    def postprocess(self, pred: Prediction, top_k: int = 5) -> list[dict[str, float]]:
        """TorchServe-style: one {class: probability} dict of the top_k classes per image."""
        k = min(top_k, len(self.classes))
        top = np.argsort(-pred.probs, axis=1, kind="stable")[:, :k].tolist()  # the whole batch at once
        return [{self.classes[i]: p[i] for i in row} for row, p in zip(top, pred.probs.tolist())]


def _to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax on the host; a graph that already ends in a softmax is left alone."""
    logits = logits.float().cpu()
    if bool((logits >= 0).all()) and bool(torch.allclose(logits.sum(1), torch.ones(len(logits)), atol=1e-4)):
        return logits
    return torch.softmax(logits, dim=1)
