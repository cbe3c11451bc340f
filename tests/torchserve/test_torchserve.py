"""A real TorchServe serving bdserve's .mar gives the same answers as bdserve itself.

One TorchServe (Java frontend + Python worker) is started for the whole module with
two archives of one tiny model: ``tiny`` (defense none) and ``tinyflip`` (flip); both
defenses are deterministic, so the answers must match bdserve's to float precision.
"""

from __future__ import annotations

import json
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from bdserve.testing import ServeProcess, run_cli, sample_images

from conftest import DETECT_NAME

pytestmark = pytest.mark.slow

DEFENSES = {"tiny": "none", "tinyflip": "flip"}


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return sample_images(6)


@pytest.fixture(scope="module")
def reference(tiny_dir, images):
    """bdserve's own answers, in-process: the pipeline the server and the handler both run."""
    from bdserve.serve.pipeline import DefendedModel

    out = {}
    for name, defense in DEFENSES.items():
        model = DefendedModel.load(tiny_dir, defense=defense)
        out[name] = [model.postprocess(model.predict(model.decode([b])))[0] for b in images]
    return out


@pytest.fixture(scope="module")
def bdserve_http(tiny_dir):
    """bdserve's real HTTP server (``bdserve serve``) for the same model with the defense none."""
    with ServeProcess(tiny_dir.parent, [tiny_dir.name], "--defense", "none") as srv:
        yield srv.http_url


def _close(a: dict, b: dict) -> bool:
    """Same top classes in the same order, probabilities equal to float32 rounding."""
    return list(a) == list(b) and np.allclose(list(a.values()), list(b.values()), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the archive


def test_archive_holds_model_card_config_and_the_packaged_handler(mar_store, tiny_dir):
    import bdserve.serve.torchserve_handler as handler

    with zipfile.ZipFile(mar_store / "tinyflip.mar") as z:
        names = set(z.namelist())
        assert {"model.onnx", "card.json", "model-config.yaml", "torchserve_handler.py",
                "MAR-INF/MANIFEST.json"} <= names
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"]["modelName"] == "tinyflip"
        assert manifest["model"]["handler"] == "torchserve_handler.py"
        assert z.read("model.onnx") == (tiny_dir / "model.onnx").read_bytes()
        assert json.loads(z.read("card.json"))["defense"] == "shrinkpad:4"  # the card is shipped unchanged
        config = z.read("model-config.yaml").decode()
        assert 'defense: "flip"' in config and "batchSize: 32" in config
        # The handler is the package's own module, not a vendored pipeline.
        assert z.read("torchserve_handler.py") == Path(handler.__file__).read_bytes()


def test_archive_refuses_a_bad_defense_and_a_directory_without_a_model(tiny_dir, tmp_path):
    res = run_cli("archive", str(tiny_dir), "--out", str(tmp_path), "--defense", "shrinkpad:x")
    assert res.returncode == 1
    assert "defense" in res.stderr and not list(tmp_path.glob("*.mar"))
    # A valid spec that cannot run on a 32x32 input: caught by loading the pipeline at archive time.
    res = run_cli("archive", str(tiny_dir), "--out", str(tmp_path), "--defense", "shrinkpad:40")
    assert res.returncode == 1, res.stdout
    assert "does not load" in res.stderr and not list(tmp_path.glob("*.mar"))
    (tmp_path / "empty").mkdir()
    res = run_cli("archive", str(tmp_path / "empty"), "--out", str(tmp_path))
    assert res.returncode == 1
    assert "model.onnx" in res.stderr


def test_archive_defaults_to_the_card_name_inside_the_model_directory(tiny_dir):
    res = run_cli("archive", str(tiny_dir))
    assert res.returncode == 0, res.stderr
    mar = tiny_dir / "tiny.mar"
    assert Path(res.stdout.strip()) == mar and mar.is_file()
    with zipfile.ZipFile(mar) as z:
        assert "defense: null" in z.read("model-config.yaml").decode()  # the card's default at serve time
    mar.unlink()


# --------------------------------------------------------- the live TorchServe


@pytest.mark.parametrize("name", ["tiny", "tinyflip"])
def test_torchserve_answers_like_bdserve(torchserve, reference, images, name):
    url = f"{torchserve.inference_url}/predictions/{name}"
    with httpx.Client(timeout=30) as c:
        for i, blob in enumerate(images):
            r = c.post(url, content=blob)
            assert r.status_code == 200, r.text
            assert r.headers["x-bdserve-defense"] == DEFENSES[name]
            got = r.json()
            assert len(got) == 5
            assert _close(got, reference[name][i]), (i, got, reference[name][i])


def test_the_defense_really_runs_inside_torchserve(torchserve, reference, images):
    """flip and none must disagree somewhere, or the comparison above could not tell them apart."""
    with httpx.Client(timeout=30) as c:
        plain = [c.post(f"{torchserve.inference_url}/predictions/tiny", content=b).json() for b in images]
        flipped = [c.post(f"{torchserve.inference_url}/predictions/tinyflip", content=b).json() for b in images]
    assert any(not _close(a, b) for a, b in zip(plain, flipped))


def test_torchserve_matches_bdserve_http_server(torchserve, bdserve_http, images):
    with httpx.Client(timeout=30) as c:
        for blob in images:
            a = c.post(f"{torchserve.inference_url}/predictions/tiny", content=blob)
            b = c.post(f"{bdserve_http}/predictions/tiny", content=blob)
            assert a.status_code == b.status_code == 200
            assert a.headers["x-bdserve-defense"] == b.headers["x-bdserve-defense"] == "none"
            assert _close(a.json(), b.json()), (a.json(), b.json())
        # The same refusal, in the same format, through both doors.
        a = c.post(f"{torchserve.inference_url}/predictions/tiny", content=b"not an image")
        b = c.post(f"{bdserve_http}/predictions/tiny", content=b"not an image")
        assert a.status_code == b.status_code == 400
        assert a.json() == b.json()


def test_multipart_field_data_is_accepted(torchserve, reference, images):
    r = httpx.post(f"{torchserve.inference_url}/predictions/tiny",
                   files={"data": ("photo.png", images[0], "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    assert _close(r.json(), reference["tiny"][0])


@pytest.mark.parametrize(
    "body, headers, needle",
    [
        (b"not an image at all", {}, "not an image"),
        (None, {}, "truncated"),  # filled in below: a PNG cut in half
        (b'{"inputs": []}', {"content-type": "application/json"}, "expected an encoded image"),
        (b"", {}, "empty"),
        (b"a=1&b=2", {"content-type": "application/x-www-form-urlencoded"}, "form fields"),
    ],
    ids=["garbage", "truncated", "json", "empty", "form-urlencoded"],
)
def test_bad_input_is_a_4xx_and_the_worker_keeps_serving(torchserve, reference, images, body, headers, needle):
    url = f"{torchserve.inference_url}/predictions/tiny"
    if body is None:
        body = images[0][: len(images[0]) // 2]
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    ok = httpx.post(url, content=images[2], timeout=30)
    assert ok.status_code == 200
    assert _close(ok.json(), reference["tiny"][2])


def test_concurrent_requests_batch_and_a_bad_one_fails_alone(torchserve, reference, images):
    """Concurrent uploads share TorchServe batches (maxBatchDelay 20 ms); the bad one gets its own 400."""
    url = f"{torchserve.inference_url}/predictions/tinyflip"
    jobs = [(i % len(images), images[i % len(images)]) for i in range(24)]
    jobs.insert(7, (-1, b"\x89PNG\r\n\x1a\n garbage"))

    def post(job):
        i, blob = job
        with httpx.Client(timeout=60) as c:
            return i, c.post(url, content=blob)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, jobs))
    for i, r in results:
        if i < 0:
            assert r.status_code == 400 and "error" in r.json()
        else:
            assert r.status_code == 200, r.text
            assert _close(r.json(), reference["tinyflip"][i])
    # The handler logs how many requests each worker call carried: some carried several.
    log = (torchserve.workdir / "logs" / "model_log.log").read_text(errors="replace")
    sizes = [int(n) for n in re.findall(r"bdserve batch of (\d+) requests", log)]
    assert sizes and max(sizes) > 1, sizes


# ------------------------------------------------- trigger detection in the handler


@pytest.fixture(scope="module")
def detect_images() -> list[bytes]:
    """The sample images and white noise, which the detector scores differently from the clean
    images it was calibrated on: some are flagged, some are not."""
    from bdserve.testing.models import encode

    rng = np.random.default_rng(4)
    return sample_images(8, seed=5) + [encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


def _detection_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-bdserve-")}


def test_torchserve_runs_the_detectors_like_bdserve(torchserve, bdserve_detect, detect_images):
    """`bdserve archive --detect scaleup` makes the handler score every image through the same
    DefendedModel as `bdserve serve --detect scaleup`: the same flag and scores, as the same headers."""
    scores = []
    with httpx.Client(timeout=60) as c:
        for blob in detect_images:
            a = c.post(f"{torchserve.inference_url}/predictions/{DETECT_NAME}", content=blob)
            b = c.post(f"{bdserve_detect.http_url}/predictions/{DETECT_NAME}", content=blob)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            assert _close(a.json(), b.json())
            ha, hb = _detection_headers(a), _detection_headers(b)
            assert {"x-bdserve-suspected-trigger", "x-bdserve-trigger-score", "x-bdserve-trigger-score-scaleup"} <= set(ha)
            assert ha == hb
            scores.append(float(ha["x-bdserve-trigger-score"]))
    flagged = [s > 0 for s in scores]
    assert any(flagged) and not all(flagged), scores  # both kinds: the flag is the detector's, not a constant


def test_torchserve_reject_mode_refuses_flagged_images_and_answers_the_others(torchserve, bdserve_detect,
                                                                                detect_images):
    with httpx.Client(timeout=60) as c:
        for blob in detect_images:
            ours = c.post(f"{bdserve_detect.http_url}/predictions/{DETECT_NAME}", content=blob)
            r = c.post(f"{torchserve.inference_url}/predictions/tinyreject", content=blob)
            if ours.headers["x-bdserve-suspected-trigger"] == "true":
                assert r.status_code == 422, r.text
                assert "trigger" in r.json()["error"]
            else:
                assert r.status_code == 200, r.text
                assert _close(r.json(), ours.json())


def test_archive_refuses_detectors_the_model_was_not_calibrated_for(tiny_dir, tmp_path):
    res = run_cli("archive", str(tiny_dir), "--out", str(tmp_path), "--detect", "scaleup")
    assert res.returncode == 1
    assert "bdserve calibrate" in res.stderr and not list(tmp_path.glob("*.mar"))
    res = run_cli("archive", str(tiny_dir), "--out", str(tmp_path), "--on-suspect", "reject")
    assert res.returncode == 1 and "--detect" in res.stderr
