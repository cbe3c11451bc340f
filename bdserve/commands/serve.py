"""``bdserve serve``: the defended models of a model store behind Open Inference Protocol
HTTP and gRPC, in one process and one event loop, until SIGTERM."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer


def event_loop_factory(choice: str):
    """uvloop roughly doubles HTTP throughput on small CPUs (bench/results/serving_summary.md)."""
    if choice not in ("auto", "uvloop", "asyncio"):
        raise typer.BadParameter(f"--loop must be auto, uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise typer.BadParameter("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model_store: Optional[Path] = typer.Option(None, "--model-store", help="Directory of model directories (default: $BDSERVE_MODEL_STORE or ./model_store)."),
        model: Optional[List[str]] = typer.Option(None, "--model", metavar="NAME", help="Model to serve: a directory of the store, or NAME=DIR to serve DIR as NAME; repeatable (default: every model in the store). Served under the directory's name; <name>/<version>/ directories are versions."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Loopback by default; bind 0.0.0.0 only behind your own network controls."),
        http_port: int = typer.Option(8080, "--http-port", help="HTTP port (0: any free port, printed at start)."),
        grpc_port: int = typer.Option(8081, "--grpc-port", help="gRPC port (0: any free port, printed at start)."),
        no_grpc: bool = typer.Option(False, "--no-grpc", help="Serve HTTP only."),
        defense: Optional[str] = typer.Option(None, "--defense", help="Defense for every model, overriding the cards: none, flip, shrinkpad:K, noise:STD, ..., joined with '+'."),
        backend: str = typer.Option("auto", "--backend", help="auto (model.onnx, else model.pt), onnx or torchscript."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when usable), cpu, cuda, cuda:1 ..."),
        max_batch_size: int = typer.Option(32, "--max-batch-size", help="Most images per executed batch."),
        max_queue_delay_ms: float = typer.Option(5.0, "--max-queue-delay-ms", help="Longest a request waits for batch-mates."),
        max_queue: int = typer.Option(4096, "--max-queue", help="Most images queued per model; beyond, requests get 503 / UNAVAILABLE."),
        detect: Optional[str] = typer.Option(None, "--detect", metavar="METHOD[,METHOD]", help="Score every image with calibrated trigger detectors (consistency, strip, scaleup; see `bdserve calibrate`) and flag those over the threshold. Costs forward passes: the card says how many."),
        on_suspect: str = typer.Option("flag", "--on-suspect", help="With --detect: flag (answer, and say so) or reject (HTTP 422 / gRPC FAILED_PRECONDITION) requests holding a flagged image."),
        lab: bool = typer.Option(False, "--lab", help="Evaluation lab: let requests choose the defense (parameter 'defense') and serve the photo lab page at /lab. Never in production."),
        lab_keep: Optional[Path] = typer.Option(None, "--lab-keep", help="With --lab: append every photo the lab page analyses, and its answer, to DIR (labels.csv, as `bdserve eval --photos` reads). Default: nothing is stored."),
        max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest HTTP body and gRPC message, in MiB."),
        max_pixels: int = typer.Option(50_000_000, "--max-pixels", help="Largest decoded image, in pixels (decompression-bomb guard)."),
        fit: str = typer.Option("cover", "--fit", help="How photos become the model's input: cover (scale to cover, center-crop) or print (find the printed picture in a camera frame, rectify it, trim its paper margin; cover when none is found). Reported in model metadata and every image response."),
        resize: Optional[str] = typer.Option(None, "--resize", help="The fit's resize filter: area, bilinear or bilinear-aa (default: bilinear-aa for cover, area for print)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: its own choice)."),
        torch_threads: int = typer.Option(1, "--torch-threads", help="torch CPU threads for decoding and the defense (default 1: ONNX Runtime's pool does the heavy work, and two pools fighting over few cores slow both)."),
        loop: str = typer.Option("auto", "--loop", help="Event loop: auto (uvloop when installed), uvloop or asyncio."),
        grace_s: float = typer.Option(30.0, "--grace-s", help="On SIGTERM, how long in-flight requests may take to finish; the process exits within it."),
        body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", help="An HTTP request's head, and then its whole body, must each arrive within this, else 408."),
        max_uploads: int = typer.Option(256, "--max-uploads", help="HTTP request bodies read or held at once; beyond, 503."),
        pixel_budget: Optional[int] = typer.Option(None, "--pixel-budget", help="Decoded pixels in flight across all requests (default: --max-pixels, one largest image at a time); beyond, requests wait up to 10 s, then 503."),
        log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning, error."),
        otel_endpoint: Optional[str] = typer.Option(None, "--otel-endpoint", metavar="URL", help="Send OpenTelemetry traces (OTLP over HTTP) to this collector, e.g. http://127.0.0.1:4318: a span per request (W3C traceparent honoured), decode, batch wait, batch, defense, inference. Needs the otel extra."),
        access_log: str = typer.Option("on", "--access-log", help="on: one JSON line per request on stdout (method, path, model, status, duration, bytes, request id); off: none."),
        workers: int = typer.Option(1, "--workers", min=1, help="Server processes sharing the ports, each with its own batcher and ONNX Runtime session (threads split between them); for machines with many cores."),
        worker_http_fd: Optional[int] = typer.Option(None, "--worker-http-fd", hidden=True, help="Internal: one of --workers, on the parent's HTTP socket."),
    ) -> None:
        """Serve defended models over HTTP (Open Inference Protocol v2, TorchServe-style /predictions, /metrics) and gRPC."""
        import asyncio
        import os
        import sys

        if workers > 1:
            from bdserve.serve.workers import supervise

            raise typer.Exit(supervise(sys.argv[1:], workers=workers, host=host, http_port=http_port,
                                       grpc_port=None if no_grpc else grpc_port, threads=threads,
                                       grace_s=grace_s, announce=typer.echo))

        echo, announce, log_format = typer.echo, typer.echo, "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if worker_http_fd is not None:  # one of --workers N: its lines say which worker it is
            from bdserve.serve.workers import WORKER_ENV, worker_output

            worker_number = int(os.environ.get(WORKER_ENV, "1"))
            echo, announce = worker_output(worker_number)
            log_format = log_format.replace("%(name)s", f"[worker {worker_number}] %(name)s")

        from bdserve.serve.errors import InvalidInput
        from bdserve.serve.server import ServeConfig, load_models, serve_forever
        from bdserve.serve.service import InferenceService
        from bdserve.settings import model_store as default_store

        import torch

        logging.basicConfig(level=log_level.upper(), format=log_format)
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        from bdserve.serve.images import FitPolicy

        store = model_store or default_store()
        try:
            fit_policy = FitPolicy(fit, resize)
        except ValueError as e:
            echo(f"error: --fit/--resize: {e}", err=True)
            raise typer.Exit(2)
        if lab_keep is not None:
            from bdserve.serve.lab_keep import LabKeeper

            try:
                if not lab:
                    raise ValueError("--lab-keep needs --lab")
                LabKeeper(lab_keep)  # checked now: a bad folder is a startup error, not a failed upload
            except (ValueError, OSError) as e:
                echo(f"error: {e}", err=True)
                raise typer.Exit(2)
        limit = int(max_body_mb * 1024 * 1024)
        if on_suspect not in ("flag", "reject"):
            raise typer.BadParameter(f"--on-suspect is flag or reject, not {on_suspect!r}")
        if on_suspect == "reject" and not detect:
            raise typer.BadParameter("--on-suspect reject needs --detect METHOD")
        broken: dict[str, str] = {}  # a broken model is reported once; the good ones are served
        try:
            models = load_models(store, model, broken=broken, defense=defense, backend=backend, device=device,
                                 lab=lab, detect=detect, max_pixels=max_pixels, threads=threads, fit=fit_policy)
        except (FileNotFoundError, ValueError, InvalidInput) as e:
            echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        for name, why in broken.items():
            echo(f"error: model {name} not served (answers 'not ready'): {why}", err=True)
        if not models:
            echo(f"error: no model in {store} could be loaded", err=True)
            raise typer.Exit(2)
        for m in models:
            detecting = f", detect {m.detection.describe()}, {on_suspect} suspects" if m.detect else ""
            echo(f"model {m.name} v{m.version}: {m.runtime.describe()}, defense {m.defense_spec}, fit {m.fit.spec}"
                       f"{', lab' if lab else ''}{detecting}, input {m.channels}x{m.input_size[0]}x{m.input_size[1]}, "
                       f"{len(m.classes)} classes")
        service = InferenceService(models, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                                   max_queue_images=max_queue, on_suspect=on_suspect, broken=broken,
                                   pixel_budget=pixel_budget or max_pixels)
        config = ServeConfig(host=host, http_port=http_port, grpc_port=None if no_grpc else grpc_port,
                             max_body_bytes=limit, max_message_bytes=limit, grace_s=grace_s,
                             body_timeout_s=body_timeout_s, max_uploads=max_uploads, log_level=log_level,
                             access_log=access_log.lower() not in ("off", "false", "0", "no"), lab_keep=lab_keep,
                             otel_endpoint=otel_endpoint)
        if worker_http_fd is not None:
            config.http_fd, config.grpc_shared = worker_http_fd, True
            config.worker = worker_number
        with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
            code = runner.run(serve_forever(service, config, announce=announce))
            # Everything is answered and every connection closed: skip the event loop's and the
            # interpreter's teardown (joining idle worker threads, then seconds of garbage
            # collection over torch and ONNX Runtime objects), so the process ends within the grace period.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
