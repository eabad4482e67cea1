"""Snapshots, log compaction and InstallSnapshot with real node processes, real fsync and real
SQLite: a node that was down while the log was compacted catches up through a snapshot and
ends with the leader's content hash; interrupted and corrupted transfers; restarts after
compaction and after an install.

The long "100,000 writes" run is `benchmarks/snapshot.py --catch-up-writes 100000`, or this
file with RAFTSQL_SNAPSHOT_WRITES=100000 (CI runs a few thousand with a tiny threshold)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from raftsql.testing.cluster import LocalCluster

WRITES = int(os.environ.get("RAFTSQL_SNAPSHOT_WRITES", "3000"))
BATCH = 10  # rows per log entry (one executemany-style batch); see write_rows
# Tiny thresholds so a few thousand writes compact the log several times.
SNAPSHOT_ENV = {
    "RAFTSQL_SNAPSHOT_ENTRIES": "50",
    "RAFTSQL_SNAPSHOT_TRAILING": "10",
}


@pytest.fixture
def make_cluster(tmp_path):
    made: list[LocalCluster] = []

    def make(env: dict[str, str] | None = None, node_env: dict[str, dict[str, str]] | None = None):
        c = _Cluster(tmp_path / f"c{len(made)}", 3, env={**SNAPSHOT_ENV, **(env or {})})
        c.per_node_env = node_env or {}
        made.append(c)
        c.start()
        return c

    yield make
    for c in made:
        c.close()


class _Cluster(LocalCluster):
    per_node_env: dict[str, dict[str, str]]

    def node_environment(self, nid: str) -> dict[str, str]:
        return {**super().node_environment(nid), **self.per_node_env.get(nid, {})}


def write_rows(client, first: int, count: int, batch: int = BATCH) -> None:
    """count rows, `batch` INSERTs per log entry (an atomic batch, as executemany sends)."""
    i = first
    end = first + count
    while i < end:
        n = min(batch, end - i)
        stmts = [("INSERT INTO t (id, v) VALUES (?, ?)", [k, f"row {k}" * 3]) for k in range(i, i + n)]
        r = client.execute(stmts)
        assert r["error"] is None, r
        i += n


def node_log(c: LocalCluster, nid: str) -> str:
    return (c.data_dir(nid) / "node.log").read_text(errors="replace")


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise TimeoutError(what)


def snapshot_status(c: LocalCluster, nid: str) -> dict:
    st = c.status(nid)
    assert st is not None
    return st


def lag_one_follower(c: LocalCluster, writes: int) -> tuple[str, str, object]:
    """Stop one follower, write `writes` rows, wait until the leader's log is compacted past
    everything the follower has. Returns (leader, follower, client)."""
    leader = c.wait_leader()
    client = c.client(timeout=30)
    assert client.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])])["error"] is None
    write_rows(client, 0, 100)
    follower = next(n for n in c.ids if n != leader)
    c.hashes()  # the follower has the table and the first rows
    behind = snapshot_status(c, follower)["applied_index"]
    c.kill(follower)
    write_rows(client, 100, writes)
    st = wait_for(
        lambda: (s := c.status(leader)) and s["snapshot_index"] > behind and s,
        30,
        "the leader never compacted its log",
    )
    assert st["snapshot"]["taken"] >= 1 and st["snapshot"]["current_index"] == st["snapshot_index"]
    return leader, follower, client


def assert_converged(c: LocalCluster, client, rows: int) -> dict:
    hashes = c.hashes(timeout=60)
    assert set(hashes) == {n for n in c.ids if c.alive(n)}
    assert len(set(hashes.values())) == 1, hashes
    assert client.execute([("SELECT count(*) FROM t", [])])["rows"][0][0] == rows
    return hashes


def test_node_down_during_compaction_catches_up_through_a_snapshot(make_cluster):
    c = make_cluster()
    leader, follower, client = lag_one_follower(c, WRITES)
    c.start(follower)
    wait_for(
        lambda: (s := c.status(follower)) and s["snapshot"]["installed"] >= 1,
        60,
        "the follower never installed a snapshot",
    )
    write_rows(client, 100 + WRITES, 100)  # entries after the snapshot reach it through the log
    assert_converged(c, client, WRITES + 200)
    assert "installed snapshot at" in node_log(c, follower)
    # A leader really did send it (no entry-by-entry catch-up hiding a broken install).
    assert any(re.search(rf"sent snapshot at \d+ to {follower}", node_log(c, n)) for n in c.ids)
    # Restart after the install: the node comes back from its installed snapshot + log.
    c.kill(follower)
    c.start(follower)
    write_rows(client, 200 + WRITES, 10)
    assert_converged(c, client, WRITES + 210)
    client.close()


def test_restart_after_compaction_keeps_data(make_cluster):
    c = make_cluster()
    c.wait_leader()
    client = c.client(timeout=30)
    client.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])])
    write_rows(client, 0, 1500)
    wait_for(lambda: all((s := c.status(n)) and s["snapshot_index"] > 0 for n in c.ids), 30,
             "not every node compacted")
    assert_converged(c, client, 1500)
    rows = client.execute([("SELECT id, v FROM t ORDER BY id", [])])["rows"]
    for nid in c.ids:  # every node, kill -9: all restart from a compacted log
        c.kill(nid)
    c.start()
    c.wait_leader(timeout=30)
    assert_converged(c, client, 1500)  # (the new leader's no-op moved the index and the hash)
    assert client.execute([("SELECT id, v FROM t ORDER BY id", [])])["rows"] == rows
    for nid in c.ids:
        st = c.status(nid)
        assert st["snapshot_index"] > 0 and st["snapshot"]["current_index"] == st["snapshot_index"]
    write_rows(client, 1500, 10)
    assert_converged(c, client, 1510)
    client.close()


def test_corrupted_chunk_is_rejected_and_the_transfer_restarts(make_cluster):
    # Every node's transport corrupts one chunk of its first transfer; whichever is leader,
    # the follower must refuse that copy, and a clean resend must then succeed.
    c = make_cluster(env={"RAFTSQL_TEST_CORRUPT_SNAPSHOTS": "1"})
    leader, follower, client = lag_one_follower(c, WRITES)
    c.start(follower)
    wait_for(
        lambda: (s := c.status(follower)) and s["snapshot"]["installed"] >= 1,
        90,
        "the follower never installed a snapshot",
    )
    text = node_log(c, follower)
    assert re.search(r"rejecting snapshot at \d+ from \w+: (corrupted chunk|sha256)", text), text[-3000:]
    assert c.status(follower)["snapshot"]["rejected"] >= 1
    assert_converged(c, client, WRITES + 100)
    client.close()


def test_follower_killed_mid_transfer_restarts_cleanly(make_cluster):
    # Big rows make the snapshot a few MB, and a test hook pauses 40 ms after each 256 KiB
    # chunk, so the follower is certainly killed while receiving it.
    c = make_cluster(env={"RAFTSQL_TEST_SNAPSHOT_CHUNK_DELAY_MS": "40"})
    leader = c.wait_leader()
    client = c.client(timeout=30)
    client.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])])
    write_rows(client, 0, 100)
    follower = next(n for n in c.ids if n != leader)
    c.hashes()
    behind = c.status(follower)["applied_index"]
    c.kill(follower)
    blob = "x" * 4000
    for k in range(100, 100 + 3000, 25):  # 120 entries: past every node's staggered threshold
        r = client.execute([("INSERT INTO t (id, v) VALUES (?, ?)", [j, blob]) for j in range(k, k + 25)])
        assert r["error"] is None
    wait_for(lambda: (s := c.status(leader)) and s["snapshot_index"] > behind, 30, "no compaction")
    c.start(follower)
    wait_for(lambda: "receiving snapshot at" in node_log(c, follower), 30, "no transfer started")
    c.kill(follower, signal.SIGKILL)
    assert "received snapshot at" not in node_log(c, follower)  # it was cut off mid-transfer
    snap_dir = c.data_dir(follower) / "snapshots"
    assert any(p.name.startswith("tmp-recv-") for p in snap_dir.iterdir())  # its partial file
    c.start(follower)
    wait_for(
        lambda: (s := c.status(follower)) and s["snapshot"]["installed"] >= 1,
        90,
        "the follower never installed a snapshot after the interrupted transfer",
    )
    assert_converged(c, client, 3100)
    # Nothing of the interrupted transfer is left behind. (The follower may be taking a
    # snapshot of its own right now: its tmp-take-* file is not a leftover.)
    names = [p.name for p in snap_dir.iterdir()]
    leftovers = [n for n in names if not n.startswith(("snap-", "tmp-take-"))]
    assert leftovers == []
    assert len([n for n in names if n.startswith("snap-")]) <= 2
    client.close()


def test_member_added_while_a_node_was_down_is_reachable_after_its_snapshot(make_cluster):
    """n3 is down while n4 joins and n1 leaves, and the log is compacted past both changes. n3
    catches up by snapshot; then n2 stops, so n3 and n4 must form the majority: n3 can only
    reach n4 if the snapshot carried n4's address (the replicated address book)."""
    c = make_cluster()
    c.wait_leader()
    client = c.client(timeout=30)
    assert client.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])])["error"] is None
    write_rows(client, 0, 50)
    c.hashes()
    c.kill("n3")
    c.add_node("n4")
    c.start("n4")  # --join
    wait_for(lambda: c.status("n4") is not None, 60, "n4 never served")
    c.admin("cluster_promote", "n4", timeout=60)
    c.admin("cluster_remove", "n1", timeout=30)
    c.kill("n1", signal.SIGTERM)
    change_index = c.status("n2")["applied_index"]
    write_rows(client, 50, 1000)
    wait_for(lambda: (s := c.status("n2")) and s["snapshot_index"] > change_index and s, 60,
             "n2 never compacted its log past the membership changes")
    wait_for(lambda: (s := c.status("n4")) and s["snapshot_index"] > change_index and s, 60,
             "n4 never compacted its log past the membership changes")
    c.start("n3")
    wait_for(lambda: (s := c.status("n3")) and s["snapshot"]["installed"] >= 1, 60,
             "n3 never installed a snapshot")
    wait_for(lambda: (s := c.status("n3")) and s["applied_index"] >= change_index, 60, "n3 lags")
    assert c.status("n3")["members"]["n4"] == c.address("n4")
    c.kill("n2", signal.SIGTERM)
    write_rows(client, 1050, 20)  # needs n3 and n4 to talk to each other
    assert client.execute([("SELECT count(*) FROM t", [])])["rows"][0][0] == 1070
    client.close()
