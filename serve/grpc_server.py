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

import grpc
import numpy as np

from bdserve.serve import oip
from bdserve.serve.errors import InvalidInput, ServeError
from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from bdserve.serve.service import EXTENSIONS, SERVER_NAME, SERVER_VERSION, InferenceService

log = logging.getLogger(__name__)

PROTOCOL = "grpc"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024  # camera photos are far above gRPC's 4 MB default


def _param_value(p: pb.InferParameter):
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _typed_contents(datatype: str, shape: list[int], contents: pb.InferTensorContents):
    if datatype == "BYTES":
        return _check_count(list(contents.bytes_contents), shape)
    field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT64": "uint64_contents", "BOOL": "bool_contents"}.get(datatype)
    if field is None:
        raise InvalidInput(f"datatype {datatype} cannot be sent as typed contents; use raw_input_contents")
    values = getattr(contents, field)
    n = int(np.prod(shape))
    if len(values) != n:
        raise InvalidInput(f"shape {shape} needs {n} elements, contents.{field} holds {len(values)}")
    dtype = oip.NUMPY_DTYPES[datatype]
    arr = np.asarray(values, dtype=np.float64 if datatype.startswith("FP") else np.int64)
    if np.issubdtype(dtype, np.integer) and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"values out of range for {datatype} ({info.min}..{info.max})")
    return arr.astype(dtype).reshape(shape)


def _check_count(values: list[bytes], shape: list[int]) -> list[bytes]:
    n = int(np.prod(shape))
    if len(values) != n:
        raise InvalidInput(f"shape {shape} needs {n} elements, contents.bytes_contents holds {len(values)}")
    return values


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

    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        with self.service.observe(request.model_name, PROTOCOL, ok_code="OK") as box:
            try:
                return await self._infer(request)
            except ServeError as e:
                box["code"] = e.grpc_code
                await self._abort(context, e)
            except Exception:
                box["code"] = "INTERNAL"
                log.exception("internal error serving model %s", request.model_name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged on the server)")

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = self.service.get(request.model_name, request.model_version)
        if len(request.inputs) != 1:
            raise InvalidInput(f"the request must have exactly one input tensor, got {len(request.inputs)}")
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
        t = request.inputs[0]
        datatype = oip.check_datatype(t.datatype)
        shape = oip.check_shape(list(t.shape))
        value = oip.from_raw(datatype, shape, raw[0]) if raw else _typed_contents(datatype, shape, t.contents)
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        x = await self.service.to_tensor(model, t.name, datatype, shape, value)
        pred = await self.service.infer(model, x, params.get("defense"))

        produced = oip.prediction_outputs(pred, model.detect)
        if request.outputs:
            by_name = {o[0]: o for o in produced}
            missing = [o.name for o in request.outputs if o.name not in by_name]
            if missing:
                raise InvalidInput(f"unknown output {missing[0]!r}; this model produces {', '.join(by_name)}")
            produced = [by_name[o.name] for o in request.outputs]
        resp = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        resp.parameters["defense"].string_param = pred.defense
        if pred.suspected is not None:
            resp.parameters["suspected_trigger"].bool_param = bool(pred.suspected.any())
        for name, dt, shape, value in produced:
            resp.outputs.add(name=name, datatype=dt, shape=shape)
            resp.raw_output_contents.append(oip.raw_of(dt, value))
        return resp


def create_grpc_server(service: InferenceService, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                       interceptors=()) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=list(interceptors), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    return server
