"""Trigger detection served (--detect, --on-suspect): the same scores in-process and through
every door, refusal of uncalibrated models, reject mode, and the metrics."""

from __future__ import annotations

import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import torch

from bdserve.serve import oip
from bdserve.serve.pipeline import DefendedModel
from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from bdserve.transforms.detectors import DETECTORS as DETECTOR_NAMES

from serve_helpers import DETECTORS, decode_raw_output, encode, metric, random_image, start_server

SCORES = ["trigger_score"] + [f"trigger_score_{m}" for m in DETECTOR_NAMES]


@pytest.fixture(scope="module")
def detecting(detect_store):
    """The tiny model as served: its calibrated detectors, in-process."""
    return DefendedModel.load(detect_store / "tiny", detect=DETECTORS, lab=True, threads=1)


@pytest.fixture(scope="module")
def lab_batch():
    """A seeded batch: smooth blobs like the calibration images, plus white noise (often flagged)."""
    rng = np.random.default_rng(21)
    blobs = np.stack([random_image(rng, 32, 32) for _ in range(10)]).transpose(0, 3, 1, 2)
    noise = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([blobs, noise]))


def test_protocol_names_the_detectors_the_transforms_have():
    assert oip.TRIGGER_DETECTORS == DETECTOR_NAMES


def test_scores_are_identical_in_process_and_through_http_grpc_and_predictions(lab_server, detecting, lab_batch):
    ref = detecting.predict(torch.from_numpy(lab_batch))
    want = {"trigger_score": ref.trigger_score, **{f"trigger_score_{m}": ref.detector_score(m) for m in DETECTOR_NAMES}}
    assert ref.suspected.any() and not ref.suspected.all()  # the batch has both kinds
    assert np.array_equal(ref.suspected, ref.trigger_score > 0)
    assert np.array_equal(ref.trigger_score, ref.detector_scores.max(1))
    # A score depends on the image alone: the same numbers one image at a time.
    for i in (0, 12):
        assert detecting.predict(torch.from_numpy(lab_batch[i:i + 1])).trigger_score[0] == ref.trigger_score[i]

    # HTTP, OIP JSON.
    meta = httpx.get(f"{lab_server.http_url}/v2/models/tiny").json()
    assert {o["name"] for o in meta["outputs"]} >= {"suspected_trigger", *SCORES}
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(lab_batch.shape),
                        "data": lab_batch.reshape(-1).tolist()}]}
    doc = httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json=body).json()
    outs = {o["name"]: o for o in doc["outputs"]}
    for name, v in want.items():
        assert outs[name]["datatype"] == "FP32"
        assert np.array_equal(np.array(outs[name]["data"], dtype=np.float32), v), name
    assert outs["suspected_trigger"]["data"] == ref.suspected.tolist()
    assert doc["parameters"]["suspected_trigger"] is True
    assert np.float32(doc["parameters"]["trigger_score"]) == ref.trigger_score.max()

    # gRPC, raw contents and typed parameters.
    with grpc.insecure_channel(lab_server.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="tiny")
        req.inputs.add(name="input", datatype="UINT8", shape=list(lab_batch.shape))
        req.raw_input_contents.append(lab_batch.tobytes())
        resp = stub.ModelInfer(req)
    got = {o.name: decode_raw_output(o.datatype, o.shape, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents)}
    for name, v in want.items():
        assert np.array_equal(np.asarray(got[name]).reshape(-1), v), name
    assert list(got["suspected_trigger"]) == ref.suspected.tolist()
    assert resp.parameters["suspected_trigger"].bool_param is True
    # KServe's InferParameter has no double: the float comes as its shortest decimal string.
    assert np.float32(float(resp.parameters["trigger_score"].string_param)) == ref.trigger_score.max()

    # /predictions: one PNG (lossless: the same pixels), the scores as headers.
    for i in (0, 12):
        r = httpx.post(f"{lab_server.http_url}/predictions/tiny", content=encode(lab_batch[i].transpose(1, 2, 0)))
        assert r.status_code == 200, r.text
        assert r.headers["X-Bdserve-Suspected-Trigger"] == ("true" if ref.suspected[i] else "false")
        assert np.float32(float(r.headers["X-Bdserve-Trigger-Score"])) == ref.trigger_score[i]
        for m in DETECTOR_NAMES:
            assert np.float32(float(r.headers[f"X-Bdserve-Trigger-Score-{m.capitalize()}"])) == ref.detector_score(m)[i]


def test_detection_metrics(lab_server, detecting, lab_batch):
    before = httpx.get(f"{lab_server.http_url}/metrics").text
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(lab_batch.shape),
                        "data": lab_batch.reshape(-1).tolist()}]}
    assert httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json=body).status_code == 200
    after = httpx.get(f"{lab_server.http_url}/metrics").text
    ref = detecting.predict(torch.from_numpy(lab_batch))
    for m in DETECTOR_NAMES:
        grew = (metric(after, "bdserve_trigger_score_count", model="tiny", method=m)
                - metric(before, "bdserve_trigger_score_count", model="tiny", method=m))
        assert grew == len(lab_batch)
        above = (metric(after, "bdserve_trigger_score_bucket", model="tiny", method=m, le="0.0")
                 - metric(before, "bdserve_trigger_score_bucket", model="tiny", method=m, le="0.0"))
        assert above == int((ref.detector_score(m) <= 0).sum())  # the bucket at the threshold
    assert (metric(after, "bdserve_suspected_triggers_total", model="tiny")
            - metric(before, "bdserve_suspected_triggers_total", model="tiny")) == ref.suspected.sum()
    assert metric(after, "bdserve_detection_false_alarm_ratio", model="tiny") == pytest.approx(
        detecting.detection.expected_far)


def test_reject_answers_422_and_still_serves_clean_images(detect_store, detecting, lab_batch):
    ref = detecting.predict(torch.from_numpy(lab_batch))
    flagged, clean = int(np.argmax(ref.suspected)), int(np.argmin(ref.suspected))
    with start_server(detect_store, detect=DETECTORS, on_suspect="reject") as srv:
        url = srv.http_url
        ok = httpx.post(f"{url}/predictions/tiny", content=encode(lab_batch[clean].transpose(1, 2, 0)))
        assert ok.status_code == 200 and ok.headers["X-Bdserve-Suspected-Trigger"] == "false"
        r = httpx.post(f"{url}/predictions/tiny", content=encode(lab_batch[flagged].transpose(1, 2, 0)))
        assert r.status_code == 422 and "trigger" in r.json()["error"]
        body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, 3, 32, 32],
                            "data": lab_batch[[clean, flagged]].reshape(-1).tolist()}]}
        r = httpx.post(f"{url}/v2/models/tiny/infer", json=body)
        assert r.status_code == 422 and "image(s) [1]" in r.json()["error"]
        body["inputs"][0].update(shape=[1, 3, 32, 32], data=lab_batch[clean].reshape(-1).tolist())
        assert httpx.post(f"{url}/v2/models/tiny/infer", json=body).status_code == 200
        with grpc.insecure_channel(srv.grpc_target) as ch:
            req = pb.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="input", datatype="UINT8", shape=[1, 3, 32, 32])
            req.raw_input_contents.append(lab_batch[flagged:flagged + 1].tobytes())
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "trigger" in e.value.details()
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "bdserve_suspected_rejections_total", model="tiny") == 3
    # One code vocabulary for both doors: gRPC's FAILED_PRECONDITION is counted as its HTTP status, 422.
    assert metric(text, "bdserve_requests_total", model="tiny", code="422") == 3
    assert metric(text, "bdserve_requests_total", model="tiny", protocol="grpc", code="422") == 1


def test_uncalibrated_detect_is_refused(served_store):
    from bdserve.serve.detection import NotCalibrated

    with pytest.raises(NotCalibrated, match="bdserve calibrate"):
        DefendedModel.load(served_store / "tiny", detect="strip", threads=1)
    proc = subprocess.run([sys.executable, "-m", "bdserve.cli", "serve", "--model-store", str(served_store),
                           "--model", "tiny", "--http-port", "0", "--grpc-port", "0", "--detect", "scaleup"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no calibrated threshold for scaleup" in proc.stderr and "bdserve calibrate" in proc.stderr
