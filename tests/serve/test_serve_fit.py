"""`bdserve serve --fit print`: the fit policy in model metadata and in every image response, through
HTTP (OIP and /predictions) and gRPC, with the fallback said when a frame holds no print."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from bdserve.client import Client
from bdserve.testing import ServeProcess
from bdserve.testing.print_scenes import picture, scene, textured

from serve_helpers import TINY_CLASSES


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def print_server(served_store):
    with ServeProcess(served_store, ["tiny"], "--fit", "print", "--defense", "none") as srv:
        yield srv


def _answers(url: str, blobs: list[bytes], route: str | None = None):
    with Client(url, "tiny") as client:
        answer = client.predict(blobs, route=route or ("predictions" if url.startswith("http") else None))
    assert set(answer.labels) <= set(TINY_CLASSES)
    return answer


def test_print_fit_is_reported_everywhere(print_server):
    rng = np.random.default_rng(4)
    frame, _, _ = scene(rng, picture(rng), angle=6, tilt=0.03, margin=0.05, background="textured")
    photo, table = jpeg(frame), jpeg(textured(rng, 480, 640))
    meta = httpx.get(f"{print_server.http_url}/v2/models/tiny").json()
    assert meta["parameters"]["fit"] == "print (area)"
    for url, route in ((print_server.http_url, "oip"), (print_server.http_url, None),
                       ("grpc://" + print_server.grpc_target, None)):
        assert _answers(url, [photo], route).parameters["fit"] == "print (area)"
        assert _answers(url, [table], route).parameters["fit"] == "cover (area; no print found)"
    mixed = _answers(print_server.http_url, [photo, table, photo], "oip")
    assert mixed.parameters["fit"] == "print (area); no print found in image 1: cover"
    # Raw tensors are the client's pixels: no fit, so none reported.
    raw = httpx.post(f"{print_server.http_url}/v2/models/tiny/infer", json={"inputs": [
        {"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * (3 * 32 * 32)}]}).json()
    assert "fit" not in raw.get("parameters", {})


def test_default_server_says_cover(served_store):
    rng = np.random.default_rng(5)
    with ServeProcess(served_store, ["tiny"]) as srv:
        assert httpx.get(f"{srv.http_url}/v2/models/tiny").json()["parameters"]["fit"] == "cover (bilinear-aa)"
        a = _answers(srv.http_url, [jpeg(textured(rng, 120, 160))], None)
        assert a.parameters["fit"] == "cover (bilinear-aa)"


def test_bad_fit_is_refused_in_one_line(served_store):
    from bdserve.testing import run_cli

    r = run_cli("serve", "--model-store", str(served_store), "--fit", "crop", "--http-port", "0", "--grpc-port", "0")
    assert r.returncode == 2 and "unknown fit 'crop'" in r.stderr
