"""Helpers for the photo lab tests (a uniquely named module; see tests/serve/serve_helpers.py)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "model_store" / "demo"
# The served defense is Flip: deterministic, so the page's defended answers can be compared with
# a direct /predictions call. ShrinkPad-4 (the card's) is on the page too, as a compared defense.
SERVED_DEFENSE = "flip"


def png_pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def data_url_pixels(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64", head
    return png_pixels(base64.b64decode(data))


def predictions_top(http: str, model: str, blob: bytes, defense: str, k: int = 3) -> list[tuple[str, float]]:
    """The top-k of a direct ``POST /predictions/{model}?defense=SPEC`` (a --lab server)."""
    r = httpx.post(f"{http}/predictions/{model}", params={"defense": defense}, content=blob, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Bdserve-Defense"] == defense
    return list(r.json().items())[:k]
