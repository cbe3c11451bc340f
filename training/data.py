"""Image datasets as decoded uint8 tensors, cached once.

Sources, by what the folder holds:
- an ImageFolder tree with ``train/`` and ``test/`` splits (e.g. ../shared/data/cifar10-jpg),
  or a single ImageFolder tree (any user's dataset; every split reads the same tree);
- torchvision's CIFAR-10 folder (``cifar-10-batches-py``), read with download off.
  That format is Python pickles by its authors' choice: read it only from a source you trust.

The decoded tensors are cached as safetensors (never pickles) under bdserve.settings.cache_dir().
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bdserve.settings import cache_dir
from bdserve.progress import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A random subset of n images, with class balance kept (n // classes per class, rest random)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        per_class = n // len(self.classes)
        picks = []
        for c in range(len(self.classes)):
            idx = (self.labels == c).nonzero(as_tuple=True)[0]
            picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        chosen = torch.cat(picks)
        if len(chosen) < n:
            rest = torch.ones(len(self), dtype=torch.bool)
            rest[chosen] = False
            others = rest.nonzero(as_tuple=True)[0]
            chosen = torch.cat([chosen, others[torch.randperm(len(others), generator=g)[: n - len(chosen)]]])
        chosen = chosen.sort().values
        return ImageSet(self.images[chosen], self.labels[chosen], self.classes)


def class_index(classes: list[str], name_or_index: str | int) -> int:
    """A class given by name ('deer') or by index ('4' or 4)."""
    if isinstance(name_or_index, int) or str(name_or_index).isdigit():
        i = int(name_or_index)
        if not 0 <= i < len(classes):
            raise ValueError(f"class index {i} out of range 0..{len(classes) - 1}")
        return i
    if name_or_index not in classes:
        raise ValueError(f"unknown class {name_or_index!r}; classes: {', '.join(classes)}")
    return classes.index(name_or_index)


def load_split(root: str | Path, split: str = "train", image_size: int | None = None, cache: bool = True) -> ImageSet:
    """Load ``split`` ('train' or 'test') of the dataset at ``root``, decoding once and caching."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist (set --data or $BDSERVE_DATA)")
    if (root / "cifar-10-batches-py").exists() or root.name == "cifar-10-batches-py":
        return _load_torchvision_cifar10(root if root.name != "cifar-10-batches-py" else root.parent, split)
    tree = root / split if (root / split).is_dir() else root
    files, classes = _list_image_folder(tree)
    key = hashlib.sha256(
        json.dumps([str(tree), image_size, len(files), tree.stat().st_mtime_ns, files[-1][0]]).encode()
    ).hexdigest()[:16]
    cached = cache_dir() / f"imagefolder-{tree.name}-{key}.safetensors"
    if cache and cached.exists():
        tensors = load_file(str(cached))
        meta = json.loads((cached.with_suffix(".json")).read_text())
        return ImageSet(tensors["images"], tensors["labels"], meta["classes"])
    images = _decode_all([f for f, _ in files], image_size, desc=f"decoding {tree}")
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    result = ImageSet(images, labels, classes)
    if cache:
        save_file({"images": images.contiguous(), "labels": labels}, str(cached))
        cached.with_suffix(".json").write_text(json.dumps({"classes": classes, "source": str(tree)}))
    return result


def _list_image_folder(tree: Path) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in tree.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{tree} has no class subfolders (expected ImageFolder layout: {tree}/<class>/<image>)")
    files = []
    for c, name in enumerate(classes):
        for f in sorted((tree / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((str(f), c))
    if not files:
        raise ValueError(f"no images found under {tree}")
    return files, classes


def _decode_one(path: str, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _decode_all(paths: list[str], image_size: int | None, desc: str) -> torch.Tensor:
    if image_size is None:
        with Image.open(paths[0]) as first:
            size = (first.height, first.width)
    else:
        size = (image_size, image_size)
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    # Pillow releases the GIL while decoding, so a few threads help.
    with ThreadPoolExecutor(max_workers=4) as pool, progress_bar(desc, total=len(paths)) as advance:
        for i, arr in enumerate(pool.map(lambda p: _decode_one(p, size), paths, chunksize=256)):
            out[i] = arr
            advance(1)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_torchvision_cifar10(root: Path, split: str) -> ImageSet:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(root), train=(split == "train"), download=False)
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))
