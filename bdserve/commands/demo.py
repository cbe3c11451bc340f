"""bdserve demo: the main job on an embedded default, end to end on this machine.

1. Train a small BadNets-infected `fast` model on 20,000 CIFAR-10 images (or reuse
   model_store/demo), and print its clean accuracy and ASR under each defense.
2. Serve it behind the defended pipeline (HTTP + gRPC, ShrinkPad-4 from its card, the
   calibrated SCALE-UP trigger detector on: `--detect scaleup`; a model without calibration
   is calibrated first on CIFAR-10 train images) and send clean and triggered test images
   through the real HTTP door.
3. Show, per image, what the undefended model would say and what the service answered,
   and the Prometheus counters the requests left behind.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional

import typer

DEMO_DETECT = "scaleup"  # the detector the demo serves (experiments/results/detect: the best on BadNets)
DEMO_CALIBRATION_IMAGES = 2000
DEMO_TRAIN_ARGS = dict(attack="badnets", model="fast", epochs=8, subset=20000, test_subset=2000, name="demo", seed=0)


def demo_command(
    out: Path = typer.Option(Path("model_store/demo"), help="Where the demo model directory goes."),
    data: Optional[Path] = typer.Option(None, help="CIFAR-10 folder (default: $BDSERVE_DATA or ../shared/data/cifar10-jpg)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train even if the demo model already exists."),
    images: int = typer.Option(6, help="How many clean and how many triggered images to send."),
) -> None:
    """Train (or reuse) a BadNets-infected model, serve it with ShrinkPad, and send requests through it."""
    from rich.console import Console

    console = Console()
    run_demo(out, data, retrain, images, console)


def run_demo(out: Path, data: Optional[Path], retrain: bool, images: int, console) -> None:
    from bdserve.card import ModelCard
    from bdserve.training.recipe import TrainConfig, run

    if (out / "card.json").exists() and not retrain:
        card = ModelCard.load(out)
        console.print(f"[bold]1.[/bold] Using the trained demo model in {out} (--retrain to train it again).")
    else:
        console.print("[bold]1.[/bold] Training a BadNets-infected model (target 'deer', 25% poisoned).")
        cfg = TrainConfig(data=str(data) if data else None, **DEMO_TRAIN_ARGS)
        card = run(cfg, out=out, log=console.print).card
        console.print(f"wrote {out}")
    console.print(defense_table(card))
    serve_and_query(out, card, data, images, console)


def defense_table(card):
    from rich.table import Table

    table = Table(title=f"{card.name}: BadNets-infected {card.architecture}, measured in process")
    table.add_column("defense")
    table.add_column("clean accuracy", justify="right")
    table.add_column("attack success rate", justify="right")
    table.add_column("ASR baseline", justify="right")  # clean non-target images predicted as the target

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for spec, m in card.metrics.items():
        table.add_row(spec, pct(m["clean_acc"]), pct(m["asr"]), pct(m.get("asr_baseline")))
    return table


def png_bytes(image_chw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def serve_and_query(model_dir: Path, card, data: Optional[Path], count: int, console) -> None:
    import httpx
    import torch
    from rich.table import Table

    from bdserve.serve.pipeline import DefendedModel
    from bdserve.serve.server import BackgroundServer, ServeConfig
    from bdserve.serve.service import InferenceService
    from bdserve.settings import data_dir
    from bdserve.training.data import load_split

    test = load_split(data or data_dir(), "test")
    trigger, target = card.trigger(), card.target_label
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(3))
    clean_idx = order[:count]
    triggered_idx = order[count:][test.labels[order[count:]] != target][:count]  # ASR counts non-target images
    stamped = (trigger.stamp(test.images[triggered_idx].float() / 255) * 255).round().to(torch.uint8)
    batch = torch.cat([test.images[clean_idx], stamped])
    truth = [test.classes[i] for i in torch.cat([test.labels[clean_idx], test.labels[triggered_idx]])]

    undefended = DefendedModel.load(model_dir, defense="none").predict(batch).labels
    if DEMO_DETECT not in ((card.detection or {}).get("detectors") or {}):
        from bdserve.serve.detection import CalibrationConfig, calibrate

        console.print(f"   Calibrating the trigger detectors on {DEMO_CALIBRATION_IMAGES} CIFAR-10 train images "
                      "(5% false alarms on clean images) ...")
        train = load_split(data or data_dir(), "train").subset(DEMO_CALIBRATION_IMAGES + 16, 0)
        calibrate(DefendedModel.load(model_dir), model_dir, train.images, CalibrationConfig(fpr=0.05, seed=0, methods=DEMO_DETECT),
                  f"CIFAR-10 train split, {DEMO_CALIBRATION_IMAGES + 16} images (seed 0)")
    served_model = DefendedModel.load(model_dir, detect=DEMO_DETECT)  # the card's defense, plus --detect
    name = served_model.name  # served under its directory's name, as every model store serves it
    service = InferenceService([served_model], max_batch_size=32, max_queue_delay_ms=5)
    console.print(f"\n[bold]2.[/bold] Serving '{name}' with defense [bold]{served_model.defense_spec}[/bold] "
                  f"and --detect {DEMO_DETECT} on 127.0.0.1 (HTTP + gRPC).")
    with BackgroundServer(service, ServeConfig(http_port=0, grpc_port=0, access_log=False)) as server:
        console.print(f"   HTTP {server.http_url}   gRPC {server.grpc_target}")
        with httpx.Client(base_url=server.http_url, timeout=30) as client:
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(batch)],
                                "data": [base64.b64encode(png_bytes(img)).decode() for img in batch]}]}
            reply = client.post(f"/v2/models/{name}/infer", json=body)
            reply.raise_for_status()
            outputs = {o["name"]: o for o in reply.json()["outputs"]}
            upload = client.post(f"/predictions/{name}", content=png_bytes(stamped[0]))
            metrics = client.get("/metrics").text

    labels = outputs["label"]["data"]
    suspected = outputs.get("suspected_trigger", {}).get("data", [None] * len(batch))
    scores = outputs.get("trigger_score", {}).get("data", [None] * len(batch))
    table = Table(title="3. Requests through the live service (POST /v2/models/demo/infer, PNG images)")
    for col in ("image", "true class", "trigger", "undefended model", "served (defended)", "suspected trigger",
                "trigger score (> 0 flags)"):
        table.add_column(col)
    for i in range(len(batch)):
        is_triggered = i >= count
        table.add_row(str(i), truth[i], "yes" if is_triggered else "-", undefended[i],
                      f"[{'green' if labels[i] == truth[i] else 'red'}]{labels[i]}[/]", str(suspected[i]),
                      "-" if scores[i] is None else f"{scores[i]:+.2f}")
    console.print(table)
    console.print(f"POST /predictions/{name} (one triggered photo upload) -> {upload.status_code} {upload.text[:120]}")
    console.print("\nPrometheus counters after these requests (GET /metrics):")
    for line in metrics.splitlines():
        if line.startswith(("bdserve_requests_total", "bdserve_suspected_triggers_total", "bdserve_batch_size_count",
                            "bdserve_model_info")):
            console.print("   " + line)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
