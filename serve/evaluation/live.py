"""A live `bdserve serve` in a subprocess on free loopback ports, for experiments and benchmarks
that evaluate through the real service, and for the evaluation tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def served(store: Path, models: list[str], *flags: str, http_port: int = 0, grpc_port: int = 0):
    """Yields {"http": url, "grpc": "grpc://host:port", "banner": startup lines}; SIGTERM on exit."""
    cmd = [sys.executable, "-m", "bdserve.cli", "serve", "--model-store", str(store), "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), *flags]
    for m in models:
        cmd += ["--model", m]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "BDSERVE_PROGRESS": "0"})
    addr, seen = {}, []
    try:
        for line in proc.stdout:  # bounded: ends with the process
            seen.append(line)
            if line.startswith("HTTP listening on "):
                addr["http"] = line.split()[-1]
            elif line.startswith("gRPC listening on "):
                addr["grpc"] = "grpc://" + line.split()[-1]
            if "http" in addr and "grpc" in addr:
                break
        if len(addr) != 2:
            raise RuntimeError("bdserve serve did not start:\n" + "".join(seen))
        addr["banner"] = "".join(seen)
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
        yield addr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
