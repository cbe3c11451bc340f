"""A model store with one good and two broken models: the server starts with the good one,
reports each broken one once (naming its file and what is wrong), and answers them as not ready."""

from __future__ import annotations

import json
import shutil

import grpc
import httpx

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

GOOD = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [7] * 3072}]}


def test_good_model_served_broken_ones_reported_and_not_ready(served_store, tmp_path):
    from bdserve.testing import ServeProcess

    store = tmp_path / "store"
    shutil.copytree(served_store / "tiny", store / "tiny")
    shutil.copytree(served_store / "tiny", store / "truncated")
    onnx = store / "truncated" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:300])
    (store / "truncated" / "model.pt").unlink(missing_ok=True)
    shutil.copytree(served_store / "tiny", store / "badcard")
    card = json.loads((store / "badcard" / "card.json").read_text())
    (store / "badcard" / "card.json").write_text(json.dumps({**card, "name": 123}))  # tests/test_card.py: every field

    with ServeProcess(store, [], "--threads", "1") as srv:
        banner = "".join(srv.banner)
        with httpx.Client(base_url=srv.http_url, timeout=30, trust_env=False) as c:
            assert c.post("/v2/models/tiny/infer", json=GOOD).status_code == 200
            for name, why in (("truncated", "model.onnx"), ("badcard", "field 'name'")):
                assert banner.count(f"model {name} not served") == 1, banner
                r = c.get(f"/v2/models/{name}/ready")
                assert r.status_code == 503 and r.json()["ready"] is False and why in r.json()["error"], r.text
                m = c.get(f"/v2/models/{name}")
                assert m.status_code == 503 and m.json()["ready"] is False, m.text
                r = c.post(f"/v2/models/{name}/infer", json=GOOD)
                assert r.status_code == 503 and "failed to load" in r.json()["error"]
            assert c.get("/v2/models/nosuch/ready").status_code == 404
            assert c.get("/v2/health/ready").status_code == 200  # the good model serves
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelReady(pb.ModelReadyRequest(name="truncated"), timeout=10).ready is False
            assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready is True
    assert "Traceback" not in banner + "".join(srv.output)
