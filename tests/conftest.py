"""Shared fixtures: a local two-node cluster, and a private broker prefix."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness.local_cluster import Cluster, delete_prefix, unique_prefix  # noqa: E402


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "cluster", ["node1", "node2"])
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def prefix():
    """A private broker prefix for a test that talks to the broker itself."""
    name = unique_prefix()
    yield name
    asyncio.run(delete_prefix(name, []))
