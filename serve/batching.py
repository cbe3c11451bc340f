"""Dynamic batching: one asyncio batcher per model, shared by every door.

Requests enqueue (tensor, defense, future); the defense is the Transform the door resolved
(a spec string also works, for callers in-process). A worker task takes the first waiting
request, then keeps collecting until the batch holds ``max_batch_size`` images or
``max_queue_delay_ms`` has passed since that first request, concatenates, runs
``predict`` in a worker thread (so the event loop keeps accepting and decoding),
and hands every request its slice of the result.

Batching does not change what a request gets: every random defense draws its
parameters per sample, so an image's draw does not depend on its batch-mates.
Requests asking for different defenses (lab mode) are run as separate groups, keyed by the
resolved defense object (the model caches one per spec).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from bdserve.serve.errors import Overloaded

log = logging.getLogger(__name__)


@dataclass
class _Item:
    x: torch.Tensor
    defense: object  # a Transform from DefendedModel.resolve_defense, a spec, or None
    future: asyncio.Future
    enqueued: float  # loop time

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


class Batcher:
    def __init__(self, model, *, max_batch_size: int = 32, max_queue_delay_ms: float = 5.0,
                 max_queue_images: int = 4096, on_batch: Callable | None = None):
        self.model = model
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue_images = max(1, int(max_queue_images))
        self._queued_images = 0
        self.delay = max(0.0, float(max_queue_delay_ms)) / 1000.0
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        # One thread per model: batches of one model run one after another.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"predict-{model.name}")

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    async def submit(self, x: torch.Tensor, defense=None):
        """Queue a (B, 3, H, W) batch; returns its Prediction once its batch has run."""
        if self._closing:
            raise Overloaded("the server is shutting down")
        if self._queued_images + int(x.shape[0]) > self.max_queue_images:
            # Bounded memory under overload: refuse now rather than queue without end.
            raise Overloaded(f"model {self.model.name} has {self._queued_images} images queued "
                             f"(limit {self.max_queue_images}); retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_Item(x, defense, fut, loop.time()))
        self._queued_images += int(x.shape[0])
        self._wakeup.set()
        try:
            return await fut
        finally:
            self._queued_images -= int(x.shape[0])

    async def close(self) -> None:
        """Finish everything queued, then stop the worker."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for company until the batch is full or the oldest request has waited long
            # enough (counted from its arrival: under load it already waited for the last batch).
            deadline = self._pending[0].enqueued + self.delay
            while sum(i.n for i in self._pending) < self.max_batch_size and not self._closing:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, n = [], 0
            while self._pending and (not batch or n + self._pending[0].n <= self.max_batch_size):
                item = self._pending.popleft()
                if item.future.done():  # the client went away
                    continue
                batch.append(item)
                n += item.n
            groups: dict[object, list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.defense, []).append(item)
            for defense, items in groups.items():
                await self._execute(loop, defense, items)

    async def _execute(self, loop, defense, items: list[_Item]) -> None:
        xs = [i.x for i in items]
        if len({t.dtype for t in xs}) > 1:
            # Photos arrive as uint8, tensors may be FP32: bring everything to float [0, 1] first.
            xs = [t.float().div(255) if t.dtype == torch.uint8 else t.float() for t in xs]
        if len({t.device for t in xs}) > 1:  # GPU-decoded photos next to host tensors
            xs = [t.to(self.model.device) for t in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        try:
            pred = await loop.run_in_executor(self._executor, lambda: self.model.predict(x, defense=defense))
        except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
            for i in items:
                if not i.future.done():
                    i.future.set_exception(e)
            return
        if self.on_batch is not None:
            try:
                self.on_batch(self.model, int(x.shape[0]), pred)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.exception("metrics callback failed")
        start = 0
        for i in items:
            if not i.future.done():
                i.future.set_result(pred.slice(start, start + i.n))
            start += i.n
