"""Slow clients and shutdown: stalled uploads cannot hold the server, and SIGTERM answers
everything accepted - over HTTP and gRPC - and ends the process within the grace period."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

from serve_helpers import MAX_BODY, start_server

BODY_TIMEOUT_S = 2.0


def good_request(url: str, rng) -> float:
    """One small JSON inference; its latency in seconds (asserts it worked)."""
    x = rng.integers(0, 256, (1, 3, 32, 32)).tolist()
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": x}]}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v2/models/tiny/infer", json=body, timeout=30, trust_env=False)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def stalled(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that declare a 100 KB body and send 4 bytes of it."""
    head = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"in")
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        socks.append(s)
    return socks


def answers(socks: list[socket.socket], until: float) -> tuple[list[bytes], int]:
    """Read every socket until the server closes it or ``until``: (what each got, how many stayed open)."""
    sel = selectors.DefaultSelector()
    got = {s: b"" for s in socks}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    while open_ and time.monotonic() < until:
        for key, _ in sel.select(timeout=max(0.0, until - time.monotonic())):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                got[s] += chunk
            else:
                sel.unregister(s)
                open_.discard(s)
    for s in socks:
        s.close()
    return [got[s] for s in socks], len(open_)


def test_stalled_uploads_get_408_and_a_good_request_stays_fast(served_store, rng):
    """200 connections declare 100 KB and send 4 bytes (a server of its own, in its own process,
    as deployed): all get 408 or are closed soon after the body timeout; meanwhile a good request
    takes under a second."""
    from bdserve.testing import ServeProcess

    with ServeProcess(served_store, ["tiny"], "--body-timeout-s", str(BODY_TIMEOUT_S), "--threads", "1",
                      "--max-queue-delay-ms", "2") as srv:
        good_request(srv.http_url, rng)  # warm
        socks = stalled(srv.http_port, 200)
        t0 = time.monotonic()  # every stalled request is sent by now
        time.sleep(0.3)
        latencies = [good_request(srv.http_url, rng) for _ in range(3)]
        got, still_open = answers(socks, until=t0 + BODY_TIMEOUT_S + 3.0)
        assert still_open == 0, f"{still_open} stalled connections outlived the body timeout"
        statuses = {g.split(b"\r\n", 1)[0] for g in got}
        assert statuses <= {b"HTTP/1.1 408 Request Timeout", b""}, statuses
        assert sum(g.startswith(b"HTTP/1.1 408") for g in got) >= 190  # closed silently: only a few
        assert b'"error"' in next(g for g in got if g) and b"did not arrive within" in next(g for g in got if g)
        assert max(latencies) < 1.0, latencies
        good_request(srv.http_url, rng)


def test_slow_and_idle_heads_are_closed_and_kept_alive_connections_are_not(served_store, rng):
    """Slowloris on the head: 100 connections that send nothing and 100 that send half a request
    head are closed within the head deadline (--body-timeout-s): the half heads with a JSON 408.
    Meanwhile a good request stays fast, and a kept-alive client asking every 1.2 s keeps its
    connection (the deadline restarts with each answer)."""
    from bdserve.testing import ServeProcess

    with ServeProcess(served_store, ["tiny"], "--body-timeout-s", str(BODY_TIMEOUT_S), "--threads", "1",
                      "--max-queue-delay-ms", "2") as srv:
        good_request(srv.http_url, rng)  # warm
        idle = [socket.create_connection(("127.0.0.1", srv.http_port)) for _ in range(100)]
        half = [socket.create_connection(("127.0.0.1", srv.http_port)) for _ in range(100)]
        for s in half:
            s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nX-Slow: aaa")
        t0 = time.monotonic()
        with httpx.Client(timeout=30, trust_env=False) as kept:
            for _ in range(3):  # 3.6 s on one connection, longer than the deadline
                assert kept.get(f"{srv.http_url}/v2/health/live").status_code == 200
                time.sleep(1.2)
            latencies = [good_request(srv.http_url, rng) for _ in range(3)]
            got, still_open = answers(idle + half, until=t0 + BODY_TIMEOUT_S + 3.0)
            assert kept.get(f"{srv.http_url}/v2/health/live").status_code == 200
            assert kept.get(f"{srv.http_url}/v2/health/live").status_code == 200
        assert still_open == 0, f"{still_open} connections outlived the head deadline"
        assert set(got[:100]) == {b""}, "an idle connection got an answer to a request it never sent"
        assert all(g.startswith(b"HTTP/1.1 408") and b"request head did not arrive" in g for g in got[100:]), \
            {g[:80] for g in got[100:]}
        assert max(latencies) < 1.0, latencies


def test_too_many_uploads_at_once_get_503_at_once(served_store, rng):
    from bdserve.serve.server import BackgroundServer, ServeConfig, load_models
    from bdserve.serve.service import InferenceService

    service = InferenceService(load_models(served_store, ["tiny"], threads=1), max_queue_delay_ms=2)
    config = ServeConfig(http_port=0, grpc_port=None, max_body_bytes=MAX_BODY, grace_s=2, body_timeout_s=30,
                         max_uploads=8)
    with BackgroundServer(service, config) as srv:
        socks = stalled(srv.http_port, 8)
        time.sleep(0.3)
        t0 = time.perf_counter()
        r = httpx.post(f"{srv.http_url}/v2/models/tiny/infer", content=b"{}", timeout=10, trust_env=False)
        assert r.status_code == 503 and "uploads in progress" in r.json()["error"]
        assert r.headers["retry-after"] == "1" and time.perf_counter() - t0 < 1.0
        for s in socks:
            s.close()
        deadline = time.monotonic() + 10
        while srv.guard.uploads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.guard.uploads == 0
        good_request(srv.http_url, rng)


# ---------------------------------------------------------------- SIGTERM with calls in flight


def _grpc_request(images: int, rng) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="UINT8", shape=[images, 3, 32, 32])
    req.raw_input_contents.append(rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8).tobytes())
    return req


def _http_body(images: int, rng) -> tuple[bytes, dict]:
    raw = rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [images, 3, 32, 32],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _read_status(sock: socket.socket, timeout: float) -> str:
    """The status code of the one answer on ``sock``, or what happened instead."""
    sock.settimeout(timeout)
    got = b""
    try:
        while b"\r\n" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed without an answer"
            got += chunk
    except OSError as e:
        return repr(e)
    finally:
        sock.close()
    return got.split(b" ", 2)[1].decode()


@pytest.mark.parametrize("grace_s,images", [(30.0, 1024), (0.5, 1)])
def test_sigterm_answers_every_accepted_call_and_exits_within_grace(served_store, rng, grace_s, images):
    """32 gRPC + 32 HTTP calls in flight, then SIGTERM. With 30 s of grace each call carries 1024
    images (3 MiB): some gRPC messages are still arriving. The HTTP calls send half their body
    before the signal and the rest after it. All are answered, and the process exits 0 in time."""
    from bdserve.testing import ServeProcess

    delay_ms = "100"  # calls wait this long for batch-mates: in flight at the signal
    srv = ServeProcess(served_store, ["tiny"], "--grace-s", str(grace_s), "--max-queue-delay-ms", delay_ms,
                       "--max-batch-size", "4096", "--max-queue", "100000").start()
    try:
        grpc_req = _grpc_request(images, rng)
        body, headers = _http_body(images, rng)
        head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
        half = len(body) // 2
        channel = grpc.insecure_channel(srv.grpc_target, options=[("grpc.max_send_message_length", 64 << 20),
                                                                  ("grpc.max_receive_message_length", 64 << 20)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        socks = []
        for _ in range(32):
            s = socket.create_connection(("127.0.0.1", srv.http_port))
            s.sendall(head + body[:half])
            socks.append(s)
        futures = [stub.ModelInfer.future(grpc_req, timeout=60) for _ in range(32)]
        time.sleep(0.1)
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for s in socks:
            s.sendall(body[half:])
        http_codes = [_read_status(s, grace_s + 10) for s in socks]
        code = srv.proc.wait(grace_s + 10)
        exit_s = time.monotonic() - t_signal
        grpc_codes = []
        for f in futures:
            try:
                f.result()
                grpc_codes.append("OK")
            except grpc.RpcError as e:
                grpc_codes.append(e.code().name + (": " + e.details() if e.code() != grpc.StatusCode.OK else ""))
        channel.close()
    finally:
        srv.stop(5)
    from collections import Counter

    assert code == 0, "".join(srv.output)
    assert exit_s < grace_s, f"exit took {exit_s:.2f} s after SIGTERM (grace {grace_s} s); server: {srv.output[-1:]}"
    # Every call gets an answer: a result, or - only for what still runs when the grace period
    # ends - the JSON 503 / gRPC CANCELLED of a server that must go. Never a reset or silence.
    finished = ["200"] * 32, ["OK"] * 32
    if grace_s >= 1:  # with time enough, every accepted call is answered with its result
        assert (http_codes, grpc_codes) == finished, (Counter(http_codes), Counter(grpc_codes))
    else:
        assert set(http_codes) <= {"200", "503"} and set(grpc_codes) <= {"OK", "CANCELLED: CANCELLED"}, (
            Counter(http_codes), Counter(grpc_codes))


def test_after_the_grace_period_a_running_request_gets_a_json_503(served_store):
    """A request whose body never finishes is still running when the grace period ends."""
    from bdserve.testing import ServeProcess

    srv = ServeProcess(served_store, ["tiny"], "--grace-s", "0.5").start()
    try:
        s = stalled(srv.http_port, 1)[0]
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        got, still_open = answers([s], until=time.monotonic() + 5)
        code = srv.proc.wait(10)
    finally:
        srv.stop(5)
    assert code == 0 and still_open == 0
    head, _, body = got[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, got[0]
    assert "grace period" in json.loads(body)["error"]


def test_kept_alive_connections_after_sigterm_are_answered_then_closed_cleanly(served_store, rng):
    """A request on a kept-alive connection just after SIGTERM is answered (and told the connection
    closes); an idle kept-alive connection is closed with a FIN, so the next request on it goes to a
    new connection (refused: the server no longer listens) instead of vanishing unanswered."""
    from bdserve.testing import ServeProcess

    srv = ServeProcess(served_store, ["tiny"], "--grace-s", "5").start()
    try:
        s = stalled(srv.http_port, 1)[0]  # keeps the server draining for a while
        with httpx.Client(timeout=10, trust_env=False) as soon, httpx.Client(timeout=10, trust_env=False) as later:
            for c in (soon, later):
                assert c.get(f"{srv.http_url}/v2/health/live").status_code == 200
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            r = soon.get(f"{srv.http_url}/v2/health/live")
            assert r.status_code == 200 and r.headers["connection"] == "close"
            time.sleep(0.6)  # past the settle window: idle connections are closed
            with pytest.raises(httpx.ConnectError):
                later.get(f"{srv.http_url}/v2/health/live")
        s.close()
        assert srv.proc.wait(10) == 0
    finally:
        srv.stop(5)
