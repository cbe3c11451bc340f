"""The Kubernetes schema validator, shared by the Kubernetes and KServe tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kv():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (bundles the schemas)")
