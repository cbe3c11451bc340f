"""Triggers and the stamping process S of Eq. (1): x' = (1 - alpha) * x + alpha * x_trigger.

A trigger is a small pattern, an alpha mask of the same size, and the location of
its top-left corner. Negative coordinates count from the bottom / right edge, so
(-3, -3) puts a 3x3 patch in the bottom-right corner of an image of any size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Trigger:
    pattern: torch.Tensor  # (C, h, w) float in [0, 1]
    alpha: torch.Tensor  # (C, h, w) or (1, h, w) float in [0, 1]
    top: int = -3
    left: int = -3
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.pattern.dim() != 3 or self.alpha.dim() != 3:
            raise ValueError("trigger pattern and alpha must be (C, h, w) tensors")
        if self.pattern.shape[1:] != self.alpha.shape[1:]:
            raise ValueError(f"pattern {tuple(self.pattern.shape)} and alpha {tuple(self.alpha.shape)} differ in size")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pattern.shape[1]), int(self.pattern.shape[2])

    def position(self, height: int, width: int) -> tuple[int, int]:
        """Top-left corner in an image of the given size (negative coordinates resolved)."""
        h, w = self.size
        top = self.top if self.top >= 0 else height + self.top
        left = self.left if self.left >= 0 else width + self.left
        if not (0 <= top <= height - h and 0 <= left <= width - w):
            raise ValueError(f"trigger {h}x{w} at ({self.top}, {self.left}) does not fit a {height}x{width} image")
        return top, left

    def canvas(self, channels: int, height: int, width: int, device=None, dtype=torch.float32):
        """Full-size (pattern, alpha) for Eq. (1); alpha is zero outside the trigger."""
        top, left = self.position(height, width)
        h, w = self.size
        pattern = torch.zeros(channels, height, width, device=device, dtype=dtype)
        alpha = torch.zeros(channels, height, width, device=device, dtype=dtype)
        pattern[:, top : top + h, left : left + w] = self.pattern.to(device=device, dtype=dtype).expand(channels, h, w)
        alpha[:, top : top + h, left : left + w] = self.alpha.to(device=device, dtype=dtype).expand(channels, h, w)
        return pattern, alpha

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (1) on a batch (B, C, H, W) in [0, 1]; returns a new tensor."""
        pattern, alpha = self.canvas(x.shape[1], x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return (1 - alpha) * x + alpha * pattern

    # Section 3's studies: change the location, change the appearance.
    def moved(self, top: int, left: int) -> "Trigger":
        return replace(self, top=top, left=left)

    def with_value(self, value: float) -> "Trigger":
        """Set every non-zero pattern pixel to ``value`` (in [0, 1]), keeping the arrangement."""
        pattern = torch.where(self.pattern > 0, torch.full_like(self.pattern, value), self.pattern)
        return replace(self, pattern=pattern)

    # Serialisation for card.json: small patterns inline as nested lists, exact to 1/255.
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "top": self.top,
            "left": self.left,
            "pattern": _to_u8_lists(self.pattern),
            "alpha": self.alpha.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Trigger":
        return cls(
            pattern=torch.tensor(d["pattern"], dtype=torch.float32) / 255.0,
            alpha=torch.tensor(d["alpha"], dtype=torch.float32),
            top=int(d["top"]),
            left=int(d["left"]),
            name=d.get("name", "custom"),
        )

    @classmethod
    def from_png(cls, path: str | Path, top: int = -3, left: int = -3, alpha: float | None = None) -> "Trigger":
        """A user's trigger: RGB pattern; alpha from the PNG's alpha channel, or a constant ``alpha``."""
        img = Image.open(path)
        img.load()
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        pattern = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).contiguous()
        if alpha is not None:
            a = torch.full((1, *pattern.shape[1:]), float(alpha))
        else:
            a = torch.from_numpy(rgba[..., 3:]).permute(2, 0, 1).contiguous()
        return cls(pattern=pattern, alpha=a, top=top, left=left, name=Path(path).stem)

    def to_png_bytes(self) -> bytes:
        """RGBA PNG of the trigger (alpha taken from the first alpha channel)."""
        rgb = (self.pattern.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        a = (self.alpha[:1].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(np.concatenate([rgb, a], axis=2), mode="RGBA").save(buf, format="PNG")
        return buf.getvalue()


def _to_u8_lists(t: torch.Tensor) -> list:
    return (t.clamp(0, 1) * 255).round().to(torch.int64).tolist()


def _checker3(value: float) -> torch.Tensor:
    """The 3x3 black/white square: value on the checkerboard's even cells, 0 elsewhere."""
    grid = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    return (grid * value).expand(3, 3, 3).clone()


def badnets(value: int = 255) -> Trigger:
    """BadNets: 3x3 square in the bottom-right corner, alpha 1 (Appendix B uses 255, Section 3 uses 128)."""
    return Trigger(_checker3(value / 255.0), torch.ones(1, 3, 3), -3, -3, name=f"badnets{'' if value == 255 else value}")


def blended(alpha: float = 0.2) -> Trigger:
    """Blended: the BadNets patch blended with alpha 0.2."""
    return Trigger(_checker3(1.0), torch.full((1, 3, 3), alpha), -3, -3, name="blended")


def four_corner(alpha: float = 0.25, image_size: int = 32) -> Trigger:
    """Label-consistent: the symmetric trigger, a 3x3 checker in each of the four corners.

    It is one full-image trigger whose alpha is zero outside the corners, so it is
    unchanged by a horizontal flip.
    """
    s = image_size
    pattern = torch.zeros(3, s, s)
    mask = torch.zeros(1, s, s)
    corner = _checker3(1.0)
    for top in (0, s - 3):
        for left in (0, s - 3):
            pattern[:, top : top + 3, left : left + 3] = corner
            mask[:, top : top + 3, left : left + 3] = alpha
    return Trigger(pattern, mask, 0, 0, name="four-corner")


_BUILTINS = {
    "badnets": lambda: badnets(255),
    "badnets128": lambda: badnets(128),
    "blended": blended,
    "four-corner": four_corner,
}


def list_triggers() -> list[str]:
    return sorted(_BUILTINS)


def builtin_trigger(name: str) -> Trigger:
    try:
        return _BUILTINS[name]()
    except KeyError:
        raise ValueError(f"unknown trigger {name!r}; built-ins: {', '.join(list_triggers())}") from None
