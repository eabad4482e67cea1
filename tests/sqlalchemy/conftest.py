"""Fixtures for the SQLAlchemy, pandas and Alembic tests: one shared 3-node cluster (real
processes) and an engine on it. SQLAlchemy's own pytest plugin is NOT loaded here: its hooks
would apply to the whole run. The compliance suite runs in a subprocess with that plugin, from
suite/ (which this run never collects)."""

from __future__ import annotations

import pytest

from raftsql.testing.cluster import LocalCluster

collect_ignore = ["suite"]


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
def sa_cluster(tmp_path_factory):
    pytest.importorskip("sqlalchemy")
    c = start_cluster(tmp_path_factory.mktemp("sqlalchemy-cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def engine(sa_cluster):
    """A SQLAlchemy engine on the shared cluster (the URL form with host= parameters)."""
    from sqlalchemy import create_engine

    from raftsql.sqla_dialect import sqlalchemy_url

    eng = create_engine(sqlalchemy_url(sa_cluster.dsn, timeout="20"))
    yield eng
    eng.dispose()
