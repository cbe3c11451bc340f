"""``bdserve eval``: clean accuracy and attack success rate through a live endpoint, or
camera photos (``--photos``) uploaded as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _defenses(spec: Optional[str]) -> list:
    if not spec:
        return [None]
    return [d.strip() for d in spec.split(",") if d.strip()]


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        endpoint: str = typer.Option(..., "--endpoint", help="http://HOST:PORT (OIP v2), grpc://HOST:PORT or torchserve+http://HOST:PORT."),
        model: str = typer.Option(..., "--model", help="Model name on the server."),
        card: Path = typer.Option(..., "--card", help="The model's card.json (classes, trigger, target)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Dataset with a test split (default: $BDSERVE_DATA or ../shared/data/cifar10-jpg)."),
        photos: Optional[Path] = typer.Option(None, "--photos", help="Evaluate the photos in DIR (class subfolders or labels.csv) instead of the test split."),
        photo_route: str = typer.Option("predictions", "--photo-route", help="http:// photos go by /predictions or by an OIP BYTES input (oip)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Class-balanced subset of N test images (seeded)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
        defenses: Optional[str] = typer.Option(None, "--defenses", help="Comma-separated defenses to compare through a --lab server, e.g. none,flip,shrinkpad:4."),
        batch_size: int = typer.Option(256, "--batch-size", help="Images per request (TorchServe: always 1)."),
        concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight."),
        retries: int = typer.Option(8, "--retries", help="Attempts per request for transient failures (connection, 503, UNAVAILABLE)."),
        timeout_s: float = typer.Option(120.0, "--timeout", help="Seconds per request."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write report.json, report.md and PNG figures here."),
        detect: bool = typer.Option(False, "--detect", help="Also measure the server's trigger detectors (it runs --detect): AUROC, TPR at 1%/5% FPR, false-alarm rate at the calibrated threshold, ROC curves."),
    ) -> None:
        """Evaluate a served model from outside, as traffic arrives: accuracy, ASR, errors, latency."""
        from bdserve.card import ModelCard
        from bdserve.serve.evaluation.retry import RetryPolicy
        from bdserve.settings import data_dir

        policy = RetryPolicy(attempts=max(1, retries))
        mc = ModelCard.load(card)
        try:
            if photos is not None:
                if detect:
                    raise ValueError("--detect measures the test split; --photos reports the served flag per photo")
                _photos(endpoint, model, mc, photos, photo_route, _defenses(defenses), concurrency, policy, timeout_s, out)
                return
            from bdserve.serve.evaluation.evaluate import EvalConfig, run, write_outputs

            cfg = EvalConfig(endpoint, model, card, data or data_dir(), limit, seed, _defenses(defenses),
                             batch_size, concurrency, timeout_s, policy, detect=detect)
            rep = run(cfg)
        except (ValueError, FileNotFoundError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        from bdserve.serve.evaluation.report import markdown

        typer.echo(markdown(rep))
        if out is not None:
            paths = write_outputs(rep, out, mc.classes)
            typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
        if any(r["errors"] for r in rep["rows"]):
            raise typer.Exit(1)  # numbers are still reported; the exit code says some images failed


def _photos(endpoint, model, card, folder, route, defenses, concurrency, policy, timeout_s, out) -> None:
    """Every photo through the server once per defense (several only on a --lab server): ASR and
    clean-photo accuracy with Wilson intervals, per defense and per fit the server applied."""
    import asyncio

    from bdserve.serve.evaluation import photos as ph
    from bdserve.serve.evaluation.clients import open_client
    from bdserve.serve.evaluation.retry import with_retries

    if route not in ("predictions", "oip"):
        raise ValueError("--photo-route is predictions or oip")
    items = ph.collect(folder, card.classes)

    async def go():
        async with open_client(endpoint, model, card.classes, concurrency=concurrency, timeout_s=timeout_s) as client:
            await with_retries(client.connect, policy)
            runs = [await ph.classify(client, items, route=route, defense=d, concurrency=concurrency, policy=policy)
                    for d in defenses]
            return client.scheme, runs

    scheme, runs = asyncio.run(go())
    via = f"{scheme}{' ' + route if scheme == 'http' else ''}"
    docs, texts = [], []
    for defense, results in zip(defenses, runs):
        summary = ph.summarize(results, card.classes, card.target_label)
        title = f"{model} on {len(items)} photos from {folder} via {via}, defense {defense or 'of the server'}"
        docs.append({"defense_asked": defense, "summary": summary, "photos": ph.per_photo_json(results), "title": title})
        texts.append(ph.markdown(summary, results, title))
    text = (ph.comparison(docs) + "\n" if len(docs) > 1 else "") + "\n".join(texts)
    typer.echo(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        first = docs[0]
        (out / "photos.json").write_text(json.dumps({
            "endpoint": endpoint, "model": model, "folder": str(folder), "route": route,
            "defense_asked": first["defense_asked"], "summary": first["summary"], "photos": first["photos"],
            "by_defense": [{k: d[k] for k in ("defense_asked", "summary", "photos")} for d in docs],
        }, indent=2) + "\n")
        (out / "photos.md").write_text(text)
        size = tuple(card.input_shape[1:])
        sheets = []
        for i, (d, results) in enumerate(zip(docs, runs)):
            name = "contact_sheet.png" if i == 0 else f"contact_sheet_{(d['defense_asked'] or 'server').replace(':', '-')}.png"
            ph.contact_sheet(results, out / name, d["title"], input_size=size)
            sheets.append(name)
        typer.echo(f"wrote {out}/photos.json, photos.md, {', '.join(sheets)}")
    if any(d["summary"]["errors"] for d in docs):
        raise typer.Exit(1)
