"""What both doors share: the loaded models, their batchers and the metrics.

A door turns its wire format into an ``oip.InferRequest``, awaits ``infer``, and
turns the ``oip.InferResponse`` back into its wire format. Here the request's input
becomes a tensor, its defense is resolved once (the Transform object then travels
through the batcher into ``DefendedModel.predict``), and the answer is assembled by
oip. Lookup errors, bad inputs and refused defenses arrive as ``InvalidInput``
subclasses, a full queue as ``Overloaded``, and, with ``on_suspect="reject"``, a request
holding an image the trigger detectors flag as ``SuspectedTrigger`` (all ``ServeError``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import torch

from bdserve import __version__ as _version
from bdserve.serve import oip
from bdserve.serve.batching import Batcher
from bdserve.serve.budget import PixelBudget, declared_pixels
from bdserve.serve.errors import InvalidInput, ModelUnavailable, NotFound, SuspectedTrigger, shown
from bdserve.serve.metrics import UNKNOWN_MODEL, Metrics
from bdserve.serve.images import DEFAULT_MAX_PIXELS
from bdserve.serve.pipeline import DefendedModel

SERVER_NAME = "bdserve"
SERVER_VERSION = _version if isinstance(_version, str) else "0"
EXTENSIONS = ["binary_tensor_data"]


# What a server does with an image its trigger detectors flag: answer it and say so, or refuse it.
ON_SUSPECT = ("flag", "reject")


class InferenceService:
    def __init__(self, models: dict[str, DefendedModel], *, max_batch_size: int = 32,
                 max_queue_delay_ms: float = 5.0, max_queue_images: int = 4096, metrics: Metrics | None = None,
                 on_suspect: str = "flag", broken: dict[str, str] | None = None,
                 pixel_budget: int = DEFAULT_MAX_PIXELS):
        """``broken``: models of the store that failed to load (name -> why); they answer as not ready."""
        if not models:
            raise ValueError("no models to serve")
        if on_suspect not in ON_SUSPECT:
            raise ValueError(f"on_suspect must be one of {', '.join(ON_SUSPECT)}, not {on_suspect!r}")
        self.on_suspect = on_suspect
        self.models = models
        self.broken = dict(broken or {})
        self.metrics = metrics or Metrics()
        self.batchers = {
            name: Batcher(m, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                          max_queue_images=max_queue_images, on_batch=self.metrics.observe_batch)
            for name, m in models.items()
        }
        for m in models.values():
            self.metrics.describe_model(m)
        self.max_request_images = max_queue_images
        # Decoded pixels in flight across every request and door (a 140 KiB PNG may declare 49 MP).
        self.pixels = PixelBudget(pixel_budget)
        self.ready = False

    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.close() for b in self.batchers.values()))

    # ------------------------------------------------------------------ lookup
    def get(self, name: str, version: str | None = None) -> DefendedModel:
        model = self.models.get(name)
        if model is None:
            if name in self.broken:
                raise ModelUnavailable(f"model {shown(name)} is not ready: it failed to load: {self.broken[name]}")
            raise NotFound(f"unknown model {shown(name)}; this server has: {', '.join(sorted(self.models))}")
        if version not in (None, "") and str(version) != model.version:
            raise NotFound(f"model {shown(name)} has no version {shown(version)} (served version: {model.version})")
        return model

    def metric_name(self, name: str) -> str:
        return name if name in self.models else UNKNOWN_MODEL

    def metadata(self, model: DefendedModel) -> dict:
        return {"name": model.name, "versions": [model.version], "platform": model.runtime.platform,
                "inputs": oip.model_inputs(model), "outputs": oip.model_outputs(model)}

    # --------------------------------------------------------------- inference
    async def infer(self, request: oip.InferRequest) -> oip.InferResponse:
        """One request through the model's batcher: input -> tensor, defense resolved, answer built."""
        model = self.get(request.model, request.version)
        oip.check_outputs(request, model)
        x = await self._to_tensor(model, request.input)
        # Refused here, before queueing (lab mode, bad spec); the cached Transform object is
        # what the batcher groups by, so "Flip", "flip" and no parameter share a batch.
        defense = model.resolve_defense(request.defense)
        gauge = self.metrics.inflight.labels(model=model.name)
        gauge.inc()
        try:
            pred = await self.batchers[model.name].submit(x, defense)
        finally:
            gauge.dec()
        if self.on_suspect == "reject" and pred.suspected is not None and pred.suspected.any():
            self.metrics.rejected.labels(model=model.name).inc()
            flagged = [int(i) for i in pred.suspected.nonzero()[0]]
            raise SuspectedTrigger(
                f"refused: the trigger detectors of model {model.name} flag image(s) {flagged[:20]} of this request "
                f"as a likely backdoor trigger (score {float(pred.trigger_score.max()):.3g} > 0; "
                f"this server rejects suspected inputs)")
        return oip.infer_response(request, model, pred)

    async def _to_tensor(self, model: DefendedModel, t: oip.Tensor) -> torch.Tensor:
        """A decoded OIP input -> the model's uint8/float batch. Images decode off the event loop."""
        shape = t.shape
        if shape and shape[0] > self.max_request_images:
            # Checked before any decoding: a request of 100k tiny PNGs would cost seconds and gigabytes.
            raise InvalidInput(f"{shape[0]} images in one request; this server takes at most {self.max_request_images}")
        if t.name not in (oip.TENSOR_INPUT, oip.IMAGE_INPUT):
            raise InvalidInput(f"unknown input {t.name!r}; model {model.name} takes {oip.TENSOR_INPUT!r} "
                               f"(UINT8/FP32 [B,3,H,W]) or {oip.IMAGE_INPUT!r} (BYTES, encoded images)")
        if t.datatype == "BYTES":
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise InvalidInput(f"BYTES input must have shape [B] (one encoded image per element), got {shape}")
            blobs = list(t.value)
            # An image over the per-image limit is refused by the decoder before any pixel is decoded.
            pixels = sum(min(declared_pixels(b), model.max_pixels) for b in blobs)
            async with self.pixels.reserve(pixels):
                return await asyncio.to_thread(model.decode, blobs)
        if t.datatype not in ("UINT8", "FP32"):
            raise InvalidInput(f"datatype {t.datatype} not accepted: send UINT8 or FP32 [B,3,H,W], or BYTES images")
        return model.from_array(t.value)

    @contextmanager
    def observe(self, model_name: str, protocol: str, ok_code: str = "200"):
        """Time a request and count it with its status code (HTTP status, or gRPC code name);
        the transport sets ``box['code']`` when the request fails."""
        box = {"code": ok_code}
        t0 = time.perf_counter()
        try:
            yield box
        finally:
            self.metrics.observe_request(self.metric_name(model_name), protocol, box["code"],
                                         time.perf_counter() - t0)
