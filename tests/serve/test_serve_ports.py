"""A busy port is refused, never shared: a second ``bdserve serve`` on a port another server
holds exits non-zero with one line naming the port, and the first server keeps every
connection (grpcio's default SO_REUSEPORT would have let the second take part of them)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from bdserve.testing import ServeProcess, free_port, run_cli


@pytest.fixture(scope="module")
def other_store(store, tmp_path_factory) -> Path:
    """A second store whose only model is named 'other' (what a leftover server would serve)."""
    s = tmp_path_factory.mktemp("ports") / "model_store"
    shutil.copytree(store / "tiny", s / "other")
    card = json.loads((s / "other" / "card.json").read_text())
    (s / "other" / "card.json").write_text(json.dumps({**card, "name": "other", "defense": "none"}))
    return s


def second(store: Path, http_port: int, grpc_port: int, *flags: str):
    return run_cli("serve", "--model-store", str(store), "--http-port", str(http_port),
                   "--grpc-port", str(grpc_port), "--threads", "1", *flags)


def listeners(port: int) -> int:
    """Sockets listening on the port (IPv4 and dual-stack IPv6; /proc/net/tcp*, state 0A), as ss shows them."""
    hex_port = f"{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if local.endswith(":" + hex_port) and state == "0A":
                count += 1
    return count


def model_answering(target: str) -> str:
    """One ModelInfer on a fresh channel (a new TCP connection each time): the model that answered."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="tiny")
        img = np.zeros((1, 3, 32, 32), dtype=np.uint8)
        req.inputs.add(name="input", datatype="UINT8", shape=list(img.shape))
        req.raw_input_contents.append(img.tobytes())
        try:
            return stub.ModelInfer(req, timeout=30).model_name
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"


def test_a_second_server_on_a_busy_grpc_port_exits_and_the_first_keeps_all_traffic(store, other_store):
    grpc_port = free_port()
    first = ServeProcess(store, (), "--threads", "1", grpc_port=grpc_port).start()
    try:
        res = second(other_store, 0, grpc_port)
        assert res.returncode != 0
        err = res.stderr.strip().splitlines()
        assert err == [f"error: gRPC port {grpc_port} on 127.0.0.1 is already in use (another server?): "
                       "stop it or choose another --grpc-port"], res.stderr
        assert "gRPC listening" not in res.stdout and "Traceback" not in res.stderr
        assert listeners(grpc_port) == 1
        answers = [model_answering(f"127.0.0.1:{grpc_port}") for _ in range(20)]
        assert answers == ["tiny"] * 20
        assert first.proc.poll() is None
    finally:
        first.stop()


def test_a_busy_http_port_is_one_line(other_store):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        res = second(other_store, port, 0)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        f"error: HTTP port {port} on 127.0.0.1 is already in use (another server?): stop it or choose another "
        "--http-port"], res.stderr


def test_debug_shows_the_traceback(other_store):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        res = second(other_store, port, 0, "--no-grpc", "--debug")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "PortInUse" in res.stderr
