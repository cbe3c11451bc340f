"""The model repository: which directories a store holds, and under what name and version
each is served.

A model is served under its directory's name, as in Triton's and KServe's model
repositories (KServe runtimes pass ``--model_name``; ``--model NAME=DIR`` renames); the
card's own name is display metadata. Several versions live as Triton lays them out:

    model_store/<name>/model.onnx              one version (the card's)
    model_store/<name>/<version>/model.onnx    several; numeric version directories

The highest version answers requests that name none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_FILES = ("model.onnx", "model.pt")


@dataclass(frozen=True)
class Entry:
    name: str  # the served name
    version: str | None  # from a <version>/ directory; None: the card's version
    path: Path


def holds_model(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in MODEL_FILES)


def _versions(d: Path) -> list[Path]:
    return sorted((v for v in d.iterdir() if v.name.isdigit() and holds_model(v)), key=lambda v: int(v.name))


def _entries_of(name: str, d: Path) -> list[Entry]:
    if holds_model(d):
        return [Entry(name, None, d)]
    return [Entry(name, v.name, v) for v in _versions(d)]


def _parse(spec: str, store: Path) -> tuple[str, Path]:
    """``NAME`` (a directory of the store) or ``NAME=DIR`` (DIR: a path, else a directory of the store)."""
    name, sep, where = spec.partition("=")
    if not sep:
        return spec, store / spec
    if not name or not where:
        raise ValueError(f"--model {spec!r}: write NAME or NAME=DIR")
    path = Path(where)
    return name, path if path.is_dir() or path.is_absolute() else store / where


def entries(store: str | Path, specs: list[str] | None = None) -> list[Entry]:
    """The models to serve: the named ones (``NAME`` or ``NAME=DIR``), else every model directory in the store."""
    store = Path(store)
    if specs:
        found = []
        for spec in specs:
            name, d = _parse(spec, store)
            if not d.is_dir():
                raise FileNotFoundError(f"no such model directory: {d}")
            got = _entries_of(name, d)
            if not got:
                raise FileNotFoundError(f"{d} holds no model ({' or '.join(MODEL_FILES)}, "
                                        "directly or in numeric version directories)")
            found += got
    else:
        if not store.is_dir():
            raise FileNotFoundError(f"no such model store: {store}")
        found = [e for d in sorted(store.iterdir()) if d.is_dir() for e in _entries_of(d.name, d)]
        if not found:
            raise FileNotFoundError(f"{store} holds no model directory ({' or '.join(MODEL_FILES)})")
    seen = set()
    for e in found:
        if (e.name, e.version) in seen:
            raise ValueError(f"model {e.name!r} is named twice" + (f" with version {e.version}" if e.version else ""))
        seen.add((e.name, e.version))
    return found


def version_key(version: str):
    """Numeric versions compare as numbers, others as text after them."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
