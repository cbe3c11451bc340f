"""``bdserve archive model_store/NAME``: pack a model directory into a TorchServe .mar."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bdserve.cli_errors import CommandError


def register(app: typer.Typer) -> None:
    @app.command("archive")
    def archive(
        model_dir: Path = typer.Argument(..., help="Model directory (model.onnx or model.pt, card.json)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write NAME.mar (default: the model directory)."),
        defense: Optional[str] = typer.Option(
            None, "--defense", help="Defense the handler serves with, e.g. flip, shrinkpad:4 (default: the card's)."
        ),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in TorchServe (default: the card's name)."),
        batch_size: int = typer.Option(32, "--batch-size", help="TorchServe batchSize for this model."),
        max_batch_delay_ms: int = typer.Option(5, "--max-batch-delay-ms", help="TorchServe maxBatchDelay."),
        workers: int = typer.Option(1, "--workers", help="TorchServe min/max workers for this model."),
        detect: Optional[str] = typer.Option(None, "--detect", metavar="METHOD[,METHOD]", help="Calibrated trigger detectors the handler runs on every image, as `bdserve serve --detect` (see `bdserve calibrate`)."),
        on_suspect: str = typer.Option("flag", "--on-suspect", help="With --detect: flag (answer, and say so) or reject (HTTP 422) images the detectors flag."),
    ) -> None:
        """Pack a model directory into a TorchServe .mar whose handler runs bdserve's defended pipeline.

        TorchServe must run from a Python environment where bdserve is installed
        (pip install 'bdserve[torchserve]'); the archive carries no copy of the pipeline.
        """
        from rich.console import Console

        from bdserve.serve.archive import ArchiveError, build_archive

        console = Console(stderr=True)
        try:
            with console.status(f"archiving {model_dir} ...") as st:
                res = build_archive(
                    model_dir, out, name=name, defense=defense, batch_size=batch_size,
                    max_batch_delay_ms=max_batch_delay_ms, workers=workers, detect=detect, on_suspect=on_suspect,
                    status=lambda msg: st.update(msg),
                )
        except ArchiveError as e:
            raise CommandError(f"archive failed: {e}", code=1) from e
        served = res.defense or "the card's default"
        console.print(
            f"[green]wrote[/green] {res.path} ({res.size_bytes / 1e6:.2f} MB, {', '.join(res.files)}; "
            f"defense: {served}) in {res.seconds:.1f} s"
        )
        typer.echo(str(res.path))  # stdout: the path alone, for scripts
