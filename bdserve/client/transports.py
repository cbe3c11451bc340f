"""One request, one attempt, three transports chosen by the endpoint's scheme.

    http://HOST:PORT              Open Inference Protocol v2 over HTTP: raw tensors with the binary
                                  tensor extension; encoded images as an OIP BYTES input, or one per
                                  request by POST /predictions/{m}
    grpc://HOST:PORT              OIP gRPC ModelInfer with raw_input_contents (bdserve's committed stubs)
    torchserve+http://HOST:PORT   TorchServe's POST /predictions/{m}: one encoded image per request

Every call answers a ``Result`` or raises ``TransientError`` (worth a retry: no connection,
HTTP 429/502/503/504, gRPC UNAVAILABLE/DEADLINE_EXCEEDED) or ``RequestRejected`` (the server's
status and message). Retries and the choice of outputs are the client's (client.py); answers
are read with the server's own protocol code (bdserve.serve.oip), so a field the server adds
is read here without a change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import numpy as np

from bdserve.client.results import Result, from_predictions, from_response
from bdserve.client.retry import PermanentError, RequestRejected, TransientError, Unreachable
from bdserve.serve import oip

TRANSIENT_HTTP = {429, 502, 503, 504}
MAX_MESSAGE = 256 * 1024 * 1024
REQUEST_ID = "x-request-id"  # the header (gRPC: metadata key) bdserve's access log reads and echoes


@dataclass
class ModelInfo:
    """A model's metadata as the server advertises it (OIP ``GET /v2/models/{m}``, ModelMetadata)."""

    name: str
    versions: list[str] = field(default_factory=list)
    platform: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # HTTP only: e.g. the fit encoded images get

    @property
    def detect(self) -> bool:
        """Whether the server runs trigger detectors for this model (--detect)."""
        return "suspected_trigger" in self.outputs

    @property
    def per_image_outputs(self) -> list[str]:
        return oip.per_image_output_names(self.outputs)


@dataclass
class Input:
    """One OIP input tensor on the wire."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes

    @classmethod
    def tensor(cls, datatype: str, arr: np.ndarray) -> "Input":
        return cls(oip.TENSOR_INPUT, datatype, list(arr.shape), arr.tobytes())

    @classmethod
    def images(cls, blobs: list[bytes]) -> "Input":
        return cls(oip.IMAGE_INPUT, "BYTES", [len(blobs)], oip.pack_bytes(blobs))


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """``scheme://host:port`` -> (scheme, host:port), with a message that says what to write."""
    if "://" not in endpoint:
        raise ValueError(f"endpoint {endpoint!r} has no scheme: write http://{endpoint}, grpc://{endpoint} "
                         f"or torchserve+http://{endpoint}")
    parts = urlsplit(endpoint)
    if parts.scheme not in TRANSPORTS:
        raise ValueError(f"endpoint scheme {parts.scheme!r} not supported: use http://, grpc:// or torchserve+http://")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"endpoint {endpoint!r} needs a host and port, e.g. http://127.0.0.1:8080")
    return parts.scheme, parts.netloc


class Transport:
    scheme = ""
    max_batch_size: int | None = None  # None: any number of images per request
    can_choose_defense = True
    can_send_tensors = True  # an OIP tensor input (else each image goes as a PNG file)

    def __init__(self, address: str, timeout_s: float, headers: dict[str, str]):
        self.address, self.timeout_s, self.headers = address, timeout_s, dict(headers)

    async def metadata(self, model: str, version: str | None) -> ModelInfo:
        raise NotImplementedError

    async def ready(self, model: str, version: str | None) -> bool:
        raise NotImplementedError

    async def models(self) -> list[str]:
        raise NotImplementedError

    async def infer(self, model: str, version: str | None, inp: Input, outputs: list[tuple[str, int]] | None,
                    parameters: dict, request_id: str | None) -> Result:
        """``outputs``: (name, class_count) to ask for, None for every output the model produces."""
        raise NotImplementedError

    async def predictions(self, model: str, version: str | None, blob: bytes, defense: str | None,
                          request_id: str | None) -> Result:
        raise NotImplementedError(f"{self.scheme}:// has no /predictions route")

    async def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ HTTP


def _model_path(model: str, version: str | None, root: str = "/v2/models") -> str:
    """OIP: /v2/models/{m}[/versions/{v}]; TorchServe: /predictions/{m}[/{v}]."""
    path = f"{root}/{quote(model, safe='')}"
    if version:
        path += f"/versions/{quote(version, safe='')}" if root == "/v2/models" else f"/{quote(version, safe='')}"
    return path


def _error_text(r) -> str:
    try:
        doc = r.json()
        if isinstance(doc, dict):
            for key in ("error", "message", "detail"):  # bdserve/KServe, TorchServe, FastAPI
                if key in doc:
                    return str(doc[key])
    except ValueError:
        pass
    return r.text[:200] or r.reason_phrase


class _HttpBase(Transport):
    def __init__(self, address: str, timeout_s: float, headers: dict[str, str], concurrency: int):
        import httpx

        super().__init__(address, timeout_s, headers)
        self._httpx = httpx
        n = max(1, concurrency)
        self.http = httpx.AsyncClient(base_url=f"http://{address}", timeout=timeout_s, trust_env=False,
                                      headers=self.headers,
                                      limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))

    async def _request(self, method: str, path: str, request_id: str | None = None, **kw):
        if request_id is not None:
            kw["headers"] = {**kw.get("headers", {}), REQUEST_ID: request_id}
        try:
            r = await self.http.request(method, path, **kw)
        except (self._httpx.ConnectError, self._httpx.ConnectTimeout) as e:  # no server there (the breaker counts these)
            raise Unreachable(f"{type(e).__name__}: {e or 'connection failed'} ({self.address})") from None
        except self._httpx.TransportError as e:  # reset, timed out: the request had no answer
            raise TransientError(f"{type(e).__name__}: {e or 'connection failed'} ({self.address})") from None
        if r.status_code in TRANSIENT_HTTP:
            raise TransientError(f"HTTP {r.status_code}: {_error_text(r)}")
        if r.status_code != 200:
            raise RequestRejected(r.status_code, _error_text(r))
        return r

    async def predictions(self, model, version, blob, defense, request_id) -> Result:
        """POST /predictions/{m} with the raw file as the body (TorchServe's image-classifier answer);
        ``defense`` goes as ``?defense=`` (honoured by a --lab bdserve, refused with 403 otherwise)."""
        r = await self._request("POST", _model_path(model, version, "/predictions"), request_id, content=blob,
                                params=None if defense is None else {oip.DEFENSE: defense},
                                headers={"Content-Type": "application/octet-stream"})
        try:
            scores = r.json()
        except ValueError as e:
            raise PermanentError(f"unreadable /predictions answer: {e}") from None
        return from_predictions(scores, r.headers, model)

    async def close(self) -> None:
        await self.http.aclose()


class HttpTransport(_HttpBase):
    scheme = "http"

    async def metadata(self, model, version) -> ModelInfo:
        doc = (await self._request("GET", _model_path(model, version))).json()
        return ModelInfo(doc.get("name", model), list(doc.get("versions") or []), doc.get("platform", ""),
                         [i.get("name") for i in doc.get("inputs", [])], [o.get("name") for o in doc.get("outputs", [])],
                         doc.get("parameters") or {})

    async def ready(self, model, version) -> bool:
        await self._request("GET", _model_path(model, version) + "/ready")
        return True

    async def models(self) -> list[str]:
        index = (await self._request("POST", "/v2/repository/index", json={})).json()
        return sorted({m["name"] for m in index})

    async def infer(self, model, version, inp, outputs, parameters, request_id) -> Result:
        head: dict = {"inputs": [{"name": inp.name, "datatype": inp.datatype, "shape": inp.shape,
                                  "parameters": {"binary_data_size": len(inp.raw)}}]}
        if outputs is None:
            head["parameters"] = {"binary_data_output": True}
        else:
            head["outputs"] = [{"name": n, "parameters": {"binary_data": True, **({oip.CLASSIFICATION: k} if k else {})}}
                               for n, k in outputs]
        if parameters:
            head["parameters"] = {**head.get("parameters", {}), **parameters}
        if request_id is not None:
            head["id"] = request_id
        js = json.dumps(head, separators=(",", ":")).encode()
        r = await self._request("POST", _model_path(model, version) + "/infer", request_id, content=js + inp.raw,
                                headers={"Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(len(js))})
        try:
            resp = oip.read_http_response(r.content, r.headers.get(oip.HEADER_LEN))
        except Exception as e:  # noqa: BLE001 - any malformed answer is the server's fault, not retryable
            raise PermanentError(f"unreadable OIP answer: {type(e).__name__}: {e}") from None
        result = from_response(resp, inp.shape[0])
        result.request_id = result.request_id or r.headers.get(REQUEST_ID)
        return result


class TorchServeTransport(_HttpBase):
    """TorchServe's inference API: one encoded image per request; the defense is the archive's."""

    scheme = "torchserve+http"
    max_batch_size = 1
    can_choose_defense = False
    can_send_tensors = False

    async def metadata(self, model, version) -> ModelInfo:
        return ModelInfo(model, [version] if version else [])  # the inference port has no metadata route

    async def ready(self, model, version) -> bool:
        await self._request("GET", "/ping")
        return True

    async def models(self) -> list[str]:
        raise PermanentError("torchserve+http:// lists no models on its inference port: name the model")

    async def predictions(self, model, version, blob, defense, request_id) -> Result:
        if defense is not None:
            raise PermanentError("TorchServe's /predictions cannot choose a defense (it is the archive's)")
        return await super().predictions(model, version, blob, None, request_id)


# ------------------------------------------------------------------------------ gRPC


class GrpcTransport(Transport):
    scheme = "grpc"

    def __init__(self, address: str, timeout_s: float, headers: dict[str, str]):
        import grpc

        from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
        from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

        super().__init__(address, timeout_s, headers)
        self._grpc, self.pb = grpc, pb
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
        ])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata_pairs = tuple((k.lower(), v) for k, v in self.headers.items())  # gRPC keys are lower case

    async def _call(self, method, request, request_id: str | None = None):
        grpc = self._grpc
        metadata = self.metadata_pairs + (((REQUEST_ID, request_id),) if request_id is not None else ())
        try:
            return await method(request, timeout=self.timeout_s, metadata=metadata or None)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAVAILABLE and "connect" in (e.details() or "").lower():
                raise Unreachable(f"gRPC {code.name}: {e.details()} ({self.address})") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise TransientError(f"gRPC {code.name}: {e.details()} ({self.address})") from None
            raise RequestRejected(code.name, e.details() or "") from None

    async def metadata(self, model, version) -> ModelInfo:
        meta = await self._call(self.stub.ModelMetadata, self.pb.ModelMetadataRequest(name=model, version=version or ""))
        return ModelInfo(meta.name, list(meta.versions), meta.platform, [i.name for i in meta.inputs],
                         [o.name for o in meta.outputs])

    async def ready(self, model, version) -> bool:
        r = await self._call(self.stub.ModelReady, self.pb.ModelReadyRequest(name=model, version=version or ""))
        return bool(r.ready)

    async def models(self) -> list[str]:
        index = await self._call(self.stub.RepositoryIndex, self.pb.RepositoryIndexRequest())
        return sorted({m.name for m in index.models})

    async def infer(self, model, version, inp, outputs, parameters, request_id) -> Result:
        req = self.pb.ModelInferRequest(model_name=model, model_version=version or "", id=request_id or "")
        req.inputs.add(name=inp.name, datatype=inp.datatype, shape=inp.shape)
        req.raw_input_contents.append(inp.raw)
        for name, k in outputs or []:
            out = req.outputs.add(name=name)
            if k:
                out.parameters[oip.CLASSIFICATION].int64_param = k
        for key, value in parameters.items():
            kind, v = oip.parameter_value(value)
            setattr(req.parameters[key], kind, v)
        msg = await self._call(self.stub.ModelInfer, req, request_id)
        try:
            resp = oip.read_grpc_response(msg)
        except Exception as e:  # noqa: BLE001
            raise PermanentError(f"unreadable ModelInfer answer: {type(e).__name__}: {e}") from None
        return from_response(resp, inp.shape[0])

    async def close(self) -> None:
        await self.channel.close()


TRANSPORTS = {"http": HttpTransport, "grpc": GrpcTransport, "torchserve+http": TorchServeTransport}


def open_transport(endpoint: str, *, timeout_s: float, headers: dict[str, str], concurrency: int = 8) -> Transport:
    scheme, address = parse_endpoint(endpoint)
    if scheme == "grpc":
        return GrpcTransport(address, timeout_s, headers)
    return TRANSPORTS[scheme](address, timeout_s, headers, concurrency)
