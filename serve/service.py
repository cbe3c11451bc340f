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
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from bdserve import __version__ as _version
from bdserve.serve import oip
from bdserve.serve.batching import Batcher
from bdserve.serve.budget import PixelBudget, declared_pixels
from bdserve.serve.errors import InvalidInput, ModelUnavailable, NotFound, SuspectedTrigger, shown
from bdserve.serve.metrics import UNKNOWN_MODEL, Metrics
from bdserve.serve.images import DEFAULT_MAX_PIXELS
from bdserve.serve.pipeline import DefendedModel, Prediction
from bdserve.serve.repository import version_key

SERVER_NAME = "bdserve"
SERVER_VERSION = _version if isinstance(_version, str) else "0"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]


# What a server does with an image its trigger detectors flag: answer it and say so, or refuse it.
ON_SUSPECT = ("flag", "reject")


class InferenceService:
    def __init__(self, models: Iterable[DefendedModel] | dict[str, DefendedModel], *, max_batch_size: int = 32,
                 max_queue_delay_ms: float = 5.0, max_queue_images: int = 4096, metrics: Metrics | None = None,
                 on_suspect: str = "flag", broken: dict[str, str] | None = None,
                 pixel_budget: int = DEFAULT_MAX_PIXELS):
        """``broken``: models of the store that failed to load (name -> why); they answer as not ready."""
        models = list(models.values()) if isinstance(models, dict) else list(models)
        if not models:
            raise ValueError("no models to serve")
        if on_suspect not in ON_SUSPECT:
            raise ValueError(f"on_suspect must be one of {', '.join(ON_SUSPECT)}, not {on_suspect!r}")
        self.on_suspect = on_suspect
        self.broken = dict(broken or {})
        # Every version of every model; the highest version answers requests that name none.
        self.versions: dict[str, dict[str, DefendedModel]] = {}
        for m in models:
            if m.version in self.versions.setdefault(m.name, {}):
                raise ValueError(f"model {m.name!r} version {m.version} is loaded twice")
            self.versions[m.name][m.version] = m
        self.models = {name: vs[max(vs, key=version_key)] for name, vs in self.versions.items()}
        self.metrics = metrics or Metrics()
        self.max_batch_size = max_batch_size
        # Requests each door holds per model name (from their first byte to their answer); the
        # batcher waits for those not yet queued (see batching.py).
        self._open: dict[str, int] = {name: 0 for name in self.versions}
        self.batchers = {
            (m.name, m.version): Batcher(m, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                                         max_queue_images=max_queue_images, on_batch=self.metrics.observe_batch,
                                         arriving=self._arriving(m.name))
            for m in models
        }
        for m in self.models.values():
            self.metrics.describe_model(m)
        self.max_request_images = max_queue_images
        # Decoded pixels in flight across every request and door (a 140 KiB PNG may declare 49 MP).
        self.pixels = PixelBudget(pixel_budget)
        self.ready = False

    def _arriving(self, name: str):
        """Requests for model ``name`` (any version) the doors hold that no batcher has yet."""
        mine = [(name, v) for v in self.versions[name]]
        return lambda: self._open[name] - sum(self.batchers[k].submitted for k in mine)

    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.close() for b in self.batchers.values()))

    # ------------------------------------------------------------------ lookup
    def get(self, name: str, version: str | None = None) -> DefendedModel:
        versions = self.versions.get(name)
        if versions is None:
            if name in self.broken:
                raise ModelUnavailable(f"model {shown(name)} is not ready: it failed to load: {self.broken[name]}")
            raise NotFound(f"unknown model {shown(name)}; this server has: {', '.join(sorted(self.models))}")
        if version in (None, ""):
            return self.models[name]
        model = versions.get(str(version))
        if model is None:
            raise NotFound(f"model {shown(name)} has no version {shown(version)}; served versions: "
                           f"{', '.join(self.version_list(name))}")
        return model

    def version_list(self, name: str) -> list[str]:
        return sorted(self.versions[name], key=version_key)

    def config(self, model: DefendedModel) -> dict:
        return oip.model_config(model, self.max_batch_size)

    def repository_index(self) -> list[dict]:
        """Triton's repository index: every served model version and its state; a model that
        failed to load is listed UNAVAILABLE with the reason."""
        state = "READY" if self.ready else "UNAVAILABLE"
        return [{"name": name, "version": v, "state": state, "reason": ""}
                for name in sorted(self.versions) for v in self.version_list(name)] + [
            {"name": name, "version": "", "state": "UNAVAILABLE", "reason": why} for name, why in sorted(self.broken.items())]

    def metric_name(self, name: str) -> str:
        return name if name in self.models else UNKNOWN_MODEL

    def metadata(self, model: DefendedModel) -> dict:
        # "parameters" (HTTP only: gRPC's ModelMetadataResponse has no such field): how encoded
        # images are fitted to the input, the same text every image response carries.
        return {"name": model.name, "versions": self.version_list(model.name), "platform": model.runtime.platform,
                "inputs": oip.model_inputs(model), "outputs": oip.model_outputs(model),
                "parameters": {"fit": model.fit.spec}}

    # --------------------------------------------------------------- inference
    async def infer(self, request: oip.InferRequest) -> oip.InferResponse:
        """One request through the model's batcher, answered with the outputs it asked for."""
        model = self.get(request.model, request.version)
        return oip.infer_response(request, model, await self._predict(model, request))

    async def predict(self, request: oip.InferRequest) -> Prediction:
        """One request through the model's batcher: input -> tensor, defense resolved; its
        Prediction (the doors that answer in their own shape need no OIP outputs built)."""
        return await self._predict(self.get(request.model, request.version), request)

    async def _predict(self, model: DefendedModel, request: oip.InferRequest) -> Prediction:
        oip.check_outputs(request, model)
        x = self._to_tensor(model, request.input)
        # Refused here, before queueing (lab mode, bad spec); the cached Transform object is
        # what the batcher groups by, so "Flip", "flip" and no parameter share a batch.
        defense = model.resolve_defense(request.defense)
        gauge, queued = self.metrics.inflight_of(model.name), self.metrics.queued_of(model.name)
        images = len(x)
        gauge.inc()
        queued.inc(images)
        try:
            batcher = self.batchers[(model.name, model.version)]
            if isinstance(x, torch.Tensor):
                pred = await batcher.submit(x, defense)
            else:  # encoded images hold the server-wide pixel budget while they queue and decode
                async with self.pixels.reserve(largest_image(model, x)):
                    pred = await batcher.submit(x, defense)
        finally:
            gauge.dec()
            queued.dec(images)
        if self.on_suspect == "reject" and pred.suspected is not None and pred.suspected.any():
            self.metrics.rejected.labels(model=model.name).inc()
            flagged = [int(i) for i in pred.suspected.nonzero()[0]]
            raise SuspectedTrigger(
                f"refused: the trigger detectors of model {model.name} flag image(s) {flagged[:20]} of this request "
                f"as a likely backdoor trigger (score {float(pred.trigger_score.max()):.3g} > 0; "
                f"this server rejects suspected inputs)")
        return pred

    def _to_tensor(self, model: DefendedModel, t: oip.Tensor) -> torch.Tensor | list[bytes]:
        """A decoded OIP input -> the model's uint8/float batch, or the encoded images, which
        the batcher decodes with the rest of their batch (one hand-off per batch, not per request)
        and reports how they were fitted (``Prediction.fit``)."""
        shape = t.shape
        if shape and shape[0] > self.max_request_images:
            # Checked before any decoding: a request of 100k tiny PNGs would cost seconds and gigabytes.
            raise InvalidInput(f"{shape[0]} images in one request; this server takes at most {self.max_request_images}")
        if t.name not in (oip.TENSOR_INPUT, oip.IMAGE_INPUT):
            raise InvalidInput(f"unknown input {t.name!r}; model {model.name} takes {oip.TENSOR_INPUT!r} "
                               f"(UINT8/FP32 [B,3,H,W]) or {oip.IMAGE_INPUT!r} (BYTES, encoded images)")
        if t.datatype == "BYTES":
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise InvalidInput(f"BYTES input must have shape [B] or [B, 1] (one encoded image per element), got {shape}")
            if not t.value:
                raise InvalidInput("no images in the request")
            return list(t.value)
        if t.datatype not in ("UINT8", "FP32"):
            raise InvalidInput(f"datatype {t.datatype} not accepted: send UINT8 or FP32 [B,3,H,W], or BYTES images")
        return model.from_array(t.value)

    @contextmanager
    def observe(self, model_name: str, protocol: str, ok_code: str = "200"):
        """Time a request and count it with its status code (HTTP status, or gRPC code name);
        the transport sets ``box['code']`` when the request fails."""
        box = {"code": ok_code}
        t0 = time.perf_counter()
        counted = model_name in self._open
        if counted:
            self._open[model_name] += 1
        try:
            yield box
        finally:
            if counted:
                self._open[model_name] -= 1
            self.metrics.observe_request(self.metric_name(model_name), protocol, box["code"],
                                         time.perf_counter() - t0)


def largest_image(model: DefendedModel, blobs: list[bytes]) -> int:
    """The decoded pixels a request's images need at once: they decode one at a time, each fitted
    to the model's input before the next. An image over the per-image limit is refused by the
    decoder before any pixel is decoded, so it counts as the limit."""
    return max((min(declared_pixels(b), model.max_pixels) for b in blobs), default=0)
