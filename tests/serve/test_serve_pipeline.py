"""DefendedModel in-process: decoding and fitting, tensor validation, defenses, lab and detect."""

from __future__ import annotations

from dataclasses import replace

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bdserve.serve.errors import DefenseNotAllowed, InvalidInput
from bdserve.serve.images import decode_image
from bdserve.serve.pipeline import DefendedModel

from serve_helpers import FOREIGN_CLASSES, bomb_png, encode, random_image


def test_decode_formats_and_fit(tiny_model, rng):
    arr = random_image(rng, 32, 32)
    png, webp = encode(arr, "PNG"), encode(arr, "WEBP", lossless=True)
    assert np.array_equal(tiny_model.decode([png])[0].permute(1, 2, 0).numpy(), arr)  # right size: untouched
    assert np.array_equal(tiny_model.decode([webp])[0].permute(1, 2, 0).numpy(), arr)
    big = encode(random_image(rng, 480, 640), "JPEG", quality=90)
    x = tiny_model.decode([big, png])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8


def test_fit_is_cover_then_center_crop():
    # A wide image: red | green | blue thirds. Cover-fit to a square keeps only the middle third.
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30, 0], arr[:, 30:60, 1], arr[:, 60:, 2] = 255, 255, 255
    out = decode_image(encode(arr), (10, 10))
    assert out.shape == (10, 10, 3)
    assert out[:, :, 1].min() > 200 and out[:, :, 0].max() < 60 and out[:, :, 2].max() < 60


def test_exif_orientation_is_honoured():
    # Top half white, bottom black, stored with "rotate 90 CW" (orientation 6): upright, the
    # white half is on the right.
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:20] = 255
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif)
    out = decode_image(buf.getvalue(), (40, 40)).astype(int)
    assert out[:, 25:].mean() > 200 and out[:, :15].mean() < 50


@pytest.mark.parametrize("blob, message", [
    (b"this is not an image at all" * 4, "not an image"),
    (b"", "empty"),
    (bomb_png(), "pixel"),
])
def test_decode_rejects(tiny_model, blob, message):
    with pytest.raises(InvalidInput, match=message):
        tiny_model.decode([blob])


def test_truncated_image_is_rejected(tiny_model, rng):
    jpeg = encode(random_image(rng, 200, 200), "JPEG")
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        tiny_model.decode([jpeg[: len(jpeg) // 2]])
    png = encode(random_image(rng, 200, 200), "PNG")
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        tiny_model.decode([png[: len(png) // 2]])


def test_from_array_validation(tiny_model):
    ok = np.zeros((2, 3, 32, 32), np.float32)
    assert tiny_model.from_array(ok).shape == (2, 3, 32, 32)
    bad = [
        (np.zeros((3, 32, 32), np.float32), "rank"),
        (np.zeros((1, 3, 16, 16), np.float32), "shape"),
        (np.zeros((1, 1, 32, 32), np.uint8), "shape"),
        (np.zeros((1, 3, 32, 32), np.int64), "datatype"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN"),
        (np.full((1, 3, 32, 32), np.inf, np.float32), "NaN or Inf"),
        (np.full((1, 3, 32, 32), 255.0, np.float32), r"\[0, 1\]"),
        (np.zeros((0, 3, 32, 32), np.uint8), "empty"),
    ]
    for arr, message in bad:
        with pytest.raises(InvalidInput, match=message):
            tiny_model.from_array(arr)


def test_uint8_and_float_agree_and_flip_is_flip(tiny_model, rng):
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    a = tiny_model.predict(x)
    b = tiny_model.predict(x.float() / 255)
    assert a.defense == "flip" and np.allclose(a.probs, b.probs, atol=1e-6)
    # Flip then no defense == no flip then... the flipped input without defense.
    c = tiny_model.predict(x.flip(-1), defense="none")
    assert np.allclose(a.probs, c.probs, atol=1e-5)
    assert a.labels == [tiny_model.classes[i] for i in a.label_ids]


def test_defense_is_the_servers_unless_lab(served_store, rng):
    prod = DefendedModel.load(served_store / "tiny", threads=1)
    x = torch.from_numpy(rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8))
    assert prod.predict(x, defense="flip").defense == "flip"  # asking for what it has is fine
    with pytest.raises(DefenseNotAllowed, match="--lab"):
        prod.predict(x, defense="none")
    with pytest.raises(InvalidInput, match="bad defense"):
        prod.predict(x, defense="explode:3")
    over = DefendedModel.load(served_store / "tiny", defense="shrinkpad:2", threads=1)
    assert over.defense_spec == "shrinkpad:2" and over.predict(x).defense == "shrinkpad:2"


def test_seeded_generator_reproduces_random_defense(served_store, rng):
    m = DefendedModel.load(served_store / "tiny", defense="shrinkpad:4", threads=1)
    x = torch.from_numpy(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    a = m.predict(x, generator=torch.Generator().manual_seed(7))
    b = m.predict(x, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(a.probs, b.probs)


def test_foreign_model_without_card(foreign_onnx, tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    (d / "model.onnx").write_bytes(foreign_onnx.read_bytes())
    m = DefendedModel.load(d, defense="none", threads=1)
    assert m.input_size == (64, 64) and m.classes == [f"class_{i}" for i in range(7)]
    assert m.card.normalization_in_graph
    m2 = DefendedModel.load(d, defense="flip", class_names=FOREIGN_CLASSES, mean=[0.5] * 3, std=[0.25] * 3, threads=1)
    assert m2.classes == FOREIGN_CLASSES and not m2.card.normalization_in_graph
    p = m2.predict(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert p.probs.shape == (2, 7) and set(p.labels) <= set(FOREIGN_CLASSES)


def test_postprocess_top_k(tiny_model, rng):
    p = tiny_model.predict(torch.from_numpy(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)))
    docs = tiny_model.postprocess(p, top_k=3)
    assert len(docs) == 2 and all(len(d) == 3 for d in docs)
    assert list(docs[0])[0] == p.labels[0]
    for doc, row in zip(docs, p.probs):  # each row's own top 3, highest first, as plain floats
        order = sorted(range(len(row)), key=lambda i: -row[i])[:3]
        assert doc == {tiny_model.classes[i]: float(row[i]) for i in order}
        assert all(type(v) is float for v in doc.values())
    tied = replace(p, probs=np.array([[0.1, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    assert list(tiny_model.postprocess(tied, top_k=2)[0]) == tiny_model.classes[1:3]  # ties: the lower index first


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_tensor_decode_path_matches_pillow(tiny_model, rng, orientation):
    """The GPU decode path (torchvision decode_jpeg + tensor fit + EXIF from the header), run
    here on the CPU: same geometry as Pillow's, pixels within a few levels."""
    from bdserve.serve.images import decode_image_tensor

    arr = random_image(rng, 96, 160)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif)
    jpeg = buf.getvalue()
    pil = torch.from_numpy(decode_image(jpeg, (32, 32))).permute(2, 0, 1).float()
    tv = decode_image_tensor(jpeg, (32, 32), 10**7, torch.device("cpu"))
    assert tv is not None and tv.shape == (3, 32, 32) and tv.dtype == torch.uint8
    assert (tv.float() - pil).abs().mean() < 6
    assert decode_image_tensor(encode(arr, "PNG"), (32, 32), 10**7, torch.device("cpu")) is None  # PNG: Pillow's job


def test_decode_device_batches_mix_paths(served_store, rng):
    m = DefendedModel.load(served_store / "tiny", threads=1)
    m.decode_device = torch.device("cpu")  # what a CUDA model does, minus the GPU
    x = m.decode([encode(random_image(rng, 64, 64), "JPEG"), encode(random_image(rng, 20, 40), "PNG")])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8
    with pytest.raises(InvalidInput, match="image 1: .*truncated|corrupt"):
        m.decode([encode(random_image(rng, 64, 64), "JPEG"), encode(random_image(rng, 64, 64), "JPEG")[:200]])


def test_torchscript_backend_agrees_with_onnx(served_store, tiny_model, rng):
    ts = DefendedModel.load(served_store / "tiny", backend="torchscript", lab=True)
    assert ts.backend == "torchscript" and ts.runtime_device == "cpu"
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    assert np.allclose(ts.predict(x, defense="flip").probs, tiny_model.predict(x, defense="flip").probs, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        DefendedModel.load(served_store / "foreign", backend="torchscript")


def test_runtime_reports_the_provider_it_got(tiny_model):
    # No GPU here: the session must say CPU, and the model must report the CPU as its device.
    assert tiny_model.runtime.providers[-1] == "CPUExecutionProvider"
    assert tiny_model.runtime_device == ("cuda:0" if tiny_model.runtime.providers[0] == "CUDAExecutionProvider" else "cpu")


def test_defense_that_cannot_run_on_the_input_is_refused(served_store, tiny_model, rng):
    with pytest.raises(InvalidInput, match="cannot run on this model's 32x32 input"):
        DefendedModel.load(served_store / "tiny", defense="shrinkpad:40", threads=1)
    with pytest.raises(InvalidInput, match="cannot run"):
        tiny_model.predict(torch.zeros(1, 3, 32, 32), defense="shrinkpad:32")
    assert tiny_model.predict(torch.zeros(1, 3, 32, 32), defense="shrinkpad:31").defense == "shrinkpad:31"


@pytest.mark.parametrize("mode,fmt,orientation", [("RGB", "PNG", 1), ("RGBA", "PNG", 1), ("L", "PNG", 1),
                                                  ("P", "PNG", 1), ("RGB", "JPEG", 1), ("RGB", "JPEG", 6)])
def test_exact_size_fast_path_gives_pillows_pixels(rng, mode, fmt, orientation):
    """Images already at the input size skip Pillow; the pixels are exactly Pillow's."""
    from bdserve.serve.fastdecode import decode_exact

    im = Image.fromarray(random_image(rng, 32, 32)).convert(mode)
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, format=fmt, exif=exif.tobytes())
    else:
        im.save(buf, format=fmt)
    blob = buf.getvalue()
    fast = decode_exact(blob, (32, 32))
    assert fast is not None
    assert torch.equal(fast, torch.from_numpy(decode_image(blob, (32, 32))).permute(2, 0, 1))
    # Another size, or something that is not an image: the Pillow path decides.
    assert decode_exact(blob, (16, 16)) is None and decode_exact(b"\x89PNG garbage", (32, 32)) is None
    assert decode_exact(blob[: len(blob) // 2], (32, 32)) is None
