"""The server-wide pixel budget: what a request reserves, waiting for room, 503 after the wait,
413 for a request that could never fit, and the header-only pixel count."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from bdserve.serve.budget import PixelBudget, declared_pixels
from bdserve.serve.errors import Overloaded, PayloadTooLarge


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 9, 9)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 9, 9)).save(buf, "JPEG")
    return buf.getvalue()


def webp(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 9, 9)).save(buf, "WEBP")
    return buf.getvalue()


def test_declared_pixels_reads_the_header_only():
    assert declared_pixels(png(300, 200)) == declared_pixels(jpeg(300, 200)) == declared_pixels(webp(300, 200)) == 60_000
    assert declared_pixels(png(300, 200)[:40]) == 60_000  # the header is enough
    assert declared_pixels(b"not an image") == 0  # the decoder words that error


def test_a_request_waits_for_room_then_runs():
    async def main():
        budget = PixelBudget(100, wait_s=5)
        order = []

        async def job(name, pixels, hold):
            async with budget.reserve(pixels):
                order.append((name, budget.in_use))
                await asyncio.sleep(hold)

        await asyncio.gather(job("a", 70, 0.2), job("b", 50, 0), job("c", 30, 0))
        return order, budget.in_use

    order, left = asyncio.run(main())
    # c fits beside a at once; b (70 + 50 > 100) waits until a is done
    assert order[:2] == [("a", 70), ("c", 100)] and order[2][0] == "b", order
    assert left == 0


def test_a_spent_budget_answers_503_after_the_wait_and_too_large_is_413():
    async def main():
        budget = PixelBudget(100, wait_s=0.2)
        async with budget.reserve(80):
            with pytest.raises(Overloaded, match="retry later"):
                async with budget.reserve(40):
                    pass
        with pytest.raises(PayloadTooLarge, match="--pixel-budget"):
            async with budget.reserve(101):
                pass
        async with budget.reserve(100):  # the failures took nothing
            assert budget.in_use == 100
        return budget.in_use

    assert asyncio.run(main()) == 0
