"""Pack a model directory into a TorchServe .mar (``bdserve archive``).

The archive holds the model (model.onnx, or a TorchScript model.pt), card.json,
a model-config.yaml (TorchServe's batching and worker settings, plus the defense
the handler serves with) and serve/torchserve_handler.py. The handler imports
``bdserve`` from the Python environment TorchServe runs in: install bdserve into
that environment (``pip install bdserve[torchserve]``). No copy of the pipeline is
vendored into the archive, so the .mar and ``bdserve serve`` cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HANDLER_FILE = Path(__file__).resolve().parent / "torchserve_handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"
MODEL_FILES = ("model.onnx", "model.pt")  # preferred first, the same order the pipeline uses
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ArchiveError(RuntimeError):
    """The model directory cannot be archived (missing files, bad name, archiver failed)."""


@dataclass
class ArchiveResult:
    path: Path
    name: str
    version: str
    defense: str | None
    files: list[str]
    seconds: float

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _model_config_yaml(*, defense: str | None, batch_size: int, max_batch_delay_ms: int,
                       workers: int, response_timeout_s: int) -> str:
    # Hand-written YAML (flat scalars only) so that archiving needs no yaml library.
    lines = [
        "# TorchServe model configuration, written by `bdserve archive`.",
        f"minWorkers: {workers}",
        f"maxWorkers: {workers}",
        f"batchSize: {batch_size}",
        f"maxBatchDelay: {max_batch_delay_ms}",
        f"responseTimeout: {response_timeout_s}",
        "# Read by bdserve's handler (context.model_yaml_config['handler']).",
        "handler:",
    ]
    if defense is not None:
        lines.append(f"  defense: {json.dumps(defense)}")  # a JSON string is a valid YAML scalar
    else:
        lines.append("  defense: null  # the card's default")
    return "\n".join(lines) + "\n"


def build_archive(
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    defense: str | None = None,
    batch_size: int = 32,
    max_batch_delay_ms: int = 5,
    workers: int = 1,
    response_timeout_s: int = 120,
    force: bool = True,
    check: bool = True,
    status: Callable[[str], None] | None = None,
) -> ArchiveResult:
    """Write ``<out_dir>/<name>.mar`` (default: inside the model directory, beside model.onnx)."""
    say = status or (lambda _msg: None)
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArchiveError(f"{model_dir} is not a model directory")
    model_file = next((model_dir / f for f in MODEL_FILES if (model_dir / f).is_file()), None)
    if model_file is None:
        raise ArchiveError(f"{model_dir} holds neither {' nor '.join(MODEL_FILES)}")
    card_file = model_dir / "card.json"

    card_version = None
    if card_file.is_file():
        from bdserve.card import ModelCard

        card = ModelCard.load(card_file)  # validates the card before it is shipped
        name = name or card.name
        card_version = card.version
    name = name or model_dir.name
    version = version or card_version or "1"
    if not _NAME_RE.match(name):
        raise ArchiveError(f"model name {name!r} is not usable as a TorchServe model name")
    if defense is not None:
        from bdserve.transforms import create_defense

        try:
            create_defense(defense)  # fail here, not in the TorchServe worker
        except ValueError as e:
            raise ArchiveError(f"--defense: {e}") from None
    if check:
        # Build the very pipeline the handler will build: a model or card it cannot load,
        # or a defense that cannot run on this input size, fails now and not in a worker loop.
        say(f"checking that {model_dir} loads with defense {defense or 'from the card'}")
        from bdserve.serve.pipeline import DefendedModel

        try:
            DefendedModel.load(model_dir, defense=defense, device="cpu")
        except Exception as e:  # noqa: BLE001 - any load failure means an unusable archive
            raise ArchiveError(f"{model_dir} does not load as a bdserve model: {e}") from None
    if batch_size < 1 or workers < 1 or max_batch_delay_ms < 0:
        raise ArchiveError("batch size and workers must be >= 1, max batch delay >= 0")

    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.mar"
    if target.exists() and not force:
        raise ArchiveError(f"{target} exists (pass force=True to overwrite)")

    files = [model_file.name] + (["card.json"] if card_file.is_file() else []) + [MODEL_CONFIG_FILE]
    say(f"packing {', '.join(files)} + handler into {target}")
    with tempfile.TemporaryDirectory(prefix="bdserve-archive-") as tmp:
        cfg = Path(tmp) / MODEL_CONFIG_FILE
        cfg.write_text(_model_config_yaml(defense=defense, batch_size=batch_size,
                                          max_batch_delay_ms=max_batch_delay_ms, workers=workers,
                                          response_timeout_s=response_timeout_s))
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", str(version),
            "--serialized-file", str(model_file),
            "--handler", str(HANDLER_FILE),
            "--config-file", str(cfg),
            "--export-path", str(out),
        ]
        if card_file.is_file():
            cmd += ["--extra-files", str(card_file)]
        if force:
            cmd.append("--force")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except FileNotFoundError as e:  # pragma: no cover - sys.executable always exists
            raise ArchiveError(str(e)) from None
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            if "No module named model_archiver" in err:
                err = "torch-model-archiver is not installed: pip install 'bdserve[torchserve]'"
            raise ArchiveError(f"torch-model-archiver failed: {err[-2000:]}")
    if not target.is_file():
        raise ArchiveError(f"torch-model-archiver reported success but {target} is missing")
    say(f"wrote {target}")
    return ArchiveResult(path=target, name=name, version=str(version), defense=defense,
                         files=files + [HANDLER_FILE.name], seconds=time.perf_counter() - t0)


def which_torchserve() -> str | None:
    """The torchserve launcher of this environment (the one whose python will run the handler)."""
    cand = Path(sys.executable).parent / "torchserve"
    if cand.is_file():
        return str(cand)
    return shutil.which("torchserve")


# ---------------------------------------------------------------------------
# A local TorchServe for tests and benchmarks: loopback only, every port free,
# pid file, sockets and logs inside one work directory so that several
# instances (or other users' TorchServes) on the machine never collide.


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTorchServe:
    """Start ``torchserve`` on 127.0.0.1 with a generated config.properties; stop it for sure.

    Token authorization is disabled unless ``token_auth``: acceptable only because every
    address is loopback. With it on, TorchServe writes ``key_file`` in the work directory.
    """

    def __init__(self, model_store: str | Path, models: list[str], workdir: str | Path, *,
                 workers: int = 1, extra_config: dict[str, str] | None = None, token_auth: bool = False):
        self.model_store = Path(model_store).resolve()
        self.models = list(models)  # .mar file names inside model_store
        self.workdir = Path(workdir).resolve()
        self.workers = workers
        self.extra_config = extra_config or {}
        self.token_auth = token_auth
        self.inference_port = free_port()
        self.management_port = free_port()
        self.metrics_port = free_port()
        self.pid: int | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def key_file(self) -> Path:
        """TorchServe's keys when token authorization is on (written at start, in its working directory)."""
        return self.workdir / "key_file.json"

    def management_headers(self) -> dict[str, str]:
        if not self.token_auth:
            return {}
        key = json.loads(self.key_file.read_text())["management"]["key"]
        return {"Authorization": f"Bearer {key}"}

    def config_text(self) -> str:
        props = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            # TorchServe's gRPC doors default to fixed ports 7070/7071; move them off the defaults.
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            "initial_worker_port": str(20000 + free_port() % 20000),
            "model_store": str(self.model_store),
            "load_models": ",".join(self.models),
            "default_workers_per_model": str(self.workers),
            "disable_token_authorization": "false" if self.token_auth else "true",  # loopback only
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "true",  # its psutil sampler costs CPU on small machines
            "enable_envvars_config": "false",
        }
        props.update(self.extra_config)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _env(self) -> dict[str, str]:
        import os

        tmp = self.workdir / "tmp"
        logs = self.workdir / "logs"
        tmp.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # TMPDIR: torchserve's pid file; TEMP: java.io.tmpdir (unpacked .mar, worker sockets).
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(logs), METRICS_LOCATION=str(logs))
        return env

    def start(self, timeout: float = 120.0) -> "LocalTorchServe":
        exe = which_torchserve()
        if exe is None:
            raise RuntimeError("torchserve is not installed: pip install 'bdserve[torchserve]'")
        if shutil.which("java") is None:
            raise RuntimeError("TorchServe needs Java 17 (java is not on PATH)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.properties"
        cfg.write_text(self.config_text())
        env = self._env()
        # The Java frontend outlives the launcher and inherits its stdout: a file, not a
        # pipe, or waiting for the launcher would wait for Java to exit.
        console = self.workdir / "logs" / "console.log"
        with open(console, "ab") as out:
            proc = subprocess.run(
                [exe, "--start", "--ncs", *([] if self.token_auth else ["--disable-token-auth"]),
                 "--ts-config", str(cfg), "--model-store", str(self.model_store)],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=60,
            )
        pid_file = Path(env["TMPDIR"]) / ".model_server.pid"
        if proc.returncode != 0 or not pid_file.is_file():
            raise RuntimeError(f"torchserve --start failed: {console.read_text(errors='replace')[-2000:]}")
        self.pid = int(pid_file.read_text().split()[0])
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        import httpx
        import psutil

        names = [Path(m).stem for m in self.models]
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.pid is None or not psutil.pid_exists(self.pid):
                raise RuntimeError(f"TorchServe exited during start-up; log tail:\n{self.log_tail()}")
            try:
                ready = True
                for n in names:
                    r = httpx.get(f"{self.management_url}/models/{n}", timeout=2, headers=self.management_headers())
                    workers = r.json()[0].get("workers", []) if r.status_code == 200 else []
                    if not any(w.get("status") == "READY" for w in workers):
                        ready, last = False, f"{n}: {r.status_code} {r.text[:200]}"
                        break
                if ready:
                    return
            except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError) as e:  # OSError: no key file yet
                last = repr(e)
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s ({last}); log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        out = []
        for name in ("console.log", "ts_log.log", "model_log.log"):
            p = self.workdir / "logs" / name
            if p.is_file():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Terminate the Java frontend and every worker it spawned (by pid, never by name)."""
        import psutil

        if self.pid is None:
            return
        try:
            parent = psutil.Process(self.pid)
            procs = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.pid = None

    def __enter__(self) -> "LocalTorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
