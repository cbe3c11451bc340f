"""Photos uploaded as they are (sizes, formats, EXIF rotation) give the same predictions through
/predictions and through an OIP BYTES input; simulated photographs are readable by --photos."""

from __future__ import annotations

import io
import json
import subprocess

import numpy as np
import torch
from PIL import Image

from bdserve.serve.evaluation.heldout import stamp_uint8
from bdserve.serve.evaluation.physical import Camera, render
from bdserve.training.data import load_split
from eval_helpers import BDSERVE, ENV, run_eval

EXIF_ORIENTATION = 0x0112
# Pillow's exif_transpose undoes orientation 6 with ROTATE_270 and 8 with ROTATE_90, so the
# stored pixels are the upright picture turned the other way.
STORE_ROTATED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _save(im: Image.Image, path, fmt: str, orientation: int | None = None) -> None:
    kw = {"quality": 92} if fmt in ("JPEG", "WEBP") else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        im = im.transpose(STORE_ROTATED[orientation])
        kw["exif"] = exif.tobytes()
    im.save(path, format=fmt, **kw)


def make_photos(root, card, cifar_dir) -> dict[str, str]:
    """Class-subfolder photos from test images: clean and triggered, several sizes and formats,
    EXIF-rotated ones among them, each rotated one beside its upright twin. Returns rotated -> twin."""
    test = load_split(cifar_dir, "test", image_size=32).subset(40, 1)
    images = torch.cat([test.images[:8], stamp_uint8(test.images[8:16], card.trigger())])
    labels = torch.cat([test.labels[:8], test.labels[8:16]])
    plans = [((32, 32), "PNG", None), ((150, 200), "JPEG", None), ((480, 640), "JPEG", 6), ((300, 300), "WEBP", None),
             ((768, 1024), "PNG", 8), ((240, 320), "JPEG", 3), ((64, 64), "PNG", 6), ((200, 150), "WEBP", None)]
    twins = {}
    for i, (img, label) in enumerate(zip(images, labels)):
        (h, w), fmt, orient = plans[i % len(plans)]
        folder = root / card.classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        up = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.Resampling.NEAREST)
        ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
        name = f"p{i:02d}_{w}x{h}{'_rot' + str(orient) if orient else ''}.{ext}"
        _save(up, folder / name, fmt, orient)
        if orient is not None and fmt == "PNG":  # lossless: the twin decodes to the very same pixels
            _save(up, folder / f"p{i:02d}_{w}x{h}_upright.png", "PNG")
            twins[name] = f"p{i:02d}_{w}x{h}_upright.png"
    return twins


def _preds(out) -> dict[str, str]:
    doc = json.loads((out / "photos.json").read_text())
    assert doc["summary"]["errors"] == 0
    return {p["file"].split("/")[-1]: p["pred_name"] for p in doc["photos"]}


def test_photos_same_through_predictions_and_oip_bytes(tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    photos = tmp_path / "photos"
    twins = make_photos(photos, tiny_card, cifar_dir)
    card = str(tiny_badnets_dir / "card.json")
    runs = {"predictions": (tiny_server["http"], "predictions"), "oip-http": (tiny_server["http"], "oip"),
            "oip-grpc": ("grpc://" + tiny_server["grpc"], "predictions")}
    got = {}
    for key, (url, route) in runs.items():
        out = tmp_path / key
        r = run_eval("--photos", str(photos), "--endpoint", url, "--model", tiny_card.name, "--card", card,
                     "--photo-route", route, "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        got[key] = _preds(out)
    assert len(got["predictions"]) == 16 + len(twins)
    assert got["predictions"] == got["oip-http"] == got["oip-grpc"]
    for rotated, upright in twins.items():  # EXIF orientation honoured: same pixels, same answer
        assert got["predictions"][rotated] == got["predictions"][upright]
    summary = json.loads((tmp_path / "predictions" / "photos.json").read_text())["summary"]
    assert summary["defenses_applied"] == ["flip"]
    non_target = sum(1 for f in photos.rglob("*.*") if f.parent.name != tiny_card.classes[tiny_card.target_label])
    assert summary["physical_asr"]["n"] == non_target
    sheet = Image.open(tmp_path / "predictions" / "contact_sheet.png")
    assert sheet.width > 8 * 128 and sheet.height > 2 * 128


def test_physical_simulation_is_seeded_and_readable_by_photos(tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    cam = Camera(width=320, height=240)
    a, da = render(img, torch.Generator().manual_seed(5), cam)
    b, db = render(img, torch.Generator().manual_seed(5), cam)
    c, _ = render(img, torch.Generator().manual_seed(6), cam)
    assert a.shape == (240, 320, 3) and np.array_equal(a, b) and da == db and not np.array_equal(a, c)

    out = tmp_path / "sim"
    sim = subprocess.run([*BDSERVE, "physical", "simulate", "--card", str(tiny_badnets_dir / "card.json"),
                          "--data", str(cifar_dir), "--out", str(out), "--count", "4", "--clean",
                          "--width", "320", "--height", "240", "--seed", "3"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 8 and all(Image.open(f).size == (320, 240) for f in files)
    r = run_eval("--photos", str(out), "--endpoint", tiny_server["http"], "--model", tiny_card.name,
                 "--card", str(tiny_badnets_dir / "card.json"), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "rep" / "photos.json").read_text())["summary"]
    assert summary["photos"] == 8 and summary["errors"] == 0
    assert summary["physical_asr"]["n"] == 4 and summary["clean_accuracy"]["n"] == 4
    assert (tmp_path / "rep" / "contact_sheet.png").exists()
