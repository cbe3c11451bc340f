"""Transform throughput: bdserve's torch implementations against Kornia's equivalents.

Prints a table and writes bench/results/transforms.{json,md}. Decides (and documents)
where plain torch ops replace Kornia in transforms/: see transforms/spatial.py.

    python bench/transforms_bench.py [--batch 256] [--device cpu|cuda] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import kornia.augmentation as KA
import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F

from bdserve.transforms import Flip, RandomTransformLayer, ShrinkPad
from bdserve.transforms.spatial import place

RESULTS = Path(__file__).resolve().parent / "results"


def kornia_shrinkpad(x: torch.Tensor, k: int) -> torch.Tensor:
    """The same ShrinkPad built from Kornia parts: kornia resize, then per-image pad via a loop."""
    small = KT.resize(x, (x.shape[-2] - k, x.shape[-1] - k), interpolation="bilinear", align_corners=False,
                      antialias=False)
    tops = torch.randint(0, k + 1, (x.shape[0],)).tolist()
    lefts = torch.randint(0, k + 1, (x.shape[0],)).tolist()
    return torch.stack([F.pad(s, (l, k - l, t, k - t)) for s, t, l in zip(small, tops, lefts)])


def timed(fn, x, repeats: int, device: torch.device) -> float:
    """Median seconds per call over ``repeats`` timed calls (robust to a busy machine)."""
    for _ in range(3):
        fn(x)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    flip_kornia = KA.RandomHorizontalFlip(p=1.0)
    enhanced = RandomTransformLayer(4)
    k_affine = KA.RandomAffine(degrees=0, translate=(4 / args.size, 4 / args.size), scale=(0.875, 1.0), p=1.0)
    cases = [
        ("flip", "bdserve Flip (torch.flip)", lambda t: Flip()(t), "kornia RandomHorizontalFlip(p=1)", flip_kornia),
        ("shrinkpad:4", "bdserve ShrinkPad(4)", lambda t: ShrinkPad(4)(t),
         "kornia resize + per-image pad", lambda t: kornia_shrinkpad(t, 4)),
        ("enhanced layer", "bdserve RandomTransformLayer(4)", lambda t: enhanced(t),
         "kornia RandomAffine (nearest analogue)", k_affine),
        ("place only", "bdserve place (index_put)", lambda t: place(t, torch.zeros(len(t), dtype=torch.long, device=t.device),
                                                                    torch.zeros(len(t), dtype=torch.long, device=t.device), args.size + 4, args.size + 4),
         "F.pad per image", lambda t: torch.stack([F.pad(s, (0, 4, 0, 4)) for s in t])),
    ]
    rows = []
    for name, ours_name, ours, theirs_name, theirs in cases:
        t_ours = timed(ours, x, args.repeats, device)
        t_theirs = timed(theirs, x, args.repeats, device)
        rows.append({"op": name, "bdserve": ours_name, "bdserve_ms": 1e3 * t_ours, "kornia": theirs_name,
                     "kornia_ms": 1e3 * t_theirs, "speedup": t_theirs / t_ours,
                     "bdserve_images_per_s": args.batch / t_ours})
    header = f"Transforms on {args.batch}x3x{args.size}x{args.size}, {device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    lines = [header, "", "| op | bdserve (ms) | alternative | alternative (ms) | speed-up | bdserve images/s |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['bdserve_ms']:.3f} | {r['kornia']} | {r['kornia_ms']:.3f} | "
                     f"{r['speedup']:.1f}x | {r['bdserve_images_per_s']:,.0f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    tag = device.type
    (RESULTS / f"transforms-{tag}.md").write_text(table + "\n")
    (RESULTS / f"transforms-{tag}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
