"""Fixtures every tier shares. A cluster is asked for by its spec (tests/support/spec.py):

    SPEC = ClusterSpec(nodes=(Node(id="n1"),), receivers=(Receivers(node="n1", instance="R"),))

    @pytest.fixture(scope="module")
    def cluster(module_cluster):
        return module_cluster(SPEC)  # one for the module's tests, closed after the last

`make_cluster(spec)` gives one for a single test, closed after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, start
from tests.support.spec import ClusterSpec

MakeCluster = Callable[..., Cluster]


def _factory(root: Callable[[str], Path]) -> tuple[MakeCluster, list[Cluster]]:
    made: list[Cluster] = []

    def make(spec: ClusterSpec, name: str = "cluster") -> Cluster:
        c = start(spec, root(name))
        made.append(c)
        return c

    return make, made


def _close(made: list[Cluster]) -> None:
    for c in reversed(made):
        c.close()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeCluster]:
    """make(spec, name="cluster"): a cluster started as spec says, shared by the module's
    tests (its fixture is module-scoped), closed after the module's last test."""
    make, made = _factory(lambda name: tmp_path_factory.mktemp(name))
    try:
        yield make
    finally:
        _close(made)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[MakeCluster]:
    """make(spec, name="cluster"): a cluster started as spec says, for this test alone,
    closed after it (its files under tmp_path/name)."""

    def root(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        return path

    make, made = _factory(root)
    try:
        yield make
    finally:
        _close(made)
