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
import sys
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


def enable(on: bool = True) -> None:
    """Access lines at INFO on stdout, whatever the server's --log-level (off: none)."""
    log.propagate = False
    log.handlers.clear()
    if on:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    else:
        log.setLevel(logging.CRITICAL + 1)


def write(**fields) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(orjson.dumps({"ts": round(time.time(), 3), **fields}).decode())


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
