"""Model repository naming and versions, as Triton and KServe lay them out: a model is
served under its directory's name (``NAME=DIR`` renames), ``<name>/<version>/``
directories are versions, the highest answers by default, and the repository index lists them."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

from bdserve.card import ModelCard
from bdserve.serve import repository
from bdserve.serve.server import BackgroundServer, ServeConfig, load_models
from bdserve.serve.service import InferenceService


@pytest.fixture(scope="module")
def versioned_store(store, tmp_path_factory):
    """'classifier' (the tiny model's directory under another name, card name 'tiny') and
    'multi' with versions 1, 2 and 10, whose cards differ by their default defense."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(store / "tiny", root / "classifier")
    for version, defense in (("1", "none"), ("2", "flip"), ("10", "shrinkpad:2")):
        d = root / "multi" / version
        shutil.copytree(store / "tiny", d)
        card = ModelCard.load(d)
        card.defense = defense
        card.save(d)
    (root / "multi" / "notes").mkdir()  # not a version: ignored
    return root


def test_entries_name_models_by_directory_and_find_versions(versioned_store):
    found = repository.entries(versioned_store)
    assert [(e.name, e.version) for e in found] == [("classifier", None), ("multi", "1"), ("multi", "2"), ("multi", "10")]
    renamed = repository.entries(versioned_store, ["web=classifier"])
    assert [(e.name, e.path.name) for e in renamed] == [("web", "classifier")]
    with pytest.raises(FileNotFoundError, match="nosuch"):
        repository.entries(versioned_store, ["nosuch"])
    with pytest.raises(ValueError, match="NAME=DIR"):
        repository.entries(versioned_store, ["=classifier"])


@pytest.fixture(scope="module")
def repo_server(versioned_store):
    models = load_models(versioned_store, ["classifier", "multi", f"renamed={versioned_store / 'classifier'}"],
                         lab=True, threads=1)
    with BackgroundServer(InferenceService(models, max_queue_delay_ms=1), ServeConfig(http_port=0, grpc_port=0)) as srv:
        yield srv


def _infer(url, x):
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    return httpx.post(url, json=body, timeout=30)


def test_served_under_directory_names_with_versions(repo_server, rng):
    base = repo_server.http_url
    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    meta = httpx.get(f"{base}/v2/models/classifier", timeout=10).json()
    assert meta["name"] == "classifier" and meta["versions"] == ["3"]  # the card's version
    assert httpx.get(f"{base}/v2/models/tiny", timeout=10).status_code == 404  # the card's name is not the served name
    assert httpx.get(f"{base}/v2/models/renamed/ready", timeout=10).status_code == 200
    assert httpx.get(f"{base}/v2/models/multi", timeout=10).json()["versions"] == ["1", "2", "10"]
    # The highest version answers by default; each version routes to its own model (its own defense).
    default = _infer(f"{base}/v2/models/multi/infer", x).json()
    assert default["model_version"] == "10" and default["parameters"]["defense"] == "shrinkpad:2"
    for version, defense in (("1", "none"), ("2", "flip")):
        r = _infer(f"{base}/v2/models/multi/versions/{version}/infer", x).json()
        assert r["model_version"] == version and r["parameters"]["defense"] == defense
    r = _infer(f"{base}/v2/models/multi/versions/7/infer", x)
    assert r.status_code == 404 and "served versions: 1, 2, 10" in r.json()["error"]


def test_repository_index(repo_server):
    index = httpx.post(f"{repo_server.http_url}/v2/repository/index", timeout=10).json()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("classifier", "3", "READY"), ("multi", "1", "READY"), ("multi", "2", "READY"), ("multi", "10", "READY"),
        ("renamed", "3", "READY")]


def test_tritonclient_sees_versions_and_the_index(repo_server, rng):
    import tritonclient.http as th

    client = th.InferenceServerClient(repo_server.http_url.removeprefix("http://"))
    assert client.is_model_ready("multi", "2")
    assert not client.is_model_ready("multi", "7")
    names = {(m["name"], m["version"]) for m in client.get_model_repository_index()}
    assert ("multi", "10") in names and ("classifier", "3") in names
    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    inp = th.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    res = client.infer("multi", [inp], model_version="1")
    assert res.get_response()["model_version"] == "1"
