"""``bdserve serve --workers N``: N server processes behind the same two ports.

Each worker is a whole server - its own event loop, batchers and ONNX Runtime session,
with ``cores / N`` intra-op threads unless ``--threads`` says otherwise - so on a many-core
machine N event loops accept, parse and batch in parallel instead of one.

The ports are shared only among this server's own workers:

* HTTP: the parent binds and listens on the port (no SO_REUSEPORT), and every worker
  inherits that listening socket and accepts on it (the pre-fork model).
* gRPC: grpcio cannot adopt a socket, so the workers bind with SO_REUSEPORT. The parent
  first checks the port is free with a SO_REUSEPORT-free bind (a port another process
  holds is refused, as without workers), then holds it for the workers' lifetime with a
  bound, never-listening SO_REUSEPORT socket, so a process that binds the ordinary way
  is refused too.

Metrics: the workers write prometheus-client's multiprocess files into one directory
(``PROMETHEUS_MULTIPROC_DIR``, made and removed by the parent); whichever worker answers
``/metrics`` aggregates all of them.

The parent announces the addresses once every worker is ready, forwards SIGTERM/SIGINT
to the workers (each drains gracefully), and exits 0; if a worker dies on its own, the
parent stops the others and exits 1 so that the supervisor above (systemd, Kubernetes)
restarts the whole server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bdserve.serve.server import PortInUse, _bind, _url_host

WORKER_ENV = "BDSERVE_WORKER"  # the worker's number, 1..N (set by the parent)
READY_FD_ENV = "BDSERVE_READY_FD"  # a worker's write end of its readiness pipe
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HTTP_FD_FLAG = "--worker-http-fd"


def threads_per_worker(workers: int, threads: int | None) -> int:
    """ONNX Runtime intra-op threads of each worker: what was asked, else the cores split evenly."""
    if threads:
        return threads
    return max(1, (os.cpu_count() or 1) // workers)


def hold_grpc_port(host: str, port: int) -> socket.socket:
    """Check the gRPC port is free, then hold it for SO_REUSEPORT workers (see module doc)."""
    probe = _bind(host, port, "gRPC", "--grpc-port")  # no SO_REUSEPORT: PortInUse if any process holds it
    port = probe.getsockname()[1]
    family = probe.family
    probe.close()
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise PortInUse("gRPC", host, port, "--grpc-port") from None  # taken meanwhile
    return holder


def worker_output(number: int):
    """In a worker: (echo for its own output lines, labelled; announce, which also tells the
    parent on the readiness pipe once the worker listens)."""
    ready_fd = os.environ.get(READY_FD_ENV)
    label = f"[worker {number}] "

    def echo(text: str, err: bool = False) -> None:
        print(label + text, file=sys.stderr if err else sys.stdout, flush=True)

    def announce(text: str) -> None:
        nonlocal ready_fd
        echo(text)
        if ready_fd is not None and text.startswith("HTTP listening on "):
            fd, ready_fd = int(ready_fd), None
            try:
                os.write(fd, (text + "\n").encode())
            finally:
                os.close(fd)

    return echo, announce


def child_argv(argv: list[str], *, http_fd: int, grpc_port: int | None, threads: int) -> list[str]:
    """The worker's command line: the parent's own, with one worker, the inherited HTTP
    socket and the resolved ports and threads (click takes the last of a repeated option)."""
    extra = ["--workers", "1", HTTP_FD_FLAG, str(http_fd), "--threads", str(threads)]
    if grpc_port is not None:
        extra += ["--grpc-port", str(grpc_port)]
    return [sys.executable, "-m", "bdserve.cli", *argv, *extra]


class _Worker:
    """One worker process. Its output goes straight to ours (inherited stdout and stderr,
    each line labelled by the worker itself): passing every access line through this
    process would make it a single-threaded bottleneck for N workers. Readiness comes on a
    pipe of its own, where the worker writes its "HTTP listening on" line."""

    def __init__(self, number: int, cmd: list[str], env: dict, pass_fds: tuple[int, ...]):
        self.number = number
        self.ready = threading.Event()
        ready_r, ready_w = os.pipe()
        try:
            self.proc = subprocess.Popen(cmd, env={**env, WORKER_ENV: str(number), READY_FD_ENV: str(ready_w)},
                                         pass_fds=(*pass_fds, ready_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(ready_w)  # the worker holds the only write end: its exit ends the pipe
        self._reader = threading.Thread(target=self._await_ready, args=(ready_r,), daemon=True,
                                        name=f"worker-{number}-ready")
        self._reader.start()

    def _await_ready(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for line in pipe:
                if line.startswith(b"HTTP listening on "):
                    self.ready.set()
        self.ready.set()  # closed without it: the worker exited, and the waiter sees its exit code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


def supervise(argv: list[str], *, workers: int, host: str, http_port: int, grpc_port: int | None,
              threads: int | None, grace_s: float, announce=print) -> int:
    """Bind, start ``workers`` copies of ``bdserve ARGV``, announce, and run until a signal.
    A busy port raises PortInUse (one line on stderr from the command line)."""
    http = _bind(host, http_port)
    try:
        holder = hold_grpc_port(host, grpc_port) if grpc_port is not None else None
    except OSError:
        http.close()
        raise
    http.listen(2048)
    http.set_inheritable(True)
    metrics_dir = tempfile.mkdtemp(prefix="bdserve-metrics-")
    env = {**os.environ, MULTIPROC_ENV: metrics_dir, "BDSERVE_PROGRESS": "0"}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cmd = child_argv(argv, http_fd=http.fileno(),
                     grpc_port=None if holder is None else holder.getsockname()[1],
                     threads=threads_per_worker(workers, threads))
    pool: list[_Worker] = []
    try:
        pool = [_Worker(i + 1, cmd, env, (http.fileno(),)) for i in range(workers)]
        for w in pool:
            while not w.ready.wait(0.2):
                if stop.is_set():
                    return 0
            if w.proc.poll() is not None:
                print(f"error: worker {w.number} exited during startup (code {w.proc.returncode})", file=sys.stderr, flush=True)
                return 1
        announce(f"HTTP listening on http://{_url_host(host)}:{http.getsockname()[1]}")
        if holder is not None:
            announce(f"gRPC listening on {_url_host(host)}:{holder.getsockname()[1]}")
        announce(f"{workers} workers: pids {', '.join(str(w.proc.pid) for w in pool)}")
        while not stop.wait(0.5):
            dead = [w for w in pool if w.proc.poll() is not None]
            if dead:
                print(f"error: worker {dead[0].number} exited (code {dead[0].proc.returncode}); stopping", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        http.close()
        for w in pool:
            w.stop()
        deadline = time.monotonic() + grace_s + 10
        for w in pool:
            w.wait(max(0.1, deadline - time.monotonic()))
        if holder is not None:
            holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if pool and stop.is_set():
            announce("stopped")
