"""Dynamic batching across both doors, and lab-mode requests with different defenses in one window."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
import torch

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

from serve_helpers import metric


def _http_body(x, defense=None):
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    if defense:
        body["parameters"] = {"defense": defense}
    return body


def _grpc_request(x, defense=None):
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="UINT8", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    if defense:
        req.parameters["defense"].string_param = defense
    return req


def _probs(resp) -> np.ndarray:
    if isinstance(resp, httpx.Response):
        assert resp.status_code == 200, resp.text
        out = {o["name"]: o for o in resp.json()["outputs"]}["probabilities"]
        return np.array(out["data"], np.float32).reshape(out["shape"])
    return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))


def test_both_doors_share_one_batcher_and_defenses_are_grouped(lab_server, tiny_model, rng):
    """16 HTTP + 16 gRPC requests at once, half asking for no defense (lab), half for the
    server's flip: batches form across doors, and every request gets its own defense."""
    xs = [rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8) for _ in range(32)]
    defenses = [None if i % 2 else "none" for i in range(32)]
    url = lab_server.http_url
    before = httpx.get(f"{url}/metrics").text

    async def fire():
        async with httpx.AsyncClient(timeout=30) as client, grpc.aio.insecure_channel(lab_server.grpc_target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            calls = []
            for i, (x, d) in enumerate(zip(xs, defenses)):
                if i < 16:
                    calls.append(client.post(f"{url}/v2/models/tiny/infer", json=_http_body(x, d)))
                else:
                    calls.append(stub.ModelInfer(_grpc_request(x, d)))
            return await asyncio.gather(*calls)

    responses = asyncio.run(fire())
    for x, d, resp in zip(xs, defenses, responses):
        expect = tiny_model.predict(torch.from_numpy(x), defense=d or "flip")
        assert np.allclose(_probs(resp), expect.probs, atol=1e-5)
    after = httpx.get(f"{url}/metrics").text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("bdserve_batch_size_sum", model="tiny") == 32
    batches = delta("bdserve_batch_size_count", model="tiny")
    assert batches < 32 and batches > delta("bdserve_batch_size_bucket", model="tiny", le="1.0")
    # Each defense ran in its own groups.
    assert delta("bdserve_defense_duration_seconds_count", model="tiny", defense="none") >= 1
    assert delta("bdserve_defense_duration_seconds_count", model="tiny", defense="flip") >= 1
    assert delta("bdserve_requests_total", model="tiny", protocol="grpc", code="200") == 16
    assert delta("bdserve_requests_total", model="tiny", protocol="http", code="200") == 16


class _SlowModel:
    """Stands in for DefendedModel: records batch sizes, takes a while."""

    name = "slow"
    device = torch.device("cpu")

    def __init__(self):
        self.batches = []

    def predict(self, x, *, defense=None):
        import time

        from bdserve.serve.pipeline import Prediction

        time.sleep(0.05)
        self.batches.append((int(x.shape[0]), defense))
        b = x.shape[0]
        return Prediction(np.full((b, 2), 0.5, np.float32), np.zeros(b, np.int64), ["a"] * b, defense or "flip")


def test_batcher_limits_and_splits():
    from bdserve.serve.batching import Batcher
    from bdserve.serve.errors import Overloaded

    model = _SlowModel()

    async def main():
        b = Batcher(model, max_batch_size=4, max_queue_delay_ms=20, max_queue_images=10)
        b.start()
        one = torch.zeros(1, 3, 2, 2)
        tasks = [asyncio.create_task(b.submit(one)) for _ in range(10)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="limit 10"):
            await b.submit(one)
        results = await asyncio.gather(*tasks)
        big = await b.submit(torch.zeros(9, 3, 2, 2))  # larger than a batch: runs alone
        mixed = await asyncio.gather(b.submit(one, "none"), b.submit(one), b.submit(one, "none"))
        await b.close()
        return results, big, mixed

    results, big, mixed = asyncio.run(main())
    assert [len(r) for r in results] == [1] * 10 and len(big) == 9
    assert model.batches[:4] == [(4, None), (4, None), (2, None), (9, None)]
    assert sorted(model.batches[4:], key=str) == sorted([(2, "none"), (1, None)], key=str)
    assert [m.defense for m in mixed] == ["none", "flip", "none"]
