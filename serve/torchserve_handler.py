"""TorchServe custom handler: bdserve's defended pipeline behind TorchServe 0.12.

``bdserve archive`` puts this file into the .mar next to model.onnx, card.json and
model-config.yaml. It builds the same ``DefendedModel`` that ``bdserve serve`` uses
(decode, fit, defense, normalize, runtime, postprocess) from the unpacked archive,
so nothing here re-implements decoding or the defense.

The worker imports ``bdserve`` from the Python environment TorchServe was started
from (``torchserve`` passes its own interpreter to the workers): install bdserve there,
``pip install 'bdserve[torchserve]'``.

Requests: one image per request, as the raw body or the multipart field ``data``
(TorchServe hands both over as ``data``/``body``). TorchServe batches requests
(``batchSize``/``maxBatchDelay`` in model-config.yaml); each batch is decoded
request by request, so one bad image gets its own 4xx and the others in the same
batch are still answered. The answer per request is what bdserve's
``POST /predictions/{model}`` returns: the body ``{class: probability}`` of the top
five classes, the defense applied in the ``X-Bdserve-Defense`` header (and
``X-Bdserve-Suspected-Trigger`` when detecting), errors as ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class BdserveHandler:
    """TorchServe entry point (TorchServe wants exactly one class in a handler module)."""

    def __init__(self) -> None:
        self.model = None
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

        props = context.system_properties
        model_dir = props.get("model_dir")
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        gpu_id = props.get("gpu_id")
        device = "auto"
        if gpu_id is not None:
            import torch

            # TorchServe assigns a GPU per worker only when it found one; honour its choice.
            device = f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"
        self.topk = int(cfg.get("topk", 5))
        from bdserve.serve.images import FitPolicy

        # Served under TorchServe's model name (the .mar's), not the worker's temporary directory.
        name = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("modelName")
        self.model = DefendedModel.load(
            model_dir, defense=cfg.get("defense"), backend=cfg.get("backend", "auto"), device=device, name=name,
            fit=FitPolicy(cfg.get("fit", "cover"), cfg.get("resize")),
        )
        self.initialized = True
        log.info("bdserve handler ready: %s, defense %s", model_dir, self.model.defense_spec)

    # -- request handling ---------------------------------------------------

    @staticmethod
    def _payload(row: Any) -> bytes:
        """The uploaded image of one TorchServe request, or InvalidInput."""
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
            f"expected an encoded image (JPEG, PNG or WebP), got a {type(body).__name__} body; "
            "tensors go to bdserve's /v2/models/{model}/infer"
        )

    def handle(self, data: list | None, context: Any) -> list:
        if data is None:  # TorchServe's function-style initialisation call; unused here
            return []
        if not self.initialized:
            self.initialize(context)
        from bdserve.serve.errors import InvalidInput

        # One line per worker call: how many requests TorchServe batched together.
        log.info("bdserve batch of %d requests", len(data))
        results: list[Any] = [None] * len(data)
        good_idx: list[int] = []
        tensors, fits = [], []
        for i, row in enumerate(data):
            try:
                x, fit = self.model.decode_fitted([self._payload(row)])
                tensors.append(x)
                fits.append(fit)
                good_idx.append(i)
            except InvalidInput as e:
                results[i] = self._error(context, i, getattr(e, "http_status", 400), str(e))
        if tensors:
            import torch

            batch = torch.cat(tensors, 0) if len(tensors) > 1 else tensors[0]
            pred = self.model.predict(batch)
            # The same body and headers as bdserve's POST /predictions/{model}.
            from bdserve.serve.oip import prediction_headers

            docs = self.model.postprocess(pred, self.topk)
            for j, i in enumerate(good_idx):
                results[i] = docs[j]
                pred.fit = fits[j]  # each request's own photo
                for key, value in prediction_headers(pred, j).items():
                    _header(context, i, key, value)
        for i in range(len(results)):
            try:
                context.set_response_content_type(i, "application/json")
            except Exception:  # noqa: BLE001 - cosmetic; TorchServe still sends the JSON
                pass
        return results

    @staticmethod
    def _error(context: Any, idx: int, code: int, message: str) -> dict:
        try:
            context.set_response_status(code=code, phrase=message[:200], idx=idx)
        except Exception:  # noqa: BLE001 - an old TorchServe without per-request status
            log.warning("could not set per-request status %s for request %d", code, idx)
        return {"error": message}  # bdserve's error format (Open Inference Protocol)


def _header(context: Any, idx: int, key: str, value: str) -> None:
    try:
        context.set_response_header(idx, key, value)
    except Exception:  # noqa: BLE001 - headers are informative; the body is the answer
        log.warning("could not set header %s on request %d", key, idx)
