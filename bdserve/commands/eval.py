"""``bdserve eval``: clean accuracy and attack success rate through a live endpoint, or
camera photos (``--photos``) uploaded as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from bdserve.cli_errors import CommandError


def _defenses(spec: Optional[str]) -> list:
    if not spec:
        return [None]
    return [d.strip() for d in spec.split(",") if d.strip()]


def request_headers(header: list[str] | None, token_file: Path | None) -> dict[str, str]:
    """``--header 'Name: value'`` (repeatable) and ``--token-file`` (TorchServe's key_file.json:
    its inference key becomes ``Authorization: Bearer KEY``, as bdserve.client sends it)."""
    from bdserve.client import auth_headers

    headers = {}
    for h in header or []:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise CommandError(f"--header {h!r} must look like 'Name: value', e.g. 'Authorization: Bearer KEY'")
        headers[name.strip()] = value.strip()
    try:
        return auth_headers(headers, token_file=token_file)
    except ValueError as e:
        raise CommandError(str(e)) from None


def explain(endpoint: str, model: str, e: Exception) -> CommandError:
    """A failure before any image was scored, as one line that says what to do."""
    from bdserve.client import RetriesExhausted

    msg = " ".join(str(e).split())
    if isinstance(e, RetriesExhausted):
        return CommandError(f"no answer from {endpoint} ({msg}): is the server running there? "
                            "Start it (bdserve serve) or wait longer with --retries", code=1)
    if "InvalidKeyException" in msg or "Token Authorization" in msg or "HTTP 401" in msg or "UNAUTHENTICATED" in msg:
        return CommandError(f"{endpoint} wants a token: pass --token-file PATH/key_file.json (TorchServe writes it "
                            "where it starts) or --header 'Authorization: Bearer KEY'", code=1)
    if "HTTP 404" in msg or "NOT_FOUND" in msg:
        return CommandError(f"{endpoint} has no model {model!r} ({msg}): --model takes a name the server "
                            "printed at start", code=1)
    return CommandError(f"{endpoint} refused the request: {msg}", code=1)


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
        header: Optional[List[str]] = typer.Option(None, "--header", metavar="'NAME: VALUE'", help="'Name: value' sent with every request (HTTP header, gRPC metadata); repeatable, e.g. 'Authorization: Bearer KEY'."),
        token_file: Optional[Path] = typer.Option(None, "--token-file", help="TorchServe's key_file.json (token authorization on): sends its inference key as a Bearer token."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write report.json, report.md and PNG figures here."),
        detect: bool = typer.Option(False, "--detect", help="Also measure the server's trigger detectors (it runs --detect): AUROC, TPR at 1%/5% FPR, false-alarm rate at the calibrated threshold, ROC curves."),
    ) -> None:
        """Evaluate a served model from outside, as traffic arrives: accuracy, ASR, errors, latency."""
        from bdserve.card import ModelCard
        from bdserve.client import PermanentError, RetryPolicy
        from bdserve.settings import data_dir

        policy = RetryPolicy(attempts=max(1, retries))
        headers = request_headers(header, token_file)
        mc = ModelCard.load(card)
        try:
            if photos is not None:
                if detect:
                    raise ValueError("--detect measures the test split; --photos reports the served flag per photo")
                _photos(endpoint, model, mc, photos, photo_route, _defenses(defenses), concurrency, policy, timeout_s, out, headers)
                return
            from bdserve.serve.evaluation.evaluate import EvalConfig, run, write_outputs

            cfg = EvalConfig(endpoint, model, card, data or data_dir(), limit, seed, _defenses(defenses),
                             batch_size, concurrency, timeout_s, policy, detect=detect, headers=headers)
            rep = run(cfg)
        except PermanentError as e:  # the server could not be reached, or refused before any image
            raise explain(endpoint, model, e) from e
        from bdserve.serve.evaluation.report import markdown

        typer.echo(markdown(rep))
        for line in report_warnings(rep, mc.classes):
            typer.echo(line, err=True)
        if out is not None:
            paths = write_outputs(rep, out, mc.classes)
            typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
        if any(r["errors"] for r in rep["rows"]):
            raise typer.Exit(1)  # numbers are still reported; the exit code says some images failed


def report_warnings(rep: dict, classes: list[str]) -> list[str]:
    """A collapsed model, once per defense row where it shows."""
    from bdserve.sanity import collapse_warning

    lines = []
    for r in rep["rows"]:
        clean = r.get("clean") or {}
        cm = clean.get("confusion")
        dominant = None
        if cm:
            per_class = [sum(col) for col in zip(*cm)]
            total = sum(per_class)
            if total:
                top = max(range(len(per_class)), key=per_class.__getitem__)
                dominant = (classes[top], per_class[top] / total)
        text = collapse_warning((clean.get("accuracy") or {}).get("rate"), len(classes), dominant)
        if text:
            lines.append(text.replace("warning:", f"warning ({r['defense']}):", 1))
    return lines


def _photos(endpoint, model, card, folder, route, defenses, concurrency, policy, timeout_s, out, headers) -> None:
    """Every photo through the server once per defense (several only on a --lab server): ASR and
    clean-photo accuracy with Wilson intervals, per defense and per fit the server applied."""
    import asyncio

    from bdserve.client import AsyncClient
    from bdserve.serve.evaluation import photos as ph

    if route not in ("predictions", "oip"):
        raise ValueError("--photo-route is predictions or oip")
    items = ph.collect(folder, card.classes)

    async def go():
        async with AsyncClient(endpoint, model, concurrency=concurrency, timeout_s=timeout_s, retries=policy,
                               headers=headers) as client:
            await client.wait_ready()
            runs = [await ph.classify(client, items, card.classes, route=route, defense=d, concurrency=concurrency)
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
