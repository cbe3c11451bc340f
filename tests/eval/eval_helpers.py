"""Helpers for the evaluation tests: the real `bdserve serve` and `bdserve eval` as subprocesses,
and a tiny real HTTP proxy that fails on purpose. Loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from bdserve.testing import bdserve_command, run_cli, served

BDSERVE = bdserve_command()
ENV = {**os.environ, "BDSERVE_PROGRESS": "0"}


@contextmanager
def running_server(model_dir: Path, *extra: str, http_port: int = 0, grpc_port: int = 0):
    """`bdserve serve` in a subprocess; yields {"http": url, "grpc": host:port}; SIGTERM at the end."""
    with served(model_dir.parent, [model_dir.name], "--threads", "1", *extra,
                http_port=http_port, grpc_port=grpc_port) as addr:
        yield {"http": addr["http"], "grpc": addr["grpc"].removeprefix("grpc://")}


def run_eval(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("eval", *args, timeout=timeout)


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


class FlakyProxy:
    """A real HTTP server on loopback in front of bdserve's HTTP door. For POST .../infer it answers
    the statuses in ``script`` to the first requests, in order (None: forward), then forwards
    everything; GETs are always forwarded. It counts what it saw."""

    def __init__(self, upstream: str, script: list[int | None]):
        self.upstream, self.script = upstream, list(script)
        self.lock = threading.Lock()
        self.infer_requests = 0
        self.answered = []  # status sent back for each infer request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _forward(self, method: str, body: bytes | None):
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                r = httpx.request(method, proxy.upstream + self.path, content=body, headers=headers, timeout=60, trust_env=False)
                return r.status_code, r.content, {k: v for k, v in r.headers.items()
                                                  if k.lower() in ("content-type", "inference-header-content-length")}

            def _send(self, status: int, body: bytes, headers: dict):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(*self._forward("GET", None))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.infer_requests += 1
                    planned = proxy.script.pop(0) if proxy.script else None
                if planned is not None:
                    status, content, headers = planned, json.dumps({"error": f"planned {planned}"}).encode(), {"Content-Type": "application/json"}
                else:
                    status, content, headers = self._forward("POST", body)
                with proxy.lock:
                    proxy.answered.append(status)
                self._send(status, content, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FlakyProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
