"""Runtimes that turn a float NCHW batch into logits: ONNX Runtime, TorchScript and eager torch.

All take a float32 tensor on any device and return a float32 torch tensor
(B, C). None unpickles anything: ONNX is a protobuf, TorchScript is loaded
with ``torch.jit.load`` (a zip of code and tensors, never ``torch.load``), and the
eager runtime builds the card's architecture from the model registry and loads
weights.safetensors. The eager runtime is what in-process evaluation (and training's
card metrics) runs: the same ``DefendedModel`` as the server, another runtime.

ONNX Runtime and devices: the CUDA execution provider is *requested* when the
caller's device is CUDA and this onnxruntime build offers it, and what the
session really got is read back from ``session.get_providers()`` (a CPU-only
wheel or a missing CUDA library silently falls back to the CPU - asking is not
getting). ``OnnxRuntime.device`` is the device the session really runs on.
When the input already lies on the GPU and the session runs on CUDA, the
tensors are handed over with IO binding (no host round trip); in every other
case the batch is copied to a numpy array on the host and back.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bdserve.training.export import WEIGHTS_FILE

log = logging.getLogger(__name__)


class Runtime:
    name: str = "?"
    platform: str = "?"  # Open Inference Protocol / Triton platform string
    device: torch.device = torch.device("cpu")
    input_shape: tuple[int | None, ...] | None = None  # (C, H, W) when the model file says so

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


SHRINK_AFTER_BATCH = 256  # images


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    platform = "onnxruntime_onnx"

    def __init__(self, path: str | Path, device: torch.device, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as missing:
            raise RuntimeError(f"{path}: ONNX models need ONNX Runtime; install bdserve[serve] (CPU) "
                               "or bdserve[serve-cuda] (onnxruntime-gpu)") from missing
        if device.type == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from torch's nvidia-* wheels: the image's one CUDA stack

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # Idle ORT worker threads spin by default; in a server they steal the CPU from the
        # event loop that decodes and answers the next requests (measured: ~2x HTTP throughput
        # on a 2-core machine without spinning).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if self.providers[0] == "CUDAExecutionProvider":
            self.device = torch.device("cuda", device.index or 0)
        else:
            self.device = torch.device("cpu")
            if device.type == "cuda":
                log.warning(
                    "asked ONNX Runtime for CUDA but the session runs on %s (available: %s)",
                    self.providers, ort.get_available_providers(),
                )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected a classifier with one input, the graph has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise ValueError(f"{path}: expected an NCHW image input, the graph's input has shape {shape}")
        self.input_shape = tuple(_static(d) for d in shape[1:])
        out_shape = outputs[0].shape
        self.num_outputs = _static(out_shape[-1]) if len(out_shape) == 2 else None

    def describe(self) -> str:
        return f"onnxruntime {'/'.join(self.providers)}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        if x.is_cuda and self.device.type == "cuda" and self.num_outputs:
            return self._run_bound(x)
        # After a large batch, the CPU arena hands its extra chunks back (else RSS stays at the peak).
        opts = self._shrink if x.shape[0] >= SHRINK_AFTER_BATCH else None
        out = self.session.run([self.output_name], {self.input_name: x.detach().cpu().numpy()}, opts)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        # GPU in, GPU out: bind torch's buffers directly (untested on the CPU-only CI).
        idx = x.device.index or 0
        out = torch.empty((x.shape[0], self.num_outputs), dtype=torch.float32, device=x.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", idx, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # the defense's kernels must be done
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out


class TorchScriptRuntime(Runtime):
    name = "torchscript"
    platform = "pytorch_torchscript"

    def __init__(self, path: str | Path, device: torch.device):
        self.device = device
        import warnings

        with warnings.catch_warnings():
            # Recent torch marks TorchScript deprecated; it still loads, and it never unpickles.
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=device)
        self.module.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(x.to(self.device, torch.float32))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()


class TorchRuntime(Runtime):
    """An eager torch module: a network of bdserve's model registry with its safetensors weights,
    or any module in-process (a model right after training)."""

    name = "torch"
    platform = "pytorch"

    def __init__(self, module: torch.nn.Module, device: torch.device | str | None = None):
        if device is None:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: torch.device) -> "TorchRuntime":
        """The card's architecture from the registry, with weights.safetensors (never a pickle)."""
        from bdserve.card import ModelCard
        from bdserve.training.export import load_weights
        from bdserve.training.models import create_model

        model_dir = Path(model_dir)
        card = ModelCard.load(model_dir)
        if not card.classes:
            raise ValueError(f"{model_dir}: the eager runtime needs the card's classes (its output size)")
        module = create_model(card.architecture, num_classes=len(card.classes))
        return cls(load_weights(module, model_dir / WEIGHTS_FILE), device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(x.to(self.device, torch.float32))
        return out.float()



def open_runtime(model_dir: Path, backend: str, device: torch.device, threads: int | None = None) -> Runtime:
    """``backend``: 'onnx', 'torchscript', 'torch' (eager, weights.safetensors) or 'auto'
    (model.onnx when present, else model.pt, else the weights)."""
    onnx_path, ts_path = model_dir / "model.onnx", model_dir / "model.pt"
    if backend == "auto":
        backend = ("onnx" if onnx_path.exists() else "torchscript" if ts_path.exists()
                   else "torch" if (model_dir / WEIGHTS_FILE).exists() else "")
        if not backend:
            raise FileNotFoundError(f"{model_dir}: no model.onnx, model.pt or {WEIGHTS_FILE}")
    if backend == "onnx":
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path} does not exist")
        return OnnxRuntime(onnx_path, device, threads)
    if backend == "torchscript":
        if not ts_path.exists():
            raise FileNotFoundError(f"{ts_path} does not exist")
        return TorchScriptRuntime(ts_path, device)
    if backend == "torch":
        if not (model_dir / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{model_dir / WEIGHTS_FILE} does not exist")
        return TorchRuntime.from_dir(model_dir, device)
    raise ValueError(f"unknown backend {backend!r}; expected auto, onnx, torchscript or torch")
