"""Trigger detection stored with a model: calibration (``bdserve calibrate``) and loading.

Calibration scores images the operator trusts to be clean, and for each detector keeps
the threshold at the chosen false-alarm rate (FAR), the clean score quantiles and the
count in card.json under ``detection``. STRIP's overlay images (picked from the same
trusted set and not scored) go beside the card as a small uint8 safetensors file.

Threshold rule (ties handled explicitly): an image is flagged when its score is
**strictly above** the threshold. With the n clean scores sorted from the highest,
the threshold is the (k+1)-th highest, k = floor(FAR * n). At most k clean images
score above it, so the realised FAR on the calibration set never exceeds the chosen
one; scores tied at the threshold are not flagged (conservative), and how many tie is
recorded (``ties_at_threshold``). The scores are continuous, so ties are rare.

Served scores are *margins*: (score - threshold) / (threshold - clean median), so that
0 is the threshold (flagged above), -1 the typical clean image, and one scale serves
every detector (the Prometheus histogram, combining several detectors by their max).
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bdserve.card import ModelCard
from bdserve.transforms.detectors import (DETECTORS, Detector, build_detector, forward_passes, parse_methods,
                                          score_batch)

OVERLAYS_FILE = "strip_overlays.safetensors"
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)
CLASSIFY_CHUNK = 1024  # images per runtime call (DefendedModel.classify): bounds the detectors' activation memory


class NotCalibrated(ValueError):
    """``--detect`` asked of a model whose card has no calibrated threshold for it."""


def threshold_at(scores: np.ndarray, fpr: float) -> tuple[float, int]:
    """(threshold, how many other clean scores equal it) for flagging ``score > threshold``
    on at most a share ``fpr`` of ``scores``."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("no calibration scores")
    k = int(math.floor(fpr * len(s) + 1e-9))
    t = float(s[min(k, len(s) - 1)])
    return t, int((s == t).sum()) - 1


def margins(scores: np.ndarray, threshold: float, median: float) -> np.ndarray:
    scale = threshold - median
    return (np.asarray(scores, dtype=np.float64) - threshold) / (scale if scale > 0 else 1.0)


# ------------------------------------------------------------------- calibration
@dataclass
class CalibrationConfig:
    fpr: float = 0.05
    methods: str = ",".join(DETECTORS)
    strip_overlays: int | None = None  # N of strip (default DEFAULT_N)
    seed: int | None = None  # detector draws and image picks; None: fresh from OS entropy
    limit: int | None = None  # most trusted images scored


def build_detectors(card: ModelCard, methods: Sequence[tuple[str, int | None]], seed: int,
                    overlays: torch.Tensor | None, defense: str) -> list[Detector]:
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for name, n in methods:
        out.append(build_detector(name, n, defense=defense, input_shape=card.input_shape,
                                  overlays=overlays if name == "strip" else None, generator=g))
    return out


def score_images(model, detectors: Sequence[Detector], images: torch.Tensor, batch_size: int = 256,
                 advance: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Raw detector scores of uint8 images (N, C, H, W), in batches (``model``: a DefendedModel)."""
    out: dict[str, list[np.ndarray]] = {d.name: [] for d in detectors}
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(model.device).float().div_(255)
            _, scores = score_batch(detectors, x, model.classify)
            for name, s in scores.items():
                out[name].append(s.double().cpu().numpy())
            if advance:
                advance(len(x))
    return {k: np.concatenate(v) for k, v in out.items()}


def summarize(scores: np.ndarray, fpr: float) -> dict:
    t, tied = threshold_at(scores, fpr)
    q = np.quantile(scores, QUANTILES)
    return {"threshold": t, "median": float(np.median(scores)), "clean_far": float((scores > t).mean()),
            "ties_at_threshold": tied, "images": int(len(scores)),
            "quantiles": {f"{p:g}": float(v) for p, v in zip(QUANTILES, q)}}


def far_by_combination(scores: dict[str, np.ndarray], records: dict[str, dict]) -> dict[str, float]:
    """Calibration FAR of every set of detectors served together (an image is flagged by any)."""
    flags = {n: scores[n] > records[n]["threshold"] for n in scores}
    out = {}
    for r in range(1, len(flags) + 1):
        for combo in itertools.combinations(sorted(flags), r):
            out[",".join(combo)] = float(np.any([flags[n] for n in combo], axis=0).mean())
    return out


def calibrate(model, model_dir: Path, images: torch.Tensor, cfg: CalibrationConfig, source: str,
              advance: Callable[[int], None] | None = None) -> dict:
    """Score the trusted ``images`` (uint8, at the model's input size), write the card's
    ``detection`` section and STRIP's overlays into ``model_dir``; return the section."""
    if not 0 < cfg.fpr < 1:
        raise ValueError(f"--fpr must lie in (0, 1), got {cfg.fpr}")
    methods = parse_methods(cfg.methods)
    if cfg.strip_overlays is not None:
        methods = [(n, cfg.strip_overlays if n == "strip" else k) for n, k in methods]
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    n_over = next((k or 16 for n, k in methods if n == "strip"), 0)
    overlays, scored = images[order[:n_over]], images[order[n_over:]]
    if cfg.limit is not None:
        scored = scored[:cfg.limit]
    min_images = math.ceil(5 / cfg.fpr)  # at least a handful of clean images above the threshold
    if len(scored) < min_images:
        raise ValueError(f"{len(scored)} trusted images to score (after {n_over} STRIP overlays); a FAR of "
                         f"{cfg.fpr:g} needs at least {min_images}")
    defense = model.defense_spec
    detectors = build_detectors(model.card, methods, seed, overlays, defense)
    t0 = time.perf_counter()
    scores = score_images(model, detectors, scored, advance=advance)
    seconds = time.perf_counter() - t0
    records = {}
    for d in detectors:
        rec = {"spec": d.spec, "forward_passes": d.passes, **summarize(scores[d.name], cfg.fpr)}
        if d.name == "consistency":
            rec["defense"] = defense
        if d.name == "strip":
            rec["overlays"] = OVERLAYS_FILE
        records[d.name] = rec
    section = {
        "fpr": cfg.fpr, "seed": int(seed), "images": int(len(scored)), "source": source,
        "rule": "flag score > threshold; threshold = (floor(fpr*n)+1)-th highest clean score",
        "calibrated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 1),
        "shared_forward_passes": 1, "detectors": records, "far_by_combination": far_by_combination(scores, records),
    }
    if n_over:
        path = Path(model_dir) / OVERLAYS_FILE
        save_file({"overlays": overlays.contiguous()}, str(path))
        path.chmod(0o644)  # readable like the rest of the model directory
    card = ModelCard.load(model_dir)
    card.detection = section
    card.save(model_dir)
    return section


# ---------------------------------------------------------------------- serving
class Detection:
    """The calibrated detectors a server runs for one model, and what it makes of their scores."""

    def __init__(self, detectors: list[Detector], records: dict[str, dict], expected_far: float):
        self.detectors = detectors
        self.records = records
        self.expected_far = expected_far  # calibration FAR of this set of detectors together

    @property
    def methods(self) -> list[str]:
        return [d.name for d in self.detectors]

    @property
    def forward_passes(self) -> int:
        return forward_passes(self.detectors)

    def describe(self) -> str:
        return ", ".join(d.spec for d in self.detectors) + f" (calibrated FAR {self.expected_far:.3g})"

    def judge(self, raw: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Raw scores -> (margins per detector, combined margin = max, suspected = combined > 0).
        float32, as every door sends them, so in-process and served values are the same numbers."""
        per = {n: margins(s.double().cpu().numpy(), self.records[n]["threshold"], self.records[n]["median"])
               for n, s in raw.items()}
        combined = np.max(np.stack(list(per.values())), axis=0).astype(np.float32)
        return {n: m.astype(np.float32) for n, m in per.items()}, combined, combined > 0


def load_detection(model_dir: Path, card: ModelCard, methods: str | Sequence[str], *,
                   defense: str | None = None) -> Detection:
    """The detectors named in ``methods`` as calibrated in the card; NotCalibrated otherwise."""
    wanted = parse_methods(methods)
    section = card.detection or {}
    records = section.get("detectors") or {}
    hint = f"run `bdserve calibrate {model_dir} --data DIR --fpr 0.05` with images you trust to be clean"
    missing = [n for n, _ in wanted if n not in records]
    if missing:
        raise NotCalibrated(f"model {card.name!r} has no calibrated threshold for {', '.join(missing)}: {hint}")
    overlays = None
    if any(n == "strip" for n, _ in wanted):
        path = Path(model_dir) / records["strip"].get("overlays", OVERLAYS_FILE)
        if not path.exists():
            raise NotCalibrated(f"model {card.name!r}: STRIP's overlays {path.name} are missing: {hint}")
        overlays = load_file(str(path))["overlays"]
    methods_n = []
    for name, n in wanted:
        stored = records[name]["spec"]
        if n is not None and f"{name}:{n}" != stored:
            raise NotCalibrated(f"model {card.name!r} is calibrated for {stored}, not {name}:{n}: "
                                f"serve {stored} or recalibrate ({hint})")
        methods_n.append((name, int(stored.partition(":")[2])))
    cal_defense = records.get("consistency", {}).get("defense", "none")
    if defense is not None and any(n == "consistency" for n, _ in wanted) and defense != cal_defense:
        raise NotCalibrated(f"model {card.name!r}: consistency was calibrated with defense {cal_defense!r}, "
                            f"the server applies {defense!r}: recalibrate ({hint})")
    detectors = build_detectors(card, methods_n, section["seed"], overlays, cal_defense)
    key = ",".join(sorted(n for n, _ in wanted))
    far = (section.get("far_by_combination") or {}).get(key, section.get("fpr", 0.0))
    return Detection(detectors, {n: records[n] for n, _ in wanted}, float(far))


def read_trusted_images(model, folder: Path, split: str | None = None, limit: int | None = None,
                        seed: int = 0) -> tuple[torch.Tensor, str]:
    """Every image under ``folder`` (ImageFolder tree, plain folder, or ``folder/split``),
    fitted to the model's input the way the server fits uploads; (uint8 (N,C,H,W), source)."""
    from bdserve.training.data import IMAGE_SUFFIXES

    root = Path(folder).expanduser().resolve()
    if split:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root} has no {split}/ folder")
        root = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images (jpg, png, webp, bmp) under {root}")
    if limit is not None and limit < len(files):
        g = torch.Generator().manual_seed(seed)
        files = [files[i] for i in sorted(torch.randperm(len(files), generator=g)[:limit].tolist())]
    chunks = [model.decode([p.read_bytes() for p in files[i:i + 512]]).cpu() for i in range(0, len(files), 512)]
    return torch.cat(chunks), str(root)


def dumps(section: dict) -> str:
    return json.dumps(section, indent=2)
