"""A connection inherited through fork() (gunicorn --preload, multiprocessing's fork start
method). Each child gets its own client identity: with the parent's, the nodes took a child's
write for a resend of another process's write with the same serial and answered it with that
write's stored result, applying nothing, while the child saw success. A transaction open at the
fork stays with the parent; in the child it is refused until rollback()."""

from __future__ import annotations

import os

import pytest

import raftsql.driver as db

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _in_child(body) -> int:
    """Run body() in a forked child; its exit status (0: body returned, 1: it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            os.write(2, f"child failed: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_children_writing_on_an_inherited_connection_lose_nothing(cluster, table):
    conn = db.connect(cluster.dsn, isolation_level=None, timeout=20)
    try:
        conn.execute(f"CREATE TABLE {table} (who TEXT, i INTEGER)")
        conn.execute(f"INSERT INTO {table} VALUES ('parent', 0)")
        cur = conn.execute(f"SELECT i FROM {table}")  # a result open at the fork

        def child(w):
            def body():
                for i in range(5):
                    c = conn.execute(f"INSERT INTO {table} VALUES (?, ?)", (f"w{w}", i))
                    assert c.rowcount == 1
            return body

        assert [_in_child(child(w)) for w in range(2)] == [0, 0]
        conn.execute(f"INSERT INTO {table} VALUES ('parent', 1)")
        assert cur.fetchall() == [(0,)]  # the parent's own result is intact
        rows = conn.execute(f"SELECT who, count(*) FROM {table} GROUP BY who ORDER BY who").fetchall()
        assert rows == [("parent", 2), ("w0", 5), ("w1", 5)]
    finally:
        conn.close()


def test_a_transaction_open_at_the_fork_stays_with_the_parent(cluster, table):
    conn = db.connect(cluster.dsn, timeout=20)  # legacy mode: INSERT opens a transaction
    try:
        conn.execute(f"CREATE TABLE {table} (who TEXT)")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES ('parent')")

        def body():
            assert conn.in_transaction
            with pytest.raises(db.TransactionAborted, match="fork"):
                conn.execute(f"INSERT INTO {table} VALUES ('copy')")
            with pytest.raises(db.TransactionAborted, match="fork"):
                conn.commit()
            conn.execute(f"INSERT INTO {table} VALUES ('child')")  # a transaction of its own
            conn.commit()

        assert _in_child(body) == 0
        conn.commit()
        rows = conn.execute(f"SELECT who FROM {table} ORDER BY who").fetchall()
        assert rows == [("child",), ("parent",)]
    finally:
        conn.close()
