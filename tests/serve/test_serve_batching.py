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

    def __init__(self, seconds: float = 0.05):
        self.batches, self.seconds, self.tasks = [], seconds, []

    def predict(self, x, *, defense=None):
        import time

        from bdserve.serve.pipeline import Prediction

        time.sleep(self.seconds)
        self.batches.append((int(x.shape[0]), defense))
        try:  # which task ran the batch (None: the model's thread)
            self.tasks.append(asyncio.current_task().get_name())
        except RuntimeError:
            self.tasks.append(None)
        b = x.shape[0]
        probs = np.stack([x[:, 0, 0, 0].float().numpy(), np.full(b, 0.5, np.float32)], 1)
        return Prediction(probs, np.zeros(b, np.int64), ["a"] * b, defense or "flip")


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
        big = await b.submit(torch.arange(9.0).view(9, 1, 1, 1).expand(9, 3, 2, 2))  # split over 3 batches
        mixed = await asyncio.gather(b.submit(one, "none"), b.submit(one), b.submit(one, "none"))
        await b.close()
        return results, big, mixed

    results, big, mixed = asyncio.run(main())
    assert [len(r) for r in results] == [1] * 10 and len(big) == 9
    # All ten queued before the batcher first ran: batches of at most 4, at once.
    assert model.batches[:3] == [(4, None), (4, None), (2, None)]
    assert model.batches[3:6] == [(4, None), (4, None), (1, None)]
    assert [float(v) for v in big.probs[:, 0]] == list(range(9))  # the pieces, back in order
    assert sorted(model.batches[6:], key=str) == sorted([(2, "none"), (1, None)], key=str)
    assert [m.defense for m in mixed] == ["none", "flip", "none"]


def test_lone_request_does_not_wait_for_the_queue_delay():
    """A 2 s batching window: an idle model still answers a single request at once."""
    from bdserve.serve.batching import Batcher

    model = _SlowModel(seconds=0.0)

    async def main():
        b = Batcher(model, max_batch_size=32, max_queue_delay_ms=2000)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.submit(torch.zeros(1, 3, 2, 2))
        took = loop.time() - t0
        await b.close()
        return took

    assert asyncio.run(main()) < 1.0  # far less than the 2 s window
    assert model.batches == [(1, None)]


def test_a_lone_request_runs_in_its_own_task_and_same_turn_arrivals_still_batch():
    """A lone request runs without the batcher's task; requests arriving in the same turn of
    the loop queue with it and run as one batch; one cancelled in its turn leaves nothing queued."""
    from bdserve.serve.batching import Batcher

    model = _SlowModel(seconds=0.0)

    async def main():
        b = Batcher(model, max_batch_size=32, max_queue_delay_ms=2000)
        b.start()
        one = torch.zeros(1, 3, 2, 2)
        await asyncio.sleep(0.01)  # (the model idle a while: a lone request may run inline)
        await asyncio.create_task(b.submit(one), name="lone")
        await asyncio.sleep(0.01)
        burst = await asyncio.gather(*(b.submit(one) for _ in range(5)))
        await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(b.submit(one))
        await asyncio.sleep(0)  # it takes its turn ...
        cancelled.cancel()  # ... and the client goes away
        await asyncio.gather(cancelled, return_exceptions=True)
        left = len(b._pending)
        await asyncio.sleep(0.01)
        after = await b.submit(one)
        await b.close()
        return burst, left, after

    burst, left, after = asyncio.run(main())
    assert len(burst) == 5 and left == 0 and len(after) == 1
    assert model.batches == [(1, None), (5, None), (1, None)]
    assert model.tasks[0] == "lone"  # in the request's own task, not the batcher's
    assert model.tasks[1] in ("batcher-slow", None)  # the burst: formed by the batcher

    # A lone request larger than the maximum batch still runs as batches of at most that size.
    small = _SlowModel(seconds=0.0)

    async def split():
        b = Batcher(small, max_batch_size=2, max_queue_delay_ms=5)
        b.start()
        await asyncio.sleep(0.01)
        out = await b.submit(torch.zeros(3, 3, 2, 2))
        await b.close()
        return out

    assert len(asyncio.run(split())) == 3 and small.batches == [(2, None), (1, None)]


def test_lone_requests_back_to_back_each_run_in_their_own_task(monkeypatch):
    """A lone request the batcher's task took during its turn must not wake that task again:
    the stale wake-up would make the next lone request, arriving right after, the batcher's
    too, and so on for every request of a back-to-back run."""
    import bdserve.serve.batching as batching

    monkeypatch.setattr(batching, "INLINE_IDLE_S", -1.0)  # back to back still counts as idle here
    model = _SlowModel(seconds=0.0)

    async def main():
        b = batching.Batcher(model, max_batch_size=32, max_queue_delay_ms=5)
        b.start()
        one = torch.zeros(1, 3, 2, 2)
        await b.submit(one)  # the batcher's task is still starting: it may take this one
        for _ in range(6):
            await b.submit(one)
        await b.close()

    asyncio.run(main())
    assert len(model.tasks) == 7 and "batcher-slow" not in model.tasks[1:]


def test_batcher_waits_for_arrivals_only_up_to_the_delay():
    """Requests the doors announce but never queue hold a batch back at most the delay."""
    from bdserve.serve.batching import Batcher

    model = _SlowModel(seconds=0.0)

    async def main():
        b = Batcher(model, max_batch_size=32, max_queue_delay_ms=300, arriving=lambda: 5)
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        late = asyncio.create_task(_after(0.05, b.submit(torch.zeros(2, 3, 2, 2))))
        first = await b.submit(torch.zeros(1, 3, 2, 2))
        took = loop.time() - t0
        await late
        await b.close()
        return first, took

    first, took = asyncio.run(main())
    assert 0.25 <= took < 2.0  # waited for the announced arrivals, then gave up at the delay
    assert model.batches == [(3, None)]  # the late request joined the batch


async def _after(seconds, coro):
    await asyncio.sleep(seconds)
    return await coro


def test_encoded_images_decode_per_batch_and_a_bad_one_fails_alone(tiny_model, rng):
    """Encoded requests are decoded with their batch; a corrupt one fails its own request only."""
    from bdserve.serve.batching import Batcher
    from bdserve.serve.errors import InvalidInput

    from serve_helpers import encode, random_image

    images = [encode(random_image(rng, 32, 32)) for _ in range(5)]

    async def main():
        b = Batcher(tiny_model, max_batch_size=4, max_queue_delay_ms=50)
        b.start()
        results = await asyncio.gather(b.submit(images[:3]), b.submit([b"not an image"]), b.submit(images[3:]),
                                       b.submit([images[0], images[1], b"garbage", images[2], images[3]]),
                                       b.submit(images), return_exceptions=True)
        tensor = await b.submit(tiny_model.decode(images[:1]))
        await b.close()
        return results, tensor

    (good, bad, rest, split_bad, split), tensor = asyncio.run(main())
    expect = tiny_model.predict(tiny_model.decode(images), defense="flip")
    assert isinstance(bad, InvalidInput) and "not an image" in str(bad)
    assert isinstance(split_bad, InvalidInput) and str(split_bad).startswith("image 2:")
    assert np.array_equal(np.concatenate([good.label_ids, rest.label_ids]), expect.label_ids)
    # Every encoded request, split (5 images, batches of 4) or not, says how its images were fitted; tensors don't.
    assert np.array_equal(split.label_ids, expect.label_ids)
    assert good.fit == rest.fit == split.fit == tiny_model.fit.spec and tensor.fit is None


def test_a_4096_image_request_runs_as_batches_of_at_most_the_maximum(server, tiny_model):
    """One gRPC request of 4,096 encoded images: split over batches of <= 32 (the server's
    maximum), decoded with them, answered whole and in order."""
    from serve_helpers import encode, pack_bytes

    colours = [np.full((32, 32, 3), v, np.uint8) for v in (0, 60, 120, 180, 240)]
    blobs = [encode(colours[i % len(colours)]) for i in range(4096)]
    before = httpx.get(f"{server.http_url}/metrics").text
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="image", datatype="BYTES", shape=[len(blobs)])
    req.raw_input_contents.append(pack_bytes(blobs))
    with grpc.insecure_channel(server.grpc_target) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=120)
    after = httpx.get(f"{server.http_url}/metrics").text

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    probs = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(resp.outputs[0].shape))
    assert probs.shape[0] == 4096
    expect = tiny_model.predict(tiny_model.decode(blobs[:5]), defense="flip").probs
    assert np.allclose(probs[:5], expect, atol=1e-5) and np.allclose(probs[4090:4095], expect, atol=1e-5)
    assert delta("bdserve_batch_size_sum", model="tiny") == 4096
    assert delta("bdserve_batch_size_count", model="tiny") >= 4096 / 32
    assert delta("bdserve_batch_size_bucket", model="tiny", le="32.0") == delta("bdserve_batch_size_count", model="tiny")
