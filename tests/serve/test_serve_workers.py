"""``bdserve serve --workers 2``: two processes answer on one HTTP port and one gRPC port,
the metrics add up across them, a port another process holds is refused, and SIGTERM
stops every worker with exit code 0."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import grpc
import httpx
import pytest

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from bdserve.testing import ServeProcess, run_cli
from serve_helpers import encode, metric, random_image


@pytest.fixture(scope="module")
def one_model_store(store, tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("workers") / "model_store"
    shutil.copytree(store / "tiny", s / "tiny")
    return s


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_two_workers_answer_on_one_port(one_model_store, rng):
    png = encode(random_image(rng, 32, 32))
    srv = ServeProcess(one_model_store, ["tiny"], "--workers", "2", "--max-queue-delay-ms", "2").start()
    try:
        url = srv.http_url

        async def one(client):
            # A new connection per request, so the kernel hands them to whichever worker accepts.
            r = await client.post(f"{url}/predictions/tiny", content=png, headers={"Connection": "close"})
            assert r.status_code == 200, r.text
            return r.headers["x-bdserve-worker"]

        async def fire(n):
            async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
                return await asyncio.gather(*(one(client) for _ in range(n)))

        seen, sent = set(), 0
        while len(seen) < 2 and sent < 640:
            seen |= set(asyncio.run(fire(32)))
            sent += 32
        pids = {int(w.split()[1]) for w in seen}
        assert len(pids) == 2, f"one worker answered all {sent} requests: {seen}"
        assert {_ppid(p) for p in pids} == {srv.proc.pid}  # both are this server's own workers

        with grpc.insecure_channel(srv.grpc_target) as ch:
            req = pb.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="image", datatype="BYTES", shape=[1])
            req.raw_input_contents.append(len(png).to_bytes(4, "little") + png)
            assert pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30).outputs

        # Whichever worker answers /metrics counts every worker's requests.
        text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
        assert metric(text, "bdserve_requests_total", model="tiny", protocol="predictions", code="200") == sent
        assert metric(text, "bdserve_requests_total", model="tiny", protocol="grpc", code="200") == 1
        assert metric(text, "bdserve_batch_size_sum", model="tiny") == sent + 1
        assert 'bdserve_model_info{' in text
    finally:
        code = srv.stop()
    assert code == 0
    # Each worker writes its own lines (not relayed by the parent): labelled, and every access
    # line says which worker answered it - all of them written before the workers exited.
    output = srv.banner + srv.output
    for n in (1, 2):
        assert any(line.startswith(f"[worker {n}] model tiny") for line in output), output[:20]
    access = [json.loads(line) for line in output if line.startswith('{"ts"')]
    numbers = {int(w.split()[0]) for w in seen}
    assert len(access) == sent + 1 + 1  # + the gRPC call and the /metrics request
    assert {a["worker"] for a in access} == numbers == {1, 2}
    for p in pids:
        assert not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text()


def test_workers_refuse_a_port_another_process_holds(one_model_store):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = run_cli("serve", "--model-store", str(one_model_store), "--workers", "2",
                    "--http-port", "0", "--grpc-port", str(port), timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: gRPC port {port} on 127.0.0.1 is already in use (another server?): "
                                             "stop it or choose another --grpc-port"], r.stderr
    assert "gRPC listening" not in r.stdout
