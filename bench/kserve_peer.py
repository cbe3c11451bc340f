"""KServe's ModelServer as a benchmark peer: the same decode, defense and ONNX Runtime
session (bdserve's ``DefendedModel``) inside a ``kserve.Model``, so a comparison measures
the serving stacks and nothing else.

Run by the bench, in its own virtual environment (made on first use under
``bench/.peers/kserve-<version>/``: kserve from PyPI plus this repository without its
extras), as a child process:

    bench/.peers/kserve-0.21/bin/python bench/kserve_peer.py --model_dir model_store/demo \\
        --model_name demo --http_port 8001 --grpc_port 8002

It answers KServe's Open Inference Protocol doors: ``POST /v2/models/{m}/infer`` (JSON and
the binary tensor extension) and gRPC ``ModelInfer``. Inputs: ``input`` UINT8/FP32
``[B,3,H,W]`` or ``image`` BYTES (encoded images). Output: ``probabilities`` FP32, raw when
the request asks for binary outputs (HTTP ``binary_data_output``; gRPC raw inputs), as
KServe decides. Per-request latency logging is off (it prints a line per request); every
other ModelServer setting is its default (one uvicorn worker, no batching).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KSERVE_VERSION = "0.21"
VENV = REPO / "bench" / ".peers" / f"kserve-{KSERVE_VERSION}"


# ------------------------------------------------------------ in the bench process


def kserve_python(log=print) -> Path:
    """The KServe environment's interpreter, made when missing (a few minutes, once)."""
    py = VENV / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import kserve, onnxruntime, bdserve.serve.pipeline"],
                                       capture_output=True).returncode == 0:
        return py
    log(f"making the KServe {KSERVE_VERSION} environment in {VENV} (once) ...")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # bdserve's serving extra: the peer runs the same decode, ShrinkPad and ONNX Runtime session.
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"kserve=={KSERVE_VERSION}.*", "-e", f"{REPO}[serve]"],
                   check=True)
    return py


class KServeProcess:
    """``kserve_peer.py`` as a child process on free loopback ports."""

    def __init__(self, model_dir: Path, *, http_port: int, grpc_port: int, log_path: Path,
                 threads: int | None = None):
        self.model_dir, self.name = model_dir, model_dir.name
        self.http_port, self.grpc_port = http_port, grpc_port
        self.log_path = log_path
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "KServeProcess":
        import httpx

        py = kserve_python()
        cmd = [str(py), str(Path(__file__).resolve()), "--model_dir", str(self.model_dir),
               "--model_name", self.name, "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port),
               "--enable_latency_logging", "False"]
        if self.threads:
            cmd += ["--ort_threads", str(self.threads)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": ""})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"KServe peer exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                r = httpx.get(f"http://127.0.0.1:{self.http_port}/v2/models/{self.name}/ready", timeout=1,
                              trust_env=False)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError("KServe peer not ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------ in the KServe process


def serve() -> None:
    import argparse

    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server

    from bdserve.serve.pipeline import DefendedModel

    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--ort_threads", type=int, default=None)
    args, _ = parser.parse_known_args()

    class DefendedKServeModel(Model):
        def __init__(self, name: str, model_dir: str):
            super().__init__(name)
            self.model_dir = model_dir
            self.pipeline: DefendedModel | None = None

        def load(self) -> bool:
            self.pipeline = DefendedModel.load(self.model_dir, threads=args.ort_threads)
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            inp = payload.inputs[0]
            arr = inp.as_numpy()
            if inp.datatype == "BYTES":
                x = self.pipeline.decode([bytes(b) for b in arr.reshape(-1)])
            else:
                x = self.pipeline.from_array(arr)
            pred = self.pipeline.predict(x)
            out = InferOutput(name="probabilities", shape=list(pred.probs.shape), datatype="FP32")
            out.set_data_from_numpy(pred.probs, binary_data=payload.use_binary_outputs)
            return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "",
                                 use_binary_outputs=payload.use_binary_outputs)

    import torch

    torch.set_num_threads(1)  # as bdserve serve: ONNX Runtime's pool does the heavy work
    model = DefendedKServeModel(args.model_name, args.model_dir)
    model.load()
    ModelServer().start([model])


if __name__ == "__main__":
    serve()
