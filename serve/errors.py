"""One exception family for everything a client can get wrong.

Every transport maps these the same way: the HTTP status and the gRPC status code
live on the class, and the message (``str(err)``) says what was wrong, so a client
sees the same explanation through every door. ``InvalidInput`` (and its
subclasses) is the client's doing; ``Overloaded`` is the server declining work it
cannot queue. Anything that is not a ``ServeError`` is a server fault (500 / INTERNAL).
"""

from __future__ import annotations


class ServeError(Exception):
    """An answer other than a prediction that the client should see, with its status."""

    http_status = 500
    grpc_code = "INTERNAL"


class Overloaded(ServeError):
    """The model's queue is full (HTTP 503, gRPC UNAVAILABLE): retry later."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ModelUnavailable(Overloaded):
    """A model of the store that failed to load (HTTP 503, gRPC UNAVAILABLE): not ready, and says why."""


class InvalidInput(ServeError, ValueError):
    """A request the server refuses because of what the client sent (HTTP 400, gRPC INVALID_ARGUMENT)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(InvalidInput):
    """A body over the server's size limit (HTTP 413)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class NotFound(InvalidInput):
    """An unknown model or model version (HTTP 404, gRPC NOT_FOUND)."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class DefenseNotAllowed(InvalidInput):
    """A request asked for another defense on a server not started in lab mode (HTTP 403)."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class SuspectedTrigger(ServeError):
    """A server started with ``--on-suspect reject`` refuses images its calibrated trigger
    detectors flag (HTTP 422, gRPC FAILED_PRECONDITION): the input, not the server, is the problem."""

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"


def shown(value, limit: int = 64, quoted: bool = True) -> str:
    """A client's value as an error message may echo it: repr (or the text, unquoted), at most
    ``limit`` characters, and no markup (``<`` ``>`` ``&`` escaped), so an answer never reflects
    what a page could render."""
    text = repr(value) if quoted or not isinstance(value, str) else value
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text.replace("&", "\\x26").replace("<", "\\x3c").replace(">", "\\x3e")
