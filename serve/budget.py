"""Server-wide budgets of memory in flight: decoded pixels, and memory given back afterwards.

A 140 KiB PNG may declare 7000x7000 pixels (legal, under the per-image limit) and decode
to 147 MB; twelve of them at once took RSS from 0.6 to 2.9 GB. ``PixelBudget`` caps the
pixels being decoded at once across every request and door: a request reserves the
pixels of its largest image, as its header declares it (read without decoding; a
request's images decode one at a time, each fitted to the model's input before the
next), waits while the budget is spent, and gets 503 (retry later) when it has waited
``wait_s``. A request that alone needs more than the whole budget is refused at once
(413): it could never run. Tensors arrive decoded and reserve nothing.

``give_back_memory`` asks glibc to return freed heap pages to the system (``malloc_trim``):
large decodes leave free but resident arenas behind, which is how RSS stayed at 2.9 GB.
``bound_heap`` fixes glibc's mmap threshold at 16 MiB (it otherwise climbs to 32 MiB after
the first large free), so every large buffer - a decoded photo, a 4,096-image batch - is
its own mapping, returned to the system when freed. Not lower: at 1 MiB every batch of a
few hundred images (6 MB of floats, a 12 MB gather index in ShrinkPad) was a fresh mapping
whose pages faulted in on every request, and the defense ran 3x slower (1.19 s against
0.42 s for 38 batches of 500 images here; `bdserve eval` took 1.2x the in-process pass, now 1.03-1.06x).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import struct
import warnings
from contextlib import asynccontextmanager

from PIL import Image

from bdserve.serve.errors import Overloaded, PayloadTooLarge
from bdserve.serve.fastdecode import header_size

FORMATS = ("JPEG", "PNG", "WEBP")


def declared_pixels(blob: bytes) -> int:
    """The pixel count an encoded image's header declares; 0 when there is no readable header
    (decoding then produces the error message)."""
    try:  # PNG and JPEG: a few bytes of the header (the decoder's own fast path reads them too)
        hw = header_size(blob if isinstance(blob, bytes) else bytes(blob[:65536]))
    except struct.error:
        hw = None
    if hw is not None:
        return hw[0] * hw[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(blob), formats=FORMATS) as im:
                w, h = im.size
                return int(w) * int(h)
    except Exception:  # noqa: BLE001 - not an image: the decoder words the error
        return 0


class PixelBudget:
    """At most ``limit`` decoded pixels in flight, server-wide (one event loop)."""

    def __init__(self, limit: int, wait_s: float = 10.0):
        self.limit = int(limit)
        self.wait_s = wait_s
        self.in_use = 0
        self._freed = asyncio.Condition()
        self._waiting = 0  # requests waiting for room: only they need telling when pixels free up

    @asynccontextmanager
    async def reserve(self, pixels: int):
        pixels = int(pixels)
        if pixels <= 0:
            yield
            return
        if pixels > self.limit:
            raise PayloadTooLarge(f"an image of this request declares {pixels} pixels, over this server's "
                                  f"budget of {self.limit} decoded pixels at once (--pixel-budget); "
                                  "send smaller images")
        if self.in_use + pixels <= self.limit:  # room now (one event loop: nothing runs in between)
            self.in_use += pixels
        else:
            async with self._freed:
                self._waiting += 1
                try:
                    await asyncio.wait_for(self._freed.wait_for(lambda: self.in_use + pixels <= self.limit), self.wait_s)
                except asyncio.TimeoutError:
                    raise Overloaded(f"the server is decoding as many pixels as it may ({self.in_use} of {self.limit}); "
                                     "retry later") from None
                finally:
                    self._waiting -= 1
                self.in_use += pixels
        try:
            yield
        finally:
            self.in_use -= pixels
            if self._waiting:
                async with self._freed:
                    self._freed.notify_all()
            if pixels >= LARGE_DECODE:
                give_back_memory()


LARGE_DECODE = 4_000_000  # pixels: after a decode this large, hand the freed heap back


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _glibc()
_M_MMAP_THRESHOLD = -3


def give_back_memory() -> None:
    """glibc only: return free heap pages to the system; elsewhere a no-op."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def bound_heap(mmap_threshold: int = 16 << 20) -> None:
    """glibc only: allocations from ``mmap_threshold`` bytes up are mappings of their own."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
