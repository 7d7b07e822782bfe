"""The compose cluster, built and started once for the whole ``tests/cluster`` session.

Registers the ``cluster`` marker (pyproject.toml stays the lead's), so the slow cluster
test runs on its own: ``python3 -m pytest tests/cluster -m cluster``.
"""

from __future__ import annotations

import sys
import time

import pytest

from compose_harness import ComposeCluster, build_images
from docker_fixtures import docker_engine  # noqa: F401  (fixture: starts the engine if needed)


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: the docker-compose multi-node cluster test (slow, needs Docker)")


@pytest.fixture(scope="session")
def cluster(docker_engine, tmp_path_factory):  # noqa: F811
    images, build_seconds = build_images()
    cluster = ComposeCluster(images, tmp_path_factory.mktemp("compose"))
    started = time.monotonic()
    try:
        cluster.up()
        print(f"\ncluster: images ready in {build_seconds:.0f} s, cluster up in "
              f"{time.monotonic() - started:.0f} s ({cluster.project})", file=sys.stderr)
        yield cluster
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Show the cluster's logs under a failed test: they say what the nodes did."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "cluster" in item.fixturenames:
        cluster = item.funcargs.get("cluster")
        if cluster is not None:
            report.sections.append(("cluster logs", cluster.logs()))
