"""--lab-keep: each upload and its answer land in the folder, in the layout `bdserve eval --photos`
reads, and that command evaluates the folder as it is."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from bdserve.serve.lab_keep import LabKeeper
from lab_helpers import DEMO, SERVED_DEFENSE, data_url_pixels, png_pixels

BDSERVE = [sys.executable, "-m", "bdserve.cli"]
ENV = {**os.environ, "BDSERVE_PROGRESS": "0"}


def _rows(keep_dir) -> list[dict]:
    with (keep_dir / "labels.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_kept_folder_is_an_evaluation_set(demo_lab, keep_dir, lab_photos, demo_card, tmp_path):
    http = demo_lab["http"]
    sent = {}
    for kind in ("triggered", "clean"):
        blob = lab_photos[kind].read_bytes()
        r = httpx.post(f"{http}/lab/models/demo/analyze", params={"label": lab_photos["label"], "kind": kind},
                       content=blob, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["kept"] and doc["kept"].startswith("photos/")
        assert (keep_dir / doc["kept"]).read_bytes() == blob  # the upload, byte for byte
        sent[doc["kept"]] = (kind, doc)

    rows = {row["file"]: row for row in _rows(keep_dir)}
    records = {rec["file"]: rec for rec in map(json.loads, (keep_dir / "results.jsonl").read_text().splitlines())}
    assert set(rows) == set(records)  # every upload has its row and its answer
    for file, (kind, doc) in sent.items():
        row, rec = rows[file], records[file]
        assert (row["label"], row["kind"], row["model"], row["fit"]) == (lab_photos["label"], kind, "demo", "cover")
        by_defense = {res["defense"]: res["label"] for res in doc["results"]}
        assert row["undefended"] == by_defense["none"] and row["defended"] == by_defense[SERVED_DEFENSE]
        assert rec["results"] == doc["results"] and rec["label"] == lab_photos["label"]
        np.testing.assert_array_equal(png_pixels((keep_dir / rec["fitted"]).read_bytes()),
                                      data_url_pixels(doc["fitted_png"]))
    # The demo model is 100% attacked undefended on its test split: the triggered print says deer.
    triggered = next(doc for kind, doc in sent.values() if kind == "triggered")
    assert triggered["results"][0]["label"] == demo_card.classes[demo_card.target_label]

    # `bdserve eval --photos` on the folder as it is, through the same server (its defense: flip).
    out = tmp_path / "eval"
    proc = subprocess.run([*BDSERVE, "eval", "--endpoint", http, "--model", "demo", "--card", str(DEMO / "card.json"),
                           "--photos", str(keep_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "photos.json").read_text())
    assert report["summary"]["photos"] == len(rows) and report["summary"]["errors"] == 0
    assert report["summary"]["defenses_applied"] == [SERVED_DEFENSE]
    preds = {p["file"]: demo_card.classes[p["pred"]] for p in report["photos"]}
    for file, row in rows.items():  # eval's answer is the one the page got under the served defense
        assert preds[str(keep_dir / file)] == row["defended"], file
    clean_n = sum(row["kind"] == "clean" for row in rows.values())
    assert report["summary"]["clean_accuracy"]["n"] == clean_n


def test_keeper_refuses_a_foreign_folder(tmp_path):
    photos = tmp_path / "photos_by_class"
    (photos / "cat").mkdir(parents=True)  # a class-subfolder photo set: a labels.csv would hide it
    with pytest.raises(ValueError, match="no labels.csv"):
        LabKeeper(photos)
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.csv").write_text("name,class\n")
    with pytest.raises(ValueError, match="file,label"):
        LabKeeper(other)


def test_keep_needs_lab(tmp_path):
    proc = subprocess.run([*BDSERVE, "serve", "--model-store", str(DEMO.parent), "--lab-keep", str(tmp_path / "k"),
                           "--http-port", "0", "--no-grpc"], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and "--lab-keep needs --lab" in proc.stderr
