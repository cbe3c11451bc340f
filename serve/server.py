"""Both doors in one process and one event loop: uvicorn (HTTP) and grpc.aio (gRPC)
share the InferenceService, hence one batcher per model.

Shutdown (SIGTERM or SIGINT, or ``request_stop``): both doors stop accepting at
once (new HTTP requests on kept-alive connections get a JSON 503 with ``Connection:
close``, new gRPC calls UNAVAILABLE), requests and calls already accepted finish, the
batchers drain, and ``run`` returns 0 - all within ``grace_s`` of the signal, whatever
clients do: what still runs then is answered 503 / cancelled. uvicorn's own signal
capture is switched off because it re-raises the signal after shutdown, which would end
the process with -15 instead of a clean exit.

A model store with a broken model (a truncated model.onnx, a bad card) still serves the
good ones: ``load_models`` records the broken one with its reason, the service answers
it as not ready, and ``bdserve serve`` reports it once at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from bdserve.serve import access_log, repository
from bdserve.serve.budget import bound_heap
from bdserve.serve.grpc_drain import DrainGate
from bdserve.serve.grpc_server import DEFAULT_MAX_MESSAGE, create_grpc_server
from bdserve.serve.grpc_standard import StandardServices
from bdserve.serve.http_protocol import guarded_http_protocol
from bdserve.serve.heap import freeze_startup_objects
from bdserve.serve.http_app import DEFAULT_MAX_BODY, create_app
from bdserve.serve.tracing import Tracing
from bdserve.serve.pipeline import DefendedModel
from bdserve.serve.service import InferenceService

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    http_port: int = 8080  # 0: any free port
    grpc_port: int | None = 8081  # 0: any free port; None: no gRPC door
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    grace_s: float = 30.0
    body_timeout_s: float = 30.0  # each HTTP request head, and then its body, must arrive within this (else 408)
    max_uploads: int = 256  # HTTP bodies read or held at once (beyond: 503)
    log_level: str = "warning"
    access_log: bool = True  # one JSON line per request on stdout (bdserve.access)
    lab_keep: Path | None = None  # --lab-keep: the photo lab appends each upload and answer here
    # One of `--workers N` (serve/workers.py): the HTTP socket the parent listens on, gRPC bound
    # with SO_REUSEPORT beside the other workers, and the worker's number in a response header.
    http_fd: int | None = None
    grpc_shared: bool = False
    worker: int | None = None
    otel_endpoint: str | None = None  # --otel-endpoint: OTLP/HTTP collector for traces (serve/tracing.py)


def load_models(store: str | Path, names: list[str] | None = None, *, broken: dict[str, str] | None = None,
                **load_kw) -> list[DefendedModel]:
    """Every model (and version) the repository holds, or the named ones (``NAME`` or ``NAME=DIR``).
    With ``broken`` (a dict), a model that fails to load is recorded there (served name -> one line
    naming its file and what is wrong) and the others load; without it, the first failure raises."""
    models = []
    for e in repository.entries(store, names):
        try:
            models.append(DefendedModel.load(e.path, name=e.name, version=e.version, **load_kw))
        except Exception as err:  # noqa: BLE001 - ONNX Runtime, torch and card errors alike
            if broken is None:
                raise
            broken[e.name] = load_failure(e.path, err)  # the caller reports it (once)
    return models


def load_failure(model_dir: Path, e: Exception) -> str:
    """One line: the file at fault (when the message does not already name one) and the reason."""
    reason = " ".join(str(e).split())  # ONNX Runtime's messages span lines
    reason = reason if len(reason) <= 400 else reason[:397] + "..."
    if str(model_dir) in reason:
        return reason
    graph = next((model_dir / f for f in ("model.onnx", "model.pt") if (model_dir / f).exists()), model_dir)
    return f"{graph}: {type(e).__name__}: {reason}"


SETTLE_S = 0.25  # after the signal, requests already on their way over open connections still count


def settle_s(grace_s: float) -> float:
    return min(SETTLE_S, grace_s / 4)


def exit_margin_s(grace_s: float) -> float:
    """Kept back from the grace period for the process to end (unmapping a few hundred MB of
    torch and ONNX Runtime takes a moment on a busy machine)."""
    return min(0.3, 0.5 * grace_s)


class _Uvicorn(uvicorn.Server):
    """uvicorn, with our signals and a shutdown that keeps to the server's deadline.

    It stops accepting connections at once. Requests that arrive on open connections are
    still served, each answer closing its connection (the guard adds ``Connection: close``);
    after ``settle`` seconds, idle connections are closed - but never one whose next request
    is already in its socket, which would reset it unanswered. At the deadline, what still
    runs is cancelled (the guard answers it with a JSON 503)."""

    deadline: float | None = None
    settle: float = SETTLE_S

    @contextlib.contextmanager
    def capture_signals(self):  # signals are ours (see module docstring)
        yield

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        now = time.monotonic()
        deadline = self.deadline if self.deadline is not None else now + 30.0
        settled_at = min(now + self.settle, deadline)
        state, told = self.server_state, set()
        while time.monotonic() < deadline:
            if time.monotonic() >= settled_at:
                for connection in list(state.connections):
                    if connection not in told and not _has_unread(connection):
                        connection.shutdown()  # idle: closed now; busy: closed after its answer
                        told.add(connection)
                if not state.connections and not state.tasks:
                    break
            await asyncio.sleep(0.02)
        running = list(state.tasks)
        for task in running:
            task.cancel(msg="grace period over")
        if running:  # the guard writes their 503s
            await asyncio.wait(running, timeout=0.05)
        for connection in list(state.connections):
            connection.transport.close()


def _has_unread(connection) -> bool:
    """Whether bytes wait in the connection's socket (a request on its way)."""
    sock = connection.transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class PortInUse(OSError):
    """Another process listens on the port this server was asked to bind."""

    def __init__(self, door: str, host: str, port: int, flag: str):
        super().__init__(errno.EADDRINUSE, f"{door} port {port} on {host} is already in use (another server?): "
                                           f"stop it or choose another {flag}")


def _bind(host: str, port: int, door: str = "HTTP", flag: str = "--http-port") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; never SO_REUSEPORT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(door, host, port, flag) from None
        raise
    return sock


class _WorkerHeader:
    """ASGI wrapper: every response says which worker process answered (``X-Bdserve-Worker: N pid``)."""

    def __init__(self, app, number: int):
        self.app = app
        self.header = (b"x-bdserve-worker", f"{number} {os.getpid()}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_header)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Server:
    def __init__(self, service: InferenceService, config: ServeConfig):
        self.service, self.config = service, config
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._stop: asyncio.Event | None = None
        self.shutdown_s = 0.0

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.http_port}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc_port is None else f"{_url_host(self.config.host)}:{self.grpc_port}"

    async def start(self) -> None:
        cfg = self.config
        self._stop = asyncio.Event()
        bound_heap()  # large buffers go back to the system when freed
        access_log.enable(cfg.access_log, worker=cfg.worker)
        self._tracing = Tracing(cfg.otel_endpoint) if cfg.otel_endpoint else None
        # Both ports are bound before anything starts, so a busy one fails with nothing to undo.
        sock = socket.socket(fileno=cfg.http_fd) if cfg.http_fd is not None else _bind(cfg.host, cfg.http_port)
        self.http_port = sock.getsockname()[1]
        self._grpc = None
        if cfg.grpc_port is not None:
            # Probe first: grpcio would also log its own multi-line complaint. A worker's port is
            # held by its parent (serve/workers.py), which probed it; the worker joins it.
            if cfg.grpc_port and not cfg.grpc_shared:
                try:
                    _bind(cfg.host, cfg.grpc_port, "gRPC", "--grpc-port").close()
                except OSError:
                    sock.close()
                    raise
            self._drain = DrainGate()
            self._grpc = create_grpc_server(self.service, max_message_bytes=cfg.max_message_bytes,
                                            reuse_port=cfg.grpc_shared,
                                            interceptors=[self._drain, *(self._tracing.grpc_interceptors() if self._tracing else ())])
            self._grpc_standard = StandardServices(self._grpc, self.service.models)
            try:  # grpc.so_reuseport is off (but for workers), so a busy port fails here too
                self.grpc_port = self._grpc.add_insecure_port(f"{_url_host(cfg.host)}:{cfg.grpc_port}")
            except RuntimeError:
                self.grpc_port = 0
            if not self.grpc_port:
                sock.close()
                raise PortInUse("gRPC", cfg.host, cfg.grpc_port, "--grpc-port")
        await self.service.start()
        http_app = create_app(self.service, max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s,
                              max_uploads=cfg.max_uploads, lab_keep=cfg.lab_keep)
        self.guard = http_app.app  # under the access log: the guard closes connections at shutdown
        if cfg.worker is not None:
            http_app = _WorkerHeader(http_app, cfg.worker)
        if self._tracing is not None:
            http_app = self._tracing.wrap_asgi(http_app)
        self._uvicorn = _Uvicorn(uvicorn.Config(
            http_app, log_level=cfg.log_level, access_log=False, lifespan="off",
            server_header=False,  # no "server: uvicorn": the server does not advertise its software
            http=guarded_http_protocol(head_timeout_s=cfg.body_timeout_s),
            timeout_graceful_shutdown=cfg.grace_s,  # (_Uvicorn.shutdown keeps its own deadline)
        ))
        self._http_task = asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[sock]))
        if self._grpc is not None:
            await self._grpc.start()
            await self._grpc_standard.serving()
        while not self._uvicorn.started:
            if self._http_task.done():
                await self._http_task  # raises the startup error
                raise OSError("HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Everything accepted is answered, and this returns within ``grace_s`` (plus a few ms)."""
        t0 = time.monotonic()
        deadline = time.monotonic() + self.config.grace_s - exit_margin_s(self.config.grace_s)
        self.guard.closing = True  # every answer from now on closes its connection
        self._uvicorn.deadline, self._uvicorn.settle = deadline, settle_s(self.config.grace_s)
        self._uvicorn.should_exit = True  # uvicorn notices within 0.1 s (its tick)
        waits = [self._http_task]
        if self._grpc is not None:
            waits.append(self._stop_grpc(deadline))
        await asyncio.gather(*waits, return_exceptions=True)
        await self.service.stop()
        access_log.flush()
        if self._tracing is not None:
            self._tracing.shutdown()
        self.shutdown_s = time.monotonic() - t0

    async def _stop_grpc(self, deadline: float) -> None:
        await self._grpc_standard.draining()  # health says NOT_SERVING while calls drain
        # Calls already sent keep being picked up and answered; the server stops once none has
        # run for a quiet moment (grpc's stop() alone would cancel those not yet picked up).
        await self._drain.drain(deadline, quiet_s=settle_s(self.config.grace_s))
        await self._grpc.stop(max(0.0, deadline - time.monotonic()))


async def serve_forever(service: InferenceService, config: ServeConfig, announce=print) -> int:
    """Start both doors, announce the addresses, run until SIGTERM/SIGINT, shut down gracefully."""
    server = Server(service, config)
    await server.start()
    # A process that only serves: what startup left alive is out of the full collections' way.
    freeze_startup_objects()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, server.request_stop)
    announce(f"HTTP listening on {server.http_url}")
    if server.grpc_target:
        announce(f"gRPC listening on {server.grpc_target}")
    await server.wait()
    announce(f"stopped ({server.shutdown_s:.2f} s after the signal)")
    return 0


class BackgroundServer:
    """A Server on its own event loop in a daemon thread (tests, benchmarks, notebooks)."""

    def __init__(self, service: InferenceService, config: ServeConfig):
        self.server = Server(service, config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bdserve-server", daemon=True)

    def _main(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            try:
                await self.server.start()
            except BaseException as e:  # noqa: BLE001
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.server.wait()

        asyncio.run(main())

    def __enter__(self) -> Server:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self.server

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self._thread.join(60)
