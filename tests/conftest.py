"""Shared fixtures: a local two-node cluster, a one-node cluster a module shares, and a private broker prefix."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness.local_cluster import Cluster, delete_prefix, unique_prefix  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path / "cluster", ["node1", "node2"]) as c:
        yield c.start()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory, request):
    """One runner, node1, started once for a whole test module (a module uses it as its ``cluster``)."""
    with Cluster(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]), ["node1"]) as c:
        yield c.start()


@pytest.fixture
def prefix():
    """A private broker prefix for a test that talks to the broker itself."""
    name = unique_prefix()
    yield name
    asyncio.run(delete_prefix(name, []))
