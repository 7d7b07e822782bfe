"""The compose cluster, built and started once for the whole ``tests/cluster`` session.

Registers the ``cluster`` marker (pyproject.toml stays the lead's), so the slow cluster
test runs on its own: ``python3 -m pytest tests/cluster -m cluster``. ``compose_broker_cluster``
is the variant with three RabbitMQ nodes, for the ``broker_cluster`` test beside it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

import pytest

from compose_harness import BROKER_CLUSTER, SINGLE_BROKER, ComposeCluster, Variant, build_images
from docker_fixtures import docker_engine  # noqa: F401  (fixture: starts the engine if needed)


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: the docker-compose multi-node cluster test (slow, needs Docker)")


@contextlib.contextmanager
def running(variant: Variant, workdir) -> Iterator[ComposeCluster]:
    """Build the images, bring the cluster up, and always take it down (``down -v``)."""
    images, build_seconds = build_images()
    cluster = ComposeCluster(images, workdir, variant)
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


@pytest.fixture(scope="session")
def cluster(docker_engine, tmp_path_factory):  # noqa: F811
    with running(SINGLE_BROKER, tmp_path_factory.mktemp("compose")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def compose_broker_cluster(docker_engine, tmp_path_factory):  # noqa: F811
    with running(BROKER_CLUSTER, tmp_path_factory.mktemp("compose-broker-cluster")) as cluster:
        yield cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Show the cluster's logs under a failed test: they say what the nodes did."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name in ("cluster", "compose_broker_cluster"):
            cluster = item.funcargs.get(name)
            if cluster is not None:
                report.sections.append(("cluster logs", cluster.logs()))
