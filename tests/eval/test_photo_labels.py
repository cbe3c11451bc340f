"""labels.csv: an empty label is a photo of no known class (it counts toward the ASR, not toward
clean accuracy); a bad row is named by its line; rates come per fit and with false alarms."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bdserve.serve.evaluation import photos as ph

CLASSES = ["airplane", "cat", "deer"]
TARGET = 2


def _folder(tmp_path, rows: list[str]):
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "labels.csv").write_text("file,label,kind\n" + "\n".join(rows) + "\n")
    return tmp_path


def _result(photo: ph.Photo, pred: int, fit: str = "print (area)", suspected=None) -> dict:
    return {"file": str(photo.path), "label": photo.label, "kind": photo.kind, "pred": pred, "suspected": suspected,
            "defense": "none", "fit": fit, "error": None, "retries": 0, "latency_s": 0.01}


def test_empty_label_is_an_unknown_class(tmp_path):
    folder = _folder(tmp_path, ["p0.png,,triggered", "p1.png,,triggered", "p2.png,cat,triggered",
                                "p3.png,cat,clean", "p4.png,,clean", "p5.png,airplane,clean"])
    photos = ph.collect(folder, CLASSES)
    assert [p.label for p in photos] == [None, None, 1, 1, None, 0]
    # Unknown-class triggered photos hit or miss the target like any other; clean ones of no class
    # have no right answer, so they stay out of clean accuracy.
    preds = [TARGET, 0, TARGET, 1, 1, 1]
    results = [_result(p, y) for p, y in zip(photos, preds)]
    s = ph.summarize(results, CLASSES, TARGET)
    assert s["physical_asr"]["k"] == 2 and s["physical_asr"]["n"] == 3
    assert s["attack_photos_accuracy"]["n"] == 1  # only the known-class attack photo has a true label
    assert s["clean_accuracy"]["k"] == 1 and s["clean_accuracy"]["n"] == 2
    assert s["unknown_class_photos"] == 3
    lo, hi = s["physical_asr"]["ci95"]
    assert 0 < lo < 2 / 3 < hi < 1  # a Wilson interval around 2/3
    md = ph.markdown(s, results, "t")
    assert "(none)" in md and "3 of no known class" in md


def test_bad_rows_name_their_line(tmp_path):
    folder = _folder(tmp_path, ["p0.png,cat,triggered", "p1.png,dog,triggered"])
    with pytest.raises(ValueError, match=r"labels.csv, line 3: unknown class 'dog'"):
        ph.collect(folder, CLASSES)
    folder = _folder(tmp_path, ["p0.png,cat,triggered", "p1.png,cat,triggered", "missing.png,cat,"])
    with pytest.raises(FileNotFoundError, match="line 4: names 'missing.png'"):
        ph.collect(folder, CLASSES)
    folder = _folder(tmp_path, ["p0.png,cat,printed"])
    with pytest.raises(ValueError, match="line 2: kind 'printed'"):
        ph.collect(folder, CLASSES)


def test_rates_per_fit_and_false_alarms_beside_detections(tmp_path):
    folder = _folder(tmp_path, ["p0.png,cat,triggered", "p1.png,cat,triggered", "p2.png,airplane,triggered",
                                "p3.png,cat,clean", "p4.png,cat,clean", "p5.png,airplane,clean"])
    photos = ph.collect(folder, CLASSES)
    fits = ["print (area)", "print (area)", "cover (area; no print found)", "print (area)", "print (area)", "print (area)"]
    flags = [True, False, True, True, False, False]
    preds = [TARGET, 1, TARGET, 1, 1, 0]
    results = [_result(p, y, f, x) for p, y, f, x in zip(photos, preds, fits, flags)]
    s = ph.summarize(results, CLASSES, TARGET)
    assert s["detection_rate"]["k"] == 2 and s["false_alarm_rate"]["k"] == 1 and s["false_alarm_rate"]["n"] == 3
    assert set(s["by_fit"]) == {"print (area)", "cover (area; no print found)"}
    assert s["by_fit"]["print (area)"]["physical_asr"]["n"] == 2
    assert s["by_fit"]["cover (area; no print found)"]["physical_asr"]["k"] == 1
    md = ph.markdown(s, results, "t")
    assert "detection rate on attack photos 66.7" in md and "false-alarm rate on clean photos 33.3" in md
    table = ph.comparison([{"defense_asked": "none", "summary": s}])
    assert "| none | cover (area; no print found), print (area) | 6 |" in table
    assert "| none | print (area) | 5 |" in table
