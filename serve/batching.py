"""Adaptive batching: one asyncio batcher per model, shared by every door.

A request enqueues its input - a decoded tensor, or the encoded images themselves - with
the defense the door resolved and a future. The batcher never makes a lone request wait:

* when the model is idle, what is queued runs at once;
* while the model is busy, requests queue; the next batch takes what queued meanwhile,
  up to ``max_batch_size`` images, oldest first;
* it waits for company only while requests are known to be on their way (the door has
  them, the batcher not yet), and never longer than ``max_queue_delay_ms`` after the
  oldest queued request arrived: the delay is an upper bound, not a fixed wait;
* a request larger than ``max_batch_size`` is split over several batches and answered
  once its last piece has run.

One executor call per formed batch decodes its encoded images (a request's slice at a
time, so a bad image fails only its own request), concatenates and runs ``predict``;
the event loop meanwhile keeps accepting requests. A lone small batch (nothing queued
behind it, nothing on its way) runs inline on the event loop instead: there is nothing
for the loop to do meanwhile, and the two thread hand-offs would cost more than the model.
A lone small request that finds the batcher idle does not even wake the batcher's task:
it gives the loop one turn (so that requests arriving in the same turn queue with it, as
they would for the batcher) and, still alone, runs inline in its own task.

Batching does not change what a request gets: every random defense draws its parameters
per sample, so an image's draw does not depend on its batch-mates. Requests asking for
different defenses (lab mode) run as separate groups, keyed by the resolved defense
object (the model caches one per spec).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from bdserve.serve import tracing
from bdserve.serve.errors import Overloaded

log = logging.getLogger(__name__)

# A lone batch this small runs inline on the event loop (see Batcher._inline): about a
# millisecond of the demo model, and small encoded images (no camera photo blocks the loop).
INLINE_MAX_IMAGES = 4
INLINE_MAX_BYTES = 64 * 1024
INLINE_IDLE_S = 0.0003  # the model idle this long before the request came (a round trip on loopback)
# (in loop time: under uvloop it ticks in whole milliseconds, so this reads "a later tick". Measured
# against time.perf_counter() in 6 rounds: the exact 0.3 ms let more lone runs in under load,
# and the ms tick gave 6-9% more requests/s at 32 gRPC or PNG clients.)


@dataclass(eq=False)
class _Item:
    x: torch.Tensor | Sequence[bytes]  # a (B, 3, H, W) batch, or B encoded images
    n: int
    defense: object  # a Transform from DefendedModel.resolve_defense, a spec, or None
    future: asyncio.Future
    enqueued: float  # loop time
    taken: int = 0  # images already placed in a batch
    parts: list = field(default_factory=list)  # (start, Prediction) per finished piece
    fits: list = field(default_factory=list)  # (start, [Fitted]) per decoded piece of encoded images
    done: int = 0  # images answered
    trace_parent: object = None  # the request's span context: the batch span links to it

    @property
    def encoded(self) -> bool:
        return not isinstance(self.x, torch.Tensor)


@dataclass
class _Piece:
    item: _Item
    start: int
    stop: int


class Batcher:
    def __init__(self, model, *, max_batch_size: int = 32, max_queue_delay_ms: float = 5.0,
                 max_queue_images: int = 4096, on_batch: Callable | None = None,
                 arriving: Callable[[], int] | None = None):
        """``arriving``: how many requests for this model the doors hold that have not reached
        ``submit`` yet (reading or parsing their body); the batcher waits for those, up to the delay."""
        self.model = model
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue_images = max(1, int(max_queue_images))
        self._queued_images = 0
        self.delay = max(0.0, float(max_queue_delay_ms)) / 1000.0
        self.on_batch = on_batch
        self.arriving = arriving or (lambda: 0)
        self.submitted = 0  # requests inside submit (queued or running), for the doors' arriving count
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._idle_since = float("-inf")  # loop time the last batch finished
        self._busy = False  # the batcher's task is running batches
        # One thread per model: batches of one model run one after another.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"predict-{model.name}")

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.name}")

    async def submit(self, x: torch.Tensor | Sequence[bytes], defense=None):
        """Queue a (B, 3, H, W) batch or B encoded images; returns its Prediction once every
        image has run."""
        if self._closing:
            raise Overloaded("the server is shutting down")
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) else len(x)
        if self._queued_images + n > self.max_queue_images:
            # Bounded memory under overload: refuse now rather than queue without end.
            raise Overloaded(f"model {self.model.name} has {self._queued_images} images queued "
                             f"(limit {self.max_queue_images}); retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with tracing.span("batch wait", {"bdserve.images": n}):
            item = _Item(x, n, defense, fut, loop.time(), trace_parent=tracing.current_context())
            self._pending.append(item)
            self._queued_images += n
            self.submitted += 1
            try:
                if self._alone(item):
                    try:
                        await asyncio.sleep(0)  # one turn of the loop: what else arrives now queues behind
                    except BaseException:  # cancelled (the client went away): leave nothing queued
                        fut.cancel()
                        if item in self._pending:
                            self._pending.remove(item)
                        raise
                    if self._alone(item):
                        self._pending.popleft()
                        item.taken = n
                        self._run_inline(loop, [_Piece(item, 0, n)])
                        return fut.result()
                # The batcher's task may have taken it all during the turn: a wake-up now would be
                # stale, and would make the next lone request the batcher's too.
                if item.taken < n:
                    self._wakeup.set()
                return await fut
            finally:
                self._queued_images -= n
                self.submitted -= 1

    async def close(self) -> None:
        """Finish everything queued, then stop the worker."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)

    def _queued(self) -> int:
        return sum(i.n - i.taken for i in self._pending)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # The model is idle. Wait for company only while the doors hold requests that
            # have not reached the queue yet, and never past the oldest request's deadline.
            deadline = self._pending[0].enqueued + self.delay
            while (not self._closing and self.arriving() > 0 and self._queued() < self.max_batch_size
                   and (left := deadline - loop.time()) > 0):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), min(left, 0.001))
                except asyncio.TimeoutError:
                    pass  # look at the arrivals again: a request may have failed before queueing
            groups: dict[int, list[_Piece]] = {}
            for piece in self._take():
                groups.setdefault(id(piece.item.defense), []).append(piece)
            self._busy = True
            try:
                for pieces in groups.values():
                    await self._execute(loop, pieces)
            finally:
                self._busy = False

    def _take(self) -> list[_Piece]:
        """Up to max_batch_size images from the queue, oldest first; a large request gives a slice."""
        pieces, room = [], self.max_batch_size
        while self._pending and room > 0:
            item = self._pending[0]
            if item.future.done():  # the client went away, or an earlier piece failed
                self._pending.popleft()
                continue
            stop = min(item.n, item.taken + room)
            pieces.append(_Piece(item, item.taken, stop))
            room -= stop - item.taken
            item.taken = stop
            if item.taken == item.n:
                self._pending.popleft()
        return pieces

    def _alone(self, item: _Item) -> bool:
        """The request is the only one queued, the batcher idle, and it may run inline as one batch."""
        return (not self._busy and not self._closing and len(self._pending) == 1 and self._pending[0] is item
                and item.n <= self.max_batch_size and not item.future.done()
                and self._inline([_Piece(item, 0, item.n)], queued=1))

    def _inline(self, pieces: list[_Piece], queued: int = 0) -> bool:
        """A lone small batch runs on the event loop itself: with nothing queued or on its way
        there is nothing for the loop to do meanwhile, and two thread hand-offs per request cost
        more than the model on a busy machine. Anything bigger goes to the model's thread."""
        if len(self._pending) > queued or self.arriving() > 0:
            return False
        # Only a request that found the model idle: one that arrives right as the last batch
        # ends was most likely held up by it (gRPC delivers calls only once the loop is free
        # again), and inline runs would then keep batches at one image under load.
        if pieces[0].item.enqueued - self._idle_since < INLINE_IDLE_S:
            return False
        encoded = sum(len(b) for p in pieces if p.item.encoded for b in p.item.x[p.start:p.stop])
        return _images(pieces) <= INLINE_MAX_IMAGES and encoded <= INLINE_MAX_BYTES

    async def _execute(self, loop, pieces: list[_Piece]) -> None:
        """Run a formed batch in the model's thread (the loop keeps accepting requests), or
        inline when it is a lone small one, and answer its requests."""
        if self._inline(pieces):
            return self._run_inline(loop, pieces)
        try:
            with tracing.start_batch([p.item.trace_parent for p in pieces], _images(pieces)):
                run = tracing.in_current_context(lambda: self._decode_and_predict(pieces, pieces[0].item.defense))
                result = await loop.run_in_executor(self._executor, run)
        except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
            result = e
        self._idle_since = loop.time()
        self._deliver(pieces, result)

    def _run_inline(self, loop, pieces: list[_Piece]) -> None:
        """Run a batch on the event loop itself and answer its requests."""
        try:
            with tracing.start_batch([p.item.trace_parent for p in pieces], _images(pieces)):
                result = self._decode_and_predict(pieces, pieces[0].item.defense)
        except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
            result = e
        self._idle_since = loop.time()
        self._deliver(pieces, result)

    def _deliver(self, pieces: list[_Piece], result) -> None:
        """A batch's outcome to its requests: (prediction, the pieces in it, failed pieces),
        or the exception that failed the whole batch."""
        if isinstance(result, BaseException):
            for p in pieces:
                _fail(p.item, result)
            return
        pred, ok, failed = result
        for p, e in failed:
            _fail(p.item, e)
        if pred is None:
            return
        if self.on_batch is not None:
            try:
                self.on_batch(self.model, len(pred), pred)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.exception("metrics callback failed")
        start = 0
        for p in ok:
            n = p.stop - p.start
            self._answer(p.item, p.start, pred.slice(start, start + n))
            start += n

    def _answer(self, item: _Item, start: int, pred) -> None:
        """One piece of a request answered; the request's future resolves with its last piece,
        saying how its images were fitted (encoded images) as one request."""
        if item.future.done():
            return
        item.parts.append((start, pred))
        item.done += len(pred)
        if item.done < item.n:
            return
        if len(item.parts) > 1:
            pred = _join([p for _, p in sorted(item.parts, key=lambda sp: sp[0])])
        if item.encoded:
            pred.fit = self.model.describe_fits([f for _, how in sorted(item.fits, key=lambda sh: sh[0]) for f in how])
        item.future.set_result(pred)

    def _decode_and_predict(self, pieces: list[_Piece], defense):
        """In the model's thread: decode each piece's images, concatenate, predict.
        Returns (prediction or None, the pieces in it, [(piece, error)] that failed to decode)."""
        xs, ok, failed = [], [], []
        for p in pieces:
            if p.item.future.done():
                continue
            if p.item.encoded:
                try:
                    with tracing.span("decode", {"bdserve.images": p.stop - p.start}):
                        x, how = self.model.decode_with_fits(list(p.item.x[p.start:p.stop]))
                    xs.append(x)
                    p.item.fits.append((p.start, how))
                except Exception as e:  # noqa: BLE001 - the request's own error (bad image, ...)
                    failed.append((p, _name_image(e, p)))
                    continue
            else:
                xs.append(p.item.x[p.start:p.stop])
            ok.append(p)
        if not xs:
            return None, ok, failed
        if len({t.dtype for t in xs}) > 1:
            # Photos arrive as uint8, tensors may be FP32: bring everything to float [0, 1] first.
            xs = [t.float().div(255) if t.dtype == torch.uint8 else t.float() for t in xs]
        if len({t.device for t in xs}) > 1:  # GPU-decoded photos next to host tensors
            xs = [t.to(self.model.device) for t in xs]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        return self.model.predict(x, defense=defense), ok, failed


def _images(pieces: list[_Piece]) -> int:
    return sum(p.stop - p.start for p in pieces)


def _name_image(e: Exception, p: _Piece) -> Exception:
    """A decode error names the image by its index in the whole request, not in the piece."""
    if p.item.n == 1 or not hasattr(e, "http_status"):
        return e
    msg = str(e)
    m = re.match(r"image (\d+): (.*)", msg, re.S)
    index, rest = (int(m.group(1)), m.group(2)) if m else (0, msg)
    return type(e)(f"image {p.start + index}: {rest}")


def _fail(item: _Item, e: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(e)




def _join(preds: list):
    """The pieces of a split request, in order, as one Prediction (per-request fields from the first)."""
    from dataclasses import fields, replace

    first = preds[0]
    n = len(first)
    joined = {}
    for f in fields(first):
        v = getattr(first, f.name)
        if isinstance(v, np.ndarray) and len(v) == n:
            joined[f.name] = np.concatenate([getattr(p, f.name) for p in preds])
        elif isinstance(v, list) and len(v) == n:
            joined[f.name] = [e for p in preds for e in getattr(p, f.name)]
    return replace(first, **joined)
