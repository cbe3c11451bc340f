"""Where data and caches live: environment variables first, then defaults that work from a checkout."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """CIFAR-10 as an ImageFolder tree: $BDSERVE_DATA, else ../shared/data/cifar10-jpg beside the checkout."""
    env = os.environ.get("BDSERVE_DATA")
    if env:
        return Path(env)
    return (REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg").resolve()


def cache_dir() -> Path:
    """Decoded-dataset cache: $BDSERVE_CACHE, else $XDG_CACHE_HOME/bdserve (never inside the repository's tracked files)."""
    env = os.environ.get("BDSERVE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bdserve"
    base.mkdir(parents=True, exist_ok=True)
    return base


def model_store() -> Path:
    """Where `bdserve serve` and `bdserve import` look by default: $BDSERVE_MODEL_STORE, else ./model_store
    in the working directory (as in Triton's and TorchServe's model repositories)."""
    return Path(os.environ.get("BDSERVE_MODEL_STORE") or "model_store")


def pick_device(name: str | None = None) -> "torch.device":  # noqa: F821
    """'auto' (or None) takes CUDA when it is usable, else the CPU; anything else is passed to torch."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
