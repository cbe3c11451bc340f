"""What trigger detection costs: images per second through DefendedModel.predict (the served
pipeline, in-process) without detection and with each detector, and the forward passes
each one adds per image.

The model (default model_store/demo) is copied to a temporary directory and calibrated
there on 600 CIFAR-10 test images (the numbers here are about speed, not about the
thresholds). Prints a table and writes bench/results/detect_bench.{json,md}.

    python bench/detect_bench.py [--model-dir model_store/demo] [--batch 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bdserve.serve.detection import CalibrationConfig, calibrate
from bdserve.serve.evaluation.heldout import load_test
from bdserve.serve.pipeline import DefendedModel
from bdserve.settings import REPO_ROOT, data_dir

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("none", "consistency", "strip", "scaleup", "consistency,strip,scaleup")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=REPO_ROOT / "model_store" / "demo")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.model_dir.name
        shutil.copytree(args.model_dir, model_dir)
        plain = DefendedModel.load(model_dir, threads=args.threads)
        images = torch.from_numpy(load_test(plain.card, data_dir(), 616, 0).images.numpy())
        calibrate(plain, model_dir, images, CalibrationConfig(fpr=0.05, seed=0), "CIFAR-10 test, 616 images")
        x = images[: args.batch]
        rows = []
        for methods in ROWS:
            model = plain if methods == "none" else DefendedModel.load(model_dir, detect=methods, threads=args.threads)
            for _ in range(3):
                model.predict(x)
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model.predict(x)
                samples.append(time.perf_counter() - t0)
            median = statistics.median(samples)
            passes = 1 + (0 if model.detection is None else model.detection.forward_passes)
            rows.append({"detect": methods, "forward_passes_per_image": passes, "batch": args.batch,
                         "median_ms_per_batch": 1000 * median, "images_per_s": args.batch / median})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["relative_throughput"] = r["images_per_s"] / base
    meta = {"model": str(args.model_dir), "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
            "host": platform.node(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lines = ["# Trigger detection: throughput cost (in-process DefendedModel.predict)", "",
             f"Model {args.model_dir.name}, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}; "
             f"load average at the end {meta['load_average'][0]:.1f} on {meta['cpus']} CPUs (shared machine: "
             "read the ratios). Command: `python bench/detect_bench.py`", "",
             "| --detect | forward passes / image | ms / batch | images/s | throughput vs none |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['detect']} | {r['forward_passes_per_image']} | {r['median_ms_per_batch']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['relative_throughput']:.2f}x |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detect_bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (args.out / "detect_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
