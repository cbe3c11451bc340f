"""``bdserve calibrate``: thresholds for the trigger detectors at a false-alarm rate the
operator picks, from images the operator trusts to be clean (serve/detection.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        model_dir: Path = typer.Argument(..., help="The model directory (card.json is updated in place)."),
        data: Path = typer.Option(..., "--data", help="Trusted clean images: an ImageFolder tree or a plain folder (not the images you evaluate on)."),
        split: Optional[str] = typer.Option(None, "--split", help="Read DATA/SPLIT (e.g. train) when DATA holds several splits."),
        fpr: float = typer.Option(0.05, "--fpr", help="False-alarm rate to calibrate to: the share of clean images flagged."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Score at most N images (a seeded random subset)."),
        detectors: str = typer.Option("consistency,strip,scaleup", "--detectors", help="Detectors to calibrate, each NAME or NAME:N (consistency:8, strip:16, scaleup:11)."),
        defense: Optional[str] = typer.Option(None, "--defense", help="Defense whose draws `consistency` compares (default: the card's, as served)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the detectors' draws and the image picks (default: fresh, kept in the card)."),
        backend: str = typer.Option("auto", "--backend", help="auto, onnx or torchscript."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    ) -> None:
        """Calibrate trigger detectors so that `bdserve serve --detect` flags the chosen share of clean images."""
        from bdserve.progress import progress_bar
        from bdserve.serve.detection import (CalibrationConfig, calibrate, parse_methods, read_trusted_images)
        from bdserve.serve.errors import InvalidInput
        from bdserve.serve.pipeline import DefendedModel
        from bdserve.transforms.detectors import DEFAULT_N

        try:
            methods = parse_methods(detectors)
            n_over = next(((n or DEFAULT_N["strip"]) for name, n in methods if name == "strip"), 0)
            model = DefendedModel.load(model_dir, defense=defense, backend=backend, device=device)
            images, source = read_trusted_images(model, data, split, None if limit is None else limit + n_over,
                                                 seed=0 if seed is None else seed)
            cfg = CalibrationConfig(fpr=fpr, methods=detectors, seed=seed, limit=limit)
            with progress_bar("calibrating", total=max(0, len(images) - n_over)) as advance:
                section = calibrate(model, model_dir, images, cfg, source, advance)
        except (ValueError, FileNotFoundError, InvalidInput) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"calibrated {model.name} on {section['images']} clean images from {source} "
                   f"at a false-alarm rate of {fpr:g} (flag: score > threshold)")
        for name, rec in section["detectors"].items():
            typer.echo(f"  {rec['spec']:<16} threshold {rec['threshold']:.4g}  clean median {rec['median']:.4g}  "
                       f"FAR on these images {rec['clean_far']:.4f}  ties {rec['ties_at_threshold']}  "
                       f"+{rec['forward_passes']} forward passes/image")
        typer.echo(f"wrote {model_dir / 'card.json'}" + (f" and {section['detectors']['strip']['overlays']}" if "strip" in section["detectors"] else ""))
