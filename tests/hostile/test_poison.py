"""Hostile client, poison statements: whatever a committed write's statements do, every node
applies it to the same result and keeps running. Each test runs on a real 3-node cluster through raftsql.driver and checks, after the
attack, that every node is alive, that no election happened and that all databases hash equal
(the `guard` fixture, tests/hostile/conftest.py)."""

import pytest

import raftsql.driver as raftsql


@pytest.fixture(scope="module")
def conn(cluster):
    c = raftsql.connect(cluster.dsn, autocommit=True, timeout=30)
    yield c
    c.close()


def test_repro_a_fts5_integrity_check_reporting_corruption(cluster, conn, guard):
    with guard():
        conn.execute("CREATE TABLE src(a)")
        conn.execute("CREATE VIRTUAL TABLE ftx USING fts5(a, content='src')")
        conn.execute("INSERT INTO src VALUES('hello')")
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute("INSERT INTO ftx(ftx, rank) VALUES('integrity-check', 1)")
        assert info.value.sqlite_errorname == "SQLITE_CORRUPT_VTAB"
        conn.execute("INSERT INTO src VALUES('after')")
    assert conn.execute("SELECT count(*) FROM src").fetchone() == (2,)


def test_repro_b_returning_larger_than_the_blob_limit(cluster, conn, guard):
    # Writing 120 MB in one entry holds each node's apply for about a second. The apply thread
    # never drives Raft, so heartbeats go on: no election.
    with guard():
        conn.execute("CREATE TABLE big(v)")
        with pytest.raises(raftsql.DataError) as info:
            conn.execute(
                "INSERT INTO big(v) VALUES(zeroblob(60000000)),(zeroblob(60000000)) RETURNING v"
            )
        assert "result too big" in str(info.value) and "16777216" in str(info.value)
        assert conn.execute("SELECT count(*) FROM big").fetchone() == (0,)


def test_a_node_restarted_after_the_poison_entries_starts_cleanly(cluster, conn, guard):
    # Restarting replays the log, poison entries included (unless a snapshot covers them).
    victim = next(n for n in cluster.ids if n != cluster.wait_leader())
    cluster.kill(victim)
    cluster.start(victim)
    with guard():
        conn.execute("CREATE TABLE IF NOT EXISTS after_restart(x)")
        conn.execute("INSERT INTO after_restart VALUES(1)")


@pytest.mark.parametrize(
    "setup, attack, error",
    [
        # Virtual tables reporting on their own content.
        (["CREATE TABLE c4(a)", "CREATE VIRTUAL TABLE f4 USING fts4(content='c4', a)",
          "INSERT INTO c4 VALUES('zz')"],
         "INSERT INTO f4(f4) VALUES('integrity-check')", "SQLITE_CORRUPT_VTAB"),
        (["CREATE TABLE s5(a)", "CREATE VIRTUAL TABLE f5 USING fts5(a, content='s5')",
          "INSERT INTO f5(rowid, a) VALUES(1, 'hello world')"],
         "CREATE TABLE hits AS SELECT * FROM f5 WHERE f5 MATCH 'hello'", "SQLITE_CORRUPT_VTAB"),
        (["CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)"],
         "INSERT INTO r VALUES(1, 5, 1)", "SQLITE_CONSTRAINT"),
        # Results over every size limit.
        (["CREATE TABLE v(x)"], "INSERT INTO v VALUES(zeroblob(200000000))", "SQLITE_TOOBIG"),
        (["CREATE TABLE v2(x)"], "INSERT INTO v2 VALUES(randomblob(200000000))", "SQLITE_TOOBIG"),
        (["CREATE TABLE v3(x)"], "INSERT INTO v3 VALUES(printf('%.*c', 2000000000, 'x'))",
         "SQLITE_TOOBIG"),
        (["CREATE TABLE v4(x)"],
         "INSERT INTO v4 SELECT zeroblob(5000000) FROM (WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL "
         "SELECT i+1 FROM c WHERE i < 10) SELECT i FROM c) RETURNING x", "RAFTSQL_RESULT_TOO_BIG"),
        # Out of memory a statement would need: stopped by SQLite's limits first.
        (["CREATE TABLE v5(x)"],
         "INSERT INTO v5 SELECT group_concat(zeroblob(60000000)) FROM (SELECT 1 UNION ALL SELECT 2)",
         "SQLITE_TOOBIG"),
        # Errors raised inside triggers and RETURNING.
        (["CREATE TABLE tt(x)",
          "CREATE TRIGGER ttr BEFORE INSERT ON tt WHEN new.x < 0 "
          "BEGIN SELECT RAISE(ROLLBACK, 'negative'); END"],
         "INSERT INTO tt VALUES(-1) RETURNING x", "SQLITE_CONSTRAINT_TRIGGER"),
        (["CREATE TABLE tj(x)"], "INSERT INTO tj VALUES('{') RETURNING json(x)", "SQLITE_ERROR"),
    ],
    ids=["fts4-integrity", "fts5-missing-content", "rtree", "zeroblob", "randomblob", "printf",
         "returning-16MiB", "group_concat", "trigger-raise-rollback", "returning-json"],
)
def test_each_class_of_apply_failure(cluster, conn, guard, setup, attack, error):
    # 50 MB written then rolled back, or 120 MB built: heavy applies, and still no election.
    with guard():
        for s in setup:
            conn.execute(s)
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute(attack)
        assert info.value.sqlite_errorname == error, info.value


def test_repro_a_like_that_would_hold_every_apply_for_an_hour(cluster, conn, guard):
    # One LIKE of a 99 MB value against a 50,000-character pattern compares about 5e12
    # characters inside one C call, which SQLite's interrupt and progress handler cannot stop:
    # about an hour in every node's apply thread, from one small request. Its work is now
    # counted against the step limit before the call starts (server/costed.py).
    with guard():
        conn.execute("CREATE TABLE flags(x)")
        with pytest.raises(raftsql.OperationalError) as info:
            conn.execute("INSERT INTO flags SELECT 1 WHERE printf('%.*c', 99000000, 'a') LIKE ?",
                         ("%" + "a" * 49998 + "b",))
        assert info.value.sqlite_errorname == "RAFTSQL_STEP_LIMIT"
        with pytest.raises(raftsql.OperationalError) as info:
            conn.execute("INSERT INTO flags SELECT trim(printf('%.*c', 50000000, 'a'), ?)",
                         ("".join(map(chr, range(0x100, 0x5000))) + "a",))
        assert info.value.sqlite_errorname == "RAFTSQL_STEP_LIMIT"
        # instr() of two strings runs in linear time: a 50 MB needle is fine (SQLite's own
        # compares 50 MB at each of 49 million places).
        conn.execute("INSERT INTO flags SELECT instr(printf('%.*c', 99000000, 'a'), "
                     "printf('%.*c', 50000000, 'a') || 'b')")
        conn.execute("INSERT INTO flags SELECT 'x' LIKE '%x%'")
    assert conn.execute("SELECT x FROM flags").fetchall() == [(0,), (1,)]
