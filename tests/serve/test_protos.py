"""The OIP v2 messages live in a private descriptor pool, so bdserve imports beside the
current tritonclient and the KServe SDK. The committed descriptor set must match the .proto."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.version import Version

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb

PROTOS = Path(pb.__file__).parent


def test_descriptor_set_matches_the_proto(tmp_path):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "fresh.desc"
    rc = protoc.main(["protoc", f"-I{PROTOS}", f"--descriptor_set_out={out}", str(PROTOS / pb.PROTO_FILE)])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    committed = descriptor_pb2.FileDescriptorSet.FromString((PROTOS / "grpc_predict_v2.desc").read_bytes())
    assert fresh == committed, "regenerate serve/protos/grpc_predict_v2.desc (serve/README.md has the command)"


def test_nothing_is_registered_in_the_default_pool():
    from google.protobuf import descriptor_pool

    assert pb.DESCRIPTOR.pool is pb.POOL and pb.POOL is not descriptor_pool.Default()
    assert {"ModelInfer", "ModelMetadata"} <= set(pb.POOL.FindServiceByName(pb.SERVICE_NAME).methods_by_name)


def test_current_tritonclient_imports_beside_bdserve():
    """tritonclient's generated code registers inference.* globally; ours must not collide with it."""
    from tritonclient.grpc import service_pb2 as triton_pb

    assert Version(importlib.metadata.version("tritonclient")) >= Version("2.73")
    # Same wire format: a request built by bdserve's classes parses as Triton's.
    ours = pb.ModelInferRequest(model_name="m", id="7")
    ours.inputs.add(name="input", datatype="UINT8", shape=[1, 3, 2, 2])
    ours.raw_input_contents.append(bytes(12))
    theirs = triton_pb.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "m" and list(theirs.inputs[0].shape) == [1, 3, 2, 2]
