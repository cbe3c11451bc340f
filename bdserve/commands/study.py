"""``bdserve study location|appearance``: Section 3's trigger studies through a live endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Trigger studies through the service (Section 3: Figs. 4 and 5).", no_args_is_help=True,
                        rich_markup_mode=None)
    app.add_typer(group, name="study")

    def go(kind: str, endpoint, model, card, data, limit, seed, defense, batch_size, concurrency, out, **kw):
        import asyncio

        from bdserve.card import ModelCard
        from bdserve.client import AsyncClient, PermanentError
        from bdserve.commands.eval import explain
        from bdserve.serve.evaluation import plots, studies
        from bdserve.settings import data_dir

        mc = ModelCard.load(card)
        cfg = studies.StudyConfig(limit=limit, seed=seed, defense=None if defense == "server" else defense,
                                  batch_size=batch_size, concurrency=concurrency)

        async def run():
            async with AsyncClient(endpoint, model, concurrency=concurrency) as client:
                await client.wait_ready()
                return await getattr(studies, kind)(client, mc, data or data_dir(), cfg, **kw)

        try:
            res = asyncio.run(run())
        except PermanentError as e:  # the server could not be reached, or refused before any image
            raise explain(endpoint, model, e) from e
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{kind}.json").write_text(json.dumps(res, indent=2) + "\n")
        title = f"{model}: ASR by trigger {kind} (defense {defense})"
        if kind == "location":
            import numpy as np

            plots.location_heatmap(np.array(res["asr_grid"]), res["rows"], res["cols"],
                                   tuple(res["trained_bottom_right"]), title, out / "location.png")
            best = max(res["cells"], key=lambda c: c["rate"] or 0)
            trained = next(c for c in res["cells"] if [c["bottom"], c["right"]] == res["trained_bottom_right"])
            typer.echo(f"{res['positions']} positions x {res['images_per_position']} images in {res['seconds']:.1f} s; "
                       f"ASR at the training location {100 * (trained['rate'] or 0):.1f}%, "
                       f"highest {100 * (best['rate'] or 0):.1f}% at ({best['bottom']}, {best['right']})")
        else:
            plots.appearance_curve(res["values"], res["points"], res["trained_value"], title, out / "appearance.png")
            typer.echo("value  ASR%")
            for p in res["points"]:
                asr = "-" if p["rate"] is None else f"{100 * p['rate']:.1f}"
                typer.echo(f"{p['value']:5d}  {asr}")
        typer.echo(f"wrote {out}/{kind}.json and {kind}.png")
        if res["errors"]:
            typer.echo(f"{res['errors']} images got no answer (see {kind}.json)", err=True)
            raise typer.Exit(1)

    opts = dict(
        endpoint=typer.Option(..., "--endpoint", help="http://HOST:PORT or grpc://HOST:PORT."),
        model=typer.Option(..., "--model", help="Model name on the server."),
        card=typer.Option(..., "--card", help="The infected model's card.json."),
        data=typer.Option(None, "--data", help="Dataset with a test split."),
        limit=typer.Option(200, "--limit", help="Class-balanced test subset (before dropping target-class images)."),
        seed=typer.Option(0, "--seed"),
        defense=typer.Option("none", "--defense", help="Defense to ask a --lab server for; 'server' keeps the server's own."),
        batch_size=typer.Option(256, "--batch-size"),
        concurrency=typer.Option(4, "--concurrency"),
        out=typer.Option(Path("study"), "--out", help="Folder for the JSON and PNG (default ./study, ignored by git)."),
    )

    @group.command("location")
    def location(endpoint: str = opts["endpoint"], model: str = opts["model"], card: Path = opts["card"],
                 data: Optional[Path] = opts["data"], limit: Optional[int] = opts["limit"], seed: int = opts["seed"],
                 defense: str = opts["defense"], batch_size: int = opts["batch_size"],
                 concurrency: int = opts["concurrency"], out: Path = opts["out"],
                 stride: int = typer.Option(3, "--stride", help="Pixels between tried positions.")) -> None:
        """Fig. 4: a heatmap of ASR over trigger positions."""
        go("location", endpoint, model, card, data, limit, seed, defense, batch_size, concurrency, out, stride=stride)

    @group.command("appearance")
    def appearance(endpoint: str = opts["endpoint"], model: str = opts["model"], card: Path = opts["card"],
                   data: Optional[Path] = opts["data"], limit: Optional[int] = opts["limit"], seed: int = opts["seed"],
                   defense: str = opts["defense"], batch_size: int = opts["batch_size"],
                   concurrency: int = opts["concurrency"], out: Path = opts["out"],
                   step: int = typer.Option(15, "--step", help="Step between tried pixel values.")) -> None:
        """Fig. 5: ASR against the trigger's non-zero pixel value."""
        go("appearance", endpoint, model, card, data, limit, seed, defense, batch_size, concurrency, out, step=step)
