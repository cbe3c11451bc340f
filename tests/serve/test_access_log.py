"""Access lines leave the event loop: written by a thread of their own, in whole-line chunks
no larger than PIPE_BUF, in order, bounded when stdout is not read, and all written when the
server stops."""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time

import httpx

from bdserve.serve.access_log import LineWriter


class RecordingStream:
    """A text stream that notes each write's size and the thread that made it."""

    def __init__(self, fd: int | None = None):
        self.fd, self.writes, self.threads = fd, [], set()

    def write(self, text: str) -> None:
        self.writes.append(text)
        self.threads.add(threading.current_thread().name)
        if self.fd is not None:
            os.write(self.fd, text.encode())

    def flush(self) -> None:
        pass


def logger_with(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.getLogger(name)
    log.propagate, log.handlers = False, [handler]
    log.setLevel(logging.INFO)
    return log


def test_lines_are_written_off_the_caller_in_order_and_in_whole_line_chunks():
    stream = RecordingStream()
    handler = LineWriter(stream)
    log = logger_with(handler, "bdserve.test.access.order")
    for i in range(5000):
        log.info(json.dumps({"i": i, "pad": "x" * (i % 300)}))
    deadline = time.monotonic() + 10
    while sum(w.count("\n") for w in stream.writes) < 5000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.threads == {"access-log"}
    lines = "".join(stream.writes).splitlines()
    assert [json.loads(s)["i"] for s in lines] == list(range(5000))
    assert all(w.endswith("\n") and len(w.encode()) <= select.PIPE_BUF for w in stream.writes)
    assert len(stream.writes) < 5000 / 10  # many lines to a write
    log.info(json.dumps({"i": 5000}))
    handler.close()  # what logging.config does to every handler: this one keeps writing
    log.info(json.dumps({"i": 5001}))
    deadline = time.monotonic() + 5
    while '"i": 5001' not in "".join(stream.writes) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert '"i": 5001' in "".join(stream.writes)
    log.info(json.dumps({"i": 5002}))
    handler.stop()  # writes what is left, and its thread ends
    handler.thread.join(2)
    assert not handler.thread.is_alive() and json.loads(stream.writes[-1].splitlines()[-1]) == {"i": 5002}


def test_a_busy_writer_is_not_woken_per_gathering_and_an_idle_one_wakes_for_the_next_line():
    """Setting an event costs the logging thread a lock, a condition and a woken thread: while
    lines keep coming the writer keeps gathering without being woken; once idle, one line wakes it."""
    stream = RecordingStream()
    handler = LineWriter(stream)
    log = logger_with(handler, "bdserve.test.access.wake")
    log.info(json.dumps({"i": -1}))  # starts the thread
    deadline = time.monotonic() + 5
    while not handler._idle and time.monotonic() < deadline:
        time.sleep(0.01)
    wake, sets = handler._wake, []
    real_set = wake.set
    wake.set = lambda: (sets.append(1), real_set())
    try:
        t_end, i = time.monotonic() + 0.4, 0  # a line per ms for 0.4 s: about 40 gatherings
        while time.monotonic() < t_end:
            log.info(json.dumps({"i": i}))
            i += 1
            time.sleep(0.001)
        assert len(sets) <= 2, f"woken {len(sets)} times while busy"
        deadline = time.monotonic() + 5
        while not handler._idle and time.monotonic() < deadline:  # a gathering with no lines: idle
            time.sleep(0.01)
        assert handler._idle
        log.info(json.dumps({"i": "after"}))
        deadline = time.monotonic() + 5
        while '"after"' not in "".join(stream.writes) and time.monotonic() < deadline:
            time.sleep(0.01)
        lines = [json.loads(s)["i"] for s in "".join(stream.writes).splitlines()]
        assert lines == [-1, *range(i), "after"]
    finally:
        handler.stop()


def test_write_goes_straight_to_the_writer_and_still_honours_the_logger(monkeypatch):
    """write() skips the logging module's records when the logger is as enable() left it, but a
    level set on the logger still silences it and a handler added since still gets every line."""
    from bdserve.serve import access_log

    stream = RecordingStream()
    monkeypatch.setattr("sys.stdout", stream)
    try:
        access_log.enable(True)
        access_log.write(i=1)
        access_log.log.setLevel(logging.WARNING)
        access_log.write(i=2)  # silenced
        access_log.log.setLevel(logging.INFO)
        seen = []
        extra = logging.Handler()
        extra.emit = lambda record: seen.append(json.loads(record.getMessage())["i"])
        access_log.log.addHandler(extra)
        access_log.write(i=3)  # through logging: both handlers
        access_log.flush()
        assert [json.loads(s)["i"] for s in "".join(stream.writes).splitlines()] == [1, 3]
        assert seen == [3]
    finally:
        access_log.enable(False)


def test_unread_stdout_does_not_block_and_dropped_lines_are_counted():
    r, w = os.pipe()  # nobody reads r until the end: writes block once the pipe is full
    try:
        handler = LineWriter(RecordingStream(w))
        handler.MAX_BUFFERED_BYTES = 256 * 1024
        log = logger_with(handler, "bdserve.test.access.blocked")
        t0 = time.monotonic()
        for i in range(20000):  # 2 MB of lines: far over the pipe (64 KiB) and the buffer
            log.info(json.dumps({"i": i, "pad": "y" * 80}))
        assert time.monotonic() - t0 < 5.0, "logging blocked on a full stdout"
        got, quiet_since = b"", time.monotonic()
        os.set_blocking(r, False)
        while time.monotonic() - quiet_since < 0.5:  # read until the writer has nothing left
            try:
                got += os.read(r, 1 << 16)
                quiet_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        docs = [json.loads(s) for s in got.decode().splitlines()]
        dropped = sum(d["count"] for d in docs if d.get("event") == "access lines dropped")
        kept = [d["i"] for d in docs if "i" in d]
        assert dropped > 0
        assert kept == sorted(kept) and len(kept) + dropped == 20000  # each line written or counted
    finally:
        os.close(r)
        os.close(w)


def test_lines_of_the_last_requests_are_written_when_the_server_stops(served_store):
    from bdserve.testing import ServeProcess

    srv = ServeProcess(served_store, ["tiny"]).start()
    ids = [f"last-{i}" for i in range(30)]
    try:
        with httpx.Client(timeout=30, trust_env=False) as c:
            for rid in ids:
                assert c.get(f"{srv.http_url}/v2/models/tiny", headers={"X-Request-ID": rid}).status_code == 200
    finally:
        assert srv.stop() == 0  # SIGTERM right after the last answer
    time.sleep(0.2)  # the launcher's reader thread sees the end of the pipe
    logged = set()
    for line in srv.output:
        try:
            logged.add(json.loads(line).get("request_id"))
        except (ValueError, AttributeError):
            continue
    assert set(ids) <= logged, sorted(set(ids) - logged)


def test_a_server_writing_straight_to_its_log_file_is_started_and_logs_there(served_store, tmp_path):
    """The benchmarks' launcher mode: nothing in the test process reads the output."""
    from bdserve.testing import ServeProcess

    log_path = tmp_path / "serve.log"
    srv = ServeProcess(served_store, ["tiny"], log_path=log_path, direct_to_log=True).start()
    try:
        r = httpx.get(f"{srv.http_url}/v2/models/tiny", headers={"X-Request-ID": "direct-1"}, timeout=30, trust_env=False)
        assert r.status_code == 200 and srv.grpc_target
    finally:
        assert srv.stop() == 0
    assert srv.output == [] and any(line.startswith("HTTP listening on ") for line in srv.banner)
    assert '"request_id":"direct-1"' in log_path.read_text()


def test_refused_requests_are_access_lines_not_error_log_warnings(served_store):
    """What the HTTP parser refuses gets an access line (status, why); uvicorn's own WARNING per
    refused request is filtered, so a client sending garbage in a loop cannot fill the error log."""
    import socket

    from bdserve.testing import ServeProcess

    srv = ServeProcess(served_store, ["tiny"]).start()
    garbage = [b"\x16\x03\x01\x02\x00 not HTTP\r\n\r\n",
               b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"]
    try:
        for i in range(30):
            with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as s:
                s.sendall(garbage[i % 3])
                assert s.recv(64).startswith(b"HTTP/1.1 4")
    finally:
        assert srv.stop() == 0
    time.sleep(0.2)
    refused = []
    for line in srv.output:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "refused" in doc:
            refused.append(doc)
    assert sorted(d["status"] for d in refused) == [400] * 20 + [431] * 10, refused[:3]
    assert all(d["protocol"] == "http" and d["bytes_out"] > 0 and d["request_id"] for d in refused)
    assert not [line for line in srv.output if "Invalid HTTP request" in line]
