"""The HTTP door's guard: what a slow, hostile or unlucky client cannot do to the server.

An ASGI middleware in front of the app, so that it also covers requests the app never
reads (a stalled body on any route) and answers every refusal as the protocol's JSON
``{"error": ...}``:

- body size: 413 for a declared Content-Length over the limit (before reading), and while
  streaming a chunked body;
- framing: Content-Length together with Transfer-Encoding, or two different
  Content-Lengths, is request smuggling's favourite ambiguity: 400;
- body deadline: the whole body must arrive within ``body_timeout_s`` of the request's
  headers, else 408 and the connection is closed (1,000 clients that declare 100 KB and
  send 4 bytes no longer hold the server);
- uploads in flight: at most ``max_uploads`` bodies being read or held at once, and at
  most ``upload_budget_bytes`` of them; beyond, 503 at once (retry later), so stalled
  uploads cannot pin memory;
- shutdown: once ``closing``, every answer carries ``Connection: close``; a request still
  running when the grace period ends is cancelled and answered with a JSON 503 instead of
  uvicorn's plain-text 500.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bdserve.serve.errors import InvalidInput, Overloaded, PayloadTooLarge, ServeError


class BodyTimeout(InvalidInput):
    """The client did not send its body in time (HTTP 408)."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class BadFraming(InvalidInput):
    """Ambiguous message framing (Content-Length with chunked, conflicting lengths)."""


class ShuttingDown(Overloaded):
    """The server is draining for shutdown (HTTP 503, gRPC UNAVAILABLE)."""


if sys.version_info >= (3, 11):
    async def _within(awaitable, seconds: float):
        """``awaitable`` in this task, bounded: Python 3.11's ``wait_for`` wraps it in a task
        of its own, one more task and loop turn for every body, even one already here."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - 3.10
    _within = asyncio.wait_for


class HttpGuard:
    def __init__(self, app, *, max_body_bytes: int, body_timeout_s: float = 30.0, max_uploads: int = 256,
                 upload_budget_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_uploads = max_uploads
        self.upload_budget_bytes = upload_budget_bytes if upload_budget_bytes is not None else 4 * max_body_bytes
        self.closing = False  # shutting down: every answer closes its connection
        self.uploads = 0  # bodies being read or held by a running request
        self.upload_bytes = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        body: _Body | None = None

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # A body refused half-read (too slow, too large) is not worth reading to its end: the
                # connection ends with the answer. (Other early answers keep it: uvicorn discards the
                # rest of the body, and closing over unread bytes would reset the answer away.)
                cut = body is not None and not body.done and message["status"] in (408, 413)
                if (cut or self.closing) and not _closes(message):
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def refuse(e: ServeError, close: bool = True):
            if not started:
                await send_error(tracked_send, e, close)

        try:
            declared = self._declared_length(scope)
        except ServeError as e:
            return await refuse(e)

        body = _Body(self, declared, receive)
        if declared is None and not any(k == b"transfer-encoding" for k, _ in scope["headers"]):
            body.done = True  # no Content-Length, not chunked: the request has no body
        try:
            await self.app(scope, body.receive, tracked_send)
        except ServeError as e:  # raised by the guarded receive outside the app's own handlers
            await refuse(e)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when the grace period ends.
            await refuse(ShuttingDown("the server shut down before this request finished (grace period over)"))
        finally:
            body.release()

    def _declared_length(self, scope) -> int | None:
        lengths = {v for k, v in scope["headers"] if k == b"content-length"}
        chunked = any(k == b"transfer-encoding" for k, _ in scope["headers"])
        if lengths and chunked:
            raise BadFraming("Content-Length together with Transfer-Encoding is ambiguous; send one of them")
        if len(lengths) > 1:
            raise BadFraming("conflicting Content-Length headers")
        if not lengths:
            return None
        text = lengths.pop()
        if not text.isdigit() or len(text) > 18:
            raise BadFraming(f"Content-Length must be a non-negative integer, got {text[:20]!r}")
        declared = int(text)
        if declared > self.max_body_bytes:
            raise PayloadTooLarge(f"request body of {declared} bytes is over this server's limit of "
                                  f"{self.max_body_bytes} bytes (--max-body-mb)")
        return declared


class _Body:
    """One request's receive(): reserves its place among the uploads on the first read,
    enforces the size limit and the deadline, and gives the place back when the request ends."""

    def __init__(self, guard: HttpGuard, declared: int | None, receive):
        self.guard, self.declared, self._receive = guard, declared, receive
        self.deadline = time.monotonic() + guard.body_timeout_s
        self.seen = 0
        self.reserved = 0
        self.counted = False
        self.done = declared == 0  # None: chunked, or no body at all (then the first read says so)

    def _reserve(self, nbytes: int) -> None:
        g = self.guard
        if not self.counted:
            if g.uploads >= g.max_uploads:
                raise Overloaded(f"{g.uploads} uploads in progress, this server's most; retry later")
            g.uploads += 1
            self.counted = True
        if g.upload_bytes + nbytes > g.upload_budget_bytes:
            raise Overloaded("the server holds as many request bodies as it can; retry later")
        g.upload_bytes += nbytes
        self.reserved += nbytes

    async def receive(self):
        if self.done:  # after the body: waiting for a disconnect is not bounded here
            return await self._receive()
        if not self.counted:
            self._reserve(self.declared or 0)
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            message = await _within(self._receive(), remaining)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.guard.body_timeout_s:g} s "
                              f"({self.seen} bytes came)") from None
        if message["type"] == "http.request":
            chunk = len(message.get("body", b""))
            self.seen += chunk
            if self.seen > self.guard.max_body_bytes:
                raise PayloadTooLarge(f"request body is over this server's limit of {self.guard.max_body_bytes} "
                                      "bytes (--max-body-mb)")
            if self.declared is None:  # chunked: reserve as it comes
                self._reserve(chunk)
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    def release(self) -> None:
        g = self.guard
        g.upload_bytes -= self.reserved
        if self.counted:
            g.uploads -= 1
        self.reserved, self.counted = 0, False


def _closes(message) -> bool:
    return any(k.lower() == b"connection" and v.lower() == b"close" for k, v in message.get("headers", []))


async def send_error(send, e: ServeError, close: bool = True) -> None:
    """The protocol's error body, on the raw ASGI channel (the app may not have run)."""
    body = json.dumps({"error": str(e)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if isinstance(e, Overloaded):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": e.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

