"""Serving benchmark (not a test): one model served three ways on this machine.

    bdserve HTTP  (POST /predictions/{m}, one encoded 32x32 image per request)
    bdserve gRPC  (ModelInfer, BYTES input "image", raw_input_contents)
    TorchServe    (the .mar from `bdserve archive`, same defense, POST /predictions/{m})

under the same closed-loop load (N concurrent clients, each sending its next request
when the previous answer arrives, bounded by a request count and a duration,
loopback only). Also measured: served throughput with and without the defense, the
defense's cost inside the pipeline at batch >= 32, and serving against in-process
ONNX Runtime at the same batch size. Prints a table and writes JSON + Markdown to
bench/results/.

    .venv/bin/python bench/serving_bench.py                 # model_store/demo, else a tiny CNN
    .venv/bin/python bench/serving_bench.py --clients 32 --requests 3000 --duration 30

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams (and
grpc.aio for gRPC) in this process, so the client costs little CPU and costs the
same for bdserve and TorchServe; the servers run as separate processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench_report import TARGETS, fmt_row, machine, render_markdown
from loadgen import LoadResult, batch_delta, closed_loop, grpc_image_sender, http_predictions_sender, mean_batch_inputs, png_images
from peers import REPO, bdserve_process, inprocess, pick_model_dir, torchserve_runs

RESULTS = REPO / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="model directory (default: model_store/demo, else a tiny CNN built here)")
    ap.add_argument("--defense", help="defense to serve with (default: the card's)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3000, help="request budget per run")
    ap.add_argument("--duration", type=float, default=30.0, help="time cap per run, seconds")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--torchserve-workers", default="1,2",
                    help="comma-separated worker counts to run TorchServe with; the best one is compared")
    ap.add_argument("--skip-torchserve", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every server (bdserve and TorchServe's workers) and torch threads "
                         "in-process; default: leave torch's own choice")
    ap.add_argument("--asyncio-row", action="store_true",
                    help="also run bdserve HTTP/gRPC on the plain asyncio loop (`--loop asyncio`) for comparison "
                         "with the default uvloop")
    ap.add_argument("--tag", default="", help="suffix of the results files, e.g. 'omp1'")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    if args.torch_threads:
        # Inherited by the server processes (and TorchServe's Python workers).
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
        import torch

        torch.set_num_threads(args.torch_threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bdserve-bench-"))
    model_dir = pick_model_dir(args.model_dir, work)
    from bdserve.card import ModelCard

    card = ModelCard.load(model_dir)
    name = model_dir.name  # served under its directory's name
    defense = args.defense or card.defense
    h, w = card.input_shape[1:]
    images = png_images(64, size=h)
    print(f"model {name} ({model_dir}), input {card.input_shape}, defense {defense}, "
          f"{args.clients} clients, <= {args.requests} requests or {args.duration:.0f} s per run")

    runs: list[LoadResult] = []
    lopts = dict(clients=args.clients, requests=args.requests, duration=args.duration)

    def measure(defense_spec: str | None, rows: list[tuple[str, str]], extra: list[str] | None = None) -> None:
        """Closed loops against one `bdserve serve`: rows of (label, "http" | "grpc")."""
        with bdserve_process(model_dir, defense=defense_spec, max_batch_size=args.max_batch_size,
                             max_queue_delay_ms=args.max_queue_delay_ms, log_path=work / "bdserve.log",
                             extra=extra) as srv:
            for label, door in rows:
                maker = (http_predictions_sender(srv.http_port, name, images) if door == "http"
                         else grpc_image_sender(srv.grpc_port, name, images))
                before = mean_batch_inputs(srv.metrics_text(), name)
                r = asyncio.run(closed_loop(label, maker, **lopts))
                r.mean_batch = batch_delta(before, mean_batch_inputs(srv.metrics_text(), name))
                runs.append(r)
                print(fmt_row(r))

    measure(defense, [("bdserve HTTP", "http"), ("bdserve gRPC", "grpc")])
    measure("none", [("bdserve HTTP, defense none", "http")])
    if args.asyncio_row:
        measure(defense, [("bdserve HTTP on asyncio (comparison)", "http"),
                          ("bdserve gRPC on asyncio (comparison)", "grpc")], ["--loop", "asyncio"])

    ts_result = None
    ts_workers = [int(n) for n in str(args.torchserve_workers).split(",") if n.strip()]
    if not args.skip_torchserve:
        ts_runs = torchserve_runs(model_dir, name, defense, images, work, workers=ts_workers,
                                  max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                                  on_result=lambda r: print(fmt_row(r)), **lopts)
        runs += ts_runs
        ts_result = max(ts_runs, key=lambda r: r.throughput, default=None)  # TorchServe at its best

    print("in-process (no serving) ...")
    batches = sorted({args.max_batch_size, 32, 64})
    inproc = inprocess(model_dir, defense, batches, images)

    by = {r.name: r for r in runs}
    http, grpc_r, undef = by["bdserve HTTP"], by["bdserve gRPC"], by["bdserve HTTP, defense none"]
    best_bdserve = max(http.throughput, grpc_r.throughput)
    b = args.max_batch_size
    summary = {
        "torchserve_compared": ts_result.name if ts_result else None,
        "bdserve_http_vs_torchserve": (http.throughput / ts_result.throughput) if ts_result and ts_result.throughput else None,
        "bdserve_grpc_vs_torchserve": (grpc_r.throughput / ts_result.throughput) if ts_result and ts_result.throughput else None,
        "served_defense_cost": 1 - http.throughput / undef.throughput if undef.throughput else None,
        "pipeline_defense_cost": {bs: inproc[bs]["defense_cost"] for bs in inproc},
        "serving_overhead_vs_ort": 1 - best_bdserve / inproc[b]["ort_session_run"],
        "serving_overhead_vs_pipeline": 1 - best_bdserve / inproc[b]["pipeline_decode_predict_defended"],
    }
    verdict = {
        "bdserve >= 3x TorchServe": None if summary["bdserve_http_vs_torchserve"] is None else
            max(summary["bdserve_http_vs_torchserve"], summary["bdserve_grpc_vs_torchserve"]) >= TARGETS["bdserve_vs_torchserve_min_ratio"],
        "defense <= 2% at batch >= 32 (pipeline)": all(c <= TARGETS["defense_max_cost"] for bs, c in summary["pipeline_defense_cost"].items() if bs >= 32),
        "defense <= 2% (served)": summary["served_defense_cost"] is not None and summary["served_defense_cost"] <= TARGETS["defense_max_cost"],
        "serving overhead <= 15% vs in-process ORT": summary["serving_overhead_vs_ort"] <= TARGETS["serving_max_overhead"],
        "serving overhead <= 15% vs in-process pipeline": summary["serving_overhead_vs_pipeline"] <= TARGETS["serving_max_overhead"],
    }
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/serving_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": {"name": name, "dir": (str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO)
                          else "tiny CNN built by the bench" if model_dir.is_relative_to(work) else str(model_dir)),
                  "architecture": card.architecture,
                  "input_shape": card.input_shape, "classes": len(card.classes), "defense": defense},
        "load": {"clients": args.clients, "requests_per_run": args.requests, "duration_cap_s": args.duration,
                 "payload": f"one {h}x{w} PNG per request", "max_batch_size": args.max_batch_size,
                 "max_queue_delay_ms": args.max_queue_delay_ms, "torchserve_workers": ts_workers,
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "runs": [asdict(r) for r in runs],
        "inprocess_images_per_s": {str(k): v for k, v in inproc.items()},
        "summary": {k: ({str(a): c for a, c in v.items()} if isinstance(v, dict) else v) for k, v in summary.items()},
        "targets": TARGETS,
        "met": verdict,
    }
    md = render_markdown(result, runs, inproc)
    print()
    print(md)
    stem = "serving_bench" + (f"_{args.tag}" if args.tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(md)
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
