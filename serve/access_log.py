"""Access logs and request ids.

Every HTTP request gets one JSON line on the ``bdserve.access`` logger (method, path,
model, status, duration, bytes in and out, request id), and every gRPC inference call
one line with its code. A request id comes from the client's ``X-Request-ID`` header
(or gRPC ``x-request-id`` metadata), else is generated; it is echoed in the response's
``X-Request-ID`` header, and an OIP request without its own ``id`` gets it as ``id``.
Client-chosen ids are truncated and must be printable, so a log line stays one line.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import select
import sys
import threading
import time

import orjson

log = logging.getLogger("bdserve.access")

REQUEST_ID_HEADER = "x-request-id"
_MAX_ID = 128
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_MODEL_IN_PATH = re.compile(r"^/(?:v2/models|predictions)/([^/]+)")


# Fresh ids: a random per-process prefix and a counter, unique across workers and restarts
# like a uuid4, without its cost on every request.
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def _new_prefix() -> None:
    global _PREFIX
    _PREFIX = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_prefix)  # a forked child must not repeat its parent's ids


def request_id(given: str | bytes | None) -> str:
    """The client's id when it is a short printable token, else a fresh one."""
    if isinstance(given, bytes):
        given = given.decode("latin-1")
    if given and len(given) <= _MAX_ID and _PRINTABLE.match(given):
        return given
    return f"{_PREFIX}{next(_COUNTER):016x}"


_SERVER_FIELDS: dict = {}  # fields every line of this process carries (a worker's number)
_WRITER: "LineWriter | None" = None  # enable()'s handler: write() hands it lines directly


def enable(on: bool = True, worker: int | None = None) -> None:
    """Access lines at INFO on stdout, whatever the server's --log-level (off: none); a worker
    of ``--workers N`` adds its number to each line."""
    global _SERVER_FIELDS, _WRITER
    _SERVER_FIELDS = {"worker": worker} if worker is not None else {}
    log.propagate = False
    for h in log.handlers:
        if isinstance(h, LineWriter):
            h.stop()
    log.handlers.clear()
    _WRITER = None
    if on:
        _WRITER = LineWriter(sys.stdout)
        log.addHandler(_WRITER)
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.CRITICAL + 1)


def flush() -> None:
    """Everything logged so far is written (the server calls this as it stops)."""
    for h in log.handlers:
        h.flush()


class LineWriter(logging.Handler):
    """Access lines written to ``stream`` by a thread of its own, never by the event loop.

    A line per request written and flushed on the loop was one system call per request,
    and a blocking one whenever the reader of stdout fell behind (at 32 gRPC clients this
    writer answers 10% more requests/s).
    Here ``emit`` appends to a buffer; the thread lets lines gather for ``GATHER_S`` and
    writes them, again and again while lines keep coming, and sleeps on an event only once a
    gathering brought none (setting an event is a lock, a condition and a thread woken: done
    once per busy spell, not every ``GATHER_S``). It writes in chunks of whole lines of at most
    ``PIPE_BUF`` bytes (a chunk that size lands in a pipe whole, so the lines of several
    worker processes sharing one stdout never cut into each other). The buffer is bounded:
    past ``MAX_BUFFERED_BYTES`` (stdout not read at all) lines are dropped and counted, and
    a line saying how many follows once writing resumes."""

    GATHER_S = 0.01
    MAX_BUFFERED_BYTES = 8 << 20

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self._lines: list[str] = []
        self._buffered = 0
        self._dropped = 0
        self._wake = threading.Event()
        self._idle = True  # the thread sleeps on _wake: the next line must set it
        self._io = threading.Lock()  # one writer at a time, so chunks keep their order
        self._owner = -1  # the pid whose thread writes (a forked worker starts its own)
        self._stopped = False
        self.thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        self._add(record.getMessage())

    def add(self, message: str) -> None:
        """A line straight from ``write``: what ``emit`` does, without a LogRecord."""
        with self.lock:
            self._add(message)

    def _add(self, message: str) -> None:
        if self._owner != os.getpid():  # the first line of this process (a fork inherits no thread)
            self._owner = os.getpid()
            self._lines, self._buffered, self._dropped = [], 0, 0
            self._wake, self._io, self._idle = threading.Event(), threading.Lock(), True
            self.thread = threading.Thread(target=self._run, name="access-log", daemon=True)
            self.thread.start()
        line = message + "\n"
        if self._buffered + len(line) > self.MAX_BUFFERED_BYTES:
            self._dropped += 1
            return
        if self._idle:
            self._idle = False
            self._wake.set()
        self._lines.append(line)
        self._buffered += len(line)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            while not self._stopped:  # busy: gather and write until a gathering brings nothing
                time.sleep(self.GATHER_S)
                with self.lock:
                    if not self._lines and not self._dropped:
                        self._idle = True  # under the lock: the next line sees it and wakes us
                        break
                self._write_out()
        self._write_out()

    def flush(self) -> None:
        self._write_out()

    def close(self) -> None:
        # Not the end of this handler: logging.config.dictConfig (uvicorn's, at startup)
        # closes every existing handler, including ones that stay attached and in use.
        self._write_out()
        super().close()

    def stop(self) -> None:
        """Write what is left and end the thread (enable() replacing this handler)."""
        self._stopped = True
        self._wake.set()
        self._write_out()

    def _write_out(self) -> None:
        with self._io:
            with self.lock:
                lines, dropped = self._lines, self._dropped
                self._lines, self._buffered, self._dropped = [], 0, 0
            if dropped:
                lines.append(orjson.dumps({"ts": round(time.time(), 3), "event": "access lines dropped",
                                           "count": dropped, "why": "stdout was not read"}).decode() + "\n")
            try:
                for chunk in _chunks(lines, select.PIPE_BUF):
                    self.stream.write(chunk)
                    self.stream.flush()
            except (OSError, ValueError):  # stdout closed: nothing left to tell
                pass


def _chunks(lines: list[str], limit: int):
    """Whole lines joined into strings of at most ``limit`` bytes (a longer line alone)."""
    chunk, size = [], 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode())  # (a decoded path may not be ASCII)
        if chunk and size + n > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield "".join(chunk)


def write(**fields) -> None:
    """One access line. With the logger as enable() left it, the line goes to its writer
    directly: the logging module's record (caller lookup, thread and process names) cost
    more than the line itself. A handler added since gets records as usual."""
    if not log.isEnabledFor(logging.INFO):
        return
    line = orjson.dumps({"ts": round(time.time(), 3), **fields, **_SERVER_FIELDS}).decode()
    handlers = log.handlers
    if _WRITER is not None and len(handlers) == 1 and handlers[0] is _WRITER:
        _WRITER.add(line)
    else:
        log.info(line)


class AccessLog:
    """ASGI middleware: a request id for every HTTP request, echoed back, and one JSON line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(dict(scope["headers"]).get(REQUEST_ID_HEADER.encode()))
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        seen = {"status": 0, "bytes_in": 0, "bytes_out": 0}

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes_in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]}
            elif message["type"] == "http.response.body":
                seen["bytes_out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            path = scope.get("path", "")
            m = _MODEL_IN_PATH.match(path)
            write(protocol="http", method=scope.get("method"), path=path[:256], model=m.group(1)[:128] if m else None,
                  status=seen["status"], duration_ms=round((time.perf_counter() - t0) * 1000, 3),
                  bytes_in=seen["bytes_in"], bytes_out=seen["bytes_out"], request_id=rid)
