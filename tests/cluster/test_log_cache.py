"""Bounded log memory with real node processes: with a log cache of one byte, every
durable entry leaves memory at once, so a follower that was down catches up entirely from the
leader's segment files, and a restart of every node boots from the log's index alone."""

from __future__ import annotations

import time

import pytest

from raftsql.testing.cluster import LocalCluster

CACHE_ENV = {"RAFTSQL_LOG_CACHE_BYTES": "1"}


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "c", 3, env=CACHE_ENV)
    c.start()
    yield c
    c.close()


def write_rows(client, first: int, count: int, batch: int = 10) -> None:
    for i in range(first, first + count, batch):
        stmts = [("INSERT INTO t (id, v) VALUES (?, ?)", [k, f"row {k}" * 20]) for k in range(i, i + batch)]
        assert client.execute(stmts)["error"] is None


def converged(c: LocalCluster, client, rows: int) -> None:
    hashes = c.hashes(timeout=60)
    assert set(hashes) == set(c.ids) and len(set(hashes.values())) == 1, hashes
    assert client.execute([("SELECT count(*) FROM t", [])])["rows"][0][0] == rows


def test_follower_catches_up_from_the_leaders_segments_and_all_restart(cluster):
    c = cluster
    leader = c.wait_leader()
    client = c.client(timeout=30)
    assert client.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])])["error"] is None
    write_rows(client, 0, 100)
    follower = next(n for n in c.ids if n != leader)
    c.hashes()
    c.kill(follower)
    write_rows(client, 100, 600)  # 60 entries it lacks, in no node's memory
    c.start(follower)
    converged(c, client, 700)
    st = c.status(follower)
    assert st["snapshot"]["installed"] == 0 and st["snapshot_index"] == 0  # by appends, not a snapshot
    for nid in c.ids:  # kill -9 everyone: each boots from its log's index, reads data on demand
        c.kill(nid)
    c.start()
    c.wait_leader(timeout=30)
    write_rows(client, 700, 20)
    time.sleep(0.2)
    converged(c, client, 720)
    client.close()
