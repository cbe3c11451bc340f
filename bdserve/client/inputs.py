"""What ``predict`` and ``infer`` accept, made into what goes on the wire.

Files go as they are (the server decodes, orients and fits them: the same path as a camera
upload); Pillow images and HWC uint8 arrays are encoded as lossless PNG, so the server sees
the very same pixels.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np


def encode_png(hwc: np.ndarray) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_chw(chw: np.ndarray) -> bytes:
    """uint8 (3, H, W), as tensors are laid out -> PNG bytes."""
    return encode_png(np.asarray(chw).transpose(1, 2, 0))


def image_bytes(image: Any) -> bytes:
    """One image: a path (str or PathLike), encoded bytes, a PIL image, or a uint8 (H, W[, 3]) array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise TypeError(f"an image array must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}; "
                            "for a batch tensor (B, C, H, W) call infer()")
        return encode_png(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing Pillow for the check
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes, a PIL image "
                    "or a uint8 (H, W, 3) array")


def images_bytes(images: Any) -> list[bytes]:
    """One image or a sequence of them -> encoded files."""
    single = isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(images, "mode") or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3))
    items: Sequence = [images] if single else list(images)
    if not items:
        raise ValueError("no images given")
    return [image_bytes(i) for i in items]


def tensor_input(tensor: Any) -> tuple[str, np.ndarray]:
    """A (B, C, H, W) batch (numpy, or anything with ``.numpy()`` such as a CPU torch tensor) ->
    (OIP datatype, contiguous array): uint8 as UINT8 (0..255), floats as FP32 ([0, 1])."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().numpy()
    arr = np.asarray(tensor)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"infer() takes a (B, C, H, W) or (C, H, W) tensor, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return "UINT8", np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        return "FP32", np.ascontiguousarray(arr, dtype=np.float32)
    raise TypeError(f"infer() takes uint8 (0..255) or float ([0, 1]) pixels, got {arr.dtype}")
