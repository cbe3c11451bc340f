"""The peers the serving benchmark measures: ``bdserve serve`` (the one launcher in
bdserve.testing), TorchServe with bdserve's .mar at each worker count, and the pipeline
in-process (no serving), with and without the defense."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from bdserve.testing import LocalTorchServe, ServeProcess, build_tiny_model_dir
from loadgen import LoadResult, closed_loop, http_predictions_sender

REPO = Path(__file__).resolve().parent.parent


def pick_model_dir(arg: str | None, workdir: Path) -> Path:
    if arg:
        return Path(arg).resolve()
    demo = REPO / "model_store" / "demo"
    if (demo / "model.onnx").is_file():
        return demo
    # No demo model yet: the registry's tiny CNN, untrained (Normalize inside, dynamic batch axis).
    return build_tiny_model_dir(workdir / "models" / "tiny", name="tiny")


def bdserve_process(model_dir: Path, *, defense: str | None, max_batch_size: int, max_queue_delay_ms: float,
                    log_path: Path, extra: list[str] | None = None) -> ServeProcess:
    """``bdserve serve`` for one model as a child process on free loopback ports."""
    flags = ["--host", "127.0.0.1", "--max-batch-size", str(max_batch_size),
             "--max-queue-delay-ms", str(max_queue_delay_ms)]
    if defense is not None:
        flags += ["--defense", defense]
    return ServeProcess(model_dir.parent, [model_dir.name], *flags, *(extra or []), log_path=log_path,
                        direct_to_log=True)  # (as the peers' own logs: nothing in the bench reads each line)


def torchserve_runs(model_dir: Path, name: str, defense: str, images: list[bytes], work: Path, *, workers: list[int],
                    max_batch_size: int, max_queue_delay_ms: float, on_result=print, **load) -> list[LoadResult]:
    """The same closed loop against TorchServe serving bdserve's .mar, once per worker count."""
    from bdserve.serve.archive import build_archive

    runs = []
    for nw in workers:
        store = work / f"mar_store_{nw}"
        build_archive(model_dir, store, name=name, defense=defense, batch_size=max_batch_size,
                      max_batch_delay_ms=int(max_queue_delay_ms), workers=nw)
        with LocalTorchServe(store, [f"{name}.mar"], work / f"torchserve_{nw}", workers=nw,
                             extra_config={"job_queue_size": "1000"}) as ts:
            r = asyncio.run(closed_loop(f"TorchServe ({nw} worker{'s' if nw > 1 else ''})",
                                        http_predictions_sender(ts.inference_port, name, images), **load))
        runs.append(r)
        on_result(r)
    return runs


def inprocess(model_dir: Path, defense: str, batches: list[int], images: list[bytes], seconds: float = 3.0) -> dict:
    """Throughput (images/s) in this process, no serving: raw ONNX Runtime, and the whole
    pipeline (decode + defense + ORT) with the defense and without it, at each batch size."""
    import onnxruntime as ort
    import torch

    from bdserve.serve.pipeline import DefendedModel

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    defended = DefendedModel.load(model_dir, defense=defense)
    plain = DefendedModel.load(model_dir, defense="none")
    c, (h, w) = defended.channels, defended.input_size

    def window(fn, n_img: int, seconds: float) -> float:
        k, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            k += 1
        return k * n_img / (time.perf_counter() - t0)

    out = {}
    for b in batches:
        x_np = np.random.default_rng(b).random((b, c, h, w), dtype=np.float32)
        blobs = [images[i % len(images)] for i in range(b)]
        x_u8 = defended.decode(blobs)
        xf = x_u8.float() / 255
        dfn = defended.resolve_defense(None)

        def defense_only():
            with torch.inference_mode():
                dfn(xf)

        fns = {
            "ort_session_run": lambda: sess.run(None, {iname: x_np}),
            "pipeline_predict_defended": lambda: defended.predict(x_u8),
            "pipeline_predict_undefended": lambda: plain.predict(x_u8),
            "pipeline_decode_predict_defended": lambda: defended.predict(defended.decode(blobs)),
            "defense_only": defense_only,
        }
        for fn in fns.values():
            fn()  # warm-up
        # The machine is shared: many short windows, every function in every round, so that
        # a disturbance hits all of them alike; the median round is reported.
        rounds = 7
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                samples[k].append(window(fn, b, seconds / (rounds * len(fns)) * 4))
        row = {k: float(np.median(v)) for k, v in samples.items()}
        # Paired per round: defended / undefended measured back to back.
        ratios = [d / u for d, u in zip(samples["pipeline_predict_defended"], samples["pipeline_predict_undefended"])]
        row["defense_cost"] = float(1 - np.median(ratios))
        row["samples"] = {k: [round(x) for x in v] for k, v in samples.items()}
        out[b] = row
    return out
