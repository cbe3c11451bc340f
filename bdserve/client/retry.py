"""Retries for transient failures: exponential backoff with jitter, a bounded number of attempts.

Only ``TransientError`` is retried (connection refused or reset, HTTP 429/502/503/504,
gRPC UNAVAILABLE/DEADLINE_EXCEEDED): the request never produced an answer the caller
kept, so sending it again cannot count an image twice. Anything else propagates at once.

A ``CircuitBreaker`` shared by every request of a run stops the run once the server has
been unreachable N times in a row (``Unreachable``: refused, reset, no route), instead of
letting every remaining batch spend its own retries on a dead server.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class ClientError(Exception):
    """Every failure bdserve.client raises."""


class TransientError(ClientError):
    """Worth another try: the server was unreachable, starting, or overloaded."""


class PermanentError(ClientError):
    """The server refused the request or answered something unusable; retrying will not help."""


class RequestRejected(PermanentError):
    """The server answered with an error (HTTP 4xx/500, a gRPC status other than UNAVAILABLE):
    ``status`` is the HTTP status or the gRPC code's name, ``message`` the server's own words."""

    def __init__(self, status: int | str, message: str):
        prefix = f"HTTP {status}" if isinstance(status, int) else f"gRPC {status}"
        super().__init__(f"{prefix}: {message}")
        self.status, self.message = status, message


class RetriesExhausted(PermanentError):
    """Every attempt failed transiently; ``last`` is the last of those failures."""

    def __init__(self, message: str, last: Exception | None = None):
        super().__init__(message)
        self.last = last


class Unreachable(TransientError):
    """No connection to the server at all (refused, reset, unknown host): the breaker counts these."""


class CircuitOpen(RetriesExhausted):
    """The breaker tripped: the server has been unreachable too many times in a row."""


class CircuitBreaker:
    """Counts consecutive ``Unreachable`` failures across every request of a run; at ``threshold``
    it opens, and every request after that fails at once with ``CircuitOpen``."""

    def __init__(self, threshold: int = 5):
        self.threshold = max(1, threshold)
        self.consecutive = 0
        self.last: Exception | None = None

    @property
    def open(self) -> bool:
        return self.consecutive >= self.threshold

    def check(self) -> None:
        if self.open:
            raise CircuitOpen(f"stopped after {self.consecutive} failed connections in a row "
                              f"(the server looks down): {self.last}")

    def record(self, error: Exception | None) -> None:
        if error is None:
            self.consecutive = 0
        elif isinstance(error, Unreachable):
            self.consecutive += 1
            self.last = error


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # total tries, the first included
    base_s: float = 0.2
    max_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Sleep before retry ``attempt`` (0-based): base * 2^attempt, capped, with jitter in [0.5, 1]x
        so that concurrent clients do not retry in lockstep."""
        return min(self.max_s, self.base_s * (2 ** attempt)) * random.uniform(0.5, 1.0)


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy,
                       on_retry: Callable[[TransientError], None] | None = None,
                       breaker: CircuitBreaker | None = None) -> T:
    last: TransientError | None = None
    for attempt in range(max(1, policy.attempts)):
        if breaker is not None:
            breaker.check()
        try:
            result = await call()
        except TransientError as e:
            last = e
            if breaker is not None:
                breaker.record(e)
                breaker.check()
            if attempt + 1 >= policy.attempts:
                break
            if on_retry is not None:
                on_retry(e)
            await asyncio.sleep(policy.delay(attempt))
        else:
            if breaker is not None:
                breaker.record(None)
            return result
    raise RetriesExhausted(f"gave up after {policy.attempts} attempts: {last}", last)
