"""bdserve installs beside the clients people already use: pip's own resolver, asked for a fresh
environment, finds one set of versions for bdserve's server and client with the KServe SDK and
tritonclient[all], and picks the newest release of each client rather than backtracking to an
old one (as a protobuf pin once made it fall back to tritonclient 2.41)."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from bdserve.testing.resolver import newest, resolve

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bdserve_kserve_and_current_tritonclient_resolve_in_one_fresh_environment():
    clients = ("kserve", "tritonclient")
    latest = {name: newest(name) for name in clients}
    got = resolve(f"{REPO}[serve,client]", "kserve", "tritonclient[all]")

    assert "bdserve" in got
    for name in clients:
        assert got[name] == latest[name], f"{name} resolved to {got[name]}, not the newest ({latest[name]})"
    # The shared gRPC stack is one set of versions; bdserve's stubs accept it (see test_protos.py).
    assert Version(got["protobuf"]) >= Version("4.25") and Version(got["grpcio"]) >= Version("1.73.1")
    # tritonclient[all] really brought its HTTP and gRPC halves.
    assert {"geventhttpclient", "grpcio", "aiohttp"} <= set(got), sorted(got)


def test_an_impossible_combination_is_reported_with_pip_s_reason():
    with pytest.raises(RuntimeError, match="cannot install") as failure:
        resolve(f"{REPO}[client]", "protobuf<3")
    assert "protobuf" in str(failure.value)
