"""Helpers shared by the serving tests (a uniquely named module: ``import conftest`` is
ambiguous when several test directories have one)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

TINY_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOREIGN_CLASSES = [f"kind{i}" for i in range(7)]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TinyNet(nn.Module):
    """A small CNN with its normalisation inside, like bdserve's own exports. Flatten + Linear
    (no global pooling) keeps it sensitive to position, so a flip changes its answers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.features((x - self.mean) / self.std)
        return self.head(x.flatten(1)) * 4.0  # sharper logits: clearer top-1


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int]) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: about a second, against ~10 s for the dynamo one.
        torch.onnx.export(model, (torch.zeros(1, 3, *size),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """uint8 (H, W, 3) -> encoded bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(rng, h: int, w: int) -> np.ndarray:
    # Smooth blobs, not white noise: JPEG and resizing behave as on photos.
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


MAX_BODY = 1 << 20  # 1 MiB: small, so the 413 tests stay cheap
MAX_PIXELS = 4_000_000


DETECTORS = "consistency,strip,scaleup"


def start_server(store: Path, *, lab: bool = False, detect: str | None = None, delay_ms: float = 20.0,
                 on_suspect: str = "flag", body_timeout_s: float = 30.0):
    from bdserve.serve.server import BackgroundServer, ServeConfig, load_models
    from bdserve.serve.service import InferenceService

    models = load_models(store, lab=lab, detect=detect, max_pixels=MAX_PIXELS, threads=1)
    service = InferenceService(models, max_batch_size=32, max_queue_delay_ms=delay_ms, on_suspect=on_suspect)
    return BackgroundServer(service, ServeConfig(http_port=0, grpc_port=0, max_body_bytes=MAX_BODY,
                                                 max_message_bytes=MAX_BODY, grace_s=5, body_timeout_s=body_timeout_s))


def calibrate_store(src: Path, dst: Path, rng, n: int = 224) -> Path:
    """A copy of the model store ``src`` with every model's detectors calibrated (cheap counts)
    on ``n`` random images at the model's input size."""
    import shutil

    import torch

    from bdserve.serve.detection import CalibrationConfig, calibrate
    from bdserve.serve.pipeline import DefendedModel

    shutil.copytree(src, dst)
    for d in sorted(p for p in dst.iterdir() if (p / "card.json").exists()):
        model = DefendedModel.load(d, threads=1)
        h, w = model.input_size
        images = torch.from_numpy(np.stack([random_image(rng, h, w) for _ in range(n)])).permute(0, 3, 1, 2)
        calibrate(model, d, images.contiguous(), CalibrationConfig(
            fpr=0.05, seed=1, methods="consistency:4,strip:4,scaleup:4"), "random blobs")
    return dst


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header declaring a huge image: a few dozen bytes that would decode to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def pack_bytes(blobs: list[bytes]) -> bytes:
    """BYTES tensor contents: each element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def decode_raw_output(datatype: str, shape, raw: bytes):
    """An output's raw contents as the test reads them (written here, not taken from the server)."""
    if datatype == "FP32":
        return np.frombuffer(raw, "<f4").reshape(list(shape))
    if datatype == "BOOL":
        return np.frombuffer(raw, np.bool_)
    vals, pos = [], 0
    while pos < len(raw):
        (k,) = struct.unpack_from("<I", raw, pos)
        vals.append(raw[pos + 4: pos + 4 + k].decode())
        pos += 4 + k
    return vals
