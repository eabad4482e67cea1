"""Fixtures for the driver tests: one shared 3-node cluster (real processes on 127.0.0.X) for
every test that does not kill nodes; fault tests start their own (tests/dbapi/test_failover.py)."""

from __future__ import annotations

import uuid

import pytest

import raftsql.driver as db
from raftsql.testing.cluster import LocalCluster


def start_cluster(base_dir) -> LocalCluster:
    c = LocalCluster(base_dir, 3)
    try:
        c.start()
        c.wait_leader()
    except BaseException:
        c.close()
        raise
    return c


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("dbapi-cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def follower(cluster) -> str:
    """The id of a node of the shared cluster that is not the leader."""
    leader = cluster.wait_leader()
    return next(n for n in cluster.ids if n != leader)


@pytest.fixture
def table():
    """A fresh table name (the cluster is shared by the session)."""
    return "t_" + uuid.uuid4().hex[:10]


@pytest.fixture
def connect(cluster):
    """connect(**kw): a driver connection to the session's cluster, closed afterwards."""
    opened = []

    def _connect(**kw):
        kw.setdefault("timeout", 20)
        c = db.connect(cluster.dsn, **kw)
        opened.append(c)
        return c

    yield _connect
    for c in opened:
        c.close()
