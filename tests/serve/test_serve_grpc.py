"""The gRPC door (inference.GRPCInferenceService) through the generated stub."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
import torch

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

from serve_helpers import MAX_BODY, bomb_png, decode_raw_output, encode, pack_bytes, random_image


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", 4 * MAX_BODY)]) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


@pytest.fixture(scope="module")
def lab_stub(lab_server):
    with grpc.insecure_channel(lab_server.grpc_target) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def request(model, datatype, shape, raw, name="input", version="", **params):
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="r1")
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    for k, v in params.items():
        req.parameters[k].string_param = v
    return req


def outputs(resp) -> dict:
    out = {}
    for o, raw in zip(resp.outputs, resp.raw_output_contents):
        out[o.name] = decode_raw_output(o.datatype, o.shape, raw)
    return out


def test_health_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="3")).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "bdserve" and "binary_tensor_data" in meta.extensions
    m = stub.ModelMetadata(pb.ModelMetadataRequest(name="foreign"))
    assert m.versions == ["1"] and list(m.inputs[0].shape) == [-1, 3, 64, 64]
    assert [o.name for o in m.outputs] == ["probabilities", "label"]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nosuch"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model" in e.value.details()


def test_infer_matches_in_process(stub, tiny_model, rng):
    x = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    expect = tiny_model.predict(torch.from_numpy(x))
    resp = stub.ModelInfer(request("tiny", "UINT8", [4, 3, 32, 32], x.tobytes()))
    out = outputs(resp)
    assert resp.id == "r1" and resp.parameters["defense"].string_param == "flip"
    assert np.allclose(out["probabilities"], expect.probs, atol=1e-5) and out["label"] == expect.labels
    # FP32 raw, and FP32 as typed contents
    xf = (x / 255.0).astype(np.float32)
    out = outputs(stub.ModelInfer(request("tiny", "FP32", [4, 3, 32, 32], xf.tobytes())))
    assert np.allclose(out["probabilities"], expect.probs, atol=1e-5)
    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="input", datatype="FP32", shape=[4, 3, 32, 32])
    t.contents.fp32_contents.extend(xf.reshape(-1).tolist())
    assert np.allclose(outputs(stub.ModelInfer(req))["probabilities"], expect.probs, atol=1e-5)


def test_images_and_requested_outputs(stub, tiny_model, rng):
    imgs = [encode(random_image(rng, 200, 300), "JPEG"), encode(random_image(rng, 50, 50), "WEBP")]
    expect = tiny_model.predict(tiny_model.decode(imgs))
    req = request("tiny", "BYTES", [2], pack_bytes(imgs), name="image")
    req.outputs.add(name="label")
    resp = stub.ModelInfer(req)
    assert [o.name for o in resp.outputs] == ["label"] and outputs(resp)["label"] == expect.labels


def test_lab_defense_none_matches_in_process(lab_stub, stub, tiny_model, rng):
    x = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request("tiny", "UINT8", [8, 3, 32, 32], x.tobytes(), defense="none"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--lab" in e.value.details()
    resp = lab_stub.ModelInfer(request("tiny", "UINT8", [8, 3, 32, 32], x.tobytes(), defense="none"))
    assert resp.parameters["defense"].string_param == "none"
    assert np.allclose(outputs(resp)["probabilities"], tiny_model.predict(torch.from_numpy(x), defense="none").probs, atol=1e-5)
    resp = lab_stub.ModelInfer(request("tiny", "UINT8", [8, 3, 32, 32], x.tobytes()))
    assert "suspected_trigger" in outputs(resp) and resp.parameters["suspected_trigger"].WhichOneof("parameter_choice") == "bool_param"


def test_bad_input_is_invalid_argument_and_next_request_works(stub, rng):
    good = request("tiny", "UINT8", [1, 3, 32, 32], rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8).tobytes())
    jpeg = encode(random_image(rng, 100, 100), "JPEG")
    nan = np.zeros((1, 3, 32, 32), np.float32)
    nan[0, 0, 0, 0] = np.nan
    two = request("tiny", "UINT8", [1, 3, 32, 32], bytes(3072))
    two.raw_input_contents.append(b"extra")
    typed_mismatch = pb.ModelInferRequest(model_name="tiny")
    typed_mismatch.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32]).contents.fp32_contents.extend([0.0] * 10)
    cases = [
        (request("tiny", "BYTES", [1], pack_bytes([b"not an image, just text"]), name="image"), "INVALID_ARGUMENT", "not an image"),
        (request("tiny", "BYTES", [1], pack_bytes([jpeg[:300]]), name="image"), "INVALID_ARGUMENT", "truncated|corrupt"),
        (request("tiny", "BYTES", [1], pack_bytes([bomb_png()]), name="image"), "INVALID_ARGUMENT", "pixel"),
        (request("tiny", "UINT8", [1, 3, 16, 16], bytes(768)), "INVALID_ARGUMENT", "expected shape"),
        (request("tiny", "INT32", [1, 3, 32, 32], bytes(3072 * 4)), "INVALID_ARGUMENT", "INT32 not accepted"),
        (request("tiny", "UINT8", [3, 32, 32], bytes(3072)), "INVALID_ARGUMENT", "rank"),
        (request("tiny", "UINT8", [1, 3, 32, 32], bytes(100)), "INVALID_ARGUMENT", "needs 3072 bytes"),
        (request("tiny", "FP32", [1, 3, 32, 32], nan.tobytes()), "INVALID_ARGUMENT", "NaN"),
        (request("tiny", "BYTES", [1], b"\x10\x00", name="image"), "INVALID_ARGUMENT", "malformed BYTES"),
        (two, "INVALID_ARGUMENT", "raw_input_contents has 2 entries"),
        (typed_mismatch, "INVALID_ARGUMENT", "needs 3072 elements"),
        (request("nosuch", "UINT8", [1, 3, 32, 32], bytes(3072)), "NOT_FOUND", "unknown model"),
        (request("tiny", "UINT8", [1, 3, 32, 32], bytes(3072), version="9"), "NOT_FOUND", "no version"),
        (request("tiny", "UINT8", [1, 3, 32, 32], bytes(2 * MAX_BODY)), "RESOURCE_EXHAUSTED", ""),
    ]
    for req, code, pattern in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code().name == code, (pattern, e.value.code(), e.value.details())
        assert not pattern or re.search(pattern, e.value.details()), e.value.details()
        assert len(outputs(stub.ModelInfer(good))["label"]) == 1
