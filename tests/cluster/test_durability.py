"""durability="leader": a write answered once the leader's disk holds it (server/DESIGN.md,
"Leader durability"), on a real 3-node cluster through the driver. What a leader crash does to
such writes is tests/faults/test_leader_durability.py."""

import pytest

import raftsql.driver as db
from raftsql.testing.cluster import running


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(tmp_path_factory.mktemp("durability"), 3) as c:
        yield c


def test_a_leader_durability_write_is_answered_early_and_read_back_at_once(cluster):
    conn = db.connect(cluster.dsn, autocommit=True, durability="leader")
    try:
        assert conn.durability == "leader"
        # The INSERT is prepared while the CREATE may not be applied yet: the leader prepares
        # it again once the client's own early write is applied.
        conn.execute("CREATE TABLE e1 (x)")
        cur = conn.execute("INSERT INTO e1 VALUES (1)")
        assert cur._result["early_term"] > 0  # answered before the quorum
        assert (cur.rowcount, cur.lastrowid) == (-1, None)  # not applied yet: unknown
        # Read-your-writes: the read waits for the write (it commits while the term lasts).
        assert conn.execute("SELECT x FROM e1").fetchall() == [(1,)]
        stale = conn.cursor()
        stale.consistency = "stale"
        conn.execute("INSERT INTO e1 VALUES (2)")
        assert stale.execute("SELECT count(*) FROM e1").fetchone() == (2,)
        # A statement that returns rows needs its result: it waits for the quorum.
        cur = conn.execute("INSERT INTO e1 VALUES (3) RETURNING x")
        assert cur.fetchall() == [(3,)] and not cur._result.get("early_term")
        # Per cursor: quorum on this one.
        q = conn.cursor()
        q.durability = "quorum"
        q.execute("INSERT INTO e1 VALUES (4)")
        assert q.rowcount == 1 and not q._result.get("early_term")
        many = conn.cursor()
        many.executemany("INSERT INTO e1 VALUES (?)", [(5,), (6,)])
        assert many._result["early_term"] > 0
        # An SQL error found when preparing is still reported.
        with pytest.raises(db.OperationalError, match="no such table"):
            conn.execute("INSERT INTO missing VALUES (1)")
        assert conn.execute("SELECT count(*) FROM e1").fetchone() == (6,)
    finally:
        conn.close()


def test_a_transaction_commits_at_quorum_whatever_the_durability(cluster):
    conn = db.connect(cluster.dsn, durability="leader")  # sqlite3's default transaction control
    try:
        conn.execute("CREATE TABLE e2 (x)")
        cur = conn.execute("INSERT INTO e2 VALUES (1)")  # opens a transaction
        assert conn.in_transaction and cur.rowcount == 1
        conn.commit()
        assert conn.execute("SELECT count(*) FROM e2").fetchone() == (1,)
    finally:
        conn.close()


def test_the_durability_setting_is_checked_like_consistency(cluster):
    conn = db.connect(cluster.dsn + "&durability=leader", autocommit=True)
    assert conn.durability == "leader"
    with pytest.raises(db.ProgrammingError, match="durability must be one of quorum, leader"):
        conn.durability = "disk"
    with pytest.raises(db.ProgrammingError, match="durability must be one of"):
        conn.cursor().durability = "async"
    conn.close()
    with pytest.raises(db.ProgrammingError, match="durability must be one of"):
        db.connect(cluster.dsn, durability="none")
    with pytest.raises(db.ProgrammingError, match="durability must be one of"):
        db.connect(cluster.dsn + "&durability=fast")
    assert db.connect(cluster.dsn).durability == "quorum"  # the default


def test_a_window_of_zero_turns_early_answers_off(tmp_path):
    with running(tmp_path / "c", 1, node_args=["--max-unreplicated-writes", "0"]) as c:
        conn = db.connect(c.dsn, autocommit=True, durability="leader")
        conn.execute("CREATE TABLE z (x)")
        cur = conn.execute("INSERT INTO z VALUES (1)")
        assert cur.rowcount == 1 and not cur._result.get("early_term")
        conn.close()
