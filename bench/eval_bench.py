"""Evaluation benchmark (not a test): the full CIFAR-10 test set, clean and triggered
(10,000 + 9,000 images), evaluated through the live service with `bdserve eval`'s client.

Starts `bdserve serve` on free loopback ports with the model's own defense (the card's),
runs the evaluation over each transport asked for, and records wall time (target: at most
60 s per transport on this CPU), throughput, latency and the numbers themselves. Writes
bench/results/eval_bench.json and .md.

    .venv/bin/python bench/eval_bench.py                               # model_store/badnets-fast
    .venv/bin/python bench/eval_bench.py --model-dir model_store/X --transports http,grpc --batch-size 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET_S = 60.0
TARGET_VS_INPROCESS = 1.15


def inprocess_pass(model_dir: Path, sets, batch_size: int, threads: int | None) -> float:
    """Seconds for the same images through DefendedModel in this process (the served work, no serving)."""
    import torch

    from bdserve.serve.pipeline import DefendedModel

    torch.set_num_threads(1)  # as `bdserve serve`: ONNX Runtime's pool does the heavy work
    model = DefendedModel.load(model_dir, threads=threads)
    model.predict(torch.from_numpy(sets[0].images[:batch_size]))  # warm-up
    t = time.perf_counter()
    for s in sets:
        for i in range(0, len(s), batch_size):
            model.predict(torch.from_numpy(s.images[i:i + batch_size]))
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=REPO / "model_store" / "badnets-fast")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--transports", default="http,grpc")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=500, help="server's --max-batch-size")
    p.add_argument("--threads", type=int, default=None, help="server's ONNX Runtime threads")
    p.add_argument("--limit", type=int, default=None, help="fewer test images (smoke runs)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="")
    args = p.parse_args()

    from bdserve.card import ModelCard
    from bdserve.serve.evaluation.evaluate import EvalConfig, run
    from bdserve.serve.evaluation.heldout import build_sets
    from bdserve.settings import data_dir

    card = ModelCard.load(args.model_dir)
    data = args.data or data_dir()
    t = time.perf_counter()
    sets = [s for s in build_sets(card, data, args.limit) if s is not None]  # also warms the dataset cache
    prep_s = time.perf_counter() - t
    inproc_s = inprocess_pass(args.model_dir, sets, args.batch_size, args.threads)
    print(f"in-process pass (DefendedModel, same sets, batch {args.batch_size}): {inproc_s:.1f} s", flush=True)

    from bdserve.testing import served

    flags = ["--max-batch-size", str(args.max_batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
    rows = []
    with served(args.model_dir.parent, [args.model_dir.name], *flags) as addr:
        banner = addr["banner"]
        for transport in args.transports.split(","):
            cfg = EvalConfig(addr[transport], args.model_dir.name, args.model_dir / "card.json", data, args.limit,
                             batch_size=args.batch_size, concurrency=args.concurrency)
            t = time.perf_counter()
            rep = run(cfg)  # builds the sets (stamping 9,000 images) and sends them
            wall = time.perf_counter() - t
            row = rep["rows"][0]
            rows.append({"transport": transport, "wall_s": wall, "send_s": row["seconds"], "images": row["images"],
                         "errors": row["errors"], "throughput_images_per_s": row["throughput_images_per_s"],
                         "latency_ms": row["latency_ms"], "defense": row["defense"],
                         "vs_inprocess": row["seconds"] / inproc_s,
                         "clean_acc": row["clean"]["accuracy"], "asr": row["triggered"]["asr"],
                         "met_target": wall <= TARGET_S,
                         "met_target_vs_inprocess": row["seconds"] / inproc_s <= TARGET_VS_INPROCESS})
            print(f"{transport}: {row['images']} images in {wall:.1f} s wall ({row['seconds']:.1f} s sending), "
                  f"{row['throughput_images_per_s']:.0f} img/s, errors {row['errors']}, defense {row['defense']}, "
                  f"clean {100 * row['clean']['accuracy']['rate']:.2f}%, ASR {100 * row['triggered']['asr']['rate']:.2f}%",
                  flush=True)

    import torch

    doc = {
        "benchmark": "full test set through the live service (bdserve eval client)",
        "model": card.name, "model_dir": str(args.model_dir), "architecture": card.architecture,
        "target_s": TARGET_S, "batch_size": args.batch_size, "concurrency": args.concurrency,
        "server_max_batch_size": args.max_batch_size, "server_threads": args.threads, "limit": args.limit,
        "dataset_load_s": prep_s, "server": banner.strip().splitlines()[0],
        "inprocess_s": inproc_s, "target_vs_inprocess": TARGET_VS_INPROCESS,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "command": "python bench/eval_bench.py " + " ".join(sys.argv[1:]),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_bench{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Full test set through the live service: {card.name}", "",
             f"{doc['server']}; client batch {args.batch_size}, {args.concurrency} in flight; "
             f"{os.cpu_count()} CPU cores shared with whatever else ran. Target: at most {TARGET_S:.0f} s.", "",
             f"In-process pass over the same sets (DefendedModel.predict, batch {args.batch_size}): {inproc_s:.1f} s; "
             f"target: sending through the service at most {TARGET_VS_INPROCESS}x that.", "",
             f"| transport | images | errors | wall s | sending s | x in-process | img/s | p50/p95/p99 ms | defense | clean acc % | ASR % | wall <= {TARGET_S:.0f} s | <= {TARGET_VS_INPROCESS}x in-process |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|"]
    for r in rows:
        lat = "/".join(f"{r['latency_ms'][k]:.0f}" for k in ("p50", "p95", "p99"))
        lines.append(f"| {r['transport']} | {r['images']} | {r['errors']} | {r['wall_s']:.1f} | {r['send_s']:.1f} | "
                     f"{r['vs_inprocess']:.2f} | "
                     f"{r['throughput_images_per_s']:.0f} | {lat} | {r['defense']} | {100 * r['clean_acc']['rate']:.2f} | "
                     f"{100 * r['asr']['rate']:.2f} | {'met' if r['met_target'] else 'MISSED'} | "
                     f"{'met' if r['met_target_vs_inprocess'] else 'MISSED'} |")
    lines += ["", f"Wall time includes building the held-out sets (stamping the triggered images); "
                  f"decoding the dataset the first time took {prep_s:.1f} s (cached after). Command: `{doc['command']}`", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
