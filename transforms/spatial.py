"""Spatial operations: flipping, shrinking with bilinear interpolation, and placing on a zero canvas.

Why plain torch here and not Kornia: on 32x32 batches, ``kornia.geometry.resize`` and
Kornia's augmentation containers add per-call validation and parameter bookkeeping
that costs more than the arithmetic (bench/transforms_bench.py measures it), and
Kornia's random augmentations draw from the global RNG, not a ``torch.Generator``.
The maths is the same bilinear resize (F.interpolate, align_corners=False, no
antialiasing) that Kornia calls underneath.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[-1])


def shrink(x: torch.Tensor, k: int) -> torch.Tensor:
    """Resize (B, C, H, W) to (H - k, W - k) with bilinear interpolation."""
    if k == 0:
        return x
    h, w = x.shape[-2] - k, x.shape[-1] - k
    if h < 1 or w < 1:
        raise ValueError(f"cannot shrink a {x.shape[-2]}x{x.shape[-1]} image by {k} pixels")
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)


def place(small: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Put each image of ``small`` on a zero canvas of (height, width) at its own (top, left).

    One vectorised index_put instead of a Python loop over the batch.
    """
    b, c, h, w = small.shape
    out = small.new_zeros(b, c, height, width)
    rows = top.view(b, 1, 1) + torch.arange(h, device=small.device).view(1, h, 1)
    cols = left.view(b, 1, 1) + torch.arange(w, device=small.device).view(1, 1, w)
    batch = torch.arange(b, device=small.device).view(b, 1, 1)
    out.permute(0, 2, 3, 1)[batch, rows, cols] = small.permute(0, 2, 3, 1)
    return out


def shrink_pad(x: torch.Tensor, k: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """ShrinkPad with a per-sample shrink size ``k`` and offset (top, left), 0 <= top, left <= k."""
    height, width = x.shape[-2:]
    sizes = torch.unique(k).tolist()
    if len(sizes) == 1:
        return place(shrink(x, int(sizes[0])), top, left, height, width)
    out = torch.empty_like(x)
    for size in sizes:  # one resize per distinct shrink size (at most max_shrink + 1 of them)
        idx = (k == size).nonzero(as_tuple=True)[0]
        out[idx] = place(shrink(x[idx], int(size)), top[idx], left[idx], height, width)
    return out
