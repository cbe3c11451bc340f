"""bdserve demo: the main job on an embedded default, end to end on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo_command(
    out: Path = typer.Option(Path("model_store/demo"), help="Where the demo model directory goes."),
    data: Optional[Path] = typer.Option(None, help="CIFAR-10 folder (default: $BDSERVE_DATA or ../shared/data/cifar10-jpg)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train even if the demo model already exists."),
) -> None:
    """Train a small BadNets-infected model on CIFAR-10 and show how Flip and ShrinkPad disarm it."""
    from rich.console import Console
    from rich.table import Table

    from bdserve.card import ModelCard
    from bdserve.training.recipe import TrainConfig, run

    console = Console()
    if (out / "card.json").exists() and not retrain:
        card = ModelCard.load(out)
        console.print(f"using the trained demo model in {out} (--retrain to train it again)")
    else:
        cfg = TrainConfig(attack="badnets", model="fast", epochs=8, subset=20000, test_subset=2000,
                          data=str(data) if data else None, name="demo", seed=0)
        card = run(cfg, out=out, log=console.print).card
        console.print(f"wrote {out}")
    table = Table(title=f"{card.name}: BadNets-infected {card.architecture} (target '{card.classes[card.target_label]}')")
    table.add_column("defense")
    table.add_column("clean accuracy", justify="right")
    table.add_column("attack success rate", justify="right")
    for spec, m in card.metrics.items():
        table.add_row(spec, f"{100 * m['clean_acc']:.1f}%", "-" if m["asr"] is None else f"{100 * m['asr']:.1f}%")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
