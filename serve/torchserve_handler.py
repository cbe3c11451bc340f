"""TorchServe custom handler: bdserve's serving pipeline behind TorchServe 0.12.

``bdserve archive`` puts this file into the .mar next to model.onnx, card.json (and, for a
calibrated model, STRIP's overlays) and model-config.yaml. The handler is one more door of
bdserve's ``InferenceService``: it loads the model as ``bdserve serve`` does
(``DefendedModel``: decode, fit, defense, trigger detectors, runtime), turns each TorchServe
request into an ``oip.InferRequest``, and runs them all through the service (its batcher,
``DefendedModel.predict``, the rejection of suspected triggers, the answer ``oip`` builds).
Nothing here re-implements decoding, the defense, detection or the protocol.

The worker imports ``bdserve`` from the Python environment TorchServe was started from
(``torchserve`` passes its own interpreter to the workers): install bdserve there,
``pip install 'bdserve[torchserve]'``.

Settings (model-config.yaml, ``handler:``; ``bdserve archive`` writes them): ``defense``,
``detect`` (calibrated detectors, as ``bdserve serve --detect``), ``on_suspect`` (flag or
reject), ``fit``, ``topk``, ``backend``.

Two request forms:

- Plain TorchServe (no service envelope): one image per request, as the raw body or the
  multipart field ``data``. The answer is what bdserve's ``POST /predictions/{model}``
  returns: ``{class: probability}`` of the top five classes, the ``X-Bdserve-*`` headers
  (defense, fit, and with detectors ``X-Bdserve-Suspected-Trigger`` / ``-Trigger-Score``),
  errors as ``{"error": "..."}`` with their status. TorchServe batches requests; one bad
  image gets its own 4xx and the others in the batch are still answered.
- ``service_envelope=kservev2`` (KServe's TorchServe runtime, ``protocolVersion: v2``): the
  body is an Open Inference Protocol v2 JSON request, ``input`` (UINT8/FP32 [B,3,H,W]) or
  ``image`` (BYTES, base64 in JSON). TorchServe's envelope hands the handler the request's
  input tensors (not the body) and builds the response itself from what the handler returns:
  the outputs carry bdserve's names and datatypes, flattened by the envelope, and the
  envelope's response has no ``parameters`` (TorchServe 0.12 leaves them out), so the
  defense, fit and detection summary travel as the ``X-Bdserve-*`` headers. The envelope
  passes on only the first request of a batch and the first element of a BYTES input:
  serve it with ``batchSize: 1`` and one image per BYTES request. Refusals are TorchServe
  errors (``{"code": 400, "message": ...}``).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PROTOCOL = "torchserve"  # the metrics' protocol label inside the worker (its registry is private)


class BdserveHandler:
    """TorchServe entry point (TorchServe wants exactly one class in a handler module)."""

    def __init__(self) -> None:
        self.model = None
        self.service = None
        self.loop = None
        self.initialized = False
        self.topk = 5

    def initialize(self, context: Any) -> None:
        try:
            from bdserve.serve.pipeline import DefendedModel
        except ImportError as e:  # the one deployment mistake worth a precise message
            import sys

            raise ImportError(
                f"bdserve is not importable by this TorchServe worker ({sys.executable}): install it into the "
                f"environment TorchServe runs from, pip install 'bdserve[torchserve]' ({e})"
            ) from e
        import asyncio

        from bdserve.serve.images import FitPolicy
        from bdserve.serve.service import InferenceService

        props = context.system_properties
        model_dir = props.get("model_dir")
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        cfg = yaml_config.get("handler") or {}
        gpu_id = props.get("gpu_id")
        device = "auto"
        if gpu_id is not None:
            import torch

            # TorchServe assigns a GPU per worker only when it found one; honour its choice.
            device = f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"
        self.topk = int(cfg.get("topk", 5))
        # Served under TorchServe's model name (the .mar's), not the worker's temporary directory.
        name = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("modelName")
        self.model = DefendedModel.load(
            model_dir, defense=cfg.get("defense"), backend=cfg.get("backend", "auto"), device=device, name=name,
            fit=FitPolicy(cfg.get("fit", "cover"), cfg.get("resize")), detect=cfg.get("detect"),
        )
        # TorchServe has already gathered the requests of one call: the service's batcher only
        # has to put them into one model batch, so it waits for company a moment at most.
        self.loop = asyncio.new_event_loop()
        self.service = InferenceService([self.model], max_batch_size=max(32, int(yaml_config.get("batchSize", 1))),
                                        max_queue_delay_ms=2.0, on_suspect=cfg.get("on_suspect", "flag"))
        self.loop.run_until_complete(self.service.start())
        # A TorchServe worker process serves this one model: its startup heap leaves the full
        # collections, which otherwise pause every request for about 200 ms (serve/heap.py).
        from bdserve.serve.heap import freeze_startup_objects

        freeze_startup_objects()
        self.initialized = True
        detecting = f", detect {self.model.detection.describe()}" if self.model.detect else ""
        log.info("bdserve handler ready: %s, defense %s%s", model_dir, self.model.defense_spec, detecting)

    # -- request handling ---------------------------------------------------

    def handle(self, data: list | None, context: Any) -> list:
        if data is None:  # TorchServe's function-style initialisation call; unused here
            return []
        if not self.initialized:
            self.initialize(context)
        if _kservev2_inputs(data, context):
            return self._handle_kservev2(data, context)
        # One line per worker call: how many requests TorchServe batched together.
        log.info("bdserve batch of %d requests", len(data))
        from bdserve.serve import oip
        from bdserve.serve.errors import ServeError

        requests = []
        for row in data:
            try:
                requests.append(oip.InferRequest(model=self.model.name, input=oip.Tensor(
                    oip.IMAGE_INPUT, "BYTES", [1], [_payload(row)])))
            except ServeError as e:
                requests.append(e)
        results = []
        for i, answer in enumerate(self._infer(requests)):
            if isinstance(answer, ServeError):
                results.append(_error(context, i, answer))
                continue
            # The same body and headers as bdserve's POST /predictions/{model}.
            pred = answer.prediction
            results.append(self.model.postprocess(pred, self.topk)[0])
            for key, value in oip.prediction_headers(pred, 0).items():
                _header(context, i, key, value)
        for i in range(len(results)):
            _content_type(context, i)
        return results

    def _infer(self, requests: list) -> list:
        """Every request (or the error it already is) through the service, concurrently, so its
        batcher runs them as one model batch; each answer is an InferResponse or a ServeError."""
        import asyncio

        from bdserve.serve.errors import ServeError

        async def one(request):
            if isinstance(request, ServeError):
                return request
            with self.service.observe(request.model, PROTOCOL) as box:
                try:
                    return await self.service.infer(request)
                except ServeError as e:
                    box["code"] = str(e.http_status)
                    return e

        async def every():
            return await asyncio.gather(*(one(r) for r in requests))

        return self.loop.run_until_complete(every())

    def _handle_kservev2(self, inputs: list, context: Any) -> list:
        """One OIP request whose input tensors TorchServe's kservev2 envelope parsed; what this
        returns, the envelope turns into the response's outputs (see the module's docstring)."""
        from ts.utils.util import PredictionException  # how an envelope's handler answers with a status

        from bdserve.serve import oip
        from bdserve.serve.errors import InvalidInput, ServeError

        if len(getattr(context, "request_ids", None) or {}) > 1:
            raise PredictionException("TorchServe's kservev2 envelope answers only the first request of a batch: "
                                       "serve this model with batchSize 1", 500)
        try:
            request = oip.read_infer_request(self.model.name, None, {"inputs": [_rewrap_bytes(t) for t in inputs]})
        except InvalidInput as e:
            raise PredictionException(str(e), e.http_status) from None
        (answer,) = self._infer([request])
        if isinstance(answer, ServeError):
            raise PredictionException(str(answer), answer.http_status)
        # The envelope names output i after its i-th "input name": give it bdserve's output names.
        context.input_names = [t.name for t in answer.outputs]
        for key, value in oip.parameter_headers(answer.parameters).items():
            _header(context, 0, key, value)
        return [_envelope_value(t) for t in answer.outputs]


def _kservev2_inputs(data: list, context: Any) -> bool:
    """Whether TorchServe's kservev2 envelope handed over a request's input tensors: it records
    their names on the context and passes the tensors (name, datatype, shape, data) as rows."""
    return hasattr(context, "input_names") and all(
        isinstance(row, dict) and {"name", "datatype", "shape"} <= row.keys() for row in data)


def _rewrap_bytes(spec: dict) -> dict:
    """The kservev2 envelope replaces a BYTES input's data by its first element; put it back in a
    list so the protocol's reader sees the request as sent, and say so when elements were dropped."""
    from bdserve.serve.errors import InvalidInput

    if spec.get("datatype") != "BYTES" or isinstance(spec.get("data"), list):
        return spec
    shape = spec.get("shape")
    if isinstance(shape, list) and shape and isinstance(shape[0], int) and shape[0] > 1:
        raise InvalidInput(f"TorchServe's kservev2 envelope passes on only the first element of a BYTES input "
                           f"(shape {shape}): send one image per request")
    return {**spec, "data": [spec.get("data")]}


def _envelope_value(t) -> Any:
    """An output tensor as the envelope wants it: an array whose dtype names the datatype
    (BYTES as text: the envelope's JSON has no bytes)."""
    import numpy as np

    from bdserve.serve import oip

    if t.datatype == "BYTES":
        return np.asarray(oip.json_of("BYTES", t.value), dtype=str)
    return np.asarray(t.value, dtype=oip.NUMPY_DTYPES[t.datatype])


def _payload(row: Any) -> bytes:
    """The uploaded image of one plain TorchServe request, or InvalidInput."""
    from bdserve.serve.errors import InvalidInput

    if not isinstance(row, dict):
        raise InvalidInput("empty request")
    body = row.get("data")
    if body is None:
        body = row.get("body")
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if not body:
            raise InvalidInput("empty body: send an image (JPEG, PNG or WebP) as the body or field 'data'")
        return body
    if body is None:
        if row:  # TorchServe split a form-urlencoded body (curl --data-binary's default type) into fields
            raise InvalidInput(
                "no image: TorchServe parsed the body as form fields; send the image with "
                "Content-Type image/jpeg (or application/octet-stream), or as the multipart field 'data'"
            )
        raise InvalidInput("no image: send it as the request body or the multipart field 'data'")
    # TorchServe has already decoded JSON/text bodies: they cannot be an image upload.
    raise InvalidInput(
        f"expected an encoded image (JPEG, PNG or WebP), got a {type(body).__name__} body; Open Inference "
        "Protocol requests need TorchServe's service_envelope=kservev2 (or bdserve's /v2/models/{model}/infer)"
    )


def _error(context: Any, idx: int, e) -> dict:
    try:
        context.set_response_status(code=e.http_status, phrase=str(e)[:200], idx=idx)
    except Exception:  # noqa: BLE001 - an old TorchServe without per-request status
        log.warning("could not set per-request status %s for request %d", e.http_status, idx)
    return {"error": str(e)}  # bdserve's error format (Open Inference Protocol)


def _content_type(context: Any, idx: int) -> None:
    try:
        context.set_response_content_type(idx, "application/json")
    except Exception:  # noqa: BLE001 - cosmetic; TorchServe still sends the JSON
        pass


def _header(context: Any, idx: int, key: str, value: str) -> None:
    try:
        context.set_response_header(idx, key, value)
    except Exception:  # noqa: BLE001 - headers are informative; the body is the answer
        log.warning("could not set header %s on request %d", key, idx)
