"""Pipeline mode (Connection.pipeline), end to end on a real 3-node cluster: queued writes
travel with the commit (fewer requests), reads and savepoints send them first, a queued
write's error fails the whole transaction (nothing applied), conflicts are still caught, and
autocommit is unchanged."""

from __future__ import annotations

import pytest

import raftsql.driver as db


def _count_requests(c) -> list:
    calls = []
    inner = c._client._call

    def counting(req, *a, **kw):
        calls.append(req.get("op") + (":commit" if "commit" in req else ""))
        return inner(req, *a, **kw)

    c._client._call = counting
    return calls


def _setup(connect, table):
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL CHECK (bal >= 0))")
    auto.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(0, 100), (1, 100)])
    auto.execute(f"CREATE TABLE {table}_log (src INTEGER, dst INTEGER, amount INTEGER)")
    return auto


def _rows(c, table):
    return c.execute(f"SELECT id, bal FROM {table} ORDER BY id").fetchall()


def test_a_transfer_is_three_requests_and_commits(connect, table):
    auto = _setup(connect, table)
    c = connect()
    calls = _count_requests(c)
    with c.pipeline():
        with c:
            a = c.execute(f"SELECT bal FROM {table} WHERE id = 0").fetchone()[0]
            b = c.execute(f"SELECT bal FROM {table} WHERE id = 1").fetchone()[0]
            cur = c.execute(f"UPDATE {table} SET bal = ? WHERE id = 0", (a - 10,))
            assert cur.rowcount == -1 and cur.lastrowid is None  # not sent yet
            c.execute(f"UPDATE {table} SET bal = ? WHERE id = 1", (b + 10,))
            c.execute(f"INSERT INTO {table}_log VALUES (0, 1, 10)")
            assert c.in_transaction
    assert calls == ["execute", "execute", "execute:commit"]
    assert _rows(auto, table) == [(0, 90), (1, 110)]
    assert auto.execute(f"SELECT * FROM {table}_log").fetchall() == [(0, 1, 10)]


def test_a_read_after_queued_writes_sees_them(connect, table):
    auto = _setup(connect, table)
    c = connect()
    calls = _count_requests(c)
    with c.pipeline():
        c.execute(f"UPDATE {table} SET bal = bal - 5 WHERE id = 0")
        c.executemany(f"INSERT INTO {table}_log VALUES (?, ?, ?)", [(0, 1, 5), (1, 0, 1)])
        assert calls == []
        assert _rows(c, table) == [(0, 95), (1, 100)]  # sends both first (read-your-writes)
        assert c.execute(f"SELECT count(*) FROM {table}_log").fetchone() == (2,)
        assert _rows(auto, table) == [(0, 100), (1, 100)]  # nothing applied yet
        c.commit()
    assert calls[:2] == ["execute", "execute"]
    assert _rows(auto, table) == [(0, 95), (1, 100)]


def test_a_failing_queued_write_fails_the_whole_commit(connect, table):
    auto = _setup(connect, table)
    c = connect()
    with c.pipeline():
        c.execute(f"UPDATE {table} SET bal = bal + 1 WHERE id = 1")
        c.execute(f"UPDATE {table} SET bal = bal - 500 WHERE id = 0")  # CHECK fails at commit
        with pytest.raises(db.IntegrityError) as info:
            c.commit()
    assert "CHECK" in str(info.value)
    assert not c.in_transaction
    assert _rows(auto, table) == [(0, 100), (1, 100)]  # nothing of it applied


def test_a_failing_write_sent_by_a_read_fails_the_transaction(connect, table):
    auto = _setup(connect, table)
    c = connect()
    with c.pipeline():
        c.execute("BEGIN")
        c.execute(f"INSERT INTO {table} VALUES (0, 1)")  # duplicate key
        with pytest.raises(db.IntegrityError, match="pipelined write"):
            c.execute(f"SELECT * FROM {table}")
        with pytest.raises(db.IntegrityError):  # the explicit transaction is doomed
            c.execute(f"SELECT * FROM {table}")
        c.rollback()
    assert _rows(auto, table) == [(0, 100), (1, 100)]


def test_leaving_the_block_sends_queued_writes_and_raises_their_error(connect, table):
    auto = _setup(connect, table)
    c = connect()
    with pytest.raises(db.IntegrityError):
        with c.pipeline():
            c.execute(f"INSERT INTO {table} VALUES (1, 1)")
    c.rollback()
    with c.pipeline():
        c.execute(f"INSERT INTO {table} VALUES (2, 7)")
    assert c.in_transaction  # sent as a preview: the transaction is still open
    c.commit()
    assert _rows(auto, table) == [(0, 100), (1, 100), (2, 7)]


def test_savepoints_send_queued_writes_first(connect, table):
    auto = _setup(connect, table)
    c = connect()
    with c.pipeline():
        c.execute("BEGIN")
        c.execute(f"UPDATE {table} SET bal = 1 WHERE id = 0")
        c.execute("SAVEPOINT s")
        c.execute(f"UPDATE {table} SET bal = 2 WHERE id = 1")
        c.execute("ROLLBACK TO s")
        c.execute(f"INSERT INTO {table} VALUES (3, 3)")
        c.execute("COMMIT")
    assert _rows(auto, table) == [(0, 1), (1, 100), (3, 3)]


def test_conflicts_are_still_caught(connect, table):
    auto = _setup(connect, table)
    c = connect()
    with c.pipeline():
        a = c.execute(f"SELECT bal FROM {table} WHERE id = 0").fetchone()[0]
        auto.execute(f"UPDATE {table} SET bal = 50 WHERE id = 0")  # after the read
        c.execute(f"UPDATE {table} SET bal = ? WHERE id = 0", (a - 10,))
        with pytest.raises(db.SerializationError):
            c.commit()
    assert _rows(auto, table) == [(0, 50), (1, 100)]


def test_autocommit_and_returning_are_not_queued(connect, table):
    _setup(connect, table)
    auto = connect(autocommit=True)
    with auto.pipeline():
        assert auto.execute(f"UPDATE {table} SET bal = 7 WHERE id = 0").rowcount == 1
    c = connect()
    with c.pipeline():
        cur = c.execute(f"UPDATE {table} SET bal = bal + 1 WHERE id = 0 RETURNING bal")
        assert cur.fetchall() == [(8,)]
        assert c.execute(f"DELETE FROM {table} WHERE id = 1").rowcount == -1  # queued
        c.commit()
    assert _rows(auto, table) == [(0, 8)]


def test_a_queued_write_that_cannot_compile_fails_the_commit_with_its_error(connect, table):
    auto = _setup(connect, table)
    c = connect()
    with c.pipeline():
        c.execute(f"UPDATE {table} SET bal = 1 WHERE id = 0")
        c.execute("UPDATE no_such_table SET x = 1")
        with pytest.raises(db.OperationalError, match="no such table: no_such_table") as info:
            c.commit()
    assert info.value.statement == 1
    assert _rows(auto, table) == [(0, 100), (1, 100)]


def test_a_queued_write_stays_queued_when_sending_it_finds_no_leader(connect, table):
    """Unavailable while the queued writes are sent (before a read): nothing was applied and
    the transaction stays open, so the write must still be there for the retry and the commit."""
    from raftsql.driver import _client

    auto = _setup(connect, table)
    c = connect()
    inner = c._client.execute_in_transaction
    calls = []

    def flaky(*a, **kw):
        calls.append(a[0][0])
        if len(calls) == 1:
            raise _client.Unavailable("no leader (test)")
        return inner(*a, **kw)

    c._client.execute_in_transaction = flaky
    with c.pipeline():
        c.execute(f"UPDATE {table} SET bal = 5 WHERE id = 0")
        with pytest.raises(db.OperationalError, match="no leader"):
            c.execute(f"SELECT bal FROM {table} WHERE id = 0")
        assert c.in_transaction
        assert c.execute(f"SELECT bal FROM {table} WHERE id = 0").fetchone() == (5,)
        c.commit()
    assert _rows(auto, table) == [(0, 5), (1, 100)]
