"""Soak run (not a test): many concurrent clients against one ``bdserve serve`` for minutes.

The load mixes what production sees:
  * photos: JPEGs of many sizes (32x32 up to 1600x1200), POST /predictions/{m};
  * tensors over HTTP: UINT8 [1,3,H,W] through /v2/models/{m}/infer with the binary
    tensor extension;
  * tensors over gRPC: ModelInfer with raw_input_contents.
Every request must succeed (any non-200 / non-OK answer or transport error is
counted), and the server's resident memory (the process and its children, read by
psutil) is sampled at the start (after warm-up), every few seconds, and at the end.
Pass: zero errors and RSS growth under 10%.

    .venv/bin/python bench/soak.py                       # 64 clients, 300 s
    .venv/bin/python bench/soak.py --duration 60         # a shorter run (say so when reporting it)

Writes bench/results/soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench_report import machine  # the script's own directory is on sys.path
from loadgen import HttpConn, mean_batch_inputs
from peers import bdserve_process, pick_model_dir
from serving_bench import RESULTS

MAX_RSS_GROWTH = 0.10


def photo_pool(n: int, seed: int = 0) -> list[bytes]:
    """JPEGs from thumbnail to camera size, with smooth content (JPEG's realistic case)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (64, 48), (224, 224), (320, 240), (640, 480), (800, 600), (1024, 768), (1600, 1200)]
    out = []
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        out.append(buf.getvalue())
    return out


def rss_bytes(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def soak(srv, model: str, input_shape: list[int], clients: int, duration: float,
               sample_every: float, warmup_s: float) -> dict:
    import grpc

    from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
    from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pbg

    photos = photo_pool(48)
    c, h, w = input_shape
    rng = np.random.default_rng(1)
    tensors = [rng.integers(0, 256, (1, c, h, w), dtype=np.uint8) for _ in range(16)]
    infer_bodies = []
    for t in tensors:
        head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(t.shape),
                                       "parameters": {"binary_data_size": t.nbytes}}]}).encode()
        infer_bodies.append((len(head), head + t.tobytes()))
    grpc_reqs = []
    for t in tensors:
        r = pb.ModelInferRequest(model_name=model)
        r.inputs.add(name="input", datatype="UINT8", shape=list(t.shape))
        r.raw_input_contents.append(t.tobytes())
        grpc_reqs.append(r)

    counts: Counter = Counter()
    errors: Counter = Counter()
    error_samples: list[str] = []
    lat: dict[str, list[float]] = {"photo": [], "http_tensor": [], "grpc_tensor": []}
    stop_at = [float("inf")]
    measuring = [False]

    warmup_errors: list[str] = []

    def record(kind: str, err: str | None, dt: float) -> None:
        if not measuring[0]:
            if err is not None:  # warm-up answers are not timed, but a failure still fails the soak
                warmup_errors.append(f"{kind}: {err[:300]}")
            return
        counts[kind] += 1
        if err is None:
            lat[kind].append(dt)
        else:
            errors[kind] += 1
            if len(error_samples) < 10:
                error_samples.append(f"{kind}: {err[:300]}")

    async def client(k: int) -> None:
        conn = HttpConn("127.0.0.1", srv.http_port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}",
                                            options=[("grpc.max_send_message_length", 64 << 20)])
        stub = pbg.GRPCInferenceServiceStub(channel)
        n = 0
        try:
            while time.perf_counter() < stop_at[0]:
                n += 1
                i = k * 7 + n  # each client walks through every payload and every kind
                kind = ("photo", "http_tensor", "photo", "grpc_tensor")[(k + n) % 4]  # half photos, half tensors
                t0 = time.perf_counter()
                err = None
                try:
                    if kind == "photo":
                        status, _, body = await conn.request("POST", f"/predictions/{model}",
                                                             photos[i % len(photos)], {"Content-Type": "image/jpeg"})
                        if status != 200:
                            err = f"HTTP {status}: {body[:200]!r}"
                    elif kind == "http_tensor":
                        hlen, body = infer_bodies[i % len(infer_bodies)]
                        status, _, resp = await conn.request(
                            "POST", f"/v2/models/{model}/infer", body,
                            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)})
                        if status != 200:
                            err = f"HTTP {status}: {resp[:200]!r}"
                    else:
                        resp = await stub.ModelInfer(grpc_reqs[i % len(grpc_reqs)], timeout=60)
                        if not resp.outputs:
                            err = "empty gRPC response"
                except grpc.aio.AioRpcError as e:
                    err = f"gRPC {e.code().name}: {e.details()}"
                except Exception as e:  # noqa: BLE001 - every failure is a counted error
                    err = repr(e)
                record(kind, err, time.perf_counter() - t0)
        finally:
            await conn.close()
            await channel.close()

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(warmup_s)  # connections open, caches and allocator pools settle
    rss = [(0.0, rss_bytes(srv.proc.pid))]
    batch0 = mean_batch_inputs(srv.metrics_text(), model)
    measuring[0] = True
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    while time.perf_counter() < stop_at[0]:
        await asyncio.sleep(min(sample_every, max(0.0, stop_at[0] - time.perf_counter())))
        rss.append((time.perf_counter() - t0, rss_bytes(srv.proc.pid)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    rss.append((elapsed, rss_bytes(srv.proc.pid)))
    batch1 = mean_batch_inputs(srv.metrics_text(), model)

    mean_batch = None
    if batch0 and batch1 and batch1[1] > batch0[1]:
        mean_batch = (batch1[0] - batch0[0]) / (batch1[1] - batch0[1])
    pct = {k: ({q: float(np.percentile(np.asarray(v) * 1e3, q)) for q in (50, 99)} if v else None)
           for k, v in lat.items()}
    total = sum(counts.values())
    start_rss, end_rss = rss[0][1], rss[-1][1]
    return {
        "duration_s": elapsed,
        "requests": total,
        "requests_by_kind": dict(counts),
        "errors": sum(errors.values()) + len(warmup_errors),
        "warmup_errors": len(warmup_errors),
        "errors_by_kind": dict(errors),
        "error_samples": error_samples + warmup_errors[:5],
        "throughput_req_s": total / elapsed if elapsed else 0.0,
        "latency_ms": pct,
        "mean_batch": mean_batch,
        "rss_start_mb": start_rss / 2**20,
        "rss_end_mb": end_rss / 2**20,
        "rss_peak_mb": max(b for _, b in rss) / 2**20,
        "rss_growth": end_rss / start_rss - 1,
        "rss_samples_mb": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="model directory (default: model_store/demo, else a tiny CNN built here)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of measured load (default 5 minutes)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the first RSS sample")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--defense", help="defense to serve with (default: the card's)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bdserve-soak-"))
    model_dir = pick_model_dir(args.model_dir, work)
    from bdserve.card import ModelCard

    card = ModelCard.load(model_dir)
    print(f"soak: {args.clients} clients for {args.duration:.0f} s against bdserve serve ({card.name}, "
          f"defense {args.defense or card.defense}); photos + HTTP tensors + gRPC tensors")
    with bdserve_process(model_dir, defense=args.defense, max_batch_size=32, max_queue_delay_ms=5.0,
                         log_path=work / "bdserve.log") as srv:
        res = asyncio.run(soak(srv, model_dir.name, card.input_shape, args.clients, args.duration,
                               args.sample_every, args.warmup))
        alive = srv.proc.poll() is None
    res["server_alive_at_end"] = alive
    res["warmup_s"] = args.warmup
    passed = res["errors"] == 0 and res["rss_growth"] < MAX_RSS_GROWTH and alive
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": {"name": card.name, "input_shape": card.input_shape, "defense": args.defense or card.defense,
                  "dir": str(model_dir)},
        "clients": args.clients,
        "full_duration": args.duration >= 300,
        "criteria": {"errors": 0, "max_rss_growth": MAX_RSS_GROWTH},
        "passed": passed,
        **res,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (out / "soak.md").write_text(md)
    print(md)
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}")
    return 0 if passed else 1


def render(r: dict) -> str:
    lat = r["latency_ms"]
    rows = "".join(
        f"| {k} | {r['requests_by_kind'].get(k, 0)} | {r['errors_by_kind'].get(k, 0)} | "
        f"{'-' if not lat[k] else f'{lat[k][50]:.1f}'} | {'-' if not lat[k] else f'{lat[k][99]:.1f}'} |\n"
        for k in ("photo", "http_tensor", "grpc_tensor")
    )
    mb = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
    note = "" if r["full_duration"] else f"\n**Shorter than the 5-minute target: {r['duration_s']:.0f} s.**\n"
    m = r["machine"]
    return (
        "# Soak run\n\n"
        f"{r['date']} · `{r['command'].strip()}`\n\n"
        f"Machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs (shared), CUDA: {m['cuda']}.\n"
        f"Model {r['model']['name']} {r['model']['input_shape']}, defense `{r['model']['defense']}`; "
        f"{r['clients']} concurrent clients for {r['duration_s']:.0f} s: half JPEG photos (32x32 to 1600x1200) "
        f"to /predictions, a quarter UINT8 tensors over HTTP binary infer, a quarter over gRPC.\n{note}\n"
        "| kind | requests | errors | p50 (ms) | p99 (ms) |\n|---|---|---|---|---|\n" + rows +
        f"\nTotal {r['requests']} requests, {r['throughput_req_s']:.0f} req/s, **{r['errors']} errors** "
        f"({r['warmup_errors']} of them during the {r['warmup_s']:.0f} s warm-up), "
        f"mean executed batch {mb}.\n\n"
        f"Server RSS (process + children): {r['rss_start_mb']:.0f} MiB after warm-up, {r['rss_end_mb']:.0f} MiB "
        f"at the end (peak {r['rss_peak_mb']:.0f} MiB): **growth {100 * r['rss_growth']:+.1f}%** "
        f"(limit +{100 * r['criteria']['max_rss_growth']:.0f}%). Server alive at the end: {r['server_alive_at_end']}.\n\n"
        f"Result: **{'PASS' if r['passed'] else 'FAIL'}**\n"
    )


if __name__ == "__main__":
    sys.exit(main())
