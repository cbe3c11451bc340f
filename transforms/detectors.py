"""Input-level trigger detectors: one suspicion score per image, higher = more suspicious.

They sit beside the defenses and follow the same shape: random parameters are drawn
in one place (``Detector.draw``, seeded by an optional ``torch.Generator``) and applied
in another (``views``). Unlike a defense, a detector draws **once**, when it is built:
every image is scored against the same draws. That makes a score a function of the
image alone (not of its batch-mates or of the request order), so the threshold that
``bdserve calibrate`` stores holds exactly for the served detector, and the same image
scores the same in-process, over HTTP and over gRPC. The seed lives in the model's
card (chosen from OS entropy at calibration); clients never see or choose it.

Each detector turns a batch of B images into V "views" (V x B images), the model
classifies them together with the undefended batch in one batched call, and the
detector reduces the views' probabilities to B scores. All three scores are continuous
(averaged probabilities or entropies, not label-agreement counts) so that a calibrated
threshold does not sit on a tie:

- ``consistency:N`` - 1 - mean probability of the undefended top-1 class over N fixed
  draws of the served defense (e.g. ShrinkPad placements). A trigger the defense
  breaks moves the prediction; clean images mostly keep theirs. N forward passes.
- ``strip:N`` (Gao et al., ACSAC 2019) - each image is averaged pixel-wise with N
  trusted clean overlays; score = log(C) - mean entropy of the N predictions. A
  trigger keeps forcing the target class through the overlay (low entropy). N passes.
- ``scaleup:N`` (Guo et al., ICLR 2023) - pixel values multiplied by 2..N and clipped
  to [0, 1]; score = mean probability of the undefended top-1 class over the N-1
  amplified copies. Triggered images keep their label when amplified. N-1 passes.

Every detector also uses the undefended prediction, computed once and shared.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bdserve.transforms.base import Transform
from bdserve.transforms.defenses import Compose, create_defense

Classify = Callable[[torch.Tensor], torch.Tensor]  # float [0, 1] (N, C, H, W) -> probabilities (N, K)

DETECTORS = ("consistency", "strip", "scaleup")
DEFAULT_N = {"consistency": 8, "strip": 16, "scaleup": 11}


class Detector(nn.Module):
    """Scores a batch: ``views`` builds the images to classify, ``reduce`` turns their
    probabilities (and the undefended ones) into one float per image."""

    name: str = "?"

    @property
    def spec(self) -> str:
        raise NotImplementedError

    @property
    def passes(self) -> int:
        """Forward passes per image on top of the shared undefended one (= views per image)."""
        raise NotImplementedError

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (V * B, C, H, W), view-major: rows k*B .. (k+1)*B - 1 are view k."""
        raise NotImplementedError

    def reduce(self, probs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Views' probabilities (V * B, K) and the undefended ones (B, K) -> scores (B,)."""
        raise NotImplementedError

    def score(self, x: torch.Tensor, classify: Classify) -> torch.Tensor:
        """One float per image of ``x`` (float [0, 1]), higher = more suspicious."""
        _, scores = score_batch([self], x, classify)
        return scores[self.name]

    def extra_repr(self) -> str:
        return self.spec


def _per_view(probs: torch.Tensor, b: int) -> torch.Tensor:
    """(V * B, K) view-major -> (V, B, K)."""
    return probs.view(-1, b, probs.shape[-1])


def _original_class_prob(probs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Mean over views of the probability of the undefended top-1 class: (B,)."""
    b = base.shape[0]
    top = base.argmax(1).view(1, b, 1).expand(probs.shape[0] // b, b, 1)
    return _per_view(probs, b).gather(2, top).squeeze(2).mean(0)


# ------------------------------------------------------------------ consistency
def _draw_fixed(t: Transform, n: int, shape: Sequence[int], generator: torch.Generator | None) -> Any:
    """n parameter sets of ``t`` for images of ``shape`` (C, H, W). Compose draws stage by stage."""
    dummy = torch.zeros((n, *shape))
    if isinstance(t, Compose):
        params = []
        for stage in t.transforms:
            params.append(stage.draw(dummy, generator))
            dummy = stage.apply(dummy, params[-1])
        return params
    return t.draw(dummy, generator)


def _repeat_params(params: Any, b: int, device: torch.device) -> Any:
    """Each of the n drawn parameter sets repeated for a batch of b images (view-major)."""
    if isinstance(params, torch.Tensor):
        return params.to(device).repeat_interleave(b, dim=0)
    if isinstance(params, dict):
        return {k: _repeat_params(v, b, device) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(_repeat_params(v, b, device) for v in params)
    return params


class Consistency(Detector):
    name = "consistency"

    def __init__(self, defense: str, n: int = DEFAULT_N["consistency"], *, input_shape: Sequence[int] = (3, 32, 32),
                 generator: torch.Generator | None = None):
        super().__init__()
        if n < 1:
            raise ValueError("consistency needs at least one draw")
        self.defense = create_defense(defense)
        if self.defense.spec == "none":
            raise ValueError("consistency compares the defended and undefended predictions: it needs a defense")
        self.n = int(n)
        # A deterministic defense (flip) gives the same view N times: one is enough.
        self._draws = self.n if self.defense.random else 1
        self._params = _draw_fixed(self.defense, self._draws, input_shape, generator)

    @property
    def spec(self) -> str:
        return f"consistency:{self.n}"

    @property
    def passes(self) -> int:
        return self._draws

    def views(self, x):
        b = x.shape[0]
        rep = x.repeat(self._draws, 1, 1, 1)
        return self.defense.apply(rep, _repeat_params(self._params, b, x.device))

    def reduce(self, probs, base):
        return 1.0 - _original_class_prob(probs, base)


# ------------------------------------------------------------------------ STRIP
class Strip(Detector):
    name = "strip"

    def __init__(self, overlays: torch.Tensor):
        """``overlays``: uint8 (N, C, H, W) trusted clean images (``bdserve calibrate`` picks them)."""
        super().__init__()
        if overlays.dim() != 4 or overlays.shape[0] < 1 or overlays.dtype != torch.uint8:
            raise ValueError("STRIP needs uint8 overlays (N, C, H, W) with N >= 1")
        self.register_buffer("overlays", overlays.clone(), persistent=False)

    @property
    def n(self) -> int:
        return int(self.overlays.shape[0])

    @property
    def spec(self) -> str:
        return f"strip:{self.n}"

    @property
    def passes(self) -> int:
        return self.n

    def views(self, x):
        if tuple(x.shape[1:]) != tuple(self.overlays.shape[1:]):
            raise ValueError(f"STRIP overlays are {tuple(self.overlays.shape[1:])}, images {tuple(x.shape[1:])}")
        b = x.shape[0]
        over = self.overlays.to(device=x.device, dtype=x.dtype).div(255).repeat_interleave(b, dim=0)
        # Superimpose: the pixel-wise mean keeps both images at half strength, in [0, 1].
        return 0.5 * x.repeat(self.n, 1, 1, 1) + 0.5 * over

    def reduce(self, probs, base):
        p = _per_view(probs, base.shape[0]).clamp_min(1e-12)
        entropy = -(p * p.log()).sum(2).mean(0)
        return math.log(probs.shape[-1]) - entropy


# --------------------------------------------------------------------- SCALE-UP
class ScaleUp(Detector):
    name = "scaleup"

    def __init__(self, n: int = DEFAULT_N["scaleup"]):
        super().__init__()
        if n < 2:
            raise ValueError("scaleup needs a largest factor of at least 2")
        self.n = int(n)

    @property
    def spec(self) -> str:
        return f"scaleup:{self.n}"

    @property
    def passes(self) -> int:
        return self.n - 1  # factor 1 is the undefended prediction, already made

    def views(self, x):
        factors = torch.arange(2, self.n + 1, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
        return (x.unsqueeze(0) * factors).clamp_(0, 1).flatten(0, 1)

    def reduce(self, probs, base):
        return _original_class_prob(probs, base)


# ------------------------------------------------------------------------- glue
def parse_methods(spec: str | Sequence[str]) -> list[tuple[str, int | None]]:
    """"consistency,strip:32" -> [("consistency", None), ("strip", 32)], validated."""
    parts = [p.strip().lower() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise ValueError(f"no detector named; choose from {', '.join(DETECTORS)}")
    out = []
    for part in parts:
        name, _, arg = part.partition(":")
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
        if any(name == n for n, _ in out):
            raise ValueError(f"detector {name!r} named twice")
        try:
            n = int(arg) if arg else None
        except ValueError:
            raise ValueError(f"detector {part!r}: the value after ':' is a count, e.g. {name}:{DEFAULT_N[name]}") from None
        out.append((name, n))
    return out


def build_detector(name: str, n: int | None = None, *, defense: str = "none", input_shape: Sequence[int] = (3, 32, 32),
                   overlays: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Detector:
    """One detector by name. ``strip`` takes its overlays (their count is its N)."""
    n = DEFAULT_N[name] if n is None else n
    if name == "consistency":
        return Consistency(defense, n, input_shape=input_shape, generator=generator)
    if name == "strip":
        if overlays is None:
            raise ValueError("strip needs its clean overlay images")
        return Strip(overlays)
    if name == "scaleup":
        return ScaleUp(n)
    raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")


def score_batch(detectors: Sequence[Detector], x: torch.Tensor, classify: Classify,
                also: Sequence[torch.Tensor] = ()) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Classify ``also`` (e.g. the defended batch), the undefended ``x`` and every detector's
    views in one batched call; return (probabilities of each ``also``, {name: scores (B,)}).

    ``x`` is float [0, 1] (B, C, H, W); the scores come back on the probabilities' device."""
    b = x.shape[0]
    views = [v for v in (d.views(x) for d in detectors)]
    probs = classify(torch.cat([*also, x, *views]))
    sizes = [len(a) for a in also] + [b] + [len(v) for v in views]
    parts = list(torch.split(probs, sizes))
    also_probs, base, view_probs = parts[:len(also)], parts[len(also)], parts[len(also) + 1:]
    return also_probs, {d.name: d.reduce(p, base) for d, p in zip(detectors, view_probs)}


def forward_passes(detectors: Sequence[Detector]) -> int:
    """Forward passes per image the detectors add to a served prediction (the shared
    undefended pass included)."""
    return (1 + sum(d.passes for d in detectors)) if detectors else 0
