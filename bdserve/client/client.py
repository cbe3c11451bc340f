"""``AsyncClient`` and its synchronous twin ``Client``: predict images, infer tensors, with retries.

Every call is retried on transient failures (no connection, HTTP 429/502/503/504, gRPC
UNAVAILABLE/DEADLINE_EXCEEDED) with exponential backoff, up to ``retries`` attempts; an
answer the server refused (a 4xx, INVALID_ARGUMENT, NOT_FOUND ...) raises ``RequestRejected``
at once with the server's own message. ``timeout_s`` bounds each attempt.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from bdserve.client.inputs import encode_chw, images_bytes, tensor_input
from bdserve.client.results import Result, joined
from bdserve.client.retry import (CircuitBreaker, PermanentError, RetriesExhausted, RetryPolicy, TransientError,
                                  with_retries)
from bdserve.client.transports import Input, ModelInfo, Transport, open_transport
from bdserve.serve import oip

T = TypeVar("T")


def token_from_file(path: str | Path) -> str:
    """The inference key of TorchServe's key_file.json (token authorization on)."""
    try:
        return json.loads(Path(path).read_text())["inference"]["key"]
    except OSError as e:
        raise ValueError(f"--token-file {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--token-file {path} is not TorchServe's key_file.json (no inference key); use "
                         "--header 'Authorization: Bearer KEY' instead") from None


def auth_headers(headers: dict[str, str] | None, token: str | None = None,
                 token_file: str | Path | None = None) -> dict[str, str]:
    """``headers`` plus ``Authorization: Bearer TOKEN`` (a token, or TorchServe's key_file.json)."""
    out = dict(headers or {})
    if token is not None and token_file is not None:
        raise ValueError("give a token or a token file, not both")
    if token_file is not None:
        token = token_from_file(token_file)
    if token is not None:
        if any(n.lower() == "authorization" for n in out):
            raise ValueError("give --token-file or an Authorization --header, not both")
        out["Authorization"] = f"Bearer {token}"
    return out


class AsyncClient:
    """``AsyncClient("http://HOST:PORT" | "grpc://HOST:PORT" | "torchserve+http://HOST:PORT", model)``.

    ``model`` may be left out when the server serves exactly one; ``version`` picks one of several
    (default: the server's highest). Use as ``async with``; ``headers`` / ``token`` / ``token_file``
    go with every request (HTTP headers, gRPC metadata)."""

    def __init__(self, endpoint: str, model: str | None = None, *, version: str | None = None,
                 timeout_s: float = 120.0, retries: int | RetryPolicy = 8, headers: dict[str, str] | None = None,
                 token: str | None = None, token_file: str | Path | None = None, concurrency: int = 8):
        self.endpoint, self._model, self.version = endpoint, model, version
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(attempts=max(1, int(retries)))
        self.transport: Transport = open_transport(endpoint, timeout_s=timeout_s,
                                                   headers=auth_headers(headers, token, token_file),
                                                   concurrency=concurrency)
        self._info: dict[str, ModelInfo] = {}
        # Set one (bdserve.client.CircuitBreaker) to stop every call at once after a few failed
        # connections in a row, instead of each spending its own retries on a dead server.
        self.breaker: CircuitBreaker | None = None
        self._gate = asyncio.Semaphore(max(1, concurrency))  # /predictions: single images in flight

    # ------------------------------------------------------------------ what the transport allows
    @property
    def scheme(self) -> str:
        return self.transport.scheme

    @property
    def max_batch_size(self) -> int | None:
        return self.transport.max_batch_size

    @property
    def can_choose_defense(self) -> bool:
        return self.transport.can_choose_defense

    # ------------------------------------------------------------------ retries
    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` with the client's retries; a Result learns its attempts and its last attempt's time."""
        attempts = 1

        def count(_e: TransientError) -> None:
            nonlocal attempts
            attempts += 1

        async def timed():
            t0 = time.perf_counter()
            out = await call()
            if isinstance(out, Result):
                out.seconds = time.perf_counter() - t0
            return out

        try:
            out = await with_retries(timed, self.retry, count, self.breaker)
        except RetriesExhausted as e:
            e.attempts = attempts
            raise
        if isinstance(out, Result):
            out.attempts = attempts
        return out

    # ------------------------------------------------------------------ models
    async def models(self) -> list[str]:
        """The served model names (the repository index)."""
        return await self._retried(self.transport.models)

    @property
    def model(self) -> str | None:
        """The model named at construction (or found by ``default_model``)."""
        return self._model

    async def default_model(self) -> str:
        """The model this client asks: the one given, else the server's only one."""
        if self._model is None:
            names = await self.models()
            if len(names) != 1:
                raise PermanentError(f"{self.endpoint} serves {len(names)} models ({', '.join(names)}): name one")
            self._model = names[0]
        return self._model

    async def metadata(self, model: str | None = None) -> ModelInfo:
        """The model's metadata (inputs, outputs, versions); cached per model."""
        name = model or await self.default_model()
        if name not in self._info:
            self._info[name] = await self._retried(lambda: self.transport.metadata(name, self.version))
        return self._info[name]

    async def wait_ready(self, model: str | None = None) -> ModelInfo:
        """Metadata, then readiness, retried while the server starts (not ready counts as transient)."""
        info = await self.metadata(model)

        async def ready():
            if not await self.transport.ready(info.name, self.version):
                raise TransientError(f"model {info.name} is not ready yet")

        await self._retried(ready)
        return info

    # ------------------------------------------------------------------ inference
    async def _outputs(self, model: str, top_k: int | None) -> list[tuple[str, int]] | None:
        """None: every output the model produces (probabilities included); else the label, the
        per-image fields, and the probabilities' top k (none for 0)."""
        if top_k is None:
            return None
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: labels only), got {top_k}")
        per_image = (await self.metadata(model)).per_image_outputs
        return [(oip.OUTPUT_LABEL, 0), *((n, 0) for n in per_image), *([(oip.OUTPUT_PROBS, top_k)] if top_k else [])]

    async def infer(self, tensor: Any, *, model: str | None = None, defense: str | None = None,
                    top_k: int | None = None, request_id: str | None = None) -> Result:
        """A (B, C, H, W) batch as the model's input: uint8 (0..255) or float ([0, 1]).

        ``top_k``: None gives every class's probability, k the best k per image (``Result.top``),
        0 the labels only. ``defense`` is honoured by a ``--lab`` server only (403 otherwise)."""
        datatype, arr = tensor_input(tensor)
        if not self.transport.can_send_tensors:
            if datatype != "UINT8":
                raise ValueError(f"{self.scheme}:// takes encoded images: send uint8 pixels (PNG-encoded here)")
            return await self.predict([encode_chw(x) for x in arr], model=model, defense=defense,
                                      request_id=request_id)
        name = model or await self.default_model()
        outputs = await self._outputs(name, top_k)
        params = {} if defense is None else {oip.DEFENSE: defense}
        inp = Input.tensor(datatype, arr)
        return await self._retried(lambda: self.transport.infer(name, self.version, inp, outputs, params, request_id))

    async def predict(self, images: Any, *, model: str | None = None, defense: str | None = None,
                      top_k: int | None = None, route: str | None = None, request_id: str | None = None) -> Result:
        """Images as files: paths, encoded bytes, PIL images or uint8 (H, W, 3) arrays (one or a list).
        The server decodes and fits them, as it does camera uploads (``Result.fit`` says how).

        http:// sends them in one OIP request (BYTES input), or with ``route="predictions"`` one
        POST /predictions each (TorchServe's answer: its top classes); torchserve+http:// always
        the latter."""
        blobs = images_bytes(images)
        name = model or await self.default_model()
        if route not in (None, "oip", "predictions"):
            raise ValueError(f"route is 'oip' or 'predictions', got {route!r}")
        if route == "predictions" and self.scheme == "grpc":
            raise ValueError("grpc:// has no /predictions route (route applies to http://)")
        if route == "predictions" or not self.transport.can_send_tensors:
            async def one(blob: bytes) -> Result:
                async with self._gate:
                    return await self._retried(lambda: self.transport.predictions(
                        name, self.version, blob, defense, request_id))

            return joined(list(await asyncio.gather(*(one(b) for b in blobs))))
        outputs = await self._outputs(name, top_k)
        params = {} if defense is None else {oip.DEFENSE: defense}
        inp = Input.images(blobs)
        return await self._retried(lambda: self.transport.infer(name, self.version, inp, outputs, params, request_id))

    # ------------------------------------------------------------------ lifetime
    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Client:
    """The synchronous twin of ``AsyncClient`` (same arguments, same methods, same results).

    Its calls run on a private event loop in a background thread, so it works from plain
    scripts and from inside a running loop (a notebook) alike."""

    def __init__(self, endpoint: str, model: str | None = None, **kw):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bdserve-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:  # gRPC's aio channel binds to the loop it is made on
            return AsyncClient(endpoint, model, **kw)

        try:
            self._client = self._run(make())
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def scheme(self) -> str:
        return self._client.scheme

    @property
    def model(self) -> str | None:
        return self._client.model

    def models(self) -> list[str]:
        return self._run(self._client.models())

    def metadata(self, model: str | None = None) -> ModelInfo:
        return self._run(self._client.metadata(model))

    def wait_ready(self, model: str | None = None) -> ModelInfo:
        return self._run(self._client.wait_ready(model))

    def infer(self, tensor: Any, **kw) -> Result:
        return self._run(self._client.infer(tensor, **kw))

    def predict(self, images: Any, **kw) -> Result:
        return self._run(self._client.predict(images, **kw))

    infer.__doc__, predict.__doc__ = AsyncClient.infer.__doc__, AsyncClient.predict.__doc__

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
