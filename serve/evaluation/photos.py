"""Camera photos through the service: each file uploaded as it is (any size, JPEG/PNG/WebP).

A photo folder is either ``DIR/<class name>/<photo>`` or ``DIR/labels.csv`` with columns
``file,label`` (a class name or index, or empty: "not one of the model's classes"; file
relative to DIR) and optionally ``kind`` (``triggered`` or ``clean``). Photos count toward
the physical ASR when their true label is not the target (an unknown class never is) and
they are not marked clean (a photo folder without ``kind`` is taken to be of triggered
prints); clean-marked photos of a known class give the clean-photo accuracy, and every
clean-marked photo the false-alarm rate of a detector.

Each answer says how the server fitted the photo (``fit``: ``print``, or ``cover`` with or
without a print-not-found fallback), and the contact sheet shows, beside each photo, the
model's input recomputed from the file with that fit (the same code the server runs).
"""

from __future__ import annotations

import asyncio
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdserve.progress import progress_bar
from bdserve.scoring import attack_hits
from bdserve.client import AsyncClient, PermanentError
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
                where = f"{table}, line {reader.line_num}"
                path = folder / (row["file"] or "").strip()
                if not (row["file"] or "").strip() or not path.is_file():
                    raise FileNotFoundError(f"{where}: names {row['file']!r}, which is not a file in {folder}")
                label = (row["label"] or "").strip()
                try:
                    index = _class_of(label, classes) if label else None  # empty: not one of the classes
                except ValueError as e:
                    raise ValueError(f"{where}: {e} (leave the label empty for a photo of no such class)") from None
                kind = (row.get("kind") or "").strip() or None
                if kind not in (None, "triggered", "clean"):
                    raise ValueError(f"{where}: kind {kind!r} is neither triggered nor clean")
                photos.append(Photo(path, index, kind))
            return photos
    photos = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = _class_of(sub.name, classes)
        photos += [Photo(f, label) for f in sorted(sub.iterdir()) if f.suffix.lower() in PHOTO_SUFFIXES]
    if not photos:
        raise ValueError(f"no photos under {folder}: expected {folder}/<class>/<photo> or {folder}/{LABELS_CSV}")
    return photos


async def classify(client: AsyncClient, photos: list[Photo], classes: list[str], *, route: str | None = None,
                   defense: str | None = None, concurrency: int = 4) -> list[dict]:
    """One request per photo; each result holds the prediction or the error. Retries and timing
    are the client's, the defense check the runner's (``ask``)."""
    from bdserve.serve.evaluation.runner import ask, canonical, class_ids

    want = canonical(defense)
    route = route if client.scheme == "http" else None  # the choice exists on http:// only
    gate = asyncio.Semaphore(max(1, concurrency))
    results: list[dict] = [{} for _ in photos]
    with progress_bar("photos", total=len(photos)) as advance:
        async def one(i: int, p: Photo) -> None:
            async with gate:
                blob = p.path.read_bytes()  # as it is: the server decodes, orients and fits
                res = {"file": str(p.path), "label": p.label, "kind": p.kind, "bytes": len(blob),
                       "pred": None, "suspected": None, "defense": None, "fit": None, "error": None, "retries": 0}

                def retried(n: int):
                    res["retries"] += n

                try:
                    a = await ask(lambda: client.predict(blob, route=route, defense=defense, top_k=0), want, retried)
                    pred = int(class_ids(a.labels, classes)[0])
                except PermanentError as e:
                    res["error"] = str(e)
                else:
                    res["pred"], res["latency_s"] = pred, a.seconds
                    res["suspected"] = None if a.suspected_trigger is None else bool(a.suspected_trigger[0])
                    res["defense"] = a.defense
                    res["fit"] = a.fit  # how the server fitted the photo (None: an older server)
                results[i] = res
                advance(1)

        await asyncio.gather(*(one(i, p) for i, p in enumerate(photos)))
    return results


def _rates(answered: list[dict], target: int | None) -> dict:
    """Physical ASR, accuracy on the attack photos, clean-photo accuracy, and with a detector its
    detection and false-alarm rates, over answered photos."""
    attack = [r for r in answered if r["kind"] != "clean" and (r["label"] is None or r["label"] != target)]
    known = [r for r in attack if r["label"] is not None]
    clean = [r for r in answered if r["kind"] == "clean"]
    clean_known = [r for r in clean if r["label"] is not None]
    out = {
        "physical_asr": rate(*attack_hits([r["pred"] for r in attack], target)) if target is not None else None,
        "attack_photos_accuracy": rate(sum(r["pred"] == r["label"] for r in known), len(known)),
        "clean_accuracy": rate(sum(r["pred"] == r["label"] for r in clean_known), len(clean_known)) if clean_known else None,
    }
    if any(r["suspected"] is not None for r in answered):
        out["detection_rate"] = rate(sum(bool(r["suspected"]) for r in attack if r["suspected"] is not None),
                                     sum(r["suspected"] is not None for r in attack))
        if clean:
            out["false_alarm_rate"] = rate(sum(bool(r["suspected"]) for r in clean if r["suspected"] is not None),
                                           sum(r["suspected"] is not None for r in clean))
    return out


def summarize(results: list[dict], classes: list[str], target: int | None) -> dict:
    answered = [r for r in results if r["pred"] is not None]
    for r in results:
        r["label_name"] = None if r["label"] is None else classes[r["label"]]
        r["pred_name"] = None if r["pred"] is None else classes[r["pred"]]
        r["hit_target"] = None if r["pred"] is None or target is None else r["pred"] == target
    out = {
        "photos": len(results), "answered": len(answered), "errors": len(results) - len(answered),
        "target": target, "target_name": None if target is None else classes[target],
        "unknown_class_photos": sum(r["label"] is None for r in results),
        **_rates(answered, target),
        "retries": sum(r["retries"] for r in results),
        "latency_ms": percentiles([r["latency_s"] for r in answered if "latency_s" in r]),
        "defenses_applied": sorted({r["defense"] for r in answered if r["defense"]}),
        "fits_applied": sorted({r["fit"] for r in answered if r.get("fit")}),
        "by_fit": {fit: {"photos": sum(r.get("fit") == fit for r in answered),
                         **_rates([r for r in answered if r.get("fit") == fit], target)}
                   for fit in sorted({r["fit"] for r in answered if r.get("fit")})},
        "error_reasons": {},
    }
    for r in results:
        if r["error"]:
            out["error_reasons"][r["error"]] = out["error_reasons"].get(r["error"], 0) + 1
    assert out["answered"] + out["errors"] == out["photos"]
    return out


def rates_lines(summary: dict) -> list[str]:
    """The rates of one run as Markdown bullets: ASR, accuracies, detection beside false alarms."""
    from bdserve.serve.evaluation.report import pct

    asr = summary.get("physical_asr") or {}
    lines = [f"- physical ASR (photos whose true label is not the target, unknown classes included): "
             f"{pct(summary.get('physical_asr'))} ({asr.get('k', 0)}/{asr.get('n', 0)})",
             f"- accuracy on those photos (known classes): {pct(summary.get('attack_photos_accuracy'))}"]
    if summary.get("clean_accuracy"):
        lines.append(f"- clean-photo accuracy: {pct(summary['clean_accuracy'])}")
    if "detection_rate" in summary:
        lines.append(f"- suspected-trigger flag: detection rate on attack photos {pct(summary['detection_rate'])}, "
                     f"false-alarm rate on clean photos {pct(summary.get('false_alarm_rate'))}")
    return lines


def markdown(summary: dict, results: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             f"{summary['photos']} photos ({summary.get('unknown_class_photos', 0)} of no known class), "
             f"{summary['errors']} errors, target {summary['target_name']}; defense applied: "
             f"{', '.join(summary['defenses_applied']) or '-'}; fit applied: {', '.join(summary.get('fits_applied', [])) or '-'}.",
             ""] + rates_lines(summary)
    if len(summary.get("by_fit", {})) > 1:
        for fit, part in summary["by_fit"].items():
            lines += ["", f"Photos fitted by {fit} ({part['photos']}):"] + rates_lines(part)
    lines += ["", "| photo | kind | true | predicted | hit target | fit |", "|---|---|---|---|---|---|"]
    for r in results:
        pred = r["pred_name"] if r["error"] is None else f"error: {r['error'][:60]}"
        lines.append(f"| {Path(r['file']).name} | {r['kind'] or '-'} | {r['label_name'] or '(none)'} | {pred} | "
                     f"{'yes' if r['hit_target'] else 'no' if r['hit_target'] is not None else '-'} | {r.get('fit') or '-'} |")
    return "\n".join(lines) + "\n"


def comparison(docs: list[dict]) -> str:
    """One table over several defenses (and the fits each applied): ASR and clean-photo accuracy
    with 95% Wilson intervals, detection beside false alarms where a detector answers."""
    from bdserve.serve.evaluation.report import pct

    lines = ["| defense | fit | photos | physical ASR % | clean-photo accuracy % | detection % | false alarms % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for d in docs:
        s = d["summary"]
        parts = [("all", {**s, "photos": s["answered"]})] + (list(s["by_fit"].items()) if len(s.get("by_fit", {})) > 1 else [])
        applied = ", ".join(s["defenses_applied"]) or (d["defense_asked"] or "-")
        for fit, part in parts:
            fit_name = (", ".join(s.get("fits_applied", [])) or "-") if fit == "all" else fit
            lines.append(f"| {applied} | {fit_name} | {part['photos']} | {pct(part.get('physical_asr'))} | "
                         f"{pct(part.get('clean_accuracy'))} | {pct(part.get('detection_rate'))} | {pct(part.get('false_alarm_rate'))} |")
    return "\n".join(lines) + "\n"


def model_view(path: Path, size: tuple[int, int], fit: str | None):
    """The model's input for a photo, recomputed with the fit the server reported (the same code as
    the server's CPU path), as a PIL image; None when it cannot be recomputed."""
    import re

    from PIL import Image

    from bdserve.serve.errors import InvalidInput
    from bdserve.serve.images import FitPolicy, decode_fitted

    m = re.match(r"^(cover|print) \(([\w-]+)", fit or "cover")
    if m is None:
        return None
    try:
        f = decode_fitted(Path(path).read_bytes(), size, policy=FitPolicy(m.group(1), m.group(2)))
    except (OSError, InvalidInput, ValueError):
        return None
    return Image.fromarray(f.image)


def contact_sheet(results: list[dict], path: Path, title: str = "", thumb: int = 128, cols: int = 8,
                  input_size: tuple[int, int] | None = None) -> Path:
    """Every photo as a thumbnail (EXIF orientation applied) with its true and predicted label
    (T/C: triggered or clean print); red caption: the target was predicted, green: correct,
    grey: no answer. With ``input_size``, each photo's model input (what the model saw, recomputed
    with the server's reported fit) sits beside it, enlarged with square pixels."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    font = ImageFont.load_default()
    cap = 30
    view = thumb if input_size else 0
    cell = thumb + view + (4 if view else 0)
    cols = max(1, min(cols, len(results)))
    rows = (len(results) + cols - 1) // cols
    head = 22 if title else 0
    sheet = Image.new("RGB", (cols * (cell + 6) + 6, head + rows * (thumb + cap + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 5), title + ("   (each photo, then the model's input)" if view else ""), fill="black", font=font)
    for i, r in enumerate(results):
        x = 6 + (i % cols) * (cell + 6)
        y = head + 6 + (i // cols) * (thumb + cap + 6)
        try:
            with Image.open(r["file"]) as im:
                im.draft("RGB", (thumb, thumb))
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except OSError:
            draw.rectangle([x, y, x + thumb, y + thumb], outline="grey")
        if view:
            seen = model_view(r["file"], input_size, r.get("fit"))
            if seen is not None:
                sheet.paste(seen.resize((view, view), Image.Resampling.NEAREST), (x + thumb + 4, y))
        if r["error"] is not None:
            color, text = "grey", "error"
        else:
            color = "red" if r.get("hit_target") else ("green" if r["pred"] == r["label"] else "black")
            text = f"-> {r['pred_name']}" + ("  (print)" if str(r.get("fit") or "").startswith("print") else "")
        tag = {"triggered": "T ", "clean": "C "}.get(r.get("kind") or "", "")
        chars = max(8, cell // 6)  # the default bitmap font is about 6 px a character
        draw.text((x, y + thumb + 2), f"{tag}{Path(r['file']).stem[:10]} {r.get('label_name') or '(none)'}"[:chars],
                  fill="black", font=font)
        draw.text((x, y + thumb + 15), text[:chars], fill=color, font=font)
    sheet.save(path)
    return path


def per_photo_json(results: list[dict]) -> list[dict]:
    return [{k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()} for r in results]
