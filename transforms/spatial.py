"""Spatial operations: flipping, shrinking with bilinear interpolation, and placing on a zero canvas.

Why plain torch here and not Kornia's augmentation classes: Kornia's random
augmentations draw from the global RNG, never a caller's ``torch.Generator``, and
its per-image padding has no batched form. Measured on 256x3x32x32 on an idle 2-core
CPU (bench/results/transforms-cpu.md): Flip 0.07 ms vs Kornia's RandomHorizontalFlip
0.16 ms; ShrinkPad-4 1.9 ms vs Kornia resize + per-image pad 3.0 ms. The resize is
the same bilinear F.interpolate (align_corners=False, no antialiasing) that
``kornia.geometry.resize`` calls underneath.
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


def windows(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cut a (height, width) window out of each image of ``x`` at its own (top, left).

    One gather instead of a Python loop over the batch (measured in
    bench/transforms_bench.py: faster than index_put or grouping by offset).
    """
    b, c, _, w = x.shape
    rows = torch.arange(height, device=x.device).view(1, height, 1) + top.view(b, 1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width) + left.view(b, 1, 1)
    index = (rows * w + cols).view(b, 1, height * width).expand(b, c, height * width)
    return x.flatten(2).gather(2, index).view(b, c, height, width)


# Up to this many images on the CPU, ``place`` copies each into its canvas: a served lone
# image takes 8 us that way against 33 us for the batched gather (bench/transforms_bench.py
# sizes; the gather wins from about 16 images, and on a GPU always: no host sync).
PLACE_BY_COPY_MAX = 8


def place(small: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Put each image of ``small`` on a zero canvas of (height, width) at its own (top, left):
    a window of a zero-padded copy (or, for a few images on the CPU, a copy into the canvas)."""
    b, c, h, w = small.shape
    if small.device.type == "cpu" and b <= PLACE_BY_COPY_MAX:
        out = small.new_zeros(b, c, height, width)
        for i, (t, l) in enumerate(zip(top.tolist(), left.tolist())):
            out[i, :, t:t + h, l:l + w] = small[i]
        return out
    pad_h, pad_w = height - h, width - w
    padded = F.pad(small, (pad_w, pad_w, pad_h, pad_h))
    return windows(padded, pad_h - top, pad_w - left, height, width)


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
