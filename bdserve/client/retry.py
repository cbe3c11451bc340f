"""Retries for transient failures: exponential backoff with jitter, a bounded number of attempts.

Only ``TransientError`` is retried (connection refused or reset, HTTP 429/502/503/504,
gRPC UNAVAILABLE/DEADLINE_EXCEEDED): the request never produced an answer the caller
kept, so sending it again cannot count an image twice. Anything else propagates at once.
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
    """Every attempt failed transiently."""


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
                       on_retry: Callable[[TransientError], None] | None = None) -> T:
    last: TransientError | None = None
    for attempt in range(max(1, policy.attempts)):
        try:
            return await call()
        except TransientError as e:
            last = e
            if attempt + 1 >= policy.attempts:
                break
            if on_retry is not None:
                on_retry(e)
            await asyncio.sleep(policy.delay(attempt))
    raise RetriesExhausted(f"gave up after {policy.attempts} attempts: {last}")
