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
import io
import json
import os
import platform
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bdserve.testing import LocalTorchServe, ServeProcess, build_tiny_model_dir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

TARGETS = {
    "bdserve_vs_torchserve_min_ratio": 3.0,
    "defense_max_cost": 0.02,
    "serving_max_overhead": 0.15,
}


# --------------------------------------------------------------------- payloads


def png_images(n: int, size: int = 32, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def bytes_element(blob: bytes) -> bytes:
    """One element of an Open Inference Protocol BYTES tensor: 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(blob)) + blob


# ------------------------------------------------------------------ the model


def pick_model_dir(arg: str | None, workdir: Path) -> Path:
    if arg:
        return Path(arg).resolve()
    demo = REPO / "model_store" / "demo"
    if (demo / "model.onnx").is_file():
        return demo
    # No demo model yet: the registry's tiny CNN, untrained (Normalize inside, dynamic batch axis).
    return build_tiny_model_dir(workdir / "models" / "tiny", name="tiny")


# -------------------------------------------------------------- the servers


def bdserve_process(model_dir: Path, *, defense: str | None, max_batch_size: int, max_queue_delay_ms: float,
                    log_path: Path, extra: list[str] | None = None) -> ServeProcess:
    """``bdserve serve`` for one model as a child process on free loopback ports."""
    flags = ["--host", "127.0.0.1", "--max-batch-size", str(max_batch_size),
             "--max-queue-delay-ms", str(max_queue_delay_ms)]
    if defense is not None:
        flags += ["--defense", defense]
    return ServeProcess(model_dir.parent, [model_dir.name], *flags, *(extra or []), log_path=log_path)


# ---------------------------------------------------------------- the clients


class HttpConn:
    """A keep-alive HTTP/1.1 connection: just enough protocol for a load generator."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def _connect(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            await self._connect()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        try:
            status_line = await self.reader.readuntil(b"\r\n")
            status = int(status_line.split()[1])
            hdrs: dict[str, str] = {}
            while True:
                line = await self.reader.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                k, _, v = line.decode("latin-1").partition(":")
                hdrs[k.strip().lower()] = v.strip()
            if "content-length" in hdrs:
                data = await self.reader.readexactly(int(hdrs["content-length"]))
            elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    n = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if n == 0:
                        await self.reader.readuntil(b"\r\n")
                        break
                    parts.append(await self.reader.readexactly(n))
                    await self.reader.readexactly(2)
                data = b"".join(parts)
            else:
                data = await self.reader.read()
                await self.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return status, hdrs, data


@dataclass
class LoadResult:
    name: str
    clients: int
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    throughput: float = 0.0  # successful requests (= images) per second
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_batch: float | None = None
    error_samples: list[str] = field(default_factory=list)


async def closed_loop(name: str, make_sender, clients: int, requests: int, duration: float,
                      warmup: int = 100) -> LoadResult:
    """``clients`` workers, each with its own connection, sending back to back until the
    request budget or the duration runs out. ``make_sender()`` returns (send(i) -> ok/err text, close)."""
    senders = [await make_sender() for _ in range(clients)]
    # Warm-up: connections, server-side caches and the first batches, not measured.
    # One request at a time per connection (HTTP/1.1 without pipelining).
    async def warm(send, k):
        for i in range(k):
            await send(i)

    await asyncio.gather(*(warm(s, max(1, warmup // clients)) for s, _ in senders))
    lat: list[float] = []
    res = LoadResult(name=name, clients=clients)
    counter = iter(range(requests))
    t_end = time.perf_counter() + duration

    async def worker(send):
        for i in counter:
            if time.perf_counter() > t_end:
                break
            t0 = time.perf_counter()
            try:
                err = await send(i)
            except Exception as e:  # noqa: BLE001 - a failed request is a counted error
                err = repr(e)
            if err is None:
                lat.append(time.perf_counter() - t0)
                res.ok += 1
            else:
                res.errors += 1
                if len(res.error_samples) < 5:
                    res.error_samples.append(err[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(s) for s, _ in senders))
    res.seconds = time.perf_counter() - t0
    for _, close in senders:
        await close()
    res.throughput = res.ok / res.seconds if res.seconds else 0.0
    if lat:
        ms = np.asarray(lat) * 1e3
        res.p50_ms, res.p90_ms, res.p99_ms = (float(np.percentile(ms, q)) for q in (50, 90, 99))
    return res


def http_predictions_sender(port: int, model: str, images: list[bytes]):
    async def make():
        conn = HttpConn("127.0.0.1", port)

        async def send(i: int):
            status, _, body = await conn.request("POST", f"/predictions/{model}", images[i % len(images)],
                                                 {"Content-Type": "application/octet-stream"})
            return None if status == 200 else f"HTTP {status}: {body[:200]!r}"

        return send, conn.close

    return make


def grpc_image_sender(port: int, model: str, images: list[bytes]):
    import grpc

    from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
    from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pbg

    async def make():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pbg.GRPCInferenceServiceStub(channel)
        reqs = []
        for blob in images:
            r = pb.ModelInferRequest(model_name=model)
            r.inputs.add(name="image", datatype="BYTES", shape=[1])
            r.raw_input_contents.append(bytes_element(blob))
            reqs.append(r)

        async def send(i: int):
            try:
                resp = await stub.ModelInfer(reqs[i % len(reqs)], timeout=60)
            except grpc.aio.AioRpcError as e:
                return f"gRPC {e.code().name}: {e.details()}"
            return None if resp.outputs else "empty response"

        return send, channel.close

    return make


# ----------------------------------------------------------- in-process runs


def inprocess(model_dir: Path, defense: str, batches: list[int], images: list[bytes], seconds: float = 3.0) -> dict:
    """Throughput (images/s) in this process, no serving: raw ONNX Runtime, and the whole
    pipeline (decode + defense + ORT) with the defense and without it, at each batch size."""
    import onnxruntime as ort
    import torch

    from bdserve.serve.pipeline import DefendedModel

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    defended = DefendedModel.load(model_dir, defense=defense)
    plain = DefendedModel.load(model_dir, defense="none")
    c, (h, w) = defended.channels, defended.input_size

    def window(fn, n_img: int, seconds: float) -> float:
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            k += 1
        return k * n_img / (time.perf_counter() - t0)

    out = {}
    for b in batches:
        x_np = np.random.default_rng(b).random((b, c, h, w), dtype=np.float32)
        blobs = [images[i % len(images)] for i in range(b)]
        x_u8 = defended.decode(blobs)
        xf = x_u8.float() / 255
        dfn = defended.resolve_defense(None)

        def defense_only():
            with torch.inference_mode():
                dfn(xf)

        fns = {
            "ort_session_run": lambda: sess.run(None, {iname: x_np}),
            "pipeline_predict_defended": lambda: defended.predict(x_u8),
            "pipeline_predict_undefended": lambda: plain.predict(x_u8),
            "pipeline_decode_predict_defended": lambda: defended.predict(defended.decode(blobs)),
            "defense_only": defense_only,
        }
        for fn in fns.values():
            fn()  # warm-up
        # The machine is shared: many short windows, every function in every round, so that
        # a disturbance hits all of them alike; the median round is reported.
        rounds = 7
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                samples[k].append(window(fn, b, seconds / (rounds * len(fns)) * 4))
        row = {k: float(np.median(v)) for k, v in samples.items()}
        # Paired per round: defended / undefended measured back to back.
        ratios = [d / u for d, u in zip(samples["pipeline_predict_defended"], samples["pipeline_predict_undefended"])]
        row["defense_cost"] = float(1 - np.median(ratios))
        row["samples"] = {k: [round(x) for x in v] for k, v in samples.items()}
        out[b] = row
    return out


# --------------------------------------------------------------------- report


def fmt_table(rows: list[LoadResult]) -> str:
    head = "| server | clients | ok | errors | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r.name} | {r.clients} | {r.ok} | {r.errors} | {r.throughput:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
        f"{'-' if r.mean_batch is None else f'{r.mean_batch:.1f}'} |\n"
        for r in rows
    )
    return head + body


def machine() -> dict:
    import onnxruntime
    import torch

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.is_available()}
    try:
        from ts.version import __version__ as tsv

        info["torchserve"] = tsv
    except ImportError:
        info["torchserve"] = None
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


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
    name = card.name
    defense = args.defense or card.defense
    h, w = card.input_shape[1:]
    images = png_images(64, size=h)
    print(f"model {name} ({model_dir}), input {card.input_shape}, defense {defense}, "
          f"{args.clients} clients, <= {args.requests} requests or {args.duration:.0f} s per run")

    runs: list[LoadResult] = []
    lopts = dict(clients=args.clients, requests=args.requests, duration=args.duration)

    def bdserve_server(d: str | None, extra: list[str] | None = None) -> ServeProcess:
        return bdserve_process(model_dir, defense=d, max_batch_size=args.max_batch_size,
                               max_queue_delay_ms=args.max_queue_delay_ms, log_path=work / "bdserve.log", extra=extra)

    with bdserve_server(defense) as srv:
        for label, maker in (("bdserve HTTP", http_predictions_sender(srv.http_port, name, images)),
                             ("bdserve gRPC", grpc_image_sender(srv.grpc_port, name, images))):
            before = mean_batch_inputs(srv.metrics_text(), name)
            r = asyncio.run(closed_loop(label, maker, **lopts))
            after = mean_batch_inputs(srv.metrics_text(), name)
            r.mean_batch = batch_delta(before, after)
            runs.append(r)
            print(fmt_row(r))
    with bdserve_server("none") as srv:
        before = mean_batch_inputs(srv.metrics_text(), name)
        r = asyncio.run(closed_loop("bdserve HTTP, defense none", http_predictions_sender(srv.http_port, name, images), **lopts))
        r.mean_batch = batch_delta(before, mean_batch_inputs(srv.metrics_text(), name))
        runs.append(r)
        print(fmt_row(r))

    if args.asyncio_row:
        with bdserve_server(defense, ["--loop", "asyncio"]) as srv:
            for label, maker in (("bdserve HTTP on asyncio (comparison)", http_predictions_sender(srv.http_port, name, images)),
                                 ("bdserve gRPC on asyncio (comparison)", grpc_image_sender(srv.grpc_port, name, images))):
                before = mean_batch_inputs(srv.metrics_text(), name)
                r = asyncio.run(closed_loop(label, maker, **lopts))
                r.mean_batch = batch_delta(before, mean_batch_inputs(srv.metrics_text(), name))
                runs.append(r)
                print(fmt_row(r))

    ts_result = None
    ts_workers = [int(n) for n in str(args.torchserve_workers).split(",") if n.strip()]
    if not args.skip_torchserve:
        from bdserve.serve.archive import build_archive

        for nw in ts_workers:
            store = work / f"mar_store_{nw}"
            build_archive(model_dir, store, name=name, defense=defense, batch_size=args.max_batch_size,
                          max_batch_delay_ms=int(args.max_queue_delay_ms), workers=nw)
            with LocalTorchServe(store, [f"{name}.mar"], work / f"torchserve_{nw}", workers=nw,
                                 extra_config={"job_queue_size": "1000"}) as ts:
                r = asyncio.run(closed_loop(f"TorchServe ({nw} worker{'s' if nw > 1 else ''})",
                                            http_predictions_sender(ts.inference_port, name, images), **lopts))
            runs.append(r)
            print(fmt_row(r))
            if ts_result is None or r.throughput > ts_result.throughput:
                ts_result = r  # compare against TorchServe at its best

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


def mean_batch_inputs(text: str, model: str) -> tuple[float, float] | None:
    s = c = None
    for line in text.splitlines():
        if f'model="{model}"' not in line:
            continue
        if line.startswith("bdserve_batch_size_sum"):
            s = float(line.rsplit(" ", 1)[1])
        elif line.startswith("bdserve_batch_size_count"):
            c = float(line.rsplit(" ", 1)[1])
    return None if s is None or c is None else (s, c)


def batch_delta(before, after) -> float | None:
    if after is None:
        return None
    s0, c0 = before or (0.0, 0.0)
    s1, c1 = after
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None


def fmt_row(r: LoadResult) -> str:
    extra = f", errors e.g. {r.error_samples[0]}" if r.error_samples else ""
    return (f"  {r.name:32s} {r.throughput:8.0f} req/s  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  "
            f"ok {r.ok} errors {r.errors}{extra}")


def render_markdown(result: dict, runs: list[LoadResult], inproc: dict) -> str:
    s, m, ld = result["summary"], result["machine"], result["load"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        "# Serving benchmark",
        "",
        f"{result['date']} · `{result['command'].strip()}`",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs (shared), CUDA: {m['cuda']}; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, TorchServe {m['torchserve']}.",
        f"Model: {result['model']['name']}, architecture {result['model']['architecture']} ({result['model']['dir']}), "
        f"input {result['model']['input_shape']}, "
        f"{result['model']['classes']} classes, defense `{result['model']['defense']}`.",
        f"Load: {ld['clients']} closed-loop clients, {ld['payload']}, at most {ld['requests_per_run']} requests or "
        f"{ld['duration_cap_s']:.0f} s per run, loopback; bdserve max batch {ld['max_batch_size']}, queue delay "
        f"{ld['max_queue_delay_ms']} ms; TorchServe batchSize {ld['max_batch_size']}, maxBatchDelay "
        f"{int(ld['max_queue_delay_ms'])} ms, workers {ld['torchserve_workers']} (the best is compared). "
        f"OMP_NUM_THREADS: {ld['omp_num_threads'] or 'unset (torch uses every core)'}.",
        "",
        "## Served, side by side",
        "",
        fmt_table(runs),
        "## In-process (no serving), images/s",
        "",
        "| batch | ORT session.run | pipeline predict, defended | pipeline predict, no defense | defense cost | decode + predict, defended |",
        "|---|---|---|---|---|---|",
    ]
    for b, row in inproc.items():
        lines.append(f"| {b} | {row['ort_session_run']:.0f} | {row['pipeline_predict_defended']:.0f} | "
                     f"{row['pipeline_predict_undefended']:.0f} | {pct(row['defense_cost'])} | "
                     f"{row['pipeline_decode_predict_defended']:.0f} |")
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines += [
        "",
        "## Against the targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| bdserve ≥ 3× TorchServe throughput ({s['torchserve_compared']}) | HTTP {ratio(s['bdserve_http_vs_torchserve'])}, gRPC "
        f"{ratio(s['bdserve_grpc_vs_torchserve'])} | {_yn(result['met']['bdserve >= 3x TorchServe'])} |",
        f"| defense costs ≤ 2% of throughput at batch ≥ 32 (pipeline) | "
        + ", ".join(f"batch {b}: {pct(c)}" for b, c in s["pipeline_defense_cost"].items())
        + f" | {_yn(result['met']['defense <= 2% at batch >= 32 (pipeline)'])} |",
        f"| defense costs ≤ 2% of throughput (served, HTTP) | {pct(s['served_defense_cost'])} | "
        f"{_yn(result['met']['defense <= 2% (served)'])} |",
        f"| serving overhead ≤ 15% vs in-process ONNX Runtime (batch {ld['max_batch_size']}) | "
        f"{pct(s['serving_overhead_vs_ort'])} | {_yn(result['met']['serving overhead <= 15% vs in-process ORT'])} |",
        f"| serving overhead ≤ 15% vs in-process pipeline incl. decode (batch {ld['max_batch_size']}) | "
        f"{pct(s['serving_overhead_vs_pipeline'])} | {_yn(result['met']['serving overhead <= 15% vs in-process pipeline'])} |",
        "",
    ]
    return "\n".join(lines)


def _yn(v) -> str:
    return "n/a" if v is None else ("yes" if v else "**no**")


if __name__ == "__main__":
    sys.exit(main())
