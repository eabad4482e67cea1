"""Hostile client, statements whose SQLite memory grows without bound: with the node's heap limit
(sqlite_heap_limit, here 128 MiB) a read that needs more fails with SQLITE_NOMEM, where the node
used to grow until the kernel killed it, and a write's entry ends alike on every node (server/
DESIGN.md, "Heap limit"). The `guard` fixture checks afterwards that every node is alive, that
no election happened and that all databases hash equal."""

from collections.abc import Iterator

import pytest

import raftsql.driver as raftsql
from raftsql.testing.cluster import LocalCluster, running

LIMIT = 128 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    env = {"RAFTSQL_SQLITE_HEAP_LIMIT": str(LIMIT)}
    with running(tmp_path_factory.mktemp("heap"), 3, env=env) as c:
        yield c


@pytest.fixture(scope="module")
def conn(base_conn):
    return base_conn


def betweens(levels: int, depth: int) -> str:
    """Each `x BETWEEN 1 AND 2` holds a copy of x, so memory grows with the square of the depth
    (one level of depth 950 took 207 MB to prepare; two, stacked by a CTE, 753 MB)."""
    parts, prev = [], "base"
    for i in range(levels):
        e = "(" * depth + "x" + " BETWEEN 1 AND 2)" * depth
        parts.append(f"c{i} AS (SELECT {e} AS x FROM {prev})")
        prev = f"c{i}"
    return "WITH " + ", ".join(parts) + f" SELECT x FROM {prev}"


def test_a_read_past_the_heap_limit_fails_and_the_node_lives(cluster, conn, guard):
    with guard():
        with pytest.raises(raftsql.OperationalError) as info:
            conn.execute(betweens(2, 950)).fetchall()
        assert "out of memory" in str(info.value) and str(LIMIT) in str(info.value)
        assert info.value.sqlite_errorname == "SQLITE_NOMEM"
        assert conn.execute("SELECT count(*) FROM base").fetchone() == (1,)


def test_a_write_past_the_heap_limit_ends_alike_on_every_node(cluster, conn, guard):
    # 207 MB: over the limit on every node's first attempt. A write is checked (prepared) on
    # the leader before it is proposed, under the limit: refused there, nothing is proposed.
    with guard():
        with pytest.raises(raftsql.OperationalError) as info:
            conn.execute("INSERT INTO sink " + betweens(1, 950))
        assert "out of memory" in str(info.value)
        conn.execute("INSERT INTO sink VALUES (1)")
    assert conn.execute("SELECT x FROM sink").fetchall() == [(1,)]
