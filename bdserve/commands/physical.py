"""``bdserve physical simulate``: triggered test images rendered as if printed and photographed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Physical-attack tools (Section 5.4).", no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(group, name="physical")

    @group.command("simulate")
    def simulate(
        card: Path = typer.Option(..., "--card", help="The infected model's card.json (trigger and target)."),
        out: Path = typer.Option(..., "--out", help="Folder for the photos (bdserve eval --photos reads it)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Dataset with a test split (default: $BDSERVE_DATA or ../shared/data/cifar10-jpg)."),
        count: int = typer.Option(200, "--count", help="Photos to render (test images whose label is not the target)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the image choice and every scene draw."),
        clean: bool = typer.Option(False, "--clean", help="Also render each image's clean counterpart in the same scene."),
        width: int = typer.Option(640, "--width", help="Camera resolution, width."),
        height: int = typer.Option(480, "--height", help="Camera resolution, height."),
        fill_min: float = typer.Option(0.5, "--fill-min", help="Smallest print side / frame's shorter side."),
        fill_max: float = typer.Option(0.75, "--fill-max", help="Largest print side / frame's shorter side."),
    ) -> None:
        """Render triggered test images as camera photos: a print (nearest) with a paper margin on a
        textured table at a random scale, position and turn, perspective tilt, lens distortion, lighting
        and colour cast, blur, sensor noise, JPEG. Serve with --fit print to have the server find the print."""
        from bdserve.card import ModelCard
        from bdserve.serve.evaluation.physical import Camera, simulate as run
        from bdserve.settings import data_dir

        if not 0 < fill_min <= fill_max <= 1.5:
            raise ValueError("need 0 < --fill-min <= --fill-max <= 1.5")
        cam = Camera(width=width, height=height, fill=(fill_min, fill_max))
        meta = run(ModelCard.load(card), data or data_dir(), out, count=count, seed=seed, clean=clean, cam=cam)
        typer.echo(f"wrote {meta['count']} simulated photos ({width}x{height}) of {meta['trigger']}-triggered test images "
                   f"to {out}{' with clean counterparts' if clean else ''}; labels in {out}/labels.csv")
