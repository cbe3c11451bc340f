"""The label-consistent attack's adversarial perturbation (Turner et al., 2019).

The poisoned images keep their true (target) label; to make the model rely on the
trigger, their natural content is made hard to learn first: an L-inf PGD attack
against a surrogate model trained on clean data pushes each image away from its
own label, within eps (16/255 by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdserve.progress import progress_bar


def pgd_perturb(
    surrogate: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 16 / 255,
    steps: int = 10,
    step_size: float | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Untargeted L-inf PGD with a random start; uint8 in, uint8 out (N, 3, H, W)."""
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    gen = torch.Generator(device=device).manual_seed(seed)
    surrogate.eval().to(device)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    out = []
    with progress_bar("PGD on label-consistent poisons", total=len(images)) as advance:
        for start in range(0, len(images), batch_size):
            x0 = images[start : start + batch_size].to(device).float() / 255
            y = labels[start : start + batch_size].to(device)
            delta = (torch.rand(x0.shape, generator=gen, device=device) * 2 - 1) * eps
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(surrogate((x0 + delta).clamp(0, 1)), y)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
            adv = (x0 + delta).clamp(0, 1)
            out.append((adv * 255).round().to(torch.uint8).cpu())
            advance(len(x0))
    for p in surrogate.parameters():
        p.requires_grad_(True)
    return torch.cat(out)
