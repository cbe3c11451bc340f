"""bdserve beside its peers, in interleaved rounds (a benchmark, not a test).

Every server runs at once for the whole run, each on its own loopback ports, serving the
same model with the same defense:

    bdserve                  bdserve serve (one process)
    bdserve --workers 2      two worker processes on the same ports
    KServe                   KServe 0.21 ModelServer around the same DefendedModel (bench/kserve_peer.py)
    TorchServe 1w / 2w       TorchServe 0.12 with the .mar of `bdserve archive`, 1 or 2 workers

Transports (one image per request, the same bytes for every server):

    png        POST /predictions/{m}, a 32x32 PNG body                  (bdserve, TorchServe)
    oip-bin    POST /v2/models/{m}/infer, UINT8 [1,3,H,W], binary extension in and out   (bdserve, KServe)
    oip-json   the same as JSON                                        (bdserve, KServe)
    grpc       ModelInfer, UINT8 raw_input_contents                      (bdserve, KServe)

Rounds: for each round, concurrency (closed loop: N clients, each sending its next request
when the answer arrives) and transport, every server that speaks it is measured for a few
seconds, back to back, in an order rotated from round to round (ABAB..., BABA...). A
disturbance from the shared machine then hits the servers of one round alike, and the
ratios are taken within each round before the median over rounds. Measured per cell:
requests/s, p50/p99 latency, and the server's CPU seconds per 1,000 requests (utime +
stime of its whole process tree, from /proc via psutil). bdserve's serving share of CPU
compares its CPU per request with the same decode/defense/ONNX Runtime work in this
process at the batch size the server formed.

    .venv/bin/python bench/peers_bench.py                       # 3 rounds, 2 s per cell
    .venv/bin/python bench/peers_bench.py --rounds 2 --seconds 1 --concurrency 1,32

Writes bench/results/peers_bench.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench_report import machine
from kserve_peer import KServeProcess
from loadgen import closed_loop, grpc_tensor_sender, http_predictions_sender, png_images, tensor_oip_sender
from peers import REPO, pick_model_dir

RESULTS = REPO / "bench" / "results"

TRANSPORTS = ("png", "oip-bin", "oip-json", "grpc")
TARGETS = {
    "1 client: bdserve / KServe on every transport": 1.0,
    "32 clients: bdserve / TorchServe (better setting), PNG": 3.0,
    "32 clients: bdserve / KServe, OIP binary and gRPC": 3.0,
    "32 clients: p99 / p50 at most": 3.0,
    "serving share of CPU, gRPC tensors, at most": 0.25,
    "serving share of CPU, PNG /predictions, at most": 0.35,
}


# ------------------------------------------------------------------ servers


def quiet_port() -> int:
    """A free port below the kernel's ephemeral range. gRPC servers bind with SO_REUSEPORT by
    default (KServe's does), and a busy shared machine's port-0 binds (other people's test
    servers) can then land on the same port and take part of the traffic: seen here once."""
    import random
    import socket

    lo, _ = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(200):
        port = random.randrange(max(1024, lo - 12000), lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port below the ephemeral range")


@dataclass
class Peer:
    label: str
    http_port: int
    grpc_port: int | None
    pid: int
    transports: tuple[str, ...]
    model: str

    def cpu_seconds(self) -> float:
        """utime + stime of the server's whole process tree (workers, TorchServe's Python backends)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return float("nan")
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def sender(self, transport: str, pngs: list[bytes], tensors: list[np.ndarray]):
        if transport == "png":
            return http_predictions_sender(self.http_port, self.model, pngs)
        if transport == "oip-bin":
            return tensor_oip_sender(self.http_port, self.model, tensors, binary=True)
        if transport == "oip-json":
            return tensor_oip_sender(self.http_port, self.model, tensors, binary=False)
        return grpc_tensor_sender(self.grpc_port, self.model, tensors)


@dataclass
class Cell:
    round: int
    clients: int
    transport: str
    server: str
    ok: int
    errors: int
    throughput: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1000: float
    mean_batch: float | None = None
    error_sample: str | None = None


def batch_totals(http_port: int, model: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10, trust_env=False).text
    s = c = 0.0
    for line in text.splitlines():
        if f'model="{model}"' in line:
            if line.startswith("bdserve_batch_size_sum"):
                s += float(line.rsplit(" ", 1)[1])
            elif line.startswith("bdserve_batch_size_count"):
                c += float(line.rsplit(" ", 1)[1])
    return s, c


def measure(peer: Peer, transport: str, clients: int, seconds: float, pngs, tensors, rnd: int) -> Cell:
    is_bdserve = peer.label.startswith("bdserve")
    b0 = batch_totals(peer.http_port, peer.model) if is_bdserve else None
    cpu0 = peer.cpu_seconds()
    r = asyncio.run(closed_loop(peer.label, peer.sender(transport, pngs, tensors), clients=clients,
                                requests=10**9, duration=seconds, warmup=min(4 * clients, 64)))
    cpu = peer.cpu_seconds() - cpu0
    mean_batch = None
    if b0 is not None:
        b1 = batch_totals(peer.http_port, peer.model)
        mean_batch = (b1[0] - b0[0]) / (b1[1] - b0[1]) if b1[1] > b0[1] else None
    # The CPU window also holds the warm-up requests: count them too.
    done = r.ok + r.errors + clients * max(1, min(4 * clients, 64) // clients)
    return Cell(rnd, clients, transport, peer.label, r.ok, r.errors, r.throughput, r.p50_ms, r.p99_ms,
                1000 * cpu / done if done else float("nan"), mean_batch,
                r.error_samples[0] if r.error_samples else None)


# ------------------------------------------------------------------ in-process baseline


def inprocess_cpu_per_image(model_dir: Path, pngs: list[bytes], tensors: list[np.ndarray],
                            batches: list[int], seconds: float = 1.5, passes: int = 3) -> dict:
    """CPU seconds per image in this process for the work a served request does, without
    serving: PNG decode + predict, and UINT8 tensor check + predict, at each batch size.

    Measured in ``passes`` rounds over every batch size, median per cell: one pass alone
    once read 0.87 ms per image at batch 32 where the others read 0.58-0.62 (the machine
    is shared), and a share of CPU taken against it came out negative."""
    import torch

    from bdserve.serve.pipeline import DefendedModel

    torch.set_num_threads(1)  # as the server: ONNX Runtime's pool does the heavy work
    m = DefendedModel.load(model_dir)
    cells: dict[tuple[int, str], list[float]] = {}
    for _ in range(passes):
        for b in batches:
            blobs = [pngs[i % len(pngs)] for i in range(b)]
            x = np.concatenate([tensors[i % len(tensors)] for i in range(b)])
            fns = {"png": lambda: m.predict(m.decode(blobs)), "tensor": lambda: m.predict(m.from_array(x))}
            for k, fn in fns.items():
                fn()
                n, c0, t0 = 0, time.process_time(), time.perf_counter()
                while time.perf_counter() - t0 < seconds / passes:
                    fn()
                    n += b
                cells.setdefault((b, k), []).append((time.process_time() - c0) / n)
    return {b: {k: float(np.median(cells[(b, k)])) for k in ("png", "tensor")} for b in batches}


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="default: model_store/demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured load per server and transport first")
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--skip", default="", help="comma-separated server labels to leave out, e.g. 'TorchServe 2w'")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    from bdserve.card import ModelCard
    from bdserve.testing import ServeProcess
    from bdserve.testing.torchserve import LocalTorchServe

    work = Path(tempfile.mkdtemp(prefix="bdserve-peers-"))
    model_dir = pick_model_dir(args.model_dir, work)
    card = ModelCard.load(model_dir)
    name, (c, h, w) = model_dir.name, card.input_shape
    rng = np.random.default_rng(0)
    pngs = png_images(16, size=h)
    tensors = [rng.integers(0, 256, (1, c, h, w), dtype=np.uint8) for _ in range(16)]
    concurrency = [int(x) for x in args.concurrency.split(",")]
    transports = [t for t in args.transports.split(",") if t]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    flags = ["--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms)]

    peers: list[Peer] = []
    stack = []
    try:
        for label, extra in (("bdserve", []), ("bdserve --workers 2", ["--workers", "2"])):
            if label in skip:
                continue
            srv = ServeProcess(model_dir.parent, [name], *flags, *extra, log_path=work / f"{label}.log", direct_to_log=True,
                               http_port=quiet_port(), grpc_port=quiet_port()).start(timeout=600)
            stack.append(srv)
            peers.append(Peer(label, srv.http_port, srv.grpc_port, srv.proc.pid, TRANSPORTS, name))
        if "KServe" not in skip:
            ks = KServeProcess(model_dir, http_port=quiet_port(), grpc_port=quiet_port(), log_path=work / "kserve.log")
            stack.append(ks.start(timeout=600))
            peers.append(Peer("KServe", ks.http_port, ks.grpc_port, ks.proc.pid, ("oip-bin", "oip-json", "grpc"), name))
        from bdserve.serve.archive import build_archive

        for nw in (1, 2):
            label = f"TorchServe {nw}w"
            if label in skip:
                continue
            store = work / f"mar_{nw}"
            build_archive(model_dir, store, name=name, defense=card.defense, batch_size=args.max_batch_size,
                          max_batch_delay_ms=int(args.max_queue_delay_ms), workers=nw)
            ts = LocalTorchServe(store, [f"{name}.mar"], work / f"ts_{nw}", workers=nw,
                                 extra_config={"job_queue_size": "1000"}).start(timeout=600)
            stack.append(ts)
            peers.append(Peer(label, ts.inference_port, None, ts.pid, ("png",), name))
        print("servers:", ", ".join(f"{p.label} (pid {p.pid})" for p in peers), flush=True)

        # Warm every server on every transport first (TorchServe's JVM compiles its hot paths
        # under load; every runtime allocates its buffers): not measured.
        for transport in transports:
            for p in peers:
                if transport in p.transports:
                    asyncio.run(closed_loop(p.label, p.sender(transport, pngs, tensors), clients=16,
                                            requests=10**9, duration=args.warmup_s, warmup=16))
        cells: list[Cell] = []
        t_start = time.time()
        for rnd in range(args.rounds):
            for clients in concurrency:
                for transport in transports:
                    group = [p for p in peers if transport in p.transports]
                    k = rnd % len(group) if group else 0
                    for p in group[k:] + group[:k]:  # rotated order
                        cell = measure(p, transport, clients, args.seconds, pngs, tensors, rnd)
                        cells.append(cell)
                        print(f"round {rnd + 1} c={clients:<3} {transport:8s} {p.label:20s} "
                              f"{cell.throughput:7.0f} req/s  p50 {cell.p50_ms:6.1f}  p99 {cell.p99_ms:6.1f} ms  "
                              f"cpu {cell.cpu_s_per_1000:5.2f} s/1k"
                              + (f"  batch {cell.mean_batch:.1f}" if cell.mean_batch else "")
                              + (f"  errors {cell.errors}: {cell.error_sample}" if cell.errors else ""), flush=True)
        wall = time.time() - t_start
    finally:
        for s in reversed(stack):
            s.stop()
        shutil.rmtree(work, ignore_errors=True)

    batches = sorted({max(1, round(x.mean_batch)) for x in cells if x.server == "bdserve" and x.mean_batch})
    inproc = inprocess_cpu_per_image(model_dir, pngs, tensors, batches or [1])
    result = summarize(cells, inproc, args, card, model_dir, wall)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "peers_bench" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    (out / f"{stem}.md").write_text(md)
    plot(result, out / f"{stem}.png")
    print(md)
    print(f"wrote {out / stem}.json, .md and .png")
    return 0


def _med(v):
    v = [x for x in v if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else None


def summarize(cells: list[Cell], inproc: dict, args, card, model_dir: Path, wall: float) -> dict:
    by = {}
    for x in cells:
        by.setdefault((x.clients, x.transport, x.server), []).append(x)
    rows = []
    for (clients, transport, server), xs in sorted(by.items()):
        rows.append({"clients": clients, "transport": transport, "server": server,
                     "throughput": _med([x.throughput for x in xs]),
                     "throughput_min": min(x.throughput for x in xs), "throughput_max": max(x.throughput for x in xs),
                     "p50_ms": _med([x.p50_ms for x in xs]), "p99_ms": _med([x.p99_ms for x in xs]),
                     "cpu_s_per_1000": _med([x.cpu_s_per_1000 for x in xs]),
                     "mean_batch": _med([x.mean_batch for x in xs]), "errors": sum(x.errors for x in xs)})

    def ratio(clients, transport, a, b_list):
        """Median over rounds of a's throughput over the best of b_list in the same round."""
        per_round = []
        for rnd in sorted({x.round for x in cells}):
            ta = [x.throughput for x in cells if (x.round, x.clients, x.transport, x.server) == (rnd, clients, transport, a)]
            tb = [x.throughput for x in cells if x.round == rnd and x.clients == clients and x.transport == transport
                  and x.server in b_list]
            if ta and tb and max(tb) > 0:
                per_round.append(ta[0] / max(tb))
        return {"median": _med(per_round), "rounds": per_round} if per_round else None

    concurrency = sorted({x.clients for x in cells})
    ratios = {}
    for clients in concurrency:
        for transport in TRANSPORTS:
            peers = ["TorchServe 1w", "TorchServe 2w"] if transport == "png" else ["KServe"]
            for a in ("bdserve", "bdserve --workers 2"):
                r = ratio(clients, transport, a, peers)
                if r:
                    ratios[f"{a} vs {'TorchServe (better)' if transport == 'png' else 'KServe'} | {transport} | {clients}"] = r

    # Serving's share of bdserve's CPU: served CPU per request vs the same work in-process
    # at the batch size the server formed.
    share = {}
    for transport, kind in (("grpc", "tensor"), ("oip-bin", "tensor"), ("oip-json", "tensor"), ("png", "png")):
        for clients in concurrency:
            row = next((r for r in rows if (r["clients"], r["transport"], r["server"]) == (clients, transport, "bdserve")), None)
            if not row or not row["mean_batch"] or not row["cpu_s_per_1000"]:
                continue
            b = max(1, round(row["mean_batch"]))
            base = inproc.get(b, {}).get(kind)
            if base:
                share[f"{transport} | {clients}"] = {"served_ms": row["cpu_s_per_1000"], "inprocess_ms": 1000 * base,
                                                     "batch": b, "share": 1 - 1000 * base / row["cpu_s_per_1000"]}

    def get_ratio(key):
        r = ratios.get(key)
        return None if r is None else r["median"]

    tail = {f"{t} | {s}": (row["p99_ms"] / row["p50_ms"]) for row in rows for t, s in [(row["transport"], row["server"])]
            if row["clients"] == 32 and row["p50_ms"]}
    verdict = {}
    one = [get_ratio(f"bdserve vs KServe | {t} | 1") for t in ("oip-bin", "oip-json", "grpc")]
    if all(v is not None for v in one):
        verdict["1 client: >= 1.0x KServe on every transport"] = {"measured": one, "met": min(one) >= 1.0}
    png32 = get_ratio("bdserve vs TorchServe (better) | png | 32")
    if png32 is not None:
        verdict["32 clients: >= 3x TorchServe (better setting), PNG /predictions"] = {"measured": png32, "met": png32 >= 3}
    k32 = [get_ratio(f"bdserve vs KServe | {t} | 32") for t in ("oip-bin", "grpc")]
    if all(v is not None for v in k32):
        verdict["32 clients: >= 3x KServe on OIP binary and gRPC"] = {"measured": k32, "met": min(k32) >= 3}
    bd_tail = [v for k, v in tail.items() if k.endswith("| bdserve")]
    if bd_tail:
        verdict["32 clients: bdserve p99 <= 3x p50 (every transport)"] = {"measured": bd_tail, "met": max(bd_tail) <= 3}
    for t, lim in (("grpc", 0.25), ("png", 0.35)):
        s = share.get(f"{t} | 32")
        if s:
            verdict[f"serving share of CPU <= {lim:.0%}, {t}, 32 clients"] = {"measured": s["share"], "met": s["share"] <= lim}

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/peers_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "load_average_at_end": os.getloadavg(),
        "wall_s": wall,
        "model": {"name": card.name, "dir": str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir),
                  "input_shape": card.input_shape, "defense": card.defense},
        "settings": {"rounds": args.rounds, "seconds_per_cell": args.seconds, "max_batch_size": args.max_batch_size,
                     "max_queue_delay_ms": args.max_queue_delay_ms},
        "rows": rows,
        "ratios": ratios,
        "p99_over_p50_at_32": tail,
        "inprocess_cpu_ms_per_image": {str(b): {k: 1000 * v for k, v in r.items()} for b, r in inproc.items()},
        "serving_cpu_share": share,
        "verdict": verdict,
        "cells": [asdict(x) for x in cells],
    }


def render_markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [
        "# bdserve beside KServe and TorchServe, interleaved rounds",
        "",
        f"{res['date']} · `{res['command'].strip()}`",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs, **shared with other engineers' trainings and tests** "
        f"(load average at the end {', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}). Absolute numbers "
        f"move with that load; read the ratios, taken within each round. {s['rounds']} rounds, {s['seconds_per_cell']:g} s "
        f"per cell (short on purpose), whole run {res['wall_s'] / 60:.1f} min.",
        f"Model {res['model']['name']} ({res['model']['dir']}), input {res['model']['input_shape']}, defense "
        f"`{res['model']['defense']}`; bdserve max batch {s['max_batch_size']}, max queue delay {s['max_queue_delay_ms']:g} ms.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for k, v in res["verdict"].items():
        meas = v["measured"]
        meas = ", ".join(fmt(x) for x in meas) if isinstance(meas, list) else fmt(meas)
        lines.append(f"| {k} | {meas} | {'yes' if v['met'] else '**no**'} |")
    lines += ["", "## Ratios (median over rounds of the per-round ratio; per-round values in brackets)", "",
              "| comparison | transport | clients | ratio | rounds |", "|---|---|---|---|---|"]
    for k, v in res["ratios"].items():
        a, t, c = k.split(" | ")
        lines.append(f"| {a} | {t} | {c} | {fmt(v['median'])}x | {', '.join(f'{x:.2f}' for x in v['rounds'])} |")
    lines += ["", "## Per server (medians over rounds)", "",
              "| clients | transport | server | req/s (min-max) | p50 ms | p99 ms | CPU s / 1k req | mean batch | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['clients']} | {r['transport']} | {r['server']} | {r['throughput']:.0f} "
                     f"({r['throughput_min']:.0f}-{r['throughput_max']:.0f}) | {fmt(r['p50_ms'], '{:.1f}')} | "
                     f"{fmt(r['p99_ms'], '{:.1f}')} | {fmt(r['cpu_s_per_1000'])} | {fmt(r['mean_batch'], '{:.1f}')} | {r['errors']} |")
    lines += ["", "## bdserve's serving share of CPU", "",
              "Served CPU per request against the same decode/check + defense + ONNX Runtime in-process at the batch "
              "size the server formed.", "",
              "| transport | clients | served ms CPU / req | in-process ms CPU / image | batch | serving share |",
              "|---|---|---|---|---|---|"]
    for k, v in res["serving_cpu_share"].items():
        t, c = k.split(" | ")
        lines.append(f"| {t} | {c} | {v['served_ms']:.2f} | {v['inprocess_ms']:.2f} | {v['batch']} | {v['share']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = [t for t in TRANSPORTS if any(r["transport"] == t for r in res["rows"])]
    fig, axes = plt.subplots(2, len(transports), figsize=(4.2 * len(transports), 7.5), squeeze=False)
    colours = {"bdserve": "C0", "bdserve --workers 2": "C9", "KServe": "C3", "TorchServe 1w": "C2", "TorchServe 2w": "C8"}
    for j, t in enumerate(transports):
        for server in colours:
            rs = sorted((r for r in res["rows"] if r["transport"] == t and r["server"] == server), key=lambda r: r["clients"])
            if not rs:
                continue
            cs = [r["clients"] for r in rs]
            thr = np.array([r["throughput"] for r in rs])
            err = [thr - [r["throughput_min"] for r in rs], [r["throughput_max"] for r in rs] - thr]
            axes[0, j].errorbar(cs, thr, yerr=err, marker="o", capsize=3, label=server, color=colours[server])
            axes[1, j].plot(cs, [r["cpu_s_per_1000"] for r in rs], marker="o", label=server, color=colours[server])
        axes[0, j].set_title(t)
        for i in (0, 1):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xlabel("concurrent clients")
            axes[i, j].grid(alpha=0.3)
        axes[0, j].set_ylim(bottom=0)
        axes[1, j].set_ylim(bottom=0)
        axes[0, j].legend(fontsize=8)
    axes[0, 0].set_ylabel("requests/s (median of rounds, min-max bars)")
    axes[1, 0].set_ylabel("server CPU s per 1,000 requests")
    fig.suptitle(f"Interleaved rounds on a shared {res['machine']['cpus']}-core machine: compare within a panel, not across runs",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
