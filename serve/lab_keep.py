"""``--lab-keep DIR``: every photo the lab analyses, appended to DIR as an evaluation set.

The layout is the one ``bdserve eval --photos DIR`` reads (serve/evaluation/photos.py), so a
morning of phone photos becomes an evaluation set without edits:

    DIR/labels.csv        file,label,kind (what --photos reads) and, for people, the model,
                          the fit and the undefended / served-defense top-1 of that upload
    DIR/photos/<id>.<ext> the upload, byte for byte
    DIR/fitted/<id>.png   the image the model saw
    DIR/results.jsonl     the whole answer the page got, one JSON object a line

``label`` is a class name, or empty when the photo shows none of the model's classes;
``kind`` is ``triggered``, ``clean`` or empty (not said).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
from pathlib import Path

from PIL import Image

from bdserve.serve.evaluation.photos import LABELS_CSV

KINDS = ("triggered", "clean")
COLUMNS = ["file", "label", "kind", "model", "fit", "undefended", "served_defense", "defended", "time"]
PHOTOS, FITTED, RESULTS = "photos", "fitted", "results.jsonl"
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


class LabKeeper:
    """Appends uploads and answers to one folder; safe to call from several threads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.table = self.folder / LABELS_CSV
        self._lock = threading.Lock()
        if self.table.exists():
            with self.table.open(newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
                    raise ValueError(f"{self.table} exists without the columns file,label; "
                                     "give --lab-keep an empty folder or one the lab wrote")
                self.columns = list(reader.fieldnames)
                self.count = sum(1 for _ in reader)
        else:
            # A folder of class subfolders would stop being read as such once labels.csv appears.
            foreign = sorted(p.name for p in self.folder.iterdir() if p.name not in (PHOTOS, FITTED, RESULTS))
            if foreign:
                raise ValueError(f"--lab-keep {self.folder} holds {', '.join(foreign[:5])} but no {LABELS_CSV}; "
                                 "give it an empty folder or one the lab wrote")
            self.columns, self.count = COLUMNS, 0
        (self.folder / PHOTOS).mkdir(exist_ok=True)
        (self.folder / FITTED).mkdir(exist_ok=True)

    def append(self, blob: bytes, label: str, kind: str, answer: dict) -> str:
        """Store one upload and its answer; returns the photo's path relative to the folder."""
        with Image.open(io.BytesIO(blob)) as im:  # the header only: the server already decoded it
            ext = _EXT.get(im.format, ".img")
        by_defense = {r["defense"]: r["label"] for r in answer["results"]}
        with self._lock:
            self.count += 1
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            ident = f"{stamp}-{self.count:05d}"
            photo = f"{PHOTOS}/{ident}{ext}"
            (self.folder / photo).write_bytes(blob)
            fitted = answer["fitted_png"].split(",", 1)[1]
            (self.folder / FITTED / f"{ident}.png").write_bytes(base64.b64decode(fitted))
            row = {"file": photo, "label": label, "kind": kind, "model": answer["model"],
                   "fit": answer["fit"]["name"], "undefended": by_defense.get("none", ""),
                   "served_defense": answer["served_defense"],
                   "defended": by_defense.get(answer["served_defense"], ""), "time": stamp}
            new = not self.table.exists()
            with self.table.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
            record = {k: v for k, v in answer.items() if k not in ("fitted_png", "kept")}
            record.update(file=photo, fitted=f"{FITTED}/{ident}.png", label=label or None, kind=kind or None,
                          time=stamp)
            with (self.folder / RESULTS).open("a") as f:
                f.write(json.dumps(record) + "\n")
        return photo
