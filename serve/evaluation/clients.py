"""One client interface, three transports, chosen by the endpoint's scheme.

    http://HOST:PORT              Open Inference Protocol v2 over HTTP: raw UINT8 tensors with the
                                  binary tensor extension; photos via POST /predictions/{m}
                                  (or an OIP BYTES input with ``photo_route="oip"``)
    grpc://HOST:PORT              OIP gRPC ModelInfer with raw_input_contents (bdserve's committed stubs)
    torchserve+http://HOST:PORT   TorchServe's POST /predictions/{m}: one PNG-encoded image per request

Every call answers an ``Answer`` (class indices, the per-image outputs the server adds such
as the suspected-trigger flags, and the response parameters such as the defense it applied)
or raises ``TransientError`` (retry) or ``PermanentError`` (count as an error). Labels come
back as class names and are mapped to indices with the card's class list, so the client
scores exactly the server's top-1. Answers are read with the server's own protocol code
(bdserve.serve.oip), so a field the server adds is read here without a change.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bdserve.serve import oip
from bdserve.serve.evaluation.retry import PermanentError, TransientError

TRANSIENT_HTTP = {429, 502, 503, 504}
MAX_MESSAGE = 256 * 1024 * 1024


@dataclass
class Answer:
    labels: np.ndarray  # int64 (B,): predicted class indices
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. suspected_trigger (B,)
    parameters: dict[str, Any] = field(default_factory=dict)  # e.g. defense

    @property
    def suspected(self) -> np.ndarray | None:
        """bool (B,) when the server runs --detect."""
        v = self.per_image.get("suspected_trigger")
        return None if v is None else np.asarray(v, dtype=bool).reshape(-1)

    @property
    def defense(self) -> str | None:
        """The defense the server says it applied."""
        return self.parameters.get(oip.DEFENSE)


class Client:
    """What the runner needs from a transport."""

    scheme = ""
    max_batch_size: int | None = None  # None: any size per request
    can_choose_defense = True

    def __init__(self, address: str, model: str, classes: list[str], timeout_s: float = 120.0):
        self.address, self.model, self.classes, self.timeout_s = address, model, list(classes), timeout_s
        self._index = {c: i for i, c in enumerate(self.classes)}
        self.per_image_outputs: list[str] = []  # learned from the model metadata where the protocol has it

    @property
    def detect(self) -> bool:
        return "suspected_trigger" in self.per_image_outputs

    def answer(self, resp: oip.InferResponse, batch: int) -> Answer:
        """An OIP answer -> Answer; PermanentError when it does not answer ``batch`` images."""
        by_name = {t.name: t.value for t in resp.outputs}
        if oip.OUTPUT_LABEL not in by_name:
            raise PermanentError(f"the answer has no {oip.OUTPUT_LABEL!r} output")
        names = [b.decode() if isinstance(b, bytes) else str(b) for b in by_name[oip.OUTPUT_LABEL]]
        if len(names) != batch:
            raise PermanentError(f"asked about {batch} images, the answer holds {len(names)} labels")
        per_image = {n: np.asarray(by_name[n]).reshape(-1) for n in self.per_image_outputs if n in by_name}
        return Answer(self.label_ids(names), per_image, dict(resp.parameters))

    def label_ids(self, names: list[str]) -> np.ndarray:
        try:
            return np.array([self._index[n] for n in names], dtype=np.int64)
        except KeyError as e:
            raise PermanentError(f"the server answered label {e.args[0]!r}, not one of the card's classes") from None

    async def connect(self) -> None:
        """Check the model is there and ready (TransientError while the server starts)."""

    async def infer_tensor(self, images: np.ndarray, defense: str | None = None) -> Answer:
        raise NotImplementedError

    async def infer_photos(self, blobs: list[bytes], route: str | None = None, defense: str | None = None) -> Answer:
        """Encoded files as they are; ``route`` picks /predictions or an OIP BYTES input where both exist."""
        raise NotImplementedError

    async def close(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def open_client(endpoint: str, model: str, classes: list[str], *, concurrency: int = 8,
                timeout_s: float = 120.0, headers: dict[str, str] | None = None) -> Client:
    """``headers`` go with every request (HTTP headers, gRPC metadata), e.g. a server's token."""
    if "://" not in endpoint:
        raise ValueError(f"endpoint {endpoint!r} has no scheme: write http://{endpoint}, grpc://{endpoint} "
                         f"or torchserve+http://{endpoint}")
    parts = urlsplit(endpoint)
    if not parts.hostname or parts.port is None:
        raise ValueError(f"endpoint {endpoint!r} needs a host and port, e.g. http://127.0.0.1:8080")
    headers = dict(headers or {})
    if parts.scheme == "http":
        return HttpClient(f"http://{parts.netloc}", model, classes, timeout_s, concurrency, headers)
    if parts.scheme == "grpc":
        return GrpcClient(parts.netloc, model, classes, timeout_s, headers)
    if parts.scheme == "torchserve+http":
        return TorchServeClient(f"http://{parts.netloc}", model, classes, timeout_s, concurrency, headers)
    raise ValueError(f"endpoint scheme {parts.scheme!r} not supported: use http://, grpc:// or torchserve+http://")


# ------------------------------------------------------------------------------ HTTP


class _HttpBase(Client):
    def __init__(self, base: str, model: str, classes: list[str], timeout_s: float, concurrency: int,
                 headers: dict[str, str] | None = None):
        import httpx

        super().__init__(base, model, classes, timeout_s)
        self._httpx = httpx
        n = max(1, concurrency)
        self.http = httpx.AsyncClient(base_url=base, timeout=timeout_s, trust_env=False, headers=headers,
                                      limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    async def _request(self, method: str, path: str, **kw):
        try:
            r = await self.http.request(method, path, **kw)
        except self._httpx.TransportError as e:  # refused, reset, timed out: the request had no answer
            raise TransientError(f"{type(e).__name__}: {e or 'connection failed'}") from None
        if r.status_code in TRANSIENT_HTTP:
            raise TransientError(f"HTTP {r.status_code}: {_error_text(r)}")
        if r.status_code != 200:
            raise PermanentError(f"HTTP {r.status_code}: {_error_text(r)}")
        return r

    async def _predictions(self, blob: bytes, defense: str | None = None) -> Answer:
        """POST /predictions/{m} with the raw file as the body (TorchServe's image-classifier answer);
        ``defense`` goes as ``?defense=`` (honoured by a --lab bdserve, refused with 403 otherwise)."""
        r = await self._request("POST", f"/predictions/{self.model}", content=blob,
                                params=None if defense is None else {oip.DEFENSE: defense},
                                headers={"Content-Type": "application/octet-stream"})
        try:
            scores = r.json()
            # The top-k dict; its best entry is the top-1 (first of equals, as the server orders them).
            best = max(scores.items(), key=lambda kv: kv[1])[0]
        except (ValueError, AttributeError) as e:
            raise PermanentError(f"unreadable /predictions answer: {e}") from None
        parameters, per_image = oip.read_headers(r.headers)
        return Answer(self.label_ids([best]), per_image, parameters)

    async def close(self) -> None:
        await self.http.aclose()


def _error_text(r) -> str:
    try:
        doc = r.json()
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except ValueError:
        pass
    return r.text[:200] or r.reason_phrase


class HttpClient(_HttpBase):
    scheme = "http"

    async def connect(self) -> None:
        r = await self._request("GET", f"/v2/models/{self.model}")
        self.per_image_outputs = oip.per_image_output_names([o.get("name") for o in r.json().get("outputs", [])])
        await self._request("GET", f"/v2/models/{self.model}/ready")

    def _outputs(self) -> list[dict]:
        names = [oip.OUTPUT_LABEL, *self.per_image_outputs]
        return [{"name": n, "parameters": {"binary_data": True}} for n in names]

    async def _infer(self, name: str, datatype: str, shape: list[int], raw: bytes, defense: str | None) -> Answer:
        head = {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                            "parameters": {"binary_data_size": len(raw)}}],
                "outputs": self._outputs()}
        if defense is not None:
            head["parameters"] = {oip.DEFENSE: defense}
        js = json.dumps(head, separators=(",", ":")).encode()
        r = await self._request("POST", f"/v2/models/{self.model}/infer", content=js + raw,
                                headers={"Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(len(js))})
        return self._parse(r, shape[0])

    def _parse(self, r, batch: int) -> Answer:
        try:
            resp = oip.read_http_response(r.content, r.headers.get(oip.HEADER_LEN))
        except Exception as e:  # noqa: BLE001 - any malformed answer is the server's fault, not retryable
            raise PermanentError(f"unreadable OIP answer: {type(e).__name__}: {e}") from None
        return self.answer(resp, batch)

    async def infer_tensor(self, images: np.ndarray, defense: str | None = None) -> Answer:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        return await self._infer(oip.TENSOR_INPUT, "UINT8", list(images.shape), images.tobytes(), defense)

    async def infer_photos(self, blobs: list[bytes], route: str | None = None, defense: str | None = None) -> Answer:
        if route == "oip":
            return await self._infer(oip.IMAGE_INPUT, "BYTES", [len(blobs)], oip.pack_bytes(blobs), defense)
        if len(blobs) != 1:
            raise ValueError("/predictions takes one photo per request")
        return await self._predictions(blobs[0], defense)


class TorchServeClient(_HttpBase):
    """TorchServe's inference API: one encoded image per request; the defense is the archive's."""

    scheme = "torchserve+http"
    max_batch_size = 1
    can_choose_defense = False

    async def connect(self) -> None:
        await self._request("GET", "/ping")

    async def infer_tensor(self, images: np.ndarray, defense: str | None = None) -> Answer:
        if defense is not None:
            raise PermanentError("TorchServe's /predictions cannot choose a defense (it is the archive's)")
        if len(images) != 1:
            raise ValueError("TorchServe takes one image per request")
        return await self.infer_photos([encode_png(images[0])])

    async def infer_photos(self, blobs: list[bytes], route: str | None = None, defense: str | None = None) -> Answer:
        if defense is not None:
            raise PermanentError("TorchServe's /predictions cannot choose a defense (it is the archive's)")
        if len(blobs) != 1:
            raise ValueError("TorchServe takes one image per request")
        return await self._predictions(blobs[0])


def encode_png(chw: np.ndarray) -> bytes:
    """uint8 (3, H, W) -> PNG bytes (lossless: the server decodes the very same pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------ gRPC


class GrpcClient(Client):
    scheme = "grpc"

    def __init__(self, target: str, model: str, classes: list[str], timeout_s: float,
                 headers: dict[str, str] | None = None):
        import grpc

        from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
        from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

        super().__init__(target, model, classes, timeout_s)
        self._grpc, self.pb = grpc, pb
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
        ])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())  # gRPC keys are lower case

    async def _call(self, method, request):
        grpc = self._grpc
        try:
            return await method(request, timeout=self.timeout_s, metadata=self.metadata or None)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TransientError(f"gRPC {code.name}: {e.details()}") from None
            raise PermanentError(f"gRPC {code.name}: {e.details()}") from None

    async def connect(self) -> None:
        meta = await self._call(self.stub.ModelMetadata, self.pb.ModelMetadataRequest(name=self.model))
        self.per_image_outputs = oip.per_image_output_names([o.name for o in meta.outputs])
        ready = await self._call(self.stub.ModelReady, self.pb.ModelReadyRequest(name=self.model))
        if not ready.ready:
            raise TransientError(f"model {self.model} is not ready yet")

    async def _infer(self, name: str, datatype: str, shape: list[int], raw: bytes, defense: str | None) -> Answer:
        pb = self.pb
        req = pb.ModelInferRequest(model_name=self.model)
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
        for out in [oip.OUTPUT_LABEL, *self.per_image_outputs]:
            req.outputs.add(name=out)
        if defense is not None:
            req.parameters[oip.DEFENSE].string_param = defense
        resp = await self._call(self.stub.ModelInfer, req)
        try:
            outputs = [oip.Tensor(o.name, o.datatype, list(o.shape), oip.read_output(o.datatype, list(o.shape), raw=raw))
                       for o, raw in zip(resp.outputs, resp.raw_output_contents)]
        except Exception as e:  # noqa: BLE001
            raise PermanentError(f"unreadable ModelInfer answer: {type(e).__name__}: {e}") from None
        params = {k: oip.read_parameter(v) for k, v in resp.parameters.items()}
        return self.answer(oip.InferResponse(resp.model_name, resp.model_version, outputs, params, resp.id), shape[0])

    async def infer_tensor(self, images: np.ndarray, defense: str | None = None) -> Answer:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        return await self._infer(oip.TENSOR_INPUT, "UINT8", list(images.shape), images.tobytes(), defense)

    async def infer_photos(self, blobs: list[bytes], route: str | None = None, defense: str | None = None) -> Answer:
        return await self._infer(oip.IMAGE_INPUT, "BYTES", [len(blobs)], oip.pack_bytes(blobs), defense)

    async def close(self) -> None:
        await self.channel.close()
