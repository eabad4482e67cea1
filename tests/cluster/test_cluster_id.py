"""The cluster's id: two clusters whose node certificates come from one CA, with the same node
ids, are told apart. A node started on another cluster's data directory is refused by its
peers (and refuses them): it cannot overwrite their log, nor they its data.

Without the id, the two clusters' nodes trust each other completely (same CA, same names):
the foreign node joins the other cluster's Raft group, whose leader then replicates into a log
and a database that hold another cluster's history."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw

import raftsql.driver as db
from raftsql.testing.cluster import LocalCluster


def _cluster_ids(c: LocalCluster, nodes: list[str], timeout: float = 15.0) -> dict[str, str]:
    """Each node's cluster id, once all of them know one."""
    deadline = time.monotonic() + timeout
    ids: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        ids = {n: (c.status(n) or {}).get("cluster_id") for n in nodes}
        if all(ids.values()):
            return ids  # type: ignore[return-value]
        time.sleep(0.1)
    raise AssertionError(f"no cluster id on every node: {ids}")


def _write(c: LocalCluster, sql: str) -> None:
    conn = db.connect(c.dsn, timeout=20)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def test_a_node_on_another_clusters_data_is_refused_both_ways(tmp_path: Path):
    a = LocalCluster(tmp_path / "a")
    shutil.copytree(a.dir / "certs", tmp_path / "b" / "certs")  # one CA for both clusters
    b = LocalCluster(tmp_path / "b", host=a.host)
    try:
        a.start()
        a.wait_leader()
        _write(a, "CREATE TABLE mine (x)")
        ids_a = _cluster_ids(a, a.ids)
        assert len(set(ids_a.values())) == 1
        b.start()
        b.wait_leader()
        _write(b, "CREATE TABLE theirs (x)")
        ids_b = _cluster_ids(b, b.ids)
        assert len(set(ids_b.values())) == 1
        id_a, id_b = ids_a["n1"], ids_b["n1"]
        assert id_a != id_b
        b.hashes()  # every node of b has applied its CREATE TABLE (n3's copy must hold it)
        b.close()

        # An operator swaps n3's data directory for the one of the other cluster's n3.
        a.kill("n3", signal.SIGTERM)
        shutil.rmtree(a.data_dir("n3"))
        shutil.copytree(b.data_dir("n3"), a.data_dir("n3"))
        a.start("n3")
        foreign = None
        deadline = time.monotonic() + 15
        while foreign is None and time.monotonic() < deadline:
            foreign = a.status("n3")
            time.sleep(0.1)
        assert foreign is not None and foreign["cluster_id"] == id_b
        applied_b = foreign["applied_index"]

        leader = a.wait_leader(exclude=("n3",))
        before = a.status(leader)["last_index"]
        for i in range(20):
            _write(a, f"INSERT INTO mine VALUES ({i})")
        time.sleep(2)  # many redials and heartbeats' worth

        st = a.status(leader)
        assert st["progress"]["n3"]["match"] <= before < st["last_index"], st["progress"]
        st3 = a.status("n3")
        assert st3["cluster_id"] == id_b and st3["applied_index"] == applied_b, st3
        assert st3["leader"] != leader or st3["term"] != st["term"], st3
        for n in ("n1", "n2"):
            assert a.status(n)["cluster_id"] == id_a
        log_leader = (a.data_dir(leader) / "node.log").read_text()
        log3 = (a.data_dir("n3") / "node.log").read_text()
        assert "two different clusters" in log_leader, log_leader[-3000:]
        assert "two different clusters" in log3, log3[-3000:]
        # Once a minute per peer, not at every redial.
        other = "n2" if leader == "n1" else "n1"
        log_other = (a.data_dir(other) / "node.log").read_text()
        assert log_other.count("two different clusters") <= 2, log_other[-3000:]

        # `raftsql status` points at the odd one out.
        out = subprocess.run([sys.executable, "-m", "raftsql.cli", "status", a.dsn],
                             capture_output=True, text=True, timeout=60)
        assert "the nodes hold the data of different clusters" in out.stdout, out.stdout + out.stderr
        assert f"n3={id_b}" in out.stdout and f"{leader}={id_a}" in out.stdout, out.stdout

        # The cluster goes on without n3, and n3 keeps the other cluster's data untouched.
        a.kill("n3", signal.SIGTERM)
        conn = db.connect(a.dsn, timeout=20)
        try:
            assert conn.execute("SELECT count(*) FROM mine").fetchone()[0] == 20
        finally:
            conn.close()
        d3 = apsw.Connection(str(a.data_dir("n3") / "db.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            tables = {r[0] for r in d3.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        finally:
            d3.close()
        assert "theirs" in tables and "mine" not in tables, tables
    finally:
        a.close()
        b.close()
