"""Hostile client, memory: a read of any size streams with bounded memory on the node and in the
driver, every chunk from one snapshot; a value too large for a frame is a clear error. Real 3-node cluster, through raftsql.driver."""

import resource
import threading
import time

import pytest

import raftsql.driver as raftsql


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples each node's RSS every 20 ms while the block runs; .growth is the largest rise
    over the value before, per node, in MB."""

    def __init__(self, cluster):
        self.pids = {n: cluster.procs[n].pid for n in cluster.ids}

    def __enter__(self):
        self.before = {n: _rss_mb(p) for n, p in self.pids.items()}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            for n, p in self.pids.items():
                self.peak[n] = max(self.peak[n], _rss_mb(p))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = {n: self.peak[n] - self.before[n] for n in self.pids}


@pytest.fixture(scope="module")
def conn(cluster):
    c = raftsql.connect(cluster.dsn, autocommit=True, timeout=60)
    yield c
    c.close()


def test_eight_rows_of_50_mb_stream_instead_of_failing(cluster, conn, guard):
    # 8 rows of 50 MB: built whole on every node and refused at the frame limit before.
    q = ("SELECT x, zeroblob(50000000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
         "SELECT x+1 FROM c WHERE x < 8) SELECT x FROM c)")
    # 400 MB streamed through the leader can, rarely, cost an election (README, Known problems:
    # seen in the whole suite, never with this test alone); the stream must still complete
    # and the cluster stay whole and converged.
    with guard(election_allowed=True), PeakRSS(cluster) as rss:
        seen = [row[0] for row in conn.execute(q)]
    assert seen == list(range(1, 9))
    # One 50 MB row at a time (plus its frame and copies), not 400 MB.
    assert max(rss.growth.values()) < 300, rss.growth


def test_iterating_a_large_result_uses_bounded_memory(cluster, conn, guard):
    # 600 MB in rows of 1 MB: far more than the chunk, so it must come in pieces.
    q = ("SELECT x, zeroblob(1000000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
         "SELECT x+1 FROM c WHERE x < 600) SELECT x FROM c)")
    driver_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with guard(), PeakRSS(cluster) as rss:
        cur = conn.execute(q)
        n = 0
        while True:
            rows = cur.fetchmany(50)
            if not rows:
                break
            n += len(rows)
    assert n == 600
    assert max(rss.growth.values()) < 120, rss.growth
    driver_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - driver_before
    assert driver_growth < 120, driver_growth


def test_rows_of_one_result_come_from_one_snapshot(cluster, conn, guard):
    conn.execute("CREATE TABLE snap(id INTEGER PRIMARY KEY, pad BLOB)")
    conn.executemany("INSERT INTO snap(pad) VALUES(zeroblob(10000))", [()] * 1000)
    with guard():
        cur = conn.execute("SELECT id FROM snap ORDER BY id")
        first = cur.fetchmany(10)
        other = raftsql.connect(cluster.dsn, autocommit=True)
        other.execute("DELETE FROM snap")
        other.close()
        rest = cur.fetchall()
    assert [r[0] for r in first + rest] == list(range(1, 1001))
    assert conn.execute("SELECT count(*) FROM snap").fetchone() == (0,)


def test_a_value_larger_than_a_frame_names_the_limit(cluster, conn, guard):
    with guard():
        with pytest.raises(raftsql.DataError) as info:
            conn.execute("SELECT zeroblob(90000000)").fetchall()
    assert "max_frame_size" in str(info.value)


def test_an_abandoned_cursor_is_closed_and_the_connection_goes_on(cluster, conn, guard):
    q = ("SELECT x, zeroblob(100000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
         "SELECT x+1 FROM c WHERE x < 500) SELECT x FROM c)")
    with guard():
        for _ in range(40):  # more than the 16 cursors a connection may keep open
            cur = conn.execute(q)
            assert cur.fetchone()[0] == 1
            cur.close()
        a, b = conn.execute(q), conn.execute(q)  # two open at once, interleaved
        assert [a.fetchone()[0], b.fetchone()[0], a.fetchone()[0]] == [1, 1, 2]
        assert len(b.fetchall()) == 499 and len(a.fetchall()) == 498


def test_invalid_utf8_text_follows_text_factory_as_in_sqlite3(cluster, conn, guard):
    import sqlite3

    sql = ["CREATE TABLE u(x TEXT)", "INSERT INTO u VALUES(CAST(x'ff61' AS TEXT)), ('ok')"]
    local = sqlite3.connect(":memory:")
    for s in sql:
        local.execute(s)
        conn.execute(s)
    for c in (local, conn):
        with pytest.raises(c.OperationalError if hasattr(c, "OperationalError") else
                           sqlite3.OperationalError) as info:
            c.execute("SELECT x FROM u").fetchall()
        assert "Could not decode to UTF-8 column 'x'" in str(info.value)
    with guard():
        for factory in (bytes, lambda b: b.decode("utf-8", "replace"), str):
            local.text_factory = conn.text_factory = factory
            q = "SELECT x FROM u WHERE x = 'ok'" if factory is str else "SELECT x FROM u"
            assert conn.execute(q).fetchall() == local.execute(q).fetchall()


def test_many_large_entries_keep_node_memory_bounded(cluster, conn, guard):
    # 30 entries of about 3.9 MB each (executemany): the log cache keeps recent entries only.
    conn.execute("CREATE TABLE bulk(v BLOB)")
    blob = b"x" * 39_000
    with guard(election_allowed=True), PeakRSS(cluster):
        for _ in range(30):
            conn.executemany("INSERT INTO bulk VALUES(?)", [(blob,)] * 100)
        time.sleep(0.5)
    after = {n: _rss_mb(p) for n, p in PeakRSS(cluster).pids.items()}
    assert max(after.values()) < 350, after


def test_one_certificate_cannot_hold_every_cursor_of_a_node(cluster, conn, guard):
    """Unfinished streamed results are bounded per node (256) and per certificate (a quarter):
    one client holding 16 on each of many connections used to make every other client's
    larger reads fail with TOO_MANY_CURSORS."""
    q = ("SELECT x, zeroblob(100000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
         "SELECT x+1 FROM c WHERE x < 30) SELECT x FROM c)")
    node = cluster.wait_leader()
    hog_dsn = (f"raftsql://{cluster.address(node)}/?certs={cluster.client_certs('hog', 'read')}")
    hogs, held = [], []
    with guard():
        try:
            with pytest.raises(raftsql.OperationalError, match="this certificate holds 64"):
                for _ in range(5):
                    h = raftsql.connect(hog_dsn, autocommit=True, timeout=20)
                    hogs.append(h)
                    for _ in range(16):
                        cur = h.execute(q)
                        assert cur.fetchone()[0] == 1
                        held.append(cur)
            assert len(held) == 64
            # Another certificate still streams a result of many chunks from that node.
            other = raftsql.connect(f"raftsql://{cluster.address(node)}/?certs="
                                    f"{cluster.client_certs('other', 'read')}",
                                    autocommit=True, timeout=20)
            try:
                assert len(other.execute(q).fetchall()) == 30
            finally:
                other.close()
        finally:
            for h in hogs:
                h.close()
