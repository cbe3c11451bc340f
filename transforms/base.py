"""The shape every transform shares: parameters drawn in one place, applied in another."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _draw_device(x_device: torch.device, generator: torch.Generator | None) -> torch.device:
    # A seeded draw happens where its generator lives, so the same seed gives the same
    # parameters on any device; the (tiny) parameter tensors then follow the images.
    return generator.device if generator is not None else x_device


class Transform(nn.Module):
    """Batched image transform on float (B, C, H, W) tensors in [0, 1].

    Subclasses implement ``draw`` (random parameters, one per sample) and ``apply``
    (deterministic given those parameters). Deterministic transforms draw nothing.
    """

    random: bool = False

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        return None

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        return self.apply(x, self.draw(x, generator))

    @property
    def spec(self) -> str:
        """The string that ``create_defense`` turns back into this transform."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.spec


def uniform(n: int, low: float, high: float, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = _draw_device(x.device, generator)
    u = torch.rand(n, generator=generator, device=dev, dtype=torch.float32)
    return (low + (high - low) * u).to(device=x.device, dtype=x.dtype)


def randint(n: int, high_inclusive: torch.Tensor | int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integers uniform over 0..high (inclusive), per sample; ``high`` may differ per sample."""
    dev = _draw_device(x.device, generator)
    u = torch.rand(n, generator=generator, device=dev)
    if isinstance(high_inclusive, int):
        # The same numbers in three in-place ops: a served single image draws two of these,
        # and each torch op costs microseconds at that size.
        return u.mul_(high_inclusive + 1).floor_().clamp_(max=high_inclusive).to(device=x.device, dtype=torch.long)
    high = torch.as_tensor(high_inclusive, device=dev)
    return torch.floor(u * (high + 1)).clamp(max=high).to(device=x.device, dtype=torch.long)


def bernoulli(n: int, p: float, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = _draw_device(x.device, generator)
    return (torch.rand(n, generator=generator, device=dev) < p).to(x.device)
