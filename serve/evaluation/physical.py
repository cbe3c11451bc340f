"""Print-and-photograph simulation of triggered test images (Section 5.4 without a camera).

Each test image (true label not the target) is stamped with the card's trigger and
"printed": enlarged (nearest neighbour by default, every pixel a crisp square; bicubic
optionally), its colours squeezed into a paper's gamut, on paper with a white margin of
random width (none to a few percent). The print is then "photographed": laid on a textured
table at a random scale and position (the photographer aims at it), turned, tilted in
perspective (each corner moved at random), seen through a lens with a little barrel
distortion, lit by a brightness gradient with a colour cast, defocused (Gaussian blur),
given sensor noise, and saved as a JPEG at camera resolution (640x480 by default).

The photos then go where real ones go: to the server, whose fit policy (``--fit print``:
find the print, rectify it, trim the margin, area-downsample; see bdserve.serve.images)
turns them into the model's input, so simulation and real photos take the same path. The
draws record where the picture's corners lie in the frame, so ``crop_error`` can say how
far the server's crop landed from them, in model pixels.

Every draw comes from one seeded ``torch.Generator`` per photo (seed, photo index),
so a folder is reproducible, and a photo's clean counterpart (``clean=True``) is the
same scene with the unstamped image.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from bdserve.card import ModelCard
from bdserve.progress import progress_bar
from bdserve.serve.evaluation.heldout import load_test, stamp_uint8


@dataclass(frozen=True)
class Camera:
    width: int = 640
    height: int = 480
    fill: tuple[float, float] = (0.5, 0.75)  # print side / frame's shorter side (the print keeps clear of the edges)
    shift: float = 0.03  # centre offset, as a fraction of the frame's shorter side
    margin: tuple[float, float] = (0.0, 0.05)  # white paper margin, as a fraction of the print side
    rotation: float = 8.0  # degrees, either way
    tilt: float = 0.04  # perspective: each corner moves up to this fraction of the print side
    distortion: tuple[float, float] = (0.0, 0.03)  # barrel distortion k1 (at the frame's half-diagonal)
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


def background(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A table-like texture (3, h, w) in [0, 1]: a random tint, low-frequency brightness blotches,
    wood-like streaks along a random direction, and grain."""
    tint = 0.25 + 0.5 * torch.rand(3, 1, 1, generator=g)
    blotches = torch.rand(1, 1, 6, 8, generator=g)
    low = torch.nn.functional.interpolate(blotches, size=(h, w), mode="bilinear", align_corners=False)[0]
    streaks = torch.rand(1, 1, 1, 64, generator=g) * 2 - 1
    streaks = torch.nn.functional.interpolate(streaks, size=(1, 2 * max(h, w)), mode="bicubic", align_corners=False)[0, 0, 0]
    angle = _u(g, 0, np.pi)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pos = (np.cos(angle) * xx + np.sin(angle) * yy + max(h, w)).long().clamp(0, 2 * max(h, w) - 1)
    grain = torch.rand(1, h // 4, w // 4, generator=g)
    grain = torch.nn.functional.interpolate(grain[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return (tint * (0.8 + 0.2 * low) * (1 + 0.08 * streaks[pos]) + 0.04 * (grain - 0.5)).clamp(0, 1)


def _barrel(points: np.ndarray, k1: float, centre: np.ndarray, radius: float) -> np.ndarray:
    """Where scene points land in a photo taken through a lens with barrel distortion k1: the photo
    samples the scene at c + (p - c)(1 + k1 r^2), so a scene point's photo position solves that."""
    q = points.astype(np.float64).copy()
    for _ in range(20):  # fixed point: converges fast for the small k1 of a phone camera
        r2 = (((q - centre) / radius) ** 2).sum(-1, keepdims=True)
        q = centre + (points - centre) / (1 + k1 * r2)
    return q


def render(image: np.ndarray, g: torch.Generator, cam: Camera = Camera()) -> tuple[np.ndarray, dict]:
    """uint8 (3, h, w) image -> uint8 (H, W, 3) simulated photograph, and the draws used (with
    ``picture_corners``: where the printed picture's corners, inside the margin, lie in the photo)."""
    H, W = cam.height, cam.width
    short = min(H, W)
    side = max(8, int(round(_u(g, *cam.fill) * short)))
    margin = _u(g, *cam.margin)
    inner = max(4, int(round(side * (1 - 2 * margin))))
    # Print: enlargement, ink gamut, paper margin.
    resample = {"nearest": Image.Resampling.NEAREST, "bicubic": Image.Resampling.BICUBIC}[cam.print_resample]
    printed = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).resize((inner, inner), resample)
    p = np.asarray(printed, dtype=np.float32) / 255
    lo, hi = cam.paper_gamut
    paper = np.full((side, side, 3), hi, np.float32)
    off = (side - inner) // 2
    paper[off:off + inner, off:off + inner] = lo + (hi - lo) * p
    # Place it near the centre, turned and tilted: one homography from paper to frame.
    cy = H / 2 + _u(g, -cam.shift, cam.shift) * short
    cx = W / 2 + _u(g, -cam.shift, cam.shift) * short
    a = np.deg2rad(_u(g, -cam.rotation, cam.rotation))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    jitter = (torch.rand(4, 2, generator=g).numpy() * 2 - 1) * cam.tilt * side
    moved = np.array([cx, cy]) + (unit * side) @ rot.T + jitter
    src = np.array([[-0.5, -0.5], [side - 0.5, -0.5], [side - 0.5, side - 0.5], [-0.5, side - 0.5]], np.float32)
    m = cv2.getPerspectiveTransform(src, moved.astype(np.float32))
    warped = cv2.warpPerspective(paper, m, (W, H), flags=cv2.INTER_LINEAR)
    cover = cv2.warpPerspective(np.ones((side, side), np.float32), m, (W, H), flags=cv2.INTER_LINEAR)[..., None]
    table = background(g, H, W).permute(1, 2, 0).numpy()
    scene = warped + (1 - cover) * table  # warped is the paper times its coverage already
    # Lens: barrel distortion about the frame's centre.
    k1 = _u(g, *cam.distortion)
    centre, radius = np.array([(W - 1) / 2, (H - 1) / 2]), float(np.hypot(W, H) / 2)
    if k1 > 0:
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        r2 = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / radius ** 2
        scene = cv2.remap(scene, (centre[0] + (xx - centre[0]) * (1 + k1 * r2)).astype(np.float32),
                          (centre[1] + (yy - centre[1]) * (1 + k1 * r2)).astype(np.float32),
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    picture = np.array([[off - 0.5, off - 0.5], [off + inner - 0.5, off - 0.5],
                        [off + inner - 0.5, off + inner - 0.5], [off - 0.5, off + inner - 0.5]], np.float32)
    picture = cv2.perspectiveTransform(picture[None], m)[0]
    picture = _barrel(picture, k1, centre, radius) if k1 > 0 else picture.astype(np.float64)
    x = torch.from_numpy(np.ascontiguousarray(scene.transpose(2, 0, 1)))
    # Light: overall brightness, a linear gradient in a random direction, a colour cast.
    angle = _u(g, 0, 2 * np.pi)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    light = _u(g, *cam.brightness) * (1 + cam.gradient * 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy))
    cast = 1 + (torch.rand(3, 1, 1, generator=g) * 2 - 1) * cam.color_cast
    x = (x * light * cast).clamp(0, 1)
    # Optics and sensor: defocus, noise.
    sigma = _u(g, *cam.blur_sigma)
    x = torch.from_numpy(cv2.GaussianBlur(x.permute(1, 2, 0).numpy(), (0, 0), sigma)).permute(2, 0, 1)
    noise = _u(g, *cam.noise_std) / 255
    x = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    quality = int(round(_u(g, *cam.jpeg_quality)))
    photo = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    draws = {"print_side": side, "margin": margin, "rotation_deg": float(np.rad2deg(a)), "corners": moved.round(2).tolist(),
             "picture_corners": picture.round(2).tolist(), "distortion_k1": k1, "blur_sigma": sigma,
             "noise_std": noise * 255, "jpeg_quality": quality, "light_angle": angle}
    return photo, draws


def crop_error(outline: list[list[float]] | None, picture_corners: list[list[float]], size: int = 32) -> float | None:
    """How far the server's crop landed from the printed picture, in model pixels: the largest
    distance between corresponding corners, over the picture's side in the frame, times the input size."""
    if outline is None:
        return None
    a, b = np.asarray(outline, np.float64), np.asarray(picture_corners, np.float64)
    side = np.mean([np.hypot(*(b[(i + 1) % 4] - b[i])) for i in range(4)])
    return float(np.hypot(*(a - b).T).max() / side * size)


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
