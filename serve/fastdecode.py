"""The fast path for encoded images that already have the model's input size.

A 32x32 PNG or JPEG needs no fit, so it skips Pillow's open/convert/array round trip:
its size is read from the header (PNG IHDR, JPEG SOF marker: a few bytes, no pixels),
and when it equals the model's input, ``torchvision.io.decode_image`` decodes it straight
into a uint8 (3, H, W) tensor (measured several times faster than Pillow for 32x32
images on this machine; the pixels are the same: lossless PNG, and the same libjpeg-turbo
settings for JPEG, checked in tests/serve/test_serve_pipeline.py). EXIF orientation is
applied as Pillow's path does.

Anything else - another size, another format, 16-bit, a file torchvision refuses - returns
None and goes through Pillow (serve/images.py), which also words every error, so this path
never decides that an upload is bad.
"""

from __future__ import annotations

import struct
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image  # at startup, not in the first request

# torchvision 0.29 warns on every decode call that its decoders will move to TorchCodec; once
# is enough (pyproject pins torchvision <= 0.29.x).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, ...); C4, C8 and CC are other segments.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(blob: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header, None when not found quickly."""
    if blob[:8] == _PNG and blob[12:16] == b"IHDR":
        w, h = struct.unpack(">II", blob[16:24])
        return h, w
    if blob[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(blob)
    while i + 9 < n and blob[i] == 0xFF:
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        seg = struct.unpack(">H", blob[i + 2:i + 4])[0]
        if marker in _SOF:
            h, w = struct.unpack(">HH", blob[i + 5:i + 9])
            return h, w
        i += 2 + seg
    return None


def decode_exact(blob: bytes, size: tuple[int, int]) -> torch.Tensor | None:
    """uint8 (3, H, W) when ``blob`` is a PNG/JPEG of exactly ``size`` (H, W); else None."""
    try:
        hw = header_size(bytes(blob[:65536]) if not isinstance(blob, bytes) else blob)
    except struct.error:
        return None
    if hw is None or (hw != size and hw[::-1] != size):
        return None
    if blob[:2] == b"\xff\xd8" and bytes(blob[-2:]) != b"\xff\xd9":
        return None  # no end-of-image marker: libjpeg would fill a truncated file with grey
    try:
        t = decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB,
                         apply_exif_orientation=True)
    except Exception:  # noqa: BLE001 - corrupt, truncated, odd: Pillow decides and words it
        return None
    if t.dtype != torch.uint8 or tuple(t.shape) != (3, *size):
        return None
    return t
