"""Shared fixtures for the hostile-client suite: a real 3-node TLS cluster per test module and a
`survives` guard that checks what every test here must show afterwards:

- every node process is still alive;
- (unless the test says an election is allowed) no node changed its term;
- every node applied the same index and holds the same content hash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from raftsql.testing.cluster import LocalCluster, running


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("hostile"), 3) as c:
        yield c


def terms(cluster: LocalCluster) -> dict[str, int]:
    out = {}
    for nid in cluster.ids:
        st = cluster.status(nid)
        assert st is not None, f"{nid} does not answer status"
        out[nid] = st["term"]
    return out


def assert_all_alive(cluster: LocalCluster) -> None:
    dead = [n for n in cluster.ids if not cluster.alive(n)]
    assert not dead, f"node(s) {dead} exited: " + "; ".join(
        (cluster.data_dir(n) / "node.log").read_text(errors="replace")[-2000:] for n in dead
    )


def assert_converged(cluster: LocalCluster) -> dict[str, tuple[int, str]]:
    hashes = cluster.hashes(timeout=60.0)
    assert len(hashes) == len(cluster.ids), hashes
    assert len(set(hashes.values())) == 1, f"replicas differ: {hashes}"
    return hashes


@contextlib.contextmanager
def survives(cluster: LocalCluster, *, election_allowed: bool = False) -> Iterator[None]:
    """The body may do anything a client can; afterwards the cluster must be whole."""
    cluster.wait_leader()
    before = terms(cluster)
    yield
    assert_all_alive(cluster)
    if not election_allowed:
        after = terms(cluster)
        assert after == before, f"an election happened: terms {before} -> {after}"
    assert_converged(cluster)


@pytest.fixture(scope="module")
def base_conn(cluster):
    """An autocommit connection to the module's cluster, with tables base (one row, x = 0)
    and sink (empty, one column x) made."""
    import raftsql.driver as raftsql

    c = raftsql.connect(cluster.dsn, autocommit=True, timeout=60)
    c.execute("CREATE TABLE base(x)")
    c.execute("INSERT INTO base VALUES (0)")
    c.execute("CREATE TABLE sink(x)")
    yield c
    c.close()


@pytest.fixture
def guard(cluster):
    """`with guard(): ...` (or `guard(election_allowed=True)`): see `survives`. Test modules
    cannot import this conftest (pytest runs with --import-mode=importlib), hence a fixture."""
    return lambda **kw: survives(cluster, **kw)
