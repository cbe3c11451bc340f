"""The photo lab's routes through a real server: absent without --lab, one answer per photo that
agrees with /predictions and with the in-process pipeline, clear 4xx for bad uploads."""

from __future__ import annotations

import base64
import io
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from bdserve.serve.images import FitPolicy, decode_fitted
from bdserve.testing import ServeProcess
from bdserve.testing.print_scenes import picture, scene, textured

from serve_helpers import MAX_BODY, encode, metric, random_image

LAB_ROUTES = [("GET", "/lab"), ("GET", "/lab/models"), ("GET", "/lab/static/lab.js"),
              ("GET", "/lab/static/lab.css"), ("POST", "/lab/models/tiny/analyze")]


@pytest.mark.parametrize("method,path", LAB_ROUTES)
def test_no_lab_routes_without_lab(server, method, path):
    r = httpx.request(method, server.http_url + path, content=b"x" if method == "POST" else None)
    assert r.status_code == 404, (path, r.status_code)


def _analyze(url, model, blob, **query):
    return httpx.post(f"{url}/lab/models/{model}/analyze", params=query, content=blob, timeout=30)


def test_page_is_self_contained(lab_server):
    page = httpx.get(lab_server.http_url + "/lab")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp
    html = page.text
    assert re.search(r'<input[^>]*type="file"[^>]*accept="image/\*"[^>]*capture="environment"', html)
    assert '<html lang="en">' in html and 'name="viewport"' in html
    texts = [html]
    for name, ctype in (("lab.css", "text/css"), ("lab.js", "text/javascript")):
        r = httpx.get(f"{lab_server.http_url}/lab/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        texts.append(r.text)
    assert httpx.get(f"{lab_server.http_url}/lab/static/..%2Fpipeline.py").status_code == 404
    # Offline: nothing is loaded from another host (the SVG namespace URI is a name, not a fetch).
    for text in texts:
        assert not re.search(r"""(src|href)=["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", text), text[:200]


def test_models_lists_the_compared_defenses(lab_server):
    doc = httpx.get(lab_server.http_url + "/lab/models").json()
    by_name = {m["name"]: m for m in doc["models"]}
    assert doc["keeping"] is False
    # tiny serves flip; foreign serves shrinkpad:4 (its card): each gets none, its own, flip, shrinkpad:4
    assert by_name["tiny"]["defenses"] == ["none", "flip", "shrinkpad:4"]
    assert by_name["foreign"]["defenses"] == ["none", "shrinkpad:4", "flip"]
    assert by_name["tiny"]["served_defense"] == "flip" and by_name["tiny"]["detect"] is True
    assert by_name["tiny"]["fit"] == "cover" and by_name["tiny"]["input_size"] == [32, 32]
    assert by_name["foreign"]["input_size"] == [64, 64]


def test_analyze_agrees_with_predictions_and_the_pipeline(lab_server, tiny_model, rng):
    photo = encode(random_image(rng, 150, 200), "JPEG", quality=90)  # fitted by the server
    r = _analyze(lab_server.http_url, "tiny", photo)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == "tiny" and doc["served_defense"] == "flip" and doc["kept"] is None
    assert doc["fit"] == {"name": "cover", "spec": tiny_model.fit.spec, "fallback": False, "outline": None,
                          "frame": [200, 150]}
    assert doc["fitted_size"] == [32, 32]
    head, data = doc["fitted_png"].split(",", 1)
    assert head == "data:image/png;base64"
    fitted = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    np.testing.assert_array_equal(fitted, tiny_model.decode([photo])[0].permute(1, 2, 0).numpy())

    rows = {row["defense"]: row for row in doc["results"]}
    assert list(rows) == ["none", "flip", "shrinkpad:4"]
    for spec in ("none", "flip"):  # deterministic: the same numbers as a direct call
        direct = httpx.post(f"{lab_server.http_url}/predictions/tiny", params={"defense": spec}, content=photo).json()
        top = rows[spec]["top"]
        assert [t["class"] for t in top] == list(direct)[:3]
        np.testing.assert_allclose([t["probability"] for t in top], list(direct.values())[:3], rtol=1e-5, atol=1e-6)
        assert rows[spec]["label"] == top[0]["class"]
    for row in rows.values():
        probs = [t["probability"] for t in row["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # --detect: the calibrated detectors score the undefended photo, so every defense's row
    # carries the same flag and score: the ones /predictions sends for it.
    served = httpx.post(f"{lab_server.http_url}/predictions/tiny", content=photo).headers
    for row in rows.values():
        assert row["suspected"] == (served["X-Bdserve-Suspected-Trigger"] == "true")
        assert np.float32(row["trigger_score"]) == np.float32(float(served["X-Bdserve-Trigger-Score"]))


def test_print_outline_under_fit_print(served_store):
    """`serve --lab --fit print`: the answer carries the print's outline in the photo's pixels, at
    its known corners, and the pixels the model saw are the print fit's; a frame with no print
    says it fell back to cover."""
    rng = np.random.default_rng(11)
    pic = picture(rng)
    frame, corners, _ = scene(rng, pic, angle=8, tilt=0.04, background="textured")
    photo = encode(frame, "JPEG", quality=92)
    with ServeProcess(served_store, ["tiny"], "--lab", "--fit", "print") as srv:
        doc = _analyze(srv.http_url, "tiny", photo).json()
        table = _analyze(srv.http_url, "tiny", encode(textured(rng, 480, 640), "JPEG", quality=92)).json()
    fit = doc["fit"]
    assert (fit["name"], fit["spec"], fit["fallback"], fit["frame"]) == ("print", "print (area)", False, [640, 480])
    assert np.abs(np.array(fit["outline"]) - corners).max() < 1.5  # photo pixels
    expected = decode_fitted(photo, (32, 32), policy=FitPolicy("print"))
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["fitted_png"].split(",", 1)[1]))))
    np.testing.assert_array_equal(seen, expected.image)
    assert table["fit"] == {"name": "cover", "spec": "cover (area; no print found)", "fallback": True,
                            "outline": None, "frame": [640, 480]}


def test_analyze_larger_model_input(lab_server, rng):
    doc = _analyze(lab_server.http_url, "foreign", encode(random_image(rng, 48, 48))).json()
    assert doc["fitted_size"] == [64, 64]
    assert Image.open(io.BytesIO(base64.b64decode(doc["fitted_png"].split(",", 1)[1]))).size == (64, 64)
    assert all(t["class"].startswith("kind") for row in doc["results"] for t in row["top"])


def test_bad_uploads_are_clear_4xx(lab_server, rng):
    url = lab_server.http_url
    good = encode(random_image(rng, 32, 32))
    before = httpx.get(url + "/metrics").text
    cases = [
        (_analyze(url, "tiny", b"not an image at all"), 400, "not an image"),
        (_analyze(url, "tiny", b""), 400, "empty image"),
        (_analyze(url, "tiny", good, label="zebra"), 400, "label 'zebra' is not one of"),
        (_analyze(url, "tiny", good, kind="blurry"), 400, "kind 'blurry' is not one of"),
        (_analyze(url, "nope", good), 404, "unknown model"),
        (_analyze(url, "tiny", b"\0" * (MAX_BODY + 1)), 413, "over this server's limit"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (words, r.status_code, r.text)
        assert words in r.json()["error"], r.json()
    after = httpx.get(url + "/metrics").text
    counted = metric(after, "bdserve_requests_total", model="tiny", protocol="http", code="400") - \
        metric(before, "bdserve_requests_total", model="tiny", protocol="http", code="400")
    assert counted == 4
