"""Clean accuracy and attack success rate (Eq. 3 of the paper), once, for every caller:
the card's metrics after training, ``bdserve eval``, the studies and the photo evaluation.

ASR counts only images whose true label is not the target (``triggered_pool``): each is
stamped with the trigger and is a success when the prediction is the target. Both helpers
take an optional ``answered`` mask: images the service never answered are left out of the
denominator (they are counted as errors by the caller). No torch: arrays or tensors on the
CPU both work.
"""

from __future__ import annotations

import numpy as np


def triggered_pool(labels, target: int) -> np.ndarray:
    """Indices of the images that count for ASR: their true label is not the target."""
    return np.flatnonzero(np.asarray(labels) != int(target))


def _matches(preds, wanted, answered) -> tuple[int, int]:
    preds = np.asarray(preds)
    wanted = np.asarray(wanted)
    if answered is not None:
        ok = np.asarray(answered, dtype=bool)
        preds = preds[ok]
        wanted = wanted[ok] if wanted.ndim else wanted
    return int((preds == wanted).sum()), int(preds.size)


def clean_correct(preds, labels, answered=None) -> tuple[int, int]:
    """(correct, n): predictions equal to the true labels, over the answered images."""
    return _matches(preds, labels, answered)


def attack_hits(preds, target: int, answered=None) -> tuple[int, int]:
    """(hits, n): predictions equal to the target, over the answered images of a triggered pool (Eq. 3)."""
    return _matches(preds, int(target), answered)


def asr_baseline(clean_preds, labels, target: int, answered=None) -> tuple[int, int]:
    """(k, n): clean images whose true label is not the target, yet predicted as the target. Beside an
    ASR this says how much of it the model gives away without any trigger."""
    others = np.asarray(labels) != int(target)
    if answered is not None:
        others = others & np.asarray(answered, dtype=bool)
    return attack_hits(np.asarray(clean_preds)[others], target)


def fraction(k: int, n: int) -> float:
    return k / max(1, n)
