"""A local TorchServe for tests and benchmarks: loopback only, every port free, pid file,
sockets and logs inside one work directory, so that several instances (or other users'
TorchServes) on the machine never collide."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from bdserve.serve.archive import which_torchserve
from bdserve.testing.launcher import free_port


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
