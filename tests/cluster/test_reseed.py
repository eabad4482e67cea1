"""A node whose own database file is damaged stops with a message that says how to recover, and
`raftsql node ... --reseed` brings it back from the leader (InstallSnapshot when the leader has
compacted its log, else its whole log), after which every replica is equal again."""

import time

import pytest

import raftsql.driver as raftsql
from raftsql.testing.cluster import LocalCluster


def _damage(db_path, pages=(3, 4, 5, 6)):
    with open(db_path, "r+b") as f:
        for p in pages:
            f.seek(4096 * p)
            f.write(b"\xa5" * 4096)


@pytest.mark.parametrize("snapshots", [False, True], ids=["whole-log", "install-snapshot"])
def test_a_damaged_node_stops_and_is_reseeded_from_the_leader(tmp_path, snapshots):
    args = ["--snapshot-entries", "50", "--snapshot-trailing", "10"] if snapshots else []
    c = LocalCluster(tmp_path / "c", 3, node_args=args)
    c.start()
    try:
        leader = c.wait_leader()
        victim = next(n for n in c.ids if n != leader)
        conn = raftsql.connect(c.dsn, autocommit=True, timeout=30)
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany("INSERT INTO t(v) VALUES(?)", [(f"row {i} " + "x" * 200,) for i in range(3000)])
        for i in range(200):
            conn.execute("INSERT INTO t(v) VALUES(?)", (f"single {i}",))
        c.hashes()
        # Stop the follower cleanly (its database checkpointed into the file), damage it.
        c.kill(victim, 15)
        _damage(c.data_dir(victim) / "db.sqlite")
        c.start(victim)
        deadline = time.monotonic() + 30
        while c.alive(victim) and time.monotonic() < deadline:
            conn.execute("UPDATE t SET v = v || '.' WHERE id % 7 = 0")
            time.sleep(0.2)
        assert not c.alive(victim), "the damaged node kept running"
        logtext = (c.data_dir(victim) / "node.log").read_text()
        assert "quick_check" in logtext or "malformed" in logtext
        assert "--reseed" in logtext
        # The rest of the cluster keeps writing.
        conn.execute("INSERT INTO t(v) VALUES('while it was down')")
        c.start(victim, ["--reseed"])
        hashes = c.hashes(timeout=60)
        assert len(hashes) == 3 and len(set(hashes.values())) == 1, hashes
        logtext = (c.data_dir(victim) / "node.log").read_text()
        assert "re-seeded" in logtext and "voting again" in logtext
        if snapshots:
            assert "install" in logtext.lower()
        assert list((c.data_dir(victim)).glob("damaged-*/db.sqlite"))
        assert not (c.data_dir(victim) / "reseed.json").exists()
        # A restart without the flag is an ordinary start.
        c.kill(victim)
        c.start(victim)
        conn.execute("INSERT INTO t(v) VALUES('after')")
        hashes = c.hashes(timeout=60)
        assert len(set(hashes.values())) == 1, hashes
        conn.close()
    finally:
        c.close()
