"""Serializable interactive transactions, end to end (real 3-node cluster, TLS, the real
driver): lost updates prevented, reads of one's own uncommitted writes, isolation from other
connections, explicit BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE as sqlite3 runs them, read-only and
write-only transactions, and concurrent read-then-write transfers that keep the total."""

from __future__ import annotations

import sqlite3
import threading
import uuid

import pytest

import raftsql.driver as db
from raftsql.driver import _connection


@pytest.fixture
def table():
    return "t_" + uuid.uuid4().hex[:10]


@pytest.fixture
def connect(cluster):
    opened = []

    def _connect(**kw):
        kw.setdefault("timeout", 20)
        c = db.connect(cluster.dsn, **kw)
        opened.append(c)
        return c

    yield _connect
    for c in opened:
        c.close()


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


def test_a_conflict_is_reported_early_by_the_next_statement(connect, table):
    auto = connect(autocommit=True)
    _accounts(auto, table)
    c = connect()
    c.execute(f"UPDATE {table} SET bal = bal - 1 WHERE id = 0")  # reads and writes the table
    auto.execute(f"UPDATE {table} SET bal = 0 WHERE id = 1")  # someone else changes it
    with pytest.raises(db.SerializationError):
        c.execute(f"SELECT bal FROM {table} WHERE id = 1")
    assert not c.in_transaction  # an implicit transaction is reset, as on TransactionAborted
    assert _bal(c, table, 0) == 100 and _bal(auto, table, 1) == 0


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


def test_read_only_explicit_transaction_sees_one_snapshot_or_fails(connect, table):
    auto = connect(autocommit=True)
    _accounts(auto, table)
    r = connect(autocommit=True)
    r.execute("BEGIN")
    assert r.in_transaction
    assert _bal(r, table, 0) == 100
    auto.execute(f"UPDATE {table} SET bal = 50 WHERE id = 1")
    with pytest.raises(db.SerializationError):
        _bal(r, table, 1)  # would mix two snapshots
    with pytest.raises(db.SerializationError):  # doomed until the transaction ends
        r.execute("SELECT 1")
    assert r.in_transaction
    r.execute("ROLLBACK")
    assert not r.in_transaction
    r.execute("BEGIN")
    assert (_bal(r, table, 0), _bal(r, table, 1)) == (100, 50)
    r.execute("COMMIT")  # nothing to apply: no entry, no error


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
            self.calls.append(kw)
            if self.fail:
                self.fail = False
                from raftsql.driver import _client
                raise _client.OutcomeUnknown("lost", kw["serial"])
            return {"columns": [], "rows": [], "rowcount": 1, "index": 9, "error": None}

        def execute_in_transaction(self, statement, writes, term, **kw):
            return {"readonly": False, "term": 1, "index": 4, "start_index": 4, "reads": ["acct"],
                    "time_ms": 123, "rowcount": 1, "error": None}, "h:1"

    stub = Stub()
    conn = _connection.Connection(stub)
    conn.execute("UPDATE acct SET bal = 1")
    with pytest.raises(db.OutcomeUnknown) as info:
        conn.commit()
    conn.resend(info.value)
    check = {"read_index": 4, "reads": ["acct"], "last_ms": 123}
    assert stub.calls[0]["commit"] == check and stub.calls[1]["commit"] == check
    assert stub.calls[0]["serial"] == stub.calls[1]["serial"] == 7
