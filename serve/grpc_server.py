"""The gRPC door: ``inference.GRPCInferenceService`` of the Open Inference Protocol
(grpc_predict_v2.proto, stubs in bdserve.serve.protos), on grpc.aio so that it
shares the event loop - and the batchers - with the HTTP door.

Inputs come as ``raw_input_contents`` (preferred; same layout as the HTTP binary
extension) or typed ``contents`` (fp32_contents, uint_contents, bytes_contents).
Outputs always go back as ``raw_output_contents`` (what Triton does, and what
tritonclient reads). Bad input -> INVALID_ARGUMENT, unknown model/version ->
NOT_FOUND, a refused defense -> PERMISSION_DENIED, each with a message.
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format

from bdserve.serve import access_log, oip
from bdserve.serve.errors import InvalidInput, ModelUnavailable, ServeError
from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from bdserve.serve.service import EXTENSIONS, SERVER_NAME, SERVER_VERSION, InferenceService

log = logging.getLogger(__name__)

PROTOCOL = "grpc"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024  # camera photos are far above gRPC's 4 MB default


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService):
        self.service = service

    async def _abort(self, context, e: ServeError):
        await context.abort(getattr(grpc.StatusCode, e.grpc_code), str(e))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):
        try:
            self.service.get(request.name, request.version)
        except ModelUnavailable:  # failed to load: not ready
            return pb.ModelReadyResponse(ready=False)
        except ServeError as e:
            await self._abort(context, e)
        return pb.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            meta = self.service.metadata(self.service.get(request.name, request.version))
        except ServeError as e:
            await self._abort(context, e)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[T(**t) for t in meta["inputs"]], outputs=[T(**t) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request, context):
        try:
            config = self.service.config(self.service.get(request.name, request.version))
        except ServeError as e:
            await self._abort(context, e)
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    async def RepositoryIndex(self, request, context):
        return json_format.ParseDict({"models": self.service.repository_index()}, pb.RepositoryIndexResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        rid = access_log.request_id(dict(context.invocation_metadata() or ()).get(access_log.REQUEST_ID_HEADER))
        if not request.id:
            request.id = rid
        grpc_code = "OK"
        t0 = time.perf_counter()
        # Metrics count every door's answers in one vocabulary, the HTTP status (the access log keeps gRPC's code).
        with self.service.observe(request.model_name, PROTOCOL) as box:
            try:
                return await self._infer(request)
            except ServeError as e:
                box["code"], grpc_code = str(e.http_status), e.grpc_code
                await self._abort(context, e)
            except Exception:
                box["code"], grpc_code = "500", "INTERNAL"
                log.exception("internal error serving model %s", request.model_name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged on the server)")
            finally:
                access_log.write(protocol="grpc", method="ModelInfer", model=request.model_name[:128],
                                 status=grpc_code, duration_ms=round((time.perf_counter() - t0) * 1000, 3),
                                 bytes_in=request.ByteSize(), request_id=rid)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self.service.get(request.model_name, request.model_version)  # NOT_FOUND before decoding
        return _write_response(await self.service.infer(_read_request(request)))


def _read_request(request: pb.ModelInferRequest) -> oip.InferRequest:
    """ModelInferRequest -> InferRequest (raw_input_contents, or typed contents)."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"the request must have exactly one input tensor, got {len(request.inputs)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    t = request.inputs[0]
    datatype = oip.check_datatype(t.datatype)
    shape = oip.check_shape(list(t.shape))
    value = (oip.from_raw(datatype, shape, raw[0]) if raw
             else oip.from_typed(datatype, shape, lambda name: getattr(t.contents, name)))
    return oip.InferRequest(
        model=request.model_name, version=request.model_version, input=oip.Tensor(t.name, datatype, shape, value),
        parameters={k: oip.read_parameter(v) for k, v in request.parameters.items()},
        outputs=[oip.RequestedOutput.with_parameters(o.name, None, {k: oip.read_parameter(v) for k, v in o.parameters.items()})
                 for o in request.outputs] or None, id=request.id)


def _write_response(resp: oip.InferResponse) -> pb.ModelInferResponse:
    """InferResponse -> ModelInferResponse; outputs always as raw_output_contents."""
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id or "")
    for k, v in resp.parameters.items():
        kind, value = oip.parameter_value(v)
        setattr(out.parameters[k], kind, value)
    for t in resp.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        out.raw_output_contents.append(oip.raw_of(t.datatype, t.value))
    return out


def create_grpc_server(service: InferenceService, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                       reuse_port: bool = False, interceptors=()) -> grpc.aio.Server:
    """``reuse_port``: only for ``--workers`` (serve/workers.py), which holds the port for its workers;
    ``interceptors``: the shutdown drain's (serve/grpc_drain.py) and tracing's (serve/tracing.py)."""
    server = grpc.aio.server(interceptors=list(interceptors) or None, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpcio sets SO_REUSEPORT by default: a second server would then share a busy port
        # and take part of its traffic. Off, binding a busy port fails; on only for --workers.
        ("grpc.so_reuseport", int(reuse_port)),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    return server
