"""``bdserve eval`` end to end: held-out sets -> live endpoint (one run per defense) -> report files."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from bdserve.card import ModelCard
from bdserve.client import AsyncClient, CircuitBreaker, PermanentError, RetryPolicy
from bdserve.serve.evaluation import plots, report
from bdserve.serve.evaluation.detection import roc_figure, served_detection
from bdserve.serve.evaluation.heldout import build_sets
from bdserve.serve.evaluation.runner import run_sets


@dataclass
class EvalConfig:
    endpoint: str
    model: str
    card: Path
    data: Path
    limit: int | None = None
    seed: int = 0
    defenses: list[str | None] = field(default_factory=lambda: [None])  # None: the server's own
    batch_size: int = 256
    concurrency: int = 4
    timeout_s: float = 120.0
    retry: RetryPolicy = RetryPolicy()
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (e.g. a token)
    detect: bool = False  # measure the server's trigger detectors (AUROC, TPR at FPR, FAR) on the first run


async def evaluate(cfg: EvalConfig) -> dict:
    card = ModelCard.load(cfg.card)
    clean, trig = build_sets(card, cfg.data, cfg.limit, cfg.seed)
    sets = [clean] + ([trig] if trig is not None else [])
    target = card.target_label
    async with AsyncClient(cfg.endpoint, cfg.model, concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
                           retries=cfg.retry, headers=cfg.headers) as client:
        if any(d is not None for d in cfg.defenses) and not client.can_choose_defense:
            raise ValueError(f"{client.scheme} endpoints apply their own defense; drop --defenses")
        info = await client.wait_ready()  # retried (--retries), not the breaker: the server may still be starting
        # One breaker for the whole evaluation: a server dying mid-run stops it in seconds.
        client.breaker = CircuitBreaker()
        if cfg.detect and not info.detect:
            raise ValueError(f"--detect: model {cfg.model} at {cfg.endpoint} sends no trigger scores; serve it with "
                             "`bdserve serve --detect consistency,strip,scaleup` (after `bdserve calibrate`)")
        if cfg.detect and trig is None:
            raise ValueError("--detect needs triggered images: the card has no attack (trigger and target)")
        for d in cfg.defenses:  # one uncounted probe each: a non-lab server refuses at once, not per batch
            if d is not None:
                try:
                    await client.infer(clean.images[:1], defense=d, top_k=0)
                except PermanentError as e:
                    raise ValueError(f"the server refused defense {d!r}: {e}") from None
        rows, partial, detection = [], None, None
        for d in cfg.defenses:
            run = await run_sets(client, sets, card.classes, defense=d, batch_size=cfg.batch_size,
                                 concurrency=cfg.concurrency, description=f"eval {d or 'server defense'}")
            rows.append(report.defense_row(run, len(card.classes), target))
            if cfg.detect and detection is None:  # the detectors do not depend on the defense asked
                detection = served_detection(run, attack_name(card))
            if run.interrupted or run.stopped:  # report what was measured, say why the rest is missing
                partial = "interrupted (SIGINT)" if run.interrupted else f"stopped: {run.stopped}"
                break
        detect = info.detect
    return {
        "endpoint": cfg.endpoint, "transport": client.scheme, "model": cfg.model, "card": str(cfg.card),
        "data": str(cfg.data), "limit": cfg.limit, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "concurrency": cfg.concurrency, "target": target,
        "target_name": None if target is None else card.classes[target],
        "trigger": None if card.attack is None else (card.attack.get("trigger") or {}).get("name"),
        "server_detects": detect, "clean_images": len(clean), "triggered_images": 0 if trig is None else len(trig),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows, "table1_row": report.table1_row(cfg.model, rows),
        **({"partial": partial} if partial else {}),
        **({} if detection is None else {"detection": {"rows": detection[0]}, "_detection_curves": detection[1]}),
    }


def attack_name(card: ModelCard) -> str:
    a = card.attack or {}
    return f"{a.get('kind', 'attack')}{'+' if a.get('enhanced') else ''}"


def run(cfg: EvalConfig) -> dict:
    return asyncio.run(evaluate(cfg))


def write_outputs(rep: dict, out: Path, classes: list[str]) -> dict[str, Path]:
    curves = rep.pop("_detection_curves", None)  # raw scores: plotted, not stored in report.json
    paths = report.write(rep, out)
    if curves:
        paths["roc_png"] = roc_figure([(f"{rep['model']}: {rep['detection']['rows'][0]['attack']}", curves)],
                                      out / "roc.png", f"trigger detectors through {rep['transport']}")
    title = f"{rep['model']} through {rep['transport']}"
    paths["defenses_png"] = plots.defenses_chart(rep["rows"], title, out / "defenses.png")
    paths["confusion_png"] = plots.confusion_chart(rep["rows"], classes, f"{title}: clean confusion", out / "confusion.png")
    return paths
