"""The grammar of transform specs, without torch: what ``create_defense`` parses, what
every transform's ``spec`` prints, and what a client compares a server's answer with.

    none | flip | shrinkpad:K | noise:STD | brightness:B | contrast:C | saturation:S | hue:H
    (training layers) randomflip:P | randomshrinkpad:K | enhanced:K | randomcrop:P | standard
    and compositions joined by '+', applied left to right, e.g. ``flip+shrinkpad:2``.

A new transform adds its name and value type to ``SPEC_VALUES`` here and its constructor
to ``bdserve.transforms.defenses._FACTORIES``.
"""

from __future__ import annotations

# name -> the type of its value (None: the name takes no value)
SPEC_VALUES: dict[str, type | None] = {
    "none": None, "flip": None, "shrinkpad": int, "noise": float,
    "brightness": float, "contrast": float, "saturation": float, "hue": float,
    # the training side: the enhanced attack's random layer and the standard augmentation
    "randomflip": float, "randomshrinkpad": int, "enhanced": int, "randomcrop": int, "standard": None,
}
# The defenses a server is meant to apply (help texts, error messages).
DEFENSE_FORMS = ["none", "flip", "shrinkpad:K", "noise:STD", "brightness:S", "contrast:S", "saturation:S", "hue:S"]

Part = tuple[str, "int | float | None"]


def format_part(name: str, value: int | float | None = None) -> str:
    """One stage's spec: ``flip``, ``shrinkpad:4``, ``noise:0.05`` (floats in their shortest form)."""
    if value is None:
        return name
    return f"{name}:{int(value)}" if SPEC_VALUES.get(name) is int else f"{name}:{float(value):g}"


def parse_spec(spec: str | None) -> list[Part]:
    """``"Flip + shrinkpad:4"`` -> [("flip", None), ("shrinkpad", 4)]; ``none`` stages are dropped.
    Raises ValueError with a message a person can act on."""
    text = (spec or "none").strip().lower()
    pieces = [p.strip() for p in text.split("+") if p.strip()]
    if not pieces:
        raise ValueError("empty defense spec")
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
            raise ValueError(f"bad value in defense {piece!r}: {e}") from None
        if name != "none":
            parts.append((name, value))
    return parts


def canonical_spec(spec: str | None) -> str:
    """The spec as the server's transform prints it (``"Flip+ShrinkPad:04"`` -> ``"flip+shrinkpad:4"``)."""
    return "+".join(format_part(n, v) for n, v in parse_spec(spec)) or "none"
