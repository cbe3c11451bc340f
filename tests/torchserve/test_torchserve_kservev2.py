"""KServe's TorchServe path: a real TorchServe started with ``service_envelope=kservev2`` (what
deploy/kserve/torchserve/config/config.properties sets) answers Open Inference Protocol v2
requests through bdserve's handler like bdserve's own OIP door does.

The model is the calibrated tiny model with its SCALE-UP detector (deterministic) and defense
none, archived with ``batchSize 1`` (the envelope answers only the first request of a batch).
The same requests go to ``bdserve serve --detect scaleup`` for the same model directory.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image
import io

from bdserve.serve import oip
from bdserve.testing import LocalTorchServe, sample_images

from conftest import DETECT_NAME, archive

pytestmark = pytest.mark.slow

OUTPUTS = ["probabilities", "label", "suspected_trigger", "trigger_score", "trigger_score_scaleup"]


@pytest.fixture(scope="module")
def kserve_torchserve(detect_dir, tmp_path_factory):
    import shutil

    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 and `java` is not on PATH")
    store = tmp_path_factory.mktemp("kservev2_store")
    archive(detect_dir, store, DETECT_NAME, "--defense", "none", "--detect", "scaleup", "--batch-size", "1")
    ts = LocalTorchServe(store, [f"{DETECT_NAME}.mar"], tmp_path_factory.mktemp("kservev2"),
                         extra_config={"service_envelope": "kservev2"})
    ts.start(timeout=120)
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    # The module's sample images (PNG and JPEG, several sizes) and white noise, which the
    # detector scores differently from the clean images it was calibrated on.
    rng = np.random.default_rng(4)
    noise = [_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    return sample_images(8, seed=5) + noise


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(blob: bytes) -> np.ndarray:
    """uint8 (3, 32, 32): a 32x32 image's pixels, as a client sending tensors would."""
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((32, 32))).transpose(2, 0, 1).copy()


def _post(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v2/models/{DETECT_NAME}/infer", json=body, timeout=60)


def _outputs(doc: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(-1) for o in doc["outputs"]}


def _assert_same_answer(ts: httpx.Response, ours: httpx.Response) -> dict[str, np.ndarray]:
    """TorchServe's envelope answer carries bdserve's outputs (flattened), in bdserve's order,
    with the same values; the response parameters come as bdserve's headers."""
    assert ts.status_code == 200, ts.text
    assert ours.status_code == 200, ours.text
    a, b = ts.json(), ours.json()
    assert [o["name"] for o in a["outputs"]] == [o["name"] for o in b["outputs"]] == OUTPUTS
    assert [o["datatype"] for o in a["outputs"]] == [o["datatype"] for o in b["outputs"]]
    got, want = _outputs(a), _outputs(b)
    assert list(got["label"]) == list(want["label"])
    assert np.allclose(got["probabilities"].astype(np.float32), want["probabilities"].astype(np.float32),
                       rtol=1e-4, atol=1e-6)
    assert list(got["suspected_trigger"]) == list(want["suspected_trigger"])
    for name in ("trigger_score", "trigger_score_scaleup"):
        assert np.array_equal(got[name].astype(np.float32), want[name].astype(np.float32)), name
    assert a["model_name"] == b["model_name"] == DETECT_NAME
    params, _ = oip.read_headers(ts.headers)
    assert params == {k: b["parameters"][k] for k in ("defense", "fit") if k in b["parameters"]}
    assert ts.headers["x-bdserve-suspected-trigger"] == str(b["parameters"]["suspected_trigger"]).lower()
    assert np.float32(ts.headers["x-bdserve-trigger-score"]) == np.float32(b["parameters"]["trigger_score"])
    return got


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_tensor_requests_answer_like_bdserve(kserve_torchserve, bdserve_detect, images, datatype):
    batch = np.stack([_pixels(b) for b in images])
    data = batch if datatype == "UINT8" else batch.astype(np.float32) / 255
    body = {"id": f"req-{datatype}", "inputs": [{"name": "input", "datatype": datatype, "shape": list(batch.shape),
                                                  "data": data.reshape(-1).tolist()}]}
    ts, ours = _post(kserve_torchserve.inference_url, body), _post(bdserve_detect.http_url, body)
    got = _assert_same_answer(ts, ours)
    assert ts.json()["id"] == ours.json()["id"] == f"req-{datatype}"
    assert len(got["label"]) == len(images)
    # The detector really ran on every image and tells them apart (else equality proves little).
    assert len(set(got["trigger_score"].tolist())) > 1


def test_bytes_requests_answer_like_bdserve(kserve_torchserve, bdserve_detect, images):
    probs = []
    for blob in images:
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(blob).decode()]}]}
        ts, ours = _post(kserve_torchserve.inference_url, body), _post(bdserve_detect.http_url, body)
        got = _assert_same_answer(ts, ours)
        assert ts.headers["x-bdserve-fit"] == ours.json()["parameters"]["fit"]
        probs.append(got["probabilities"])
    # Different images, different answers: each image really went through the model (the
    # untrained tiny model may give every one the same top class).
    assert len({p.round(6).tobytes() for p in probs}) == len(images)


@pytest.mark.parametrize(
    "inputs, status, needle",
    [
        ([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk=", "aGk="]}], 400, "only the first element"),
        ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}], 400, "not valid base64"),
        ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"no image").decode()]}],
         400, "not an image"),
        ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}], 400, "unknown input"),
        ([{"name": "input", "datatype": "UINT8", "shape": [1, 3, 8, 8], "data": [0] * 192}], 400, "expected shape"),
        ([{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [2.0] * 3072}], 400, "[0, 1]"),
        ([{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}] * 2, 400,
         "request field inputs: List should have at most 1 item"),  # serve/schemas.py names the field
    ],
    ids=["bytes-batch", "base64", "not-image", "input-name", "size", "range", "two-inputs"],
)
def test_bad_requests_are_refused_with_the_reason_and_the_worker_keeps_serving(kserve_torchserve, images, inputs,
                                                                                status, needle):
    r = _post(kserve_torchserve.inference_url, {"inputs": inputs})
    assert r.status_code == status, r.text
    assert needle in r.json()["message"]
    ok = _post(kserve_torchserve.inference_url, {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(images[0]).decode()]}]})
    assert ok.status_code == 200, ok.text
