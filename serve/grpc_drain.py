"""gRPC drains like HTTP: every call that reaches the server before it stops is answered.

grpc.aio's ``server.stop(grace)`` at once cancels every call the application has not
picked up yet - a call whose headers came in while the event loop was busy, or whose large
message is still arriving - so a SIGTERM ended such calls with CANCELLED within 0.1 s
while the equivalent HTTP calls were answered. This interceptor counts the unary calls
in progress (it sees each when its headers are picked up, before the message is read);
shutdown waits until none has been in progress for a quiet moment (or the grace period is
over), and only then stops the server, whose GOAWAY makes clients go elsewhere.
"""

from __future__ import annotations

import asyncio
import time

import grpc


class DrainGate(grpc.aio.ServerInterceptor):
    def __init__(self):
        self.active = 0
        self.last_change = time.monotonic()
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming calls (health Watch, reflection) end with the server
        self._enter()
        behavior = handler.unary_unary

        async def counted(request, context):
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        # A call whose message never arrives is never left here: shutdown then waits for the
        # grace period, which bounds it.
        return grpc.unary_unary_rpc_method_handler(
            counted, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _enter(self) -> None:
        self.active += 1
        self.last_change = time.monotonic()
        self._idle.clear()

    def _leave(self) -> None:
        self.active = max(0, self.active - 1)
        self.last_change = time.monotonic()
        if self.active == 0:
            self._idle.set()

    async def drain(self, deadline: float, quiet_s: float) -> bool:
        """Wait until no call has been in progress for ``quiet_s`` (calls already sent are still
        being picked up), or until ``deadline`` (time.monotonic()). False when the deadline came."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except asyncio.TimeoutError:
                return False
            quiet_until = self.last_change + quiet_s
            if time.monotonic() >= quiet_until:
                return True
            await asyncio.sleep(min(quiet_until, deadline) - time.monotonic())
            if self.active == 0 and time.monotonic() >= self.last_change + quiet_s:
                return True
