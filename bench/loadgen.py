"""The load generator of the serving benchmark: payloads, a minimal keep-alive HTTP/1.1 client on
asyncio streams and a grpc.aio sender (cheap on the CPU, and the same cost for every server under
test), the closed loop, and the batch sizes the server's metrics report for a run."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np

from bdserve.serve import oip


def png_images(n: int, size: int = 32, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class HttpConn:
    """A keep-alive HTTP/1.1 connection: just enough protocol for a load generator."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def _connect(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            await self._connect()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        try:
            status_line = await self.reader.readuntil(b"\r\n")
            status = int(status_line.split()[1])
            hdrs: dict[str, str] = {}
            while True:
                line = await self.reader.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                k, _, v = line.decode("latin-1").partition(":")
                hdrs[k.strip().lower()] = v.strip()
            if "content-length" in hdrs:
                data = await self.reader.readexactly(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    n = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if n == 0:
                        await self.reader.readuntil(b"\r\n")
                        break
                    parts.append(await self.reader.readexactly(n))
                    await self.reader.readexactly(2)
                data = b"".join(parts)
            else:
                data = await self.reader.read()
                await self.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, hdrs, data


@dataclass
class LoadResult:
    name: str
    clients: int
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    throughput: float = 0.0  # successful requests (= images) per second
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch: float | None = None
    error_samples: list[str] = field(default_factory=list)


async def closed_loop(name: str, make_sender, clients: int, requests: int, duration: float,
                      warmup: int = 100) -> LoadResult:
    """``clients`` workers, each with its own connection, sending back to back until the
    request budget or the duration runs out. ``make_sender()`` returns (send(i) -> ok/err text, close)."""
    senders = [await make_sender() for _ in range(clients)]
    # Warm-up: connections, server-side caches and the first batches, not measured.
    # One request at a time per connection (HTTP/1.1 without pipelining).
    async def warm(send, k):
        for i in range(k):
            await send(i)

    await asyncio.gather(*(warm(s, max(1, warmup // clients)) for s, _ in senders))
    lat: list[float] = []
    res = LoadResult(name=name, clients=clients)
    counter = iter(range(requests))
    t_end = time.perf_counter() + duration

    async def worker(send):
        for i in counter:
            if time.perf_counter() > t_end:
                break
            t0 = time.perf_counter()
            try:
                err = await send(i)
            except Exception as e:  # noqa: BLE001 - a failed request is a counted error
                err = repr(e)
            if err is None:
                lat.append(time.perf_counter() - t0)
                res.ok += 1
            else:
                res.errors += 1
                if len(res.error_samples) < 5:
                    res.error_samples.append(err[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(s) for s, _ in senders))
    res.seconds = time.perf_counter() - t0
    for _, close in senders:
        await close()
    res.throughput = res.ok / res.seconds if res.seconds else 0.0
    if lat:
        ms = np.asarray(lat) * 1e3
        res.p50_ms, res.p90_ms, res.p99_ms = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    return res


def http_predictions_sender(port: int, model: str, images: list[bytes]):
    async def make():
        conn = HttpConn("127.0.0.1", port)

        async def send(i: int):
            status, _, body = await conn.request("POST", f"/predictions/{model}", images[i % len(images)],
                                                 {"Content-Type": "application/octet-stream"})
            return None if status == 200 else f"HTTP {status}: {body[:200]!r}"

        return send, conn.close

    return make


def grpc_image_sender(port: int, model: str, images: list[bytes]):
    """gRPC ModelInfer of one encoded image per request (BYTES input, raw contents)."""
    return grpc_sender(port, model, [(oip.IMAGE_INPUT, "BYTES", [1], oip.pack_bytes([b])) for b in images])


def grpc_tensor_sender(port: int, model: str, tensors: list[np.ndarray]):
    """gRPC ModelInfer of one UINT8 tensor per request (raw contents)."""
    return grpc_sender(port, model, [(oip.TENSOR_INPUT, "UINT8", list(x.shape), x.tobytes()) for x in tensors])


def grpc_sender(port: int, model: str, inputs: list[tuple[str, str, list[int], bytes]]):
    """Requests cycling over ``inputs`` (name, datatype, shape, raw contents), one channel per client."""
    import grpc

    from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
    from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pbg

    async def make():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pbg.GRPCInferenceServiceStub(channel)
        reqs = []
        for name, datatype, shape, raw in inputs:
            r = pb.ModelInferRequest(model_name=model)
            r.inputs.add(name=name, datatype=datatype, shape=shape)
            r.raw_input_contents.append(raw)
            reqs.append(r)

        async def send(i: int):
            try:
                resp = await stub.ModelInfer(reqs[i % len(reqs)], timeout=60)
            except grpc.aio.AioRpcError as e:
                return f"gRPC {e.code().name}: {e.details()}"
            return None if resp.outputs else "empty response"

        return send, channel.close

    return make


def tensor_oip_sender(port: int, model: str, tensors: list[np.ndarray], binary: bool):
    """OIP HTTP infer of one UINT8 tensor per request: binary extension in and out, or JSON."""
    def body_of(x: np.ndarray) -> tuple[bytes, dict]:
        spec = {"name": oip.TENSOR_INPUT, "datatype": "UINT8", "shape": list(x.shape)}
        if binary:
            raw = x.tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            head = json.dumps({"inputs": [spec], "parameters": {"binary_data_output": True}}).encode()
            return head + raw, {"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(head))}
        spec["data"] = x.reshape(-1).tolist()
        return json.dumps({"inputs": [spec]}).encode(), {"Content-Type": "application/json"}

    bodies = [body_of(x) for x in tensors]

    async def make():
        conn = HttpConn("127.0.0.1", port)

        async def send(i: int):
            body, headers = bodies[i % len(bodies)]
            status, _, data = await conn.request("POST", f"/v2/models/{model}/infer", body, headers)
            return None if status == 200 else f"HTTP {status}: {data[:200]!r}"

        return send, conn.close

    return make


def mean_batch_inputs(text: str, model: str) -> tuple[float, float] | None:
    s = c = None
    for line in text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("bdserve_batch_size_sum"):
            s = float(line.rsplit(" ", 1)[1])
        elif line.startswith("bdserve_batch_size_count"):
            c = float(line.rsplit(" ", 1)[1])
    return None if s is None or c is None else (s, c)


def batch_delta(before, after) -> float | None:
    if after is None:
        return None
    s0, c0 = before or (0.0, 0.0)
    s1, c1 = after
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None
