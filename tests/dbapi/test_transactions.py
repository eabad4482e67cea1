"""Serializable interactive transactions, end to end (real 3-node cluster, TLS, the real
driver): lost updates and write skew prevented, conflicts only on the rows really read,
reads of one's own uncommitted writes, isolation from other connections, explicit
BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE as sqlite3 runs them, read-only and write-only
transactions, and concurrent read-then-write transfers that keep the total."""

from __future__ import annotations

import sqlite3
import threading

import pytest

import raftsql.driver as db
from raftsql.driver import _connection


def _accounts(c, table, n=2, balance=100):
    c.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)")
    c.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(i, balance) for i in range(n)])


def _bal(c, table, i):
    return c.execute(f"SELECT bal FROM {table} WHERE id = ?", (i,)).fetchone()[0]


# --------------------------------------------------------------------------- must-show 2


def test_lost_update_is_prevented_one_commits_the_other_gets_a_serialization_error(connect, table):
    auto = connect(autocommit=True)
    _accounts(auto, table)
    a, b = connect(), connect()
    # Both read the same row, then both write a value computed from what they read.
    bal_a, bal_b = _bal(a, table, 0), _bal(b, table, 0)
    a.execute(f"UPDATE {table} SET bal = ? WHERE id = 0", (bal_a + 10,))
    b.execute(f"UPDATE {table} SET bal = ? WHERE id = 0", (bal_b + 20,))
    a.commit()
    with pytest.raises(db.SerializationError) as info:
        b.commit()
    err = info.value
    assert isinstance(err, db.OperationalError) and err.retryable
    assert err.sqlite_errorname == "RAFTSQL_SERIALIZATION" and err.sqlite_errorcode == 517
    assert not b.in_transaction
    assert _bal(auto, table, 0) == 110  # a's update, not lost, and b's not applied
    # Run again, b now succeeds on the new value.
    b.execute(f"UPDATE {table} SET bal = ? WHERE id = 0", (_bal(b, table, 0) + 20,))
    b.commit()
    assert _bal(auto, table, 0) == 130


def test_only_rows_really_read_conflict(connect, table):
    """A change to a row the transaction did not read is no conflict, even in the same table;
    a change to a row it read is, reported by commit()."""
    auto = connect(autocommit=True)
    _accounts(auto, table, n=3)
    c = connect()
    c.execute(f"UPDATE {table} SET bal = bal - 1 WHERE id = 0")  # reads and writes row 0
    auto.execute(f"UPDATE {table} SET bal = 0 WHERE id = 1")  # someone else changes row 1
    assert _bal(c, table, 1) == 0  # the latest committed state, plus its own writes
    assert _bal(c, table, 0) == 99
    c.commit()  # nothing it saw has changed since
    assert [_bal(auto, table, i) for i in range(3)] == [99, 0, 100]

    # A write that shows nothing of what it read (bal - 1) is re-run by the commit on the
    # newest value: no conflict, and no lost update.
    c.execute(f"UPDATE {table} SET bal = bal - 1 WHERE id = 0")
    auto.execute(f"UPDATE {table} SET bal = 50 WHERE id = 0")
    c.commit()
    assert _bal(auto, table, 0) == 49

    bal = _bal(c, table, 0)  # the application sees the balance...
    c.execute(f"UPDATE {table} SET bal = ? WHERE id = 0", (bal - 1,))  # ...and writes from it
    auto.execute(f"UPDATE {table} SET bal = 50 WHERE id = 0")
    c.execute(f"SELECT bal FROM {table} WHERE id = 2").fetchall()
    with pytest.raises(db.SerializationError) as info:
        c.commit()
    assert "statement 0" in str(info.value)
    assert not c.in_transaction
    assert [_bal(auto, table, i) for i in range(3)] == [50, 0, 100]


def test_write_skew_two_doctors_on_call_is_refused(connect, table):
    """Each doctor checks that the other is on call, then goes off call. Run concurrently, both
    would commit under snapshot isolation and leave nobody on call; here the second commit
    fails, because the row it checked (the other doctor) changed before it committed."""
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (name TEXT PRIMARY KEY, on_call INTEGER NOT NULL)")
    auto.executemany(f"INSERT INTO {table} VALUES (?, 1)", [("alice",), ("bob",)])
    alice, bob = connect(), connect()
    for me, conn in (("alice", alice), ("bob", bob)):
        conn.execute("BEGIN")
        (others,) = conn.execute(f"SELECT count(*) FROM {table} WHERE on_call = 1 AND name != ?",
                                 (me,)).fetchone()
        assert others == 1
        conn.execute(f"UPDATE {table} SET on_call = 0 WHERE name = ?", (me,))
    alice.execute("COMMIT")
    with pytest.raises(db.SerializationError):
        bob.execute("COMMIT")
    assert auto.execute(f"SELECT name FROM {table} WHERE on_call = 1").fetchall() == [("bob",)]
    # Run again, bob now sees that alice is off call and stays on.
    bob.execute("BEGIN")
    assert bob.execute(f"SELECT count(*) FROM {table} WHERE on_call = 1 AND name != 'bob'"
                       ).fetchone() == (0,)
    bob.execute("COMMIT")


def test_transfers_between_different_accounts_do_not_conflict(connect, table):
    """Read-then-write transactions on one table that touch different rows all commit,
    however they interleave."""
    auto = connect(autocommit=True)
    _accounts(auto, table, n=4)
    a, b = connect(), connect()
    for conn, (src, dst) in ((a, (0, 1)), (b, (2, 3))):
        conn.execute("BEGIN")
        s_bal, d_bal = _bal(conn, table, src), _bal(conn, table, dst)
        conn.execute(f"UPDATE {table} SET bal = ? WHERE id = ?", (s_bal - 5, src))
        conn.execute(f"UPDATE {table} SET bal = ? WHERE id = ?", (d_bal + 5, dst))
    a.execute("COMMIT")
    b.execute("COMMIT")
    assert [_bal(auto, table, i) for i in range(4)] == [95, 105, 95, 105]


def test_a_statement_that_rolls_back_ends_the_transaction_as_in_sqlite3(connect, table, tmp_path):
    lite = sqlite3.connect(tmp_path / "ref.db")
    got = connect()
    for c in (lite, got):
        c.execute(f"CREATE TABLE {table} (v INTEGER UNIQUE)")
        c.commit()
        c.execute(f"INSERT INTO {table} VALUES (1)")
        assert c.in_transaction
        with pytest.raises(Exception) as info:  # noqa: PT011 - compared below
            c.execute(f"INSERT OR ROLLBACK INTO {table} VALUES (1)")
        assert type(info.value).__name__ == "IntegrityError"
        assert not c.in_transaction  # the whole transaction was rolled back
        c.execute(f"INSERT INTO {table} VALUES (2)")
        c.commit()
        assert c.execute(f"SELECT v FROM {table}").fetchall() == [(2,)]
    lite.close()


def test_rollback_to_savepoint_replays_reads_where_they_ran(connect, table):
    """Reads made after a savepoint saw the writes later rolled back to it; the commit checks
    them at the same place (with those writes), so they do not make it fail."""
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (v INTEGER)")
    c = connect(autocommit=True)
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {table} VALUES (1)")
    c.execute("SAVEPOINT a")
    c.execute(f"INSERT INTO {table} VALUES (2)")
    assert c.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)
    c.execute("ROLLBACK TO a")
    assert c.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    c.execute(f"INSERT INTO {table} VALUES (3)")
    c.execute("COMMIT")
    assert sorted(auto.execute(f"SELECT v FROM {table}").fetchall()) == [(1,), (3,)]


def test_executemany_in_a_transaction_is_one_round_trip(connect, table):
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (v INTEGER UNIQUE)")
    c = connect()
    calls = []
    inner = c._client._call

    def counting(req, *a, **kw):
        calls.append(req.get("op"))
        return inner(req, *a, **kw)

    c._client._call = counting
    cur = c.executemany(f"INSERT INTO {table} VALUES (?)", [(i,) for i in range(500)])
    assert cur.rowcount == 500 and calls == ["execute"]
    assert c.execute(f"SELECT count(*) FROM {table}").fetchone() == (500,)
    with pytest.raises(db.IntegrityError) as info:  # set 3 fails; sqlite3 keeps sets 0-2
        c.executemany(f"INSERT INTO {table} VALUES (?)", [(1000,), (1001,), (1002,), (7,), (1003,)])
    assert info.value.statement == 3
    c.commit()
    assert auto.execute(f"SELECT count(*), max(v) FROM {table}").fetchone() == (503, 1002)


def test_a_rowid_looked_at_is_checked_at_commit(connect, table):
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT)")
    c = connect()
    cur = c.execute(f"INSERT INTO {table} (v) VALUES ('mine')")
    seen = cur.lastrowid
    auto.execute(f"INSERT INTO {table} (v) VALUES ('theirs')")  # takes that rowid first
    with pytest.raises(db.SerializationError):
        c.commit()
    # Not looked at: the committed entry simply assigns the next rowid, and lastrowid says it.
    cur = c.execute(f"INSERT INTO {table} (v) VALUES ('mine')")
    auto.execute(f"INSERT INTO {table} (v) VALUES ('theirs again')")
    c.commit()
    assert cur.lastrowid == seen + 2
    assert auto.execute(f"SELECT v FROM {table} WHERE id = ?", (seen + 2,)).fetchone() == ("mine",)


# --------------------------------------------------------------------------- must-show 3


def test_transaction_sees_its_own_writes_and_nobody_else_does_before_commit(cluster, connect,
                                                                             follower, table):
    auto = connect(autocommit=True)
    _accounts(auto, table)
    stale = connect(autocommit=True, consistency="stale", hosts=[cluster.address(follower)])
    c = connect()
    c.execute(f"UPDATE {table} SET bal = bal - 30 WHERE id = 0")
    c.execute(f"INSERT INTO {table} VALUES (2, 30)")
    assert c.execute(f"SELECT id, bal FROM {table} ORDER BY id").fetchall() == [
        (0, 70), (1, 100), (2, 30)]
    for other in (auto, stale):
        assert other.execute(f"SELECT id, bal FROM {table} ORDER BY id").fetchall() == [
            (0, 100), (1, 100)]
    c.commit()
    stale.cursor().min_index = c.last_index
    for other in (auto, stale):
        cur = other.cursor()
        cur.min_index = c.last_index
        assert cur.execute(f"SELECT id, bal FROM {table} ORDER BY id").fetchall() == [
            (0, 70), (1, 100), (2, 30)]


# --------------------------------------------------------------------------- read-only / write-only


def test_read_only_explicit_transaction_is_checked_at_commit(connect, table):
    auto = connect(autocommit=True)
    _accounts(auto, table)
    r = connect(autocommit=True)
    r.execute("BEGIN")
    assert r.in_transaction
    assert _bal(r, table, 0) == 100
    auto.execute(f"UPDATE {table} SET bal = 50 WHERE id = 1")
    assert _bal(r, table, 1) == 50  # row 0 did not change: both reads hold at commit
    r.execute("COMMIT")
    assert not r.in_transaction
    r.execute("BEGIN")
    assert _bal(r, table, 0) == 100
    # One transaction moves 10 from row 0 to row 1: r's two reads now mix two states.
    auto.execute("BEGIN")
    auto.execute(f"UPDATE {table} SET bal = 90 WHERE id = 0")
    auto.execute(f"UPDATE {table} SET bal = 60 WHERE id = 1")
    auto.execute("COMMIT")
    assert _bal(r, table, 1) == 60
    with pytest.raises(db.SerializationError):
        r.execute("COMMIT")
    assert not r.in_transaction
    r.execute("BEGIN")
    assert (_bal(r, table, 0), _bal(r, table, 1)) == (90, 60)
    r.execute("COMMIT")


def test_a_read_only_transaction_that_reads_last_insert_rowid_commits(connect, table):
    """Its read got the client's last rowid (as a write would start from); the check at the
    ReadIndex started from 0, so such a transaction failed at every try."""
    c = connect(autocommit=True)
    c.execute(f"CREATE TABLE {table} (x)")
    c.execute(f"INSERT INTO {table} VALUES (1)")
    c.execute(f"INSERT INTO {table} VALUES (2)")
    c.execute("BEGIN")
    assert c.execute("SELECT last_insert_rowid()").fetchall() == [(2,)]
    c.execute("COMMIT")
    assert not c.in_transaction


def test_write_only_transactions_do_not_conflict(connect, table):
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (v INTEGER)")
    a, b = connect(), connect()
    a.execute(f"INSERT INTO {table} VALUES (1)")
    b.execute(f"INSERT INTO {table} VALUES (2)")
    auto.execute(f"INSERT INTO {table} VALUES (3)")
    a.commit()
    b.commit()
    assert sorted(auto.execute(f"SELECT v FROM {table}").fetchall()) == [(1,), (2,), (3,)]


# --------------------------------------------------------------------------- sqlite3 parity


def _script(table):
    """(sql, params) steps; each step's outcome (rows or exception class name and message) must
    be the same on sqlite3 (isolation_level=None: statements pass straight to SQLite) and on a
    raftsql connection with autocommit=True."""
    t = table
    return [
        (f"CREATE TABLE {t} (v INTEGER)", ()),
        ("COMMIT", ()),  # no transaction
        ("ROLLBACK", ()),
        ("RELEASE a", ()),
        ("ROLLBACK TO a", ()),
        ("BEGIN IMMEDIATE TRANSACTION", ()),
        (f"INSERT INTO {t} VALUES (1)", ()),
        ("BEGIN", ()),  # nested
        (f"SELECT v FROM {t}", ()),
        ("SAVEPOINT a", ()),
        (f"INSERT INTO {t} VALUES (2)", ()),
        ("SAVEPOINT B", ()),
        (f"INSERT INTO {t} VALUES (3)", ()),
        ("ROLLBACK TO SAVEPOINT b", ()),  # case-insensitive; B stays open
        (f"SELECT v FROM {t} ORDER BY v", ()),
        (f"INSERT INTO {t} VALUES (4)", ()),
        ("RELEASE SAVEPOINT a", ()),  # releases a and B
        ("RELEASE B", ()),
        (f"SELECT v FROM {t} ORDER BY v", ()),
        ("END TRANSACTION", ()),
        (f"SELECT v FROM {t} ORDER BY v", ()),
        ("BEGIN DEFERRED", ()),
        (f"DELETE FROM {t}", ()),
        ("ROLLBACK TRANSACTION", ()),
        (f"SELECT v FROM {t} ORDER BY v", ()),
        ("SAVEPOINT outer", ()),  # starts a transaction; RELEASE of it commits
        (f"INSERT INTO {t} VALUES (5)", ()),
        ("SAVEPOINT inner", ()),
        (f"INSERT INTO {t} VALUES (6)", ()),
        ("ROLLBACK TO outer", ()),
        (f"INSERT INTO {t} VALUES (7)", ()),
        ("RELEASE outer", ()),
        ("COMMIT", ()),  # nothing open any more
        (f"SELECT v FROM {t} ORDER BY v", ()),
        ("BEGIN EXCLUSIVE", ()),
        (f"INSERT INTO {t} VALUES (8)", ()),
        ("COMMIT", ()),
        (f"SELECT v FROM {t} ORDER BY v", ()),
    ]


def _outcomes(conn, steps):
    out = []
    for sql, params in steps:
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchall() if cur.description else None
            out.append((sql, "ok", rows, conn.in_transaction))
        except Exception as e:  # noqa: BLE001 - compared below
            out.append((sql, type(e).__name__, str(e), conn.in_transaction))
    return out


def test_explicit_transaction_statements_behave_as_in_sqlite3(connect, table, tmp_path):
    lite = sqlite3.connect(tmp_path / "ref.db", isolation_level=None)
    try:
        expected = _outcomes(lite, _script(table))
    finally:
        lite.close()
    got = _outcomes(connect(autocommit=True), _script(table))
    assert got == expected
    assert expected[-1][2] == [(1,), (2,), (4,), (7,), (8,)]  # the script means something


def test_explicit_begin_commit_with_autocommit_false(connect, table):
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (v INTEGER)")
    c = connect()
    c.execute(f"SELECT count(*) FROM {table}")  # a read does not start a write transaction
    c.execute("BEGIN")
    c.execute(f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(db.OperationalError, match="within a transaction"):
        c.execute("BEGIN")
    assert auto.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    c.execute("COMMIT")
    assert not c.in_transaction
    assert auto.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    c.execute(f"INSERT INTO {table} VALUES (2)")
    c.execute("ROLLBACK")
    c.commit()
    assert auto.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    with pytest.raises(db.ProgrammingError):
        c.execute("COMMIT; SELECT 1")


# --------------------------------------------------------------------------- bank, no faults


def test_concurrent_transfers_keep_the_total_and_apply_exactly_once(cluster, connect, table):
    """The bank workload without faults (the fault harness runs it with a leader killed):
    4 threads each move money between random accounts with read-then-write transactions that
    write absolute balances, retrying on SerializationError. Every read of all balances sees
    the same total, and the final balances are the initial ones plus every committed transfer."""
    n, start = 5, 100
    auto = connect(autocommit=True)
    _accounts(auto, table, n, start)
    auto.execute(f"CREATE TABLE {table}_log (tid TEXT, src INTEGER, dst INTEGER, amount INTEGER)")
    committed: list[tuple[str, int, int, int]] = []
    conflicts = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def transfer(worker: int) -> None:
        import random

        rng = random.Random(worker)
        c = db.connect(cluster.dsn, timeout=20)
        try:
            for k in range(12):
                src, dst = rng.sample(range(n), 2)
                amount = rng.randint(1, 20)
                tid = f"{worker}-{k}"
                while True:
                    try:
                        c.execute("BEGIN")
                        a = _bal(c, table, src)
                        b = _bal(c, table, dst)
                        if a >= amount:
                            c.execute(f"UPDATE {table} SET bal = ? WHERE id = ?", (a - amount, src))
                            c.execute(f"UPDATE {table} SET bal = ? WHERE id = ?", (b + amount, dst))
                            c.execute(f"INSERT INTO {table}_log VALUES (?, ?, ?, ?)",
                                      (tid, src, dst, amount))
                        c.execute("COMMIT")
                        if a >= amount:
                            with lock:
                                committed.append((tid, src, dst, amount))
                        break
                    except (db.SerializationError, db.TransactionAborted):
                        c.rollback()
                        with lock:
                            conflicts[0] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=transfer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    totals = []
    while any(t.is_alive() for t in threads):
        totals.append(auto.execute(f"SELECT sum(bal) FROM {table}").fetchone()[0])
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(totals) == {n * start}
    log = auto.execute(f"SELECT tid, src, dst, amount FROM {table}_log").fetchall()
    assert sorted(log) == sorted(committed)  # each committed transfer once, nothing else
    expected = [start] * n
    for _, src, dst, amount in committed:
        expected[src] -= amount
        expected[dst] += amount
    assert [r[0] for r in auto.execute(f"SELECT bal FROM {table} ORDER BY id")] == expected
    assert len(committed) > 0
    print(f"{len(committed)} transfers committed, {conflicts[0]} serialization retries")


def test_outcome_unknown_commit_is_resent_with_its_check():
    """resend() of a commit whose outcome was unknown keeps the transaction check, so a resend
    that arrives after a conflicting write cannot apply the stale writes."""

    class Stub:
        timeout, client_id, last_index = 5.0, "stub", 0

        def __init__(self):
            self.calls = []
            self.fail = True

        def next_serial(self):
            return 7

        def execute(self, statements, **kw):
            self.calls.append((statements, kw))
            if self.fail:
                self.fail = False
                from raftsql.driver import _client
                raise _client.OutcomeUnknown("lost", kw["serial"])
            return {"columns": [], "rows": [], "rowcount": 1, "index": 9, "error": None}

        def execute_in_transaction(self, statement, term, **kw):
            return {"readonly": False, "term": 1, "index": 4, "txn": "t1", "time_ms": 123,
                    "rowcount": 1, "error": None, "columns": [], "rows": []}, "h:1"

    stub = Stub()
    conn = _connection.Connection(stub)
    conn.execute("UPDATE acct SET bal = 1")
    with pytest.raises(db.OutcomeUnknown) as info:
        conn.commit()
    conn.resend(info.value)
    (first, kw1), (again, kw2) = stub.calls
    assert first == again == [("UPDATE acct SET bal = 1", [])]
    check = kw1["commit"]
    assert kw2["commit"] == check and check["last_ms"] == 123 and check["txn"] == "t1"
    assert check["checks"] == [(0, 1, 0, True, check["checks"][0][4], None, None)]
    assert kw1["serial"] == kw2["serial"] == 7


def test_transactions_that_see_random_and_now_commit(connect, table):
    """What random(), a randomblob() default and 'now' gave inside a transaction is what its
    commit stores, in explicit transactions and in sqlite3's legacy mode (where a read before
    the first write could otherwise run on any node)."""
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, u BLOB DEFAULT (randomblob(8)), "
                 "ts TEXT, r INTEGER)")
    c = connect()
    c.execute("BEGIN")
    (r,) = c.execute("SELECT random()").fetchone()
    (u,) = c.execute(f"INSERT INTO {table} (id, r) VALUES (1, ?) RETURNING u", (r,)).fetchone()
    c.execute("COMMIT")
    assert auto.execute(f"SELECT u, r FROM {table} WHERE id = 1").fetchone() == (u, r)
    legacy = connect()  # sqlite3's defaults: the SELECT runs before any transaction is open
    (ts,) = legacy.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").fetchone()
    legacy.execute(f"INSERT INTO {table} (id, ts) VALUES (2, ?)", (ts,))
    legacy.commit()
    assert auto.execute(f"SELECT ts FROM {table} WHERE id = 2").fetchone() == (ts,)


def test_a_view_that_calls_random_or_now_read_before_the_first_write_commits(connect, table):
    """The statement's text names no random() or clock, its view does: the node notices at
    prepare (Result.volatile) and the read runs again on the leader with an env the commit
    reproduces. Before, such a transaction failed with SerializationError at every commit."""
    auto = connect(autocommit=True)
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, r INTEGER, ts TEXT)")
    auto.execute(f"CREATE VIEW {table}_dice AS SELECT random() AS r, "
                 "strftime('%Y-%m-%d %H:%M:%f', 'now') AS ts")
    for explicit in (True, False):
        c = connect()  # sqlite3's legacy mode: an implicit transaction's first read
        if explicit:
            c.execute("BEGIN")
        r, ts = c.execute(f"SELECT r, ts FROM {table}_dice").fetchone()
        c.execute(f"INSERT INTO {table} (r, ts) VALUES (?, ?)", (r, ts))
        c.commit()  # no SerializationError: the read is reproduced at commit
        assert auto.execute(f"SELECT r, ts FROM {table} ORDER BY id DESC LIMIT 1").fetchone() == (r, ts)


@pytest.mark.parametrize("park", ["none", "unrelated write", "write to the same table",
                                  "write of the row it kept"])
def test_what_a_failed_statement_keeps_is_what_commits_as_in_sqlite3(connect, table, tmp_path, park):
    """INSERT OR FAIL stops at the conflicting row and keeps the rows it inserted before it,
    inside the transaction and through commit(), as sqlite3 does; also when another client's
    write parks the transaction on the leader in between (and its changeset, or its replay,
    must bring the kept row back)."""

    def run(c, other, park):
        c.execute(f"CREATE TABLE {table} (x UNIQUE)")
        c.execute(f"INSERT INTO {table} VALUES (5)")
        c.commit()
        with pytest.raises(Exception) as info:
            c.execute(f"INSERT OR FAIL INTO {table} VALUES (1), (5), (7)")
        assert type(info.value).__name__ == "IntegrityError"
        seen = c.execute(f"SELECT x FROM {table} WHERE x < 100 ORDER BY x").fetchall()
        if park == "unrelated write":
            other.execute(f"CREATE TABLE {table}_o (y)")
        elif park == "write to the same table":
            other.execute(f"INSERT INTO {table} VALUES (100)")
        elif park == "write of the row it kept":
            other.execute(f"INSERT INTO {table} VALUES (1)")
        again = c.execute(f"SELECT x FROM {table} WHERE x < 100 ORDER BY x").fetchall()
        c.commit()
        final = other.execute(f"SELECT x FROM {table} WHERE x < 100 ORDER BY x").fetchall()
        return [tuple(r) for r in seen], [tuple(r) for r in again], [tuple(r) for r in final]

    path = str(tmp_path / "ref.db")
    # sqlite3 cannot write beside an open write transaction ("database is locked").
    ref = run(sqlite3.connect(path), sqlite3.connect(path, isolation_level=None), "none")
    assert ref == ([(1,), (5,)],) * 3
    # Another client's row 100 (with the rowid the kept row had) makes the leader rebuild the
    # transaction by replaying it; another client's row 1 makes the replayed INSERT OR FAIL
    # fail at once, keeping nothing: the same rows, and as serializable as before.
    assert run(connect(), connect(autocommit=True), park) == ref


def test_reads_before_the_first_write_are_bounded(connect, table):
    """Legacy mode: the reads before an implicit transaction's first write are checked by its
    commit, but only the latest ones: a connection that reads for hours without committing
    keeps a bounded list, and its first write still commits (it used to fail: request too big)."""
    from raftsql.driver._connection import MAX_READS_BEFORE_WRITE

    c = connect()
    c.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER, pad TEXT)")
    c.execute(f"INSERT INTO {table} VALUES (1, 0, ?)", ("x" * 2000,))
    c.commit()
    sql = f"SELECT n, pad /* {'y' * 400} */ FROM {table} WHERE id = ?"
    for _ in range(MAX_READS_BEFORE_WRITE * 3):
        assert c.execute(sql, (1,)).fetchone()[0] == 0
    assert not c.in_transaction
    assert len(c._txn.steps) <= MAX_READS_BEFORE_WRITE
    c.execute(f"UPDATE {table} SET n = n + 1 WHERE id = 1")
    c.commit()
    assert c.execute(f"SELECT n FROM {table}").fetchone()[0] == 1
    # The latest reads are still checked: a change to what they read makes the commit fail.
    assert c.execute(f"SELECT n FROM {table} WHERE id = 1").fetchone()[0] == 1
    other = connect(isolation_level=None)
    other.execute(f"UPDATE {table} SET n = 10 WHERE id = 1")
    c.execute(f"UPDATE {table} SET pad = 'z' WHERE id = 1")
    with pytest.raises(db.SerializationError):
        c.commit()



@pytest.mark.parametrize("filler", ["many reads", "one large read"])
def test_autocommit_false_checks_every_read_before_the_first_write(connect, table, filler):
    """With autocommit=False sqlite3 runs every read inside the transaction, so the commit must
    check them all: a balance read before 300 other reads (or before one read with a 270 KB
    parameter) and changed meanwhile fails the commit. Legacy mode's bounds (256 reads, 256
    KiB) used to drop it from the check, and the read-modify-write lost a deposit."""
    c = connect(autocommit=False)
    other = connect(autocommit=True)
    other.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, bal INTEGER)")
    other.execute(f"INSERT INTO {table} VALUES (1, 100)")
    (bal,) = c.execute(f"SELECT bal FROM {table} WHERE id = 1").fetchone()
    if filler == "many reads":
        for k in range(300):
            c.execute(f"SELECT bal FROM {table} WHERE id = ?", (k + 2,)).fetchall()
    else:
        c.execute(f"SELECT count(*) FROM {table} WHERE bal <> ?", ("q" * 270_000,)).fetchone()
    other.execute(f"UPDATE {table} SET bal = bal + 50 WHERE id = 1")
    c.execute(f"UPDATE {table} SET bal = ? WHERE id = 1", (bal - 10,))
    with pytest.raises(db.SerializationError):
        c.commit()
    assert other.execute(f"SELECT bal FROM {table} WHERE id = 1").fetchone()[0] == 150


def test_autocommit_false_refuses_to_write_past_what_its_commit_can_check(connect, table, monkeypatch):
    """Past its bounds a transaction's reads before its first write are dropped to keep its
    memory bounded, and it can then no longer write: the write is refused before anything is
    sent, with what to do; the reads can still be committed, and the next transaction writes."""
    from raftsql.driver import _connection

    monkeypatch.setattr(_connection, "MAX_READS_BEFORE_WRITE_PEP249", 5)
    c = connect(autocommit=False)
    c.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER)")
    c.execute(f"INSERT INTO {table} VALUES (1, 0)")
    c.commit()
    for _ in range(6):
        c.execute(f"SELECT n FROM {table} WHERE id = 1").fetchone()
    with pytest.raises(db.OperationalError, match="more than its commit can check"):
        c.execute(f"UPDATE {table} SET n = 1 WHERE id = 1")
    with pytest.raises(db.OperationalError, match="more than its commit can check"):
        c.executemany(f"INSERT INTO {table} (n) VALUES (?)", [(5,)])
    with pytest.raises(db.OperationalError, match="more than its commit can check"):
        c.executescript(f"INSERT INTO {table} (n) VALUES (6);")
    c.commit()
    c.execute(f"UPDATE {table} SET n = 2 WHERE id = 1")
    c.commit()
    assert c.execute(f"SELECT id, n FROM {table}").fetchall() == [(1, 2)]

def test_a_commit_too_big_to_send_says_why(connect, table):
    """Every statement of the transaction ran, but together they exceed the node's request
    limit: the commit's error says that the transaction travels as one request."""
    c = connect()
    c.execute(f"CREATE TABLE {table} (v TEXT)")
    c.commit()
    value = "x" * 100_000
    for _ in range(45):  # 4.5 MB: over the default 4 MiB max_request_size
        c.execute(f"INSERT INTO {table} VALUES (?)", (value,))
    with pytest.raises(db.DataError, match="travel with its commit as one request"):
        c.commit()
    assert not c.in_transaction
    assert c.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
