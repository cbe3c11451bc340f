"""Camera photos through the service: each file uploaded as it is (any size, JPEG/PNG/WebP).

A photo folder is either ``DIR/<class name>/<photo>`` or ``DIR/labels.csv`` with columns
``file,label`` (a class name or index; file relative to DIR) and optionally ``kind``
(``triggered`` or ``clean``). Photos count toward the physical ASR when their true label
is not the target and they are not marked clean (a photo folder without ``kind`` is taken
to be of triggered prints); clean-marked photos give a clean accuracy.
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdserve.progress import progress_bar
from bdserve.scoring import attack_hits
from bdserve.serve.evaluation.clients import Client
from bdserve.serve.evaluation.retry import PermanentError, RetryPolicy
from bdserve.serve.evaluation.stats import percentiles, rate

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
LABELS_CSV = "labels.csv"


@dataclass
class Photo:
    path: Path
    label: int | None
    kind: str | None = None  # "triggered", "clean" or None (unspecified: treated as triggered)


def _class_of(value: str, classes: list[str]) -> int:
    from bdserve.training.data import class_index

    return class_index(classes, value.strip())


def collect(folder: Path, classes: list[str]) -> list[Photo]:
    folder = Path(folder)
    table = folder / LABELS_CSV
    if table.exists():
        with table.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{table} needs the columns file,label (got {reader.fieldnames})")
            photos = []
            for row in reader:
                path = folder / row["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"{table} names {row['file']}, which is not in {folder}")
                kind = (row.get("kind") or "").strip() or None
                photos.append(Photo(path, _class_of(row["label"], classes), kind))
            return photos
    photos = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = _class_of(sub.name, classes)
        photos += [Photo(f, label) for f in sorted(sub.iterdir()) if f.suffix.lower() in PHOTO_SUFFIXES]
    if not photos:
        raise ValueError(f"no photos under {folder}: expected {folder}/<class>/<photo> or {folder}/{LABELS_CSV}")
    return photos


async def classify(client: Client, photos: list[Photo], *, route: str | None = None, defense: str | None = None,
                   concurrency: int = 4, policy: RetryPolicy = RetryPolicy()) -> list[dict]:
    """One request per photo; each result holds the prediction or the error. Retries, timing and
    the defense check are the runner's (``ask``)."""
    from bdserve.serve.evaluation.runner import ask, canonical

    want = canonical(defense)
    gate = asyncio.Semaphore(max(1, concurrency))
    results: list[dict] = [{} for _ in photos]
    with progress_bar("photos", total=len(photos)) as advance:
        async def one(i: int, p: Photo) -> None:
            async with gate:
                blob = p.path.read_bytes()  # as it is: the server decodes, orients and fits
                res = {"file": str(p.path), "label": p.label, "kind": p.kind, "bytes": len(blob),
                       "pred": None, "suspected": None, "defense": None, "error": None, "retries": 0}

                def retried(_e):
                    res["retries"] += 1

                try:
                    a, res["latency_s"] = await ask(lambda: client.infer_photos([blob], route, defense),
                                                    policy, want, retried)
                except PermanentError as e:
                    res["error"] = str(e)
                else:
                    res["pred"] = int(a.labels[0])
                    res["suspected"] = None if a.suspected is None else bool(a.suspected[0])
                    res["defense"] = a.defense
                results[i] = res
                advance(1)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(photos)))
    return results


def summarize(results: list[dict], classes: list[str], target: int | None) -> dict:
    answered = [r for r in results if r["pred"] is not None]
    for r in results:
        r["label_name"] = None if r["label"] is None else classes[r["label"]]
        r["pred_name"] = None if r["pred"] is None else classes[r["pred"]]
        r["hit_target"] = None if r["pred"] is None or target is None else r["pred"] == target
    attack = [r for r in answered if r["kind"] != "clean" and r["label"] is not None and r["label"] != target]
    clean = [r for r in answered if r["kind"] == "clean" and r["label"] is not None]
    out = {
        "photos": len(results), "answered": len(answered), "errors": len(results) - len(answered),
        "target": target, "target_name": None if target is None else classes[target],
        "physical_asr": rate(*attack_hits([r["pred"] for r in attack], target)) if target is not None else None,
        "attack_photos_accuracy": rate(sum(r["pred"] == r["label"] for r in attack), len(attack)),
        "clean_accuracy": rate(sum(r["pred"] == r["label"] for r in clean), len(clean)) if clean else None,
        "retries": sum(r["retries"] for r in results),
        "latency_ms": percentiles([r["latency_s"] for r in answered if "latency_s" in r]),
        "defenses_applied": sorted({r["defense"] for r in answered if r["defense"]}),
        "error_reasons": {},
    }
    flagged = [r for r in answered if r["suspected"] is not None]
    if flagged:
        out["detection_rate"] = rate(sum(r["suspected"] for r in attack if r["suspected"] is not None),
                                     sum(r["suspected"] is not None for r in attack))
        if clean:
            out["false_alarm_rate"] = rate(sum(bool(r["suspected"]) for r in clean),
                                           sum(r["suspected"] is not None for r in clean))
    for r in results:
        if r["error"]:
            out["error_reasons"][r["error"]] = out["error_reasons"].get(r["error"], 0) + 1
    assert out["answered"] + out["errors"] == out["photos"]
    return out


def markdown(summary: dict, results: list[dict], title: str) -> str:
    from bdserve.serve.evaluation.report import pct

    lines = [f"# {title}", "",
             f"{summary['photos']} photos, {summary['errors']} errors, target {summary['target_name']}; "
             f"defense applied: {', '.join(summary['defenses_applied']) or '-'}.", "",
             f"- physical ASR (photos whose true label is not the target): {pct(summary['physical_asr'])} "
             f"({(summary['physical_asr'] or {}).get('k', 0)}/{(summary['physical_asr'] or {}).get('n', 0)})",
             f"- accuracy on those photos: {pct(summary['attack_photos_accuracy'])}"]
    if summary.get("clean_accuracy"):
        lines.append(f"- clean photos' accuracy: {pct(summary['clean_accuracy'])}")
    if "detection_rate" in summary:
        lines.append(f"- suspected-trigger flag on attack photos: {pct(summary['detection_rate'])}")
    lines += ["", "| photo | kind | true | predicted | hit target |", "|---|---|---|---|---|"]
    for r in results:
        pred = r["pred_name"] if r["error"] is None else f"error: {r['error'][:60]}"
        lines.append(f"| {Path(r['file']).name} | {r['kind'] or '-'} | {r['label_name']} | {pred} | "
                     f"{'yes' if r['hit_target'] else 'no' if r['hit_target'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


def contact_sheet(results: list[dict], path: Path, title: str = "", thumb: int = 128, cols: int = 8) -> Path:
    """Every photo as a thumbnail (EXIF orientation applied) with its true and predicted label
    (T/C: triggered or clean print); red caption: the target was predicted, green: correct,
    grey: no answer."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    font = ImageFont.load_default()
    cap = 30
    cols = max(1, min(cols, len(results)))
    rows = (len(results) + cols - 1) // cols
    head = 22 if title else 0
    sheet = Image.new("RGB", (cols * (thumb + 6) + 6, head + rows * (thumb + cap + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 5), title, fill="black", font=font)
    for i, r in enumerate(results):
        x = 6 + (i % cols) * (thumb + 6)
        y = head + 6 + (i // cols) * (thumb + cap + 6)
        try:
            with Image.open(r["file"]) as im:
                im.draft("RGB", (thumb, thumb))
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except OSError:
            draw.rectangle([x, y, x + thumb, y + thumb], outline="grey")
        if r["error"] is not None:
            color, text = "grey", "error"
        else:
            color = "red" if r.get("hit_target") else ("green" if r["pred"] == r["label"] else "black")
            text = f"-> {r['pred_name']}"
        tag = {"triggered": "T ", "clean": "C "}.get(r.get("kind") or "", "")
        chars = max(8, thumb // 6)  # the default bitmap font is about 6 px a character
        draw.text((x, y + thumb + 2), f"{tag}{Path(r['file']).stem[:4]} {r.get('label_name') or '?'}"[:chars],
                  fill="black", font=font)
        draw.text((x, y + thumb + 15), text[:chars], fill=color, font=font)
    sheet.save(path)
    return path


def per_photo_json(results: list[dict]) -> list[dict]:
    return [{k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()} for r in results]
