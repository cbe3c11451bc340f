"""Both doors in one process and one event loop: uvicorn (HTTP) and grpc.aio (gRPC)
share the InferenceService, hence one batcher per model.

Shutdown (SIGTERM or SIGINT, or ``request_stop``): both doors stop accepting at
once, requests in flight finish (up to ``grace_s``), the batchers drain, and
``run`` returns 0. uvicorn's own signal capture is switched off because it
re-raises the signal after shutdown, which would end the process with -15
instead of a clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from bdserve.serve import access_log, repository
from bdserve.serve.grpc_server import DEFAULT_MAX_MESSAGE, create_grpc_server
from bdserve.serve.grpc_standard import StandardServices
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
    log_level: str = "warning"
    access_log: bool = True  # one JSON line per request on stdout (bdserve.access)
    lab_keep: Path | None = None  # --lab-keep: the photo lab appends each upload and answer here
    # One of `--workers N` (serve/workers.py): the HTTP socket the parent listens on, gRPC bound
    # with SO_REUSEPORT beside the other workers, and the worker's number in a response header.
    http_fd: int | None = None
    grpc_shared: bool = False
    worker: int | None = None
    otel_endpoint: str | None = None  # --otel-endpoint: OTLP/HTTP collector for traces (serve/tracing.py)


def load_models(store: str | Path, names: list[str] | None = None, **load_kw) -> list[DefendedModel]:
    """Every model (and version) the repository holds, or the named ones (``NAME`` or ``NAME=DIR``)."""
    return [DefendedModel.load(e.path, name=e.name, version=e.version, **load_kw)
            for e in repository.entries(store, names)]


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # signals are ours (see module docstring)
        yield


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

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.http_port}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc_port is None else f"{_url_host(self.config.host)}:{self.grpc_port}"

    async def start(self) -> None:
        cfg = self.config
        self._stop = asyncio.Event()
        access_log.enable(cfg.access_log)
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
            self._grpc = create_grpc_server(self.service, max_message_bytes=cfg.max_message_bytes,
                                            reuse_port=cfg.grpc_shared,
                                            interceptors=self._tracing.grpc_interceptors() if self._tracing else ())
            self._grpc_standard = StandardServices(self._grpc, self.service.models)
            try:  # grpc.so_reuseport is off (but for workers), so a busy port fails here too
                self.grpc_port = self._grpc.add_insecure_port(f"{_url_host(cfg.host)}:{cfg.grpc_port}")
            except RuntimeError:
                self.grpc_port = 0
            if not self.grpc_port:
                sock.close()
                raise PortInUse("gRPC", cfg.host, cfg.grpc_port, "--grpc-port")
        await self.service.start()
        app = create_app(self.service, max_body_bytes=cfg.max_body_bytes, lab_keep=cfg.lab_keep)
        if cfg.worker is not None:
            app = _WorkerHeader(app, cfg.worker)
        if self._tracing is not None:
            app = self._tracing.wrap_asgi(app)
        self._uvicorn = _Uvicorn(uvicorn.Config(
            app, log_level=cfg.log_level, access_log=False, lifespan="off",
            timeout_graceful_shutdown=int(cfg.grace_s) or None,
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
        self._uvicorn.should_exit = True  # stop accepting; uvicorn finishes open requests
        waits = [self._http_task]
        if self._grpc is not None:
            await self._grpc_standard.draining()  # health says NOT_SERVING while calls drain
            waits.append(self._grpc.stop(self.config.grace_s))
        await asyncio.gather(*waits, return_exceptions=True)
        await self.service.stop()
        if self._tracing is not None:
            self._tracing.shutdown()


async def serve_forever(service: InferenceService, config: ServeConfig, announce=print) -> int:
    """Start both doors, announce the addresses, run until SIGTERM/SIGINT, shut down gracefully."""
    server = Server(service, config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, server.request_stop)
    announce(f"HTTP listening on {server.http_url}")
    if server.grpc_target:
        announce(f"gRPC listening on {server.grpc_target}")
    await server.wait()
    announce("stopped")
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
