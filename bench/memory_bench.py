"""Memory under hostile load (not a test): resident memory of one ``bdserve serve`` before,
at the peak of, and after each case. Target: growth under 300 MB.

Cases (each against a fresh server, RSS of the server process sampled every 20 ms):
  * bomb: 12 concurrent uploads of a small PNG (flat, ~140 KiB) that declares 7000x7000
    pixels - legal (under the 50-megapixel limit), 147 MB once decoded;
  * batch: 3 concurrent requests of 4,096 images each (UINT8 [4096,3,32,32], binary tensor
    extension).

    .venv/bin/python bench/memory_bench.py            # writes bench/results/memory_bench.{json,md}
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench_report import machine  # the script's own directory is on sys.path
from peers import bdserve_process, pick_model_dir
from serving_bench import RESULTS

TARGET_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """RSS of ``pid`` every 20 ms in a thread; ``peak`` since start."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def bomb_png(side: int = 7000) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def run_case(model_dir: Path, work: Path, name: str, send, settle_s: float = 3.0) -> dict:
    # --max-queue 16384: the three 4,096-image requests are all taken (the default queue holds one).
    srv = bdserve_process(model_dir, defense=None, max_batch_size=64, max_queue_delay_ms=5,
                          log_path=work / f"{name}.log", extra=["--threads", "1", "--max-queue", "16384"])
    srv.start()
    try:
        pid = srv.proc.pid
        with httpx.Client(timeout=120, trust_env=False) as c:  # warm: one small request of each kind
            img = np.zeros((1, 3, 32, 32), np.uint8)
            c.post(f"{srv.http_url}/v2/models/{model_dir.name}/infer",
                   json={"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                     "data": img.reshape(-1).tolist()}]})
        time.sleep(1.0)
        before = rss_mb(pid)
        t0 = time.perf_counter()
        with Sampler(pid) as s:
            statuses = send(srv.http_url, model_dir.name)
            seconds = time.perf_counter() - t0
            time.sleep(settle_s)
        after = rss_mb(pid)
    finally:
        srv.stop()
    return {"case": name, "rss_before_mb": round(before, 1), "rss_peak_mb": round(s.peak, 1),
            "rss_after_mb": round(after, 1), "peak_growth_mb": round(s.peak - before, 1),
            "retained_growth_mb": round(after - before, 1), "seconds": round(seconds, 2),
            "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))}}


def send_bombs(n: int):
    blob = bomb_png()

    def send(url, model):
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: httpx.post(f"{url}/predictions/{model}", content=blob, timeout=300,
                                                      trust_env=False).status_code, range(n)))

    send.blob_bytes = len(blob)
    return send


def send_batches(n: int, images: int = 4096):
    raw = np.random.default_rng(0).integers(0, 256, (images, 3, 32, 32), dtype=np.uint8).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [images, 3, 32, 32],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()

    def send(url, model):
        def one(_):
            return httpx.post(f"{url}/v2/models/{model}/infer", content=head + raw, timeout=300, trust_env=False,
                              headers={"Inference-Header-Content-Length": str(len(head))}).status_code

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    return send


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--bombs", type=int, default=12)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--cases", default="bomb,batch")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = pick_model_dir(args.model_dir, work)
        bombs = send_bombs(args.bombs)
        rows = [run_case(model_dir, work, "bomb", bombs)] if "bomb" in args.cases else []
        rows += [run_case(model_dir, work, "batch", send_batches(args.batches))] if "batch" in args.cases else []
    for r in rows:
        r["met"] = r["peak_growth_mb"] < TARGET_MB and r["retained_growth_mb"] < TARGET_MB
    out = {"machine": machine(), "target_growth_mb": TARGET_MB, "bomb_png_bytes": bombs.blob_bytes,
           "bombs": args.bombs, "batches": args.batches, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_bench.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Memory under hostile load", "",
             f"`python bench/memory_bench.py` on {out['machine'].get('cpus')} CPUs; one fresh `bdserve serve` per "
             f"case, RSS sampled every 20 ms. bomb: {args.bombs} concurrent uploads of a {bombs.blob_bytes // 1024} KiB "
             f"PNG declaring 7000x7000; batch: {args.batches} concurrent requests of 4,096 UINT8 images. "
             f"Target: growth under {TARGET_MB} MB.", "",
             "| case | RSS before MB | peak MB | after MB | peak growth MB | retained MB | answers | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['rss_before_mb']} | {r['rss_peak_mb']} | {r['rss_after_mb']} | "
                     f"{r['peak_growth_mb']} | {r['retained_growth_mb']} | {r['statuses']} | {'yes' if r['met'] else 'NO'} |")
    (RESULTS / "memory_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
