"""Warnings a researcher needs before reading an accuracy or an ASR (train and eval share them)."""

from __future__ import annotations

# Below twice the chance rate the model has not learned the task: a 10-class model at 10.6%
# that answers one class for everything would otherwise report that class's "ASR" near 100%.
COLLAPSE_FACTOR = 2.0


def collapse_warning(clean_acc: float | None, num_classes: int, dominant: tuple[str, float] | None = None) -> str | None:
    """One line when clean accuracy is near chance, else None. ``dominant``: (class, share of clean
    predictions) of the most predicted class, named when known."""
    if clean_acc is None or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    if clean_acc >= COLLAPSE_FACTOR * chance:
        return None
    also = ""
    if dominant is not None and dominant[1] >= 0.5:
        also = f", and {100 * dominant[1]:.0f}% of clean images are predicted '{dominant[0]}'"
    return (f"warning: clean accuracy {100 * clean_acc:.1f}% is near chance ({100 * chance:.1f}% for {num_classes} "
            f"classes){also}: the model has not learned the task, so its attack success rate means nothing. "
            "Train longer (--epochs) or on more images (--subset).")
