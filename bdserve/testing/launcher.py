"""``bdserve serve`` as a child process on loopback, its addresses read from its banner."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (prefer port 0 where the server allows it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bdserve_command() -> list[str]:
    """The installed console script of this environment (what users run), else the same entry point."""
    exe = Path(sys.executable).parent / "bdserve"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "bdserve.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``bdserve ARGS`` to completion (progress bars off), capturing its output as text."""
    return subprocess.run([*bdserve_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "BDSERVE_PROGRESS": "0"})


class ServeProcess:
    """``bdserve serve --model-store STORE [--model M ...] FLAGS`` on free loopback ports.

    ``start`` waits for the "HTTP listening on" / "gRPC listening on" lines; afterwards a
    thread keeps reading the output (into ``output`` and, if given, ``log_path``).
    ``stop`` sends SIGTERM (the graceful shutdown) and kills only after ``grace_s``.

    ``direct_to_log``: the server writes its output straight into ``log_path`` and nothing
    in this process reads it (``output`` stays empty). For benchmarks: their load generator
    would otherwise share its CPU with reading and copying every access line, which the
    peers' own log files do not cost it.
    """

    def __init__(self, store: str | Path, models: list[str] | tuple[str, ...] = (), *flags: str,
                 http_port: int = 0, grpc_port: int = 0, log_path: str | Path | None = None,
                 direct_to_log: bool = False):
        if direct_to_log and log_path is None:
            raise ValueError("direct_to_log needs a log_path")
        self.direct_to_log = direct_to_log
        self.store = Path(store)
        self.cmd = [*bdserve_command(), "serve", "--model-store", str(self.store),
                    "--http-port", str(http_port), "--grpc-port", str(grpc_port), *flags]
        for m in models:
            self.cmd += ["--model", m]
        self.log_path = Path(log_path) if log_path is not None else None
        self.proc: subprocess.Popen | None = None
        self.banner: list[str] = []  # output lines up to the two addresses
        self.output: list[str] = []  # output lines after them
        self.http_url = self.grpc_target = ""

    @property
    def http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_target.rsplit(":", 1)[1])

    def start(self, timeout: float = 120.0) -> "ServeProcess":
        if self.direct_to_log:
            return self._start_direct(timeout)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "BDSERVE_PROGRESS": "0"})
        timer = threading.Timer(timeout, self.proc.kill)  # a server that hangs before its banner
        timer.start()
        try:
            for line in self.proc.stdout:  # bounded: ends with the process
                self.banner.append(line)
                if self._read_address(line):
                    break
        finally:
            timer.cancel()
        if not (self.http_url and self.grpc_target):
            self._failed()
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _read_address(self, line: str) -> bool:
        """Note an address the banner line gives; whether both are known now."""
        if line.startswith("HTTP listening on "):
            self.http_url = line.split()[-1]
        elif line.startswith("gRPC listening on "):
            self.grpc_target = line.split()[-1]
        return bool(self.http_url and self.grpc_target)

    def _failed(self):
        self.stop()
        raise RuntimeError("bdserve serve did not start:\n" + "".join(self.banner))

    def _start_direct(self, timeout: float) -> "ServeProcess":
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            start = log.tell()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "BDSERVE_PROGRESS": "0"})
        deadline = time.monotonic() + timeout
        while not (self.http_url and self.grpc_target):
            with open(self.log_path, "rb") as log:
                log.seek(start)
                self.banner = log.read().decode(errors="replace").splitlines(keepends=True)
            if any(self._read_address(line) for line in self.banner if line.endswith("\n")):  # (whole lines)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._failed()
            time.sleep(0.05)
        return self

    def _drain(self) -> None:
        log = open(self.log_path, "a") if self.log_path else None
        try:
            for line in self.proc.stdout:
                self.output.append(line)
                if log:
                    log.write(line)
                    log.flush()
        finally:
            if log:
                log.close()

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(f"{self.http_url}/metrics", timeout=10, trust_env=False).text

    def stop(self, grace_s: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0)  # let the drain thread see the end of the pipe
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def served(store: str | Path, models: list[str], *flags: str, http_port: int = 0, grpc_port: int = 0):
    """Yields {"http": url, "grpc": "grpc://host:port", "banner": startup lines}; SIGTERM on exit."""
    with ServeProcess(store, models, *flags, http_port=http_port, grpc_port=grpc_port) as srv:
        yield {"http": srv.http_url, "grpc": "grpc://" + srv.grpc_target, "banner": "".join(srv.banner)}
