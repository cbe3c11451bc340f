"""Fixtures for the evaluation tests: the session's tiny BadNets model served by the real CLI."""

from __future__ import annotations

import pytest

from bdserve.card import ModelCard
from eval_helpers import running_server


@pytest.fixture(scope="session")
def tiny_card(tiny_badnets_dir) -> ModelCard:
    return ModelCard.load(tiny_badnets_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_badnets_dir):
    """`bdserve serve --lab --detect --defense flip`: requests may choose their defense; the
    default (what /predictions gets) is the deterministic flip, so routes can be compared."""
    with running_server(tiny_badnets_dir, "--lab", "--detect", "--defense", "flip") as addr:
        yield addr
