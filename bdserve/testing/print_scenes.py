"""Synthetic camera frames holding a print at known corners (the ``print`` fit's tests, the photo lab's)."""

from __future__ import annotations

import cv2
import numpy as np


def picture(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A CIFAR-sized picture: smooth random colour fields, a 3x3 0/255 checker in the bottom-right corner."""
    low = rng.integers(40, 216, (4, 4, 3)).astype(np.uint8)
    pic = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    checker = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], np.uint8)
    pic[-3:, -3:] = checker[..., None]
    return pic


def textured(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A wood-like table: a tint, streaks along one direction, grain."""
    tint = rng.uniform(35, 90, 3)  # a dark table, so that a borderless print stands out all round
    streaks = cv2.resize(rng.uniform(-1, 1, (h // 40 + 1, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 1, (h, w)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 1.2)
    img = tint[None, None, :] * (1 + 0.18 * streaks[..., None]) + 14 * grain[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def scene(rng: np.random.Generator, pic: np.ndarray, *, width: int = 640, height: int = 480, side: float = 300,
          angle: float = 0.0, tilt: float = 0.0, margin: float = 0.0, background: str = "plain",
          blur: float = 0.7, noise: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A frame with ``pic`` printed (nearest) on paper (``margin``: white border, fraction of the
    picture's side), rotated by ``angle`` degrees, each corner moved up to ``tilt`` * side (perspective).
    Returns the frame (h, w, 3), the paper's outer corners (4, 2), TL TR BR BL, pixel centres at
    integers, and the picture's corners (inside the margin) likewise."""
    k = 8
    paper_px = pic.shape[0] * k
    m = int(round(margin * paper_px))
    paper = np.full((paper_px + 2 * m, paper_px + 2 * m, 3), 238, np.uint8)
    paper[m:m + paper_px, m:m + paper_px] = cv2.resize(pic, (paper_px, paper_px), interpolation=cv2.INTER_NEAREST)
    ps = paper.shape[0]
    src = np.array([[-0.5, -0.5], [ps - 0.5, -0.5], [ps - 0.5, ps - 0.5], [-0.5, ps - 0.5]], np.float32)
    c = np.array([width / 2, height / 2]) + rng.uniform(-0.06, 0.06, 2) * height
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    dst = c + (unit * side) @ rot.T + rng.uniform(-tilt, tilt, (4, 2)) * side
    M = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    # Supersample 4x for antialiased edges, as a lens and sensor would give.
    s = 4
    S = np.diag([s, s, 1.0]) @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]]) @ M
    S = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ S
    big = cv2.warpPerspective(paper, S, (width * s, height * s), flags=cv2.INTER_NEAREST)
    mask = cv2.warpPerspective(np.ones(paper.shape[:2], np.float32), S, (width * s, height * s), flags=cv2.INTER_NEAREST)
    big = cv2.resize(big.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA)[..., None]
    bg = textured(rng, height, width) if background == "textured" else np.full((height, width, 3), (96, 110, 124), np.uint8)
    frame = big + (1 - mask) * bg  # big is already the paper times its coverage
    if blur:
        frame = cv2.GaussianBlur(frame, (0, 0), blur)
    frame = frame + rng.normal(0, noise, frame.shape)
    inner = np.array([[m - 0.5, m - 0.5], [ps - m - 0.5, m - 0.5], [ps - m - 0.5, ps - m - 0.5], [m - 0.5, ps - m - 0.5]], np.float32)
    picture_corners = cv2.perspectiveTransform(inner[None], M)[0].astype(np.float64)
    return np.clip(frame, 0, 255).round().astype(np.uint8), dst, picture_corners
