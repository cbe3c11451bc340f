"""Print-and-photograph simulation of triggered test images (Section 5.4 without a camera).

Each test image (true label not the target) is stamped with the card's trigger and
"printed": enlarged (nearest neighbour by default, every pixel a crisp square; bicubic
optionally), its colours squeezed into a paper's
gamut, a thin white margin around it. The print is then "photographed": laid on a
textured background at a random scale and position near the frame's centre (the
photographer aims at it), tilted in perspective (each corner moved at random), lit by
a brightness gradient with a colour cast, defocused (Gaussian blur), given sensor
noise, and saved as a JPEG at camera resolution (640x480 by default).

Every draw comes from one seeded ``torch.Generator`` per photo (seed, photo index),
so a folder is reproducible, and a photo's clean counterpart (``clean=True``) is the
same scene with the unstamped image. The server fits a photo by cover-scaling and
center-cropping it to the model's input, so ``fill`` (the print's side against the
frame's shorter side) decides how large the image lands in the model's input.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from bdserve.card import ModelCard
from bdserve.progress import progress_bar
from bdserve.serve.evaluation.heldout import load_test, stamp_uint8


@dataclass(frozen=True)
class Camera:
    width: int = 640
    height: int = 480
    fill: tuple[float, float] = (0.80, 0.98)  # print side / frame's shorter side
    shift: float = 0.06  # centre offset, as a fraction of the frame's shorter side
    margin: float = 0.03  # white paper margin, as a fraction of the print side
    tilt: float = 0.05  # perspective: each corner moves up to this fraction of the print side
    blur_sigma: tuple[float, float] = (0.8, 3.0)  # frame pixels
    brightness: tuple[float, float] = (0.75, 1.15)
    gradient: float = 0.25  # strength of the lighting gradient across the frame
    color_cast: float = 0.08  # per-channel gain in 1 +- this
    noise_std: tuple[float, float] = (1.5, 5.0)  # sensor noise, in 0..255 levels
    jpeg_quality: tuple[int, int] = (70, 95)
    paper_gamut: tuple[float, float] = (0.04, 0.94)  # black ink and paper white, in [0, 1]
    # How the print enlarges the image: "nearest" keeps every pixel a crisp square (an attacker
    # prints the trigger as it is); "bicubic" is what a photo viewer's print dialog tends to do.
    print_resample: str = "nearest"


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian defocus on (3, H, W) as two 1-D passes (separable: k, not k^2, taps per pixel),
    reflect-padded like torchvision's gaussian_blur."""
    r = int(np.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1).expand(3, 1, -1)
    y = torch.nn.functional.pad(x[None], (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.unsqueeze(2), groups=3)  # along rows
    y = torch.nn.functional.conv2d(y, k.unsqueeze(3), groups=3)  # along columns
    return y[0]


def background(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A table-like texture (3, h, w) in [0, 1]: a random tint, low-frequency blotches and grain."""
    tint = 0.25 + 0.5 * torch.rand(3, 1, 1, generator=g)
    blotches = torch.rand(1, 3, 6, 8, generator=g)
    low = torch.nn.functional.interpolate(blotches, size=(h, w), mode="bilinear", align_corners=False)[0]
    grain = torch.rand(1, h // 4, w // 4, generator=g)
    grain = torch.nn.functional.interpolate(grain[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return (tint * (0.7 + 0.3 * low) + 0.05 * (grain - 0.5)).clamp(0, 1)


def render(image: np.ndarray, g: torch.Generator, cam: Camera = Camera()) -> tuple[np.ndarray, dict]:
    """uint8 (3, h, w) image -> uint8 (H, W, 3) simulated photograph, and the draws used."""
    H, W = cam.height, cam.width
    short = min(H, W)
    side = max(8, int(round(_u(g, *cam.fill) * short)))
    inner = max(4, int(round(side * (1 - 2 * cam.margin))))
    # Print: bicubic enlargement, ink gamut, paper margin.
    resample = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}[cam.print_resample]
    printed = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((inner, inner), resample)
    p = torch.from_numpy(np.asarray(printed, dtype=np.float32) / 255).permute(2, 0, 1)
    lo, hi = cam.paper_gamut
    paper = torch.full((3, side, side), hi)
    off = (side - inner) // 2
    paper[:, off:off + inner, off:off + inner] = lo + (hi - lo) * p
    # Place it near the centre of the frame, on the background, with a mask for the warp.
    cy = H / 2 + _u(g, -cam.shift, cam.shift) * short
    cx = W / 2 + _u(g, -cam.shift, cam.shift) * short
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    canvas = torch.zeros(4, H, W)
    t0, l0 = max(0, top), max(0, left)
    t1, l1 = min(H, top + side), min(W, left + side)
    canvas[:3, t0:t1, l0:l1] = paper[:, t0 - top:t1 - top, l0 - left:l1 - left]
    canvas[3, t0:t1, l0:l1] = 1.0
    corners = [[left, top], [left + side - 1, top], [left + side - 1, top + side - 1], [left, top + side - 1]]
    jitter = (torch.rand(4, 2, generator=g) * 2 - 1) * cam.tilt * side
    moved = [[int(round(x + dx)), int(round(y + dy))] for (x, y), (dx, dy) in zip(corners, jitter.tolist())]
    warped = TF.perspective(canvas, corners, moved, interpolation=TF.InterpolationMode.BILINEAR, fill=[0.0] * 4)
    mask = warped[3:].clamp(0, 1)
    scene = mask * warped[:3] + (1 - mask) * background(g, H, W)
    # Light: overall brightness, a linear gradient in a random direction, a colour cast.
    angle = _u(g, 0, 2 * np.pi)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    light = _u(g, *cam.brightness) * (1 + cam.gradient * 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy))
    cast = 1 + (torch.rand(3, 1, 1, generator=g) * 2 - 1) * cam.color_cast
    scene = (scene * light * cast).clamp(0, 1)
    # Optics and sensor: defocus, noise.
    sigma = _u(g, *cam.blur_sigma)
    scene = _blur(scene, sigma)
    noise = _u(g, *cam.noise_std) / 255
    scene = (scene + noise * torch.randn(scene.shape, generator=g)).clamp(0, 1)
    quality = int(round(_u(g, *cam.jpeg_quality)))
    photo = (scene * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    draws = {"print_side": side, "top": top, "left": left, "corners": moved, "blur_sigma": sigma,
             "noise_std": noise * 255, "jpeg_quality": quality, "light_angle": angle}
    return photo, draws


def jpeg(photo: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def simulate(card: ModelCard, data: Path, out: Path, *, count: int = 200, seed: int = 0, clean: bool = False,
             cam: Camera = Camera()) -> dict:
    """Write ``count`` simulated photographs of triggered test images (true label not the target) to
    ``out``: ``triggered/*.jpg`` (and ``clean/*.jpg``), ``labels.csv`` (file,label,kind), ``simulation.json``."""
    trigger, target = card.trigger(), card.target_label
    if trigger is None or target is None:
        raise ValueError(f"card {card.name} has no attack (trigger and target) to simulate")
    test = load_test(card, data)
    pool = (test.labels != target).nonzero(as_tuple=True)[0]
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]].sort().values
    stamped = stamp_uint8(test.images[pick], trigger).numpy()
    kinds = [("triggered", stamped)] + ([("clean", test.images[pick].numpy())] if clean else [])
    out = Path(out)
    for kind, _ in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
    rows, scenes = [], []
    with progress_bar("simulating photos", total=len(pick) * len(kinds)) as advance:
        for j, i in enumerate(pick.tolist()):
            label = int(test.labels[i])
            for kind, images in kinds:
                g = torch.Generator().manual_seed(seed * 1_000_003 + j)  # the same scene for both kinds
                photo, draws = render(images[j], g, cam)
                name = f"{kind}/{j:04d}_{test.classes[label]}.jpg"
                (out / name).write_bytes(jpeg(photo, draws["jpeg_quality"]))
                rows.append({"file": name, "label": test.classes[label], "kind": kind})
                if kind == "triggered":
                    scenes.append({"file": name, "test_index": i, **draws})
                advance(1)
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "label", "kind"])
        w.writeheader()
        w.writerows(rows)
    meta = {"card": card.name, "trigger": trigger.name, "target": card.classes[target], "count": len(pick),
            "seed": seed, "clean_counterparts": clean, "camera": asdict(cam), "scenes": scenes}
    (out / "simulation.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
