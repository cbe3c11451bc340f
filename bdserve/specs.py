"""The grammar of transform specs, without torch: what ``create_defense`` parses, what
every transform's ``spec`` prints, and what a client compares a server's answer with.

    none | flip | shrinkpad:K | noise:STD (0.02, or 5/255) | brightness:B | contrast:C | saturation:S | hue:H
    (training layers) randomflip:P | randomshrinkpad:K | enhanced:K | randomcrop:P | standard | physical
    and compositions joined by '+', applied left to right, e.g. ``flip+shrinkpad:2``.

A new transform adds its name and value type to ``SPEC_VALUES`` here and its constructor
to ``bdserve.transforms.defenses._FACTORIES``.
"""

from __future__ import annotations

import math
from fractions import Fraction


def noise_std(text: str) -> float:
    """A noise standard deviation on the [0, 1] pixel scale: ``0.02``, or the paper's ``5/255``."""
    try:
        std = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError, OverflowError):  # 1e309 overflows the float
        raise ValueError(f"noise std must be a number or a fraction like 5/255, got {text!r}") from None
    if not 0 <= std <= 1:
        raise ValueError(f"noise std {text} is off the [0, 1] pixel scale; for 5 of 255 levels write noise:5/255")
    return std


# name -> the type of its value (None: the name takes no value)
SPEC_VALUES: dict[str, type | None] = {
    "none": None, "flip": None, "shrinkpad": int, "noise": noise_std,
    "brightness": float, "contrast": float, "saturation": float, "hue": float,
    # the training side: the enhanced attack's random layer and the standard augmentation
    "randomflip": float, "randomshrinkpad": int, "enhanced": int, "randomcrop": int, "standard": None,
    "physical": None,  # the camera-robust attack's print-and-photograph layer (bdserve.transforms.physical)
}
# The defenses a server is meant to apply (help texts, error messages).
DEFENSE_FORMS = ["none", "flip", "shrinkpad:K", "noise:STD", "brightness:S", "contrast:S", "saturation:S", "hue:S"]

Part = tuple[str, "int | float | None"]
# Largest value each takes (all are >= 0): hue is a fraction of the colour wheel, p a probability.
SPEC_MAX: dict[str, float] = {"hue": 0.5, "randomflip": 1.0, "noise": 1.0, "brightness": 10.0, "contrast": 10.0,
                              "saturation": 10.0, "shrinkpad": 1024, "randomshrinkpad": 1024, "enhanced": 1024,
                              "randomcrop": 1024}
MAX_SPEC_CHARS = 120  # specs become metric labels and cache keys
MAX_STAGES = 6


def format_part(name: str, value: int | float | None = None) -> str:
    """One stage's spec: ``flip``, ``shrinkpad:4``, ``noise:0.05`` (floats in their shortest form)."""
    if value is None:
        return name
    if name == "noise" and value > 0 and abs(value * 255 - round(value * 255)) < 1e-6:
        return f"noise:{round(value * 255)}/255"  # the paper's units (Appendix D: 5/255 .. 20/255)
    return f"{name}:{int(value)}" if SPEC_VALUES.get(name) is int else f"{name}:{float(value):g}"


def parse_spec(spec: str | None) -> list[Part]:
    """``"Flip + shrinkpad:4"`` -> [("flip", None), ("shrinkpad", 4)]; ``none`` stages are dropped.
    Raises ValueError with a message a person can act on."""
    if spec is not None and not isinstance(spec, str):
        raise ValueError(f"a defense spec is a string, not {type(spec).__name__}")
    text = (spec or "none").strip().lower()
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"defense spec of {len(text)} characters; at most {MAX_SPEC_CHARS}")
    pieces = [p.strip() for p in text.split("+") if p.strip()]
    if not pieces:
        raise ValueError("empty defense spec")
    if len(pieces) > MAX_STAGES:
        raise ValueError(f"defense spec of {len(pieces)} stages; at most {MAX_STAGES}")
    parts: list[Part] = []
    for piece in pieces:
        name, _, arg = piece.partition(":")
        if name not in SPEC_VALUES:
            raise ValueError(f"unknown defense {name!r}; expected one of: {', '.join(DEFENSE_FORMS)}")
        kind = SPEC_VALUES[name]
        if kind is not None and not arg:
            raise ValueError(f"defense {name!r} needs a value, e.g. {name}:{'4' if kind is int else '0.1'}")
        if kind is None and arg:
            raise ValueError(f"defense {name!r} takes no value")
        try:
            value = None if kind is None else kind(arg)
        except ValueError as e:
            raise ValueError(f"bad value in defense {piece[:40]!r}: {e}") from None
        if value is not None and not (math.isfinite(value) and 0 <= value <= SPEC_MAX.get(name, math.inf)):
            raise ValueError(f"bad value in defense {piece[:40]!r}: {name} takes a finite value in "
                             f"[0, {SPEC_MAX.get(name, 'inf'):g}]" if name in SPEC_MAX else
                             f"bad value in defense {piece[:40]!r}: {name} takes a finite value >= 0")
        if name != "none":
            parts.append((name, value))
    return parts


def canonical_spec(spec: str | None) -> str:
    """The spec as the server's transform prints it (``"Flip+ShrinkPad:04"`` -> ``"flip+shrinkpad:4"``)."""
    return "+".join(format_part(n, v) for n, v in parse_spec(spec)) or "none"
