"""The Open Inference Protocol v2 messages, built at import from grpc_predict_v2.desc.

Why not protoc's ``*_pb2.py``: generated message code registers ``inference.*`` in
protobuf's process-wide default pool and pins the protobuf runtime it was generated
for. tritonclient and the KServe SDK register the very same names from their own
copies of this proto, so one process could not import both, and bdserve could not be
installed beside them (they need protobuf 6, the gencode wanted 7). Building the
classes in a private descriptor pool from the compiled descriptor set avoids both:
any protobuf runtime from 4.25 on reads it, and nothing is registered globally.

Regenerate the descriptor set and the service stubs after editing the .proto
(serve/README.md has the command; tests/serve/test_protos.py checks they match).
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper

PROTO_FILE = "grpc_predict_v2.proto"
SERVICE_NAME = "inference.GRPCInferenceService"

# The pool reflection serves from (grpc_reflection takes a pool argument).
POOL = descriptor_pool.DescriptorPool()


def _load() -> None:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files(__package__).joinpath("grpc_predict_v2.desc").read_bytes())
    for file_proto in descriptor_set.file:
        POOL.Add(file_proto)


_load()
DESCRIPTOR = POOL.FindFileByName(PROTO_FILE)



def _message_class(name: str):
    """The class of a top-level message; nested types are its attributes (ModelInferRequest.InferInputTensor)."""
    return message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name[name])


ServerLiveRequest = _message_class("ServerLiveRequest")
ServerLiveResponse = _message_class("ServerLiveResponse")
ServerReadyRequest = _message_class("ServerReadyRequest")
ServerReadyResponse = _message_class("ServerReadyResponse")
ModelReadyRequest = _message_class("ModelReadyRequest")
ModelReadyResponse = _message_class("ModelReadyResponse")
ServerMetadataRequest = _message_class("ServerMetadataRequest")
ServerMetadataResponse = _message_class("ServerMetadataResponse")
ModelMetadataRequest = _message_class("ModelMetadataRequest")
ModelMetadataResponse = _message_class("ModelMetadataResponse")
ModelInferRequest = _message_class("ModelInferRequest")
ModelInferResponse = _message_class("ModelInferResponse")
InferParameter = _message_class("InferParameter")
InferTensorContents = _message_class("InferTensorContents")
# Triton's extensions (model configuration, repository index)
ModelConfigRequest = _message_class("ModelConfigRequest")
ModelConfigResponse = _message_class("ModelConfigResponse")
ModelConfig = _message_class("ModelConfig")
ModelInput = _message_class("ModelInput")
ModelOutput = _message_class("ModelOutput")
RepositoryIndexRequest = _message_class("RepositoryIndexRequest")
RepositoryIndexResponse = _message_class("RepositoryIndexResponse")
DataType = enum_type_wrapper.EnumTypeWrapper(DESCRIPTOR.enum_types_by_name["DataType"])
