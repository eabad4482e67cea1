"""The driver against a real 3-node cluster (shared, nodes are not killed here): transactions,
read consistency (read-your-writes on a follower), errors as sqlite3 raises them, values and
type codes, batches and scripts, connections shared between threads."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import threading
import uuid

import pytest

import raftsql.driver as db
from raftsql.testing.cluster import free_port


@pytest.fixture
def table():
    return "t_" + uuid.uuid4().hex[:10]


@pytest.fixture
def conn(cluster):
    c = db.connect(cluster.dsn, timeout=20)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def auto(cluster):
    c = db.connect(cluster.dsn, timeout=20, autocommit=True)
    try:
        yield c
    finally:
        c.close()


def _count(c, table):
    return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# --------------------------------------------------------------------------- transactions


@pytest.fixture
def pep249(cluster):
    """autocommit=False: every statement, DDL included, joins the transaction."""
    c = db.connect(cluster.dsn, timeout=20, autocommit=False)
    try:
        yield c
    finally:
        c.close()


def test_executescript_joins_the_open_transaction_outside_legacy_control(pep249, auto, table):
    """Python 3.12's sqlite3: executescript commits a pending transaction first only under
    legacy transaction control. With autocommit=False the script joins the open transaction
    (a later rollback() undoes it); with autocommit=True an explicit BEGIN stays open around
    it; a COMMIT inside the script commits there."""
    auto.execute(f"CREATE TABLE {table}(a)")
    auto.execute(f"INSERT INTO {table} VALUES (1)")
    pep249.execute(f"INSERT INTO {table} VALUES (2)")
    pep249.executescript(f"INSERT INTO {table} VALUES (3); SELECT a FROM {table}; "
                         f"INSERT INTO {table} VALUES (4);")
    assert _count(pep249, table) == 4
    pep249.rollback()
    assert _count(auto, table) == 1
    auto.execute("BEGIN")
    auto.executescript(f"INSERT INTO {table} VALUES (5);")
    assert auto.in_transaction
    auto.rollback()
    assert _count(auto, table) == 1
    pep249.executescript(f"INSERT INTO {table} VALUES (6); COMMIT; INSERT INTO {table} VALUES (7);")
    pep249.rollback()
    assert sorted(r[0] for r in auto.execute(f"SELECT a FROM {table}")) == [1, 6]
    with pytest.raises(db.OperationalError, match="no such table"):
        pep249.executescript(f"INSERT INTO {table} VALUES (8); INSERT INTO {table}_none "
                             f"VALUES (0); INSERT INTO {table} VALUES (9);")
    pep249.commit()  # the statement before the failure stays in the transaction, as in SQLite
    assert sorted(r[0] for r in auto.execute(f"SELECT a FROM {table}")) == [1, 6, 8]


def test_transaction_reads_its_own_writes_and_is_invisible_to_others(cluster, pep249, auto, table):
    conn = pep249
    assert conn.autocommit is False
    cur1, cur2 = conn.cursor(), conn.cursor()
    cur1.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT)")
    cur1.execute(f"INSERT INTO {table} (v) VALUES (?)", ("a",))
    assert cur1.rowcount == 1 and cur1.lastrowid == 1
    cur2.execute(f"INSERT INTO {table} (v) VALUES (:v)", {"v": "b"})
    assert cur2.execute(f"SELECT v FROM {table} ORDER BY id").fetchall() == [("a",), ("b",)]
    assert conn.in_transaction
    with pytest.raises(db.OperationalError, match="no such table"):
        auto.execute(f"SELECT * FROM {table}")  # nobody else sees the transaction
    conn.commit()
    assert not conn.in_transaction
    assert auto.execute(f"SELECT v FROM {table} ORDER BY id").fetchall() == [("a",), ("b",)]
    conn.execute(f"INSERT INTO {table} (v) VALUES ('c')")
    conn.rollback()
    assert _count(auto, table) == 2 and _count(conn, table) == 2


def test_default_is_sqlite3s_legacy_transaction_control(conn, auto, table):
    assert conn.autocommit == db.LEGACY_TRANSACTION_CONTROL and conn.isolation_level == ""
    conn.execute(f"CREATE TABLE {table} (v TEXT)")  # outside the transaction, as in sqlite3
    assert not conn.in_transaction
    assert auto.execute(f"SELECT * FROM {table}").fetchall() == []
    conn.execute(f"INSERT INTO {table} VALUES ('a')")  # opens the transaction
    assert conn.in_transaction and _count(auto, table) == 0
    conn.commit()
    assert _count(auto, table) == 1


def test_context_manager_commits_or_rolls_back_and_keeps_the_connection(conn, auto, table):
    auto.execute(f"CREATE TABLE {table} (v INTEGER)")
    with conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert _count(auto, table) == 2
    with pytest.raises(ZeroDivisionError), conn:
        conn.execute(f"INSERT INTO {table} VALUES (3)")
        1 / 0  # noqa: B018
    assert _count(auto, table) == 2
    assert conn.execute("SELECT 1").fetchone() == (1,)  # still open


def test_commit_is_one_log_entry_applied_exactly_once(conn, auto, table):
    auto.execute(f"CREATE TABLE {table} (v INTEGER)")
    before = auto.last_index
    for i in range(5):
        conn.execute(f"INSERT INTO {table} VALUES (?)", (i,))
    conn.commit()
    auto.execute(f"INSERT INTO {table} VALUES (99)")
    assert auto.last_index - before <= 2 + 2  # our commit and insert, maybe one other entry
    assert _count(auto, table) == 6


def test_commit_that_now_fails_applies_nothing(conn, auto, table):
    auto.execute(f"CREATE TABLE {table} (v INTEGER UNIQUE)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    auto.execute(f"INSERT INTO {table} VALUES (2)")  # a concurrent writer wins
    # The application saw that INSERT succeed: a conflict to retry, naming the error.
    with pytest.raises(db.SerializationError, match="now fails .UNIQUE constraint failed") as info:
        conn.commit()
    assert info.value.statement == 1 and info.value.retryable
    assert not conn.in_transaction
    assert auto.execute(f"SELECT v FROM {table}").fetchall() == [(2,)]


def test_autocommit_switch_commits_pending_work(conn, auto, table):
    conn.execute(f"CREATE TABLE {table} (v INTEGER)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.autocommit = True
    assert _count(auto, table) == 1
    conn.execute(f"INSERT INTO {table} VALUES (2)")  # applied at once
    assert _count(auto, table) == 2


# --------------------------------------------------------------------------- consistency


def test_stale_read_on_a_follower_sees_the_write_just_made(cluster, follower, table):
    """Read-your-writes: write through the leader, then read with consistency=stale on a
    connection pinned to a follower; min_index makes the follower wait for the write."""
    writer = db.connect(cluster.dsn, autocommit=True, timeout=20)
    reader = db.connect(cluster.dsn, hosts=[cluster.address(follower)], consistency="stale",
                        autocommit=True, timeout=20)
    try:
        writer.execute(f"CREATE TABLE {table} (v INTEGER)")
        cur = reader.cursor()
        for i in range(30):
            writer.execute(f"INSERT INTO {table} VALUES (?)", (i,))
            cur.min_index = writer.last_index
            assert cur.execute(f"SELECT max(v), count(*) FROM {table}").fetchone() == (i, i + 1)
            assert cur._result["index"] >= writer.last_index
        status = reader.status()
        assert status["role"] != "leader" and status["id"] == follower  # really the follower
        # Read-your-writes on one connection: its own writes are always included.
        mixed = db.connect(cluster.dsn, hosts=[cluster.address(follower)], consistency="stale",
                           autocommit=True, timeout=20)
        try:
            mixed.execute(f"INSERT INTO {table} VALUES (100)")  # redirected to the leader
            mixed._client._leader = None  # go back to the follower for the read
            mixed._client.close()
            assert mixed.execute(f"SELECT max(v) FROM {table}").fetchone() == (100,)
            assert mixed._client.served_by == (cluster.host, cluster.ports[follower])
        finally:
            mixed.close()
    finally:
        writer.close()
        reader.close()


def test_consistency_levels_per_connection_and_cursor(cluster, auto, table):
    auto.execute(f"CREATE TABLE {table} (v INTEGER)")
    auto.execute(f"INSERT INTO {table} VALUES (1)")
    for level in db.CONSISTENCY_LEVELS:
        cur = auto.cursor()
        cur.consistency = level
        assert cur.execute(f"SELECT v FROM {table}").fetchall() == [(1,)]
    auto.consistency = "leader"
    assert auto.execute(f"SELECT v FROM {table}").fetchall() == [(1,)]
    with pytest.raises(db.ProgrammingError):
        auto.consistency = "eventual"
    with pytest.raises(db.ProgrammingError):
        auto.cursor().consistency = "eventual"
    c = db.connect(cluster.dsn + "&consistency=stale")
    try:
        assert c.consistency == "stale"
    finally:
        c.close()


# --------------------------------------------------------------------------- errors


def test_sql_errors_map_like_sqlite3(auto, table):
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, u UNIQUE, n NOT NULL)")
    auto.execute(f"INSERT INTO {table} VALUES (1, 1, 1)")
    cases = [
        (f"INSERT INTO {table} VALUES (2, 1, 1)", (), db.IntegrityError, "SQLITE_CONSTRAINT_UNIQUE", 2067),
        (f"INSERT INTO {table} VALUES (3, 3, NULL)", (), db.IntegrityError, "SQLITE_CONSTRAINT_NOTNULL", 1299),
        ("SELEC 1", (), db.OperationalError, "SQLITE_ERROR", 1),
        ("SELECT * FROM no_such_table", (), db.OperationalError, "SQLITE_ERROR", 1),
        ("SELECT 1; SELECT 2", (), db.ProgrammingError, "RAFTSQL_MULTIPLE_STATEMENTS", 1),
        ("SELECT ?", (1, 2), db.ProgrammingError, "RAFTSQL_BINDINGS", 25),
        ("ATTACH 'x.db' AS x", (), db.DatabaseError, "SQLITE_AUTH", 23),
    ]
    for sql, params, cls, name, code in cases:
        with pytest.raises(cls) as info:
            auto.execute(sql, params)
        assert type(info.value) is cls, sql
        assert (info.value.sqlite_errorname, info.value.sqlite_errorcode) == (name, code), sql
    with pytest.raises(db.ProgrammingError, match="You can only execute one statement at a time."):
        auto.execute("SELECT 1; SELECT 2")


def test_unreachable_cluster_is_unavailable_not_unknown(cluster):
    dead = f"{cluster.host}:{free_port(cluster.host)}"
    c = db.connect(cluster.dsn, hosts=[dead], timeout=0.5, autocommit=True)
    try:
        with pytest.raises(db.Unavailable):
            c.execute("INSERT INTO x VALUES (1)")
    finally:
        c.close()


class _CuttingProxy:
    """A TCP proxy to one node (on the cluster's address, so its certificate still matches).
    While `cut` is set, every client chunk is forwarded and then the connection is closed:
    a request reaches the node but no response comes back (and new handshakes fail)."""

    def __init__(self, host: str, target: tuple[str, int]):
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.target = target
        self.cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            server.settimeout(None)
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up, (client, server)),
                                 daemon=True).start()

    def _pump(self, src, dst, up, pair) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if up and self.cut:
                    break
        except OSError:
            pass
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_lost_response_to_a_with_select_is_unavailable_and_to_a_write_unknown(cluster, table):
    """The driver knows before sending that `WITH ... SELECT` only reads, so when its response
    is lost it raises Unavailable (nothing applied: resend anywhere), never OutcomeUnknown;
    `WITH ... INSERT` may write, so it raises OutcomeUnknown, and resend() applies it once."""
    leader = cluster.wait_leader()
    proxy = _CuttingProxy(cluster.host, (cluster.host, cluster.ports[leader]))
    conn = db.connect(cluster.dsn, hosts=[proxy.address], autocommit=True, timeout=20,
                      discover=False)
    try:
        conn.execute(f"CREATE TABLE {table} (x)")  # connected through the proxy
        proxy.cut, conn.timeout = True, 1.0
        with pytest.raises(db.Unavailable):
            conn.execute("WITH x(a) AS (SELECT 1) SELECT a FROM x")
        proxy.cut, conn.timeout = False, 20
        assert conn.execute("SELECT 1").fetchone() == (1,)  # connected again
        proxy.cut, conn.timeout = True, 1.0
        with pytest.raises(db.OutcomeUnknown) as info:
            conn.execute(f"WITH v(a) AS (VALUES (1)) INSERT INTO {table} SELECT a FROM v")
        proxy.cut, conn.timeout = False, 20
        cur = conn.resend(info.value)
        assert cur._result["duplicate"] is True  # it had been applied; not again
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
    finally:
        conn.close()
        proxy.close()


def test_a_resent_ddl_whose_first_attempt_applied_gets_its_stored_result(cluster, table):
    """A resend of CREATE TABLE or DROP TABLE after a lost response would fail to prepare
    ("already exists", "no such table") against the state its first attempt made: the node
    answers with the stored result of that attempt instead, as for any other duplicate."""
    leader = cluster.wait_leader()
    proxy = _CuttingProxy(cluster.host, (cluster.host, cluster.ports[leader]))
    conn = db.connect(cluster.dsn, hosts=[proxy.address], autocommit=True, timeout=20,
                      discover=False)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)  # connected through the proxy
        for sql in (f"CREATE TABLE {table} (x)", f"DROP TABLE {table}"):
            proxy.cut, conn.timeout = True, 1.0
            with pytest.raises(db.OutcomeUnknown) as info:
                conn.execute(sql)
            proxy.cut, conn.timeout = False, 20
            cur = conn.resend(info.value)
            assert cur._result["duplicate"] is True, sql
        with pytest.raises(db.OperationalError, match="no such table"):
            conn.execute(f"SELECT * FROM {table}")
    finally:
        conn.close()
        proxy.close()


# --------------------------------------------------------------------------- values and types


def test_values_round_trip_and_adapters(auto, table):
    auto.execute(f"CREATE TABLE {table} (i INTEGER, r REAL, t TEXT, b BLOB, n NUMERIC, "
                 "d DATE, ts TIMESTAMP, tm TIME, flag BOOLEAN)")
    row = (2**63 - 1, 1.5, "héllo", b"\x00\xff", None, datetime.date(2024, 2, 29),
           datetime.datetime(2024, 2, 29, 12, 30, 1, 5), datetime.time(23, 59), True)
    auto.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    auto.execute(f"INSERT INTO {table} (b) VALUES (?)", (db.Binary(b"bin"),))
    cur = auto.execute(f"SELECT * FROM {table} ORDER BY rowid")
    assert cur.fetchone() == (2**63 - 1, 1.5, "héllo", b"\x00\xff", None, "2024-02-29",
                              "2024-02-29 12:30:01.000005", "23:59:00", 1)
    assert cur.fetchone()[3] == b"bin"
    types = {d[0]: d[1] for d in cur.description}
    assert types["i"] == db.NUMBER and types["i"] == db.ROWID
    assert types["r"] == db.NUMBER and types["t"] == db.STRING and types["b"] == db.BINARY
    assert types["d"] == db.DATETIME and types["ts"] == db.DATETIME and types["tm"] == db.DATETIME
    with pytest.raises(OverflowError):
        auto.execute("SELECT ?", (2**63,))
    with pytest.raises(db.ProgrammingError, match="not supported"):
        auto.execute("SELECT ?", (object(),))


def test_row_factory_and_fetch_methods(auto, table):
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, Name TEXT)")
    auto.executemany(f"INSERT INTO {table} (Name) VALUES (?)", [(f"n{i}",) for i in range(7)])
    auto.row_factory = db.Row
    cur = auto.cursor()
    assert cur.row_factory is db.Row
    cur.execute(f"SELECT id, Name FROM {table} ORDER BY id")
    assert cur.rowcount == -1
    r = cur.fetchone()
    assert r["ID"] == 1 and r["name"] == "n0" and r.keys() == ["id", "Name"] and tuple(r) == (1, "n0")
    cur.arraysize = 2
    assert [x[0] for x in cur.fetchmany()] == [2, 3]
    assert [x["id"] for x in cur.fetchmany(3)] == [4, 5, 6]
    assert [x[0] for x in cur] == [7]
    assert cur.fetchall() == [] and cur.fetchone() is None
    cur.row_factory = None
    assert cur.execute(f"SELECT count(*) FROM {table}").fetchall() == [(7,)]


# --------------------------------------------------------------------------- batches, scripts


def test_executemany_in_autocommit_mode_keeps_the_sets_before_a_failure(auto, table):
    auto.execute(f"CREATE TABLE {table} (v INTEGER UNIQUE)")
    cur = auto.executemany(f"INSERT INTO {table} VALUES (?)", [(i,) for i in range(100)])
    assert cur.rowcount == 100 and _count(auto, table) == 100
    with pytest.raises(db.IntegrityError) as info:
        auto.executemany(f"INSERT INTO {table} VALUES (?)", [(2000,), (2001,), (5,), (2002,)])
    assert info.value.statement == 2
    assert _count(auto, table) == 102  # the sets before the failing one, as sqlite3 keeps them
    cur = auto.executemany(f"UPDATE {table} SET v = v + 1000 WHERE v < :n", [{"n": 10}, {"n": 20}])
    assert cur.rowcount == 10 + 10


def test_executemany_in_a_transaction(conn, auto, table):
    conn.execute(f"CREATE TABLE {table} (v INTEGER)")
    cur = conn.executemany(f"INSERT INTO {table} VALUES (?)", [(1,), (2,), (3,)])
    assert cur.rowcount == 3
    assert conn.execute(f"SELECT sum(v) FROM {table}").fetchone() == (6,)
    conn.commit()
    assert _count(auto, table) == 3


def test_executescript_commits_first_and_runs_atomically(conn, auto, table):
    conn.execute(f"CREATE TABLE {table} (v TEXT)")
    conn.execute(f"INSERT INTO {table} VALUES ('pending')")
    conn.executescript(f"""
        BEGIN;
        INSERT INTO {table} VALUES ('a;b');  -- a comment; with a semicolon
        CREATE TABLE {table}_log (v TEXT);
        CREATE TRIGGER {table}_tr AFTER INSERT ON {table} BEGIN
            INSERT INTO {table}_log VALUES (new.v);
        END;
        INSERT INTO {table} VALUES ('c');
        COMMIT;
    """)
    assert not conn.in_transaction
    assert auto.execute(f"SELECT v FROM {table} ORDER BY rowid").fetchall() == [
        ("pending",), ("a;b",), ("c",)]
    assert auto.execute(f"SELECT v FROM {table}_log").fetchall() == [("c",)]
    with pytest.raises(db.OperationalError):
        auto.executescript(f"INSERT INTO {table} VALUES ('x'); INSERT INTO nope VALUES (1);")
    assert _count(auto, table) == 3  # the failed script applied nothing


# --------------------------------------------------------------------------- threads


def test_threads_share_a_connection(cluster, table):
    """threadsafety = 2: one connection, one cursor per thread."""
    shared = db.connect(cluster.dsn, autocommit=True, timeout=30)
    try:
        shared.execute(f"CREATE TABLE {table} (thread INTEGER, i INTEGER, UNIQUE (thread, i))")
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                cur = shared.cursor()
                for i in range(40):
                    cur.execute(f"INSERT INTO {table} VALUES (?, ?)", (n, i))
                    assert cur.rowcount == 1
                    cur.execute(f"SELECT count(*) FROM {table} WHERE thread = ?", (n,))
                    assert cur.fetchone() == (i + 1,)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert _count(shared, table) == 160
        # A transaction shared by threads (as sqlite3 with check_same_thread=False).
        shared.autocommit = False
        threads = [threading.Thread(target=shared.execute,
                                    args=(f"INSERT INTO {table} VALUES (?, ?)", (9, n)))
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(shared._txn.writes) == 4
        shared.commit()
        assert _count(shared, table) == 164
    finally:
        shared.close()


# --------------------------------------------------------------------------- imports


def test_using_the_driver_never_imports_apsw_or_cryptography(cluster, table):
    code = f"""
import sys
import raftsql.driver as db
c = db.connect({cluster.dsn!r}, autocommit=True)
c.executescript("CREATE TABLE {table} (v); INSERT INTO {table} VALUES (1);")
assert c.execute("SELECT v FROM {table}").fetchall() == [(1,)]
c.close()
print(sorted(m for m in sys.modules if m.split('.')[0] in ('apsw', 'cryptography')))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_fetch_cut_short_by_an_exception_does_not_skip_rows(auto, table):
    """KeyboardInterrupt (or an exception from a signal handler) while a chunk of a streamed
    result is on its way: the chunk arrives later and is skipped as a stale response, so the
    next fetch must fail instead of going on after a silent gap."""
    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, pad BLOB)")
    auto.execute(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000) "
                 f"INSERT INTO {table} SELECT i, randomblob(1000) FROM n")
    cur = auto.execute(f"SELECT id, pad FROM {table} ORDER BY id")
    ids = [cur.fetchone()[0]]
    conn = cur._stream._conn
    real = conn._next_frame
    calls = []

    def interrupted():
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt  # the Fetch request has been sent, its answer not read
        return real()

    conn._next_frame = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            while True:
                ids.append(cur.fetchone()[0])
        with pytest.raises(db.OperationalError, match="interrupted.*run the query again"):
            cur.fetchone()
    finally:
        conn._next_frame = real
    assert ids == list(range(1, len(ids) + 1))  # no gap in what was handed out
    assert auto.execute(f"SELECT count(*) FROM {table}").fetchone() == (4000,)  # still usable


def test_dropped_cursors_free_their_results_on_the_node(auto, table):
    """Cursors dropped with rows left (sqlite3 finalizes them when collected) are closed on the
    node at the connection's next request: more than the node's 16 per connection is fine. Held
    ones past the limit fail at once with a clear error instead of a 10 s retry."""
    import gc

    from raftsql.server.clients import MAX_CURSORS_PER_CONNECTION

    auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, pad BLOB)")
    auto.execute(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500) "
                 f"INSERT INTO {table} SELECT i, randomblob(1000) FROM n")
    sql = f"SELECT id, pad FROM {table} WHERE id > ?"
    for i in range(MAX_CURSORS_PER_CONNECTION * 2):
        assert auto.execute(sql, (i,)).fetchone()[0] == i + 1  # the cursor is dropped
        gc.collect()
    held = [auto.execute(sql, (i,)) for i in range(MAX_CURSORS_PER_CONNECTION)]
    # OperationalError from the first refusal (Unavailable would mean it was retried until the
    # connection's timeout, as if waiting could free a cursor).
    with pytest.raises(db.OperationalError, match="unfinished") as info:
        auto.execute(sql, (0,))
    assert not isinstance(info.value, db.Unavailable)
    held.pop().close()
    assert auto.execute(sql, (0,)).fetchone()[0] == 1


def test_a_certificate_that_never_verifies_fails_at_once(cluster, tmp_path):
    """Certificates from another CA (or a host name the nodes' certificates do not hold): a
    setting to fix, not a node that is down. OperationalError naming the cause after every node
    was tried once, not Unavailable after retrying for the whole timeout."""
    from raftsql.server import certs as pki

    other = pki.CertsTree(tmp_path / "other")
    _, client = other.init()
    dsn = "raftsql://" + ",".join(cluster.address(n) for n in cluster.ids) + \
        f"/?certs={client.cert_path.parent}"
    assert "certificate verify failed" in _fails_at_once(dsn, "certificate was refused")


def _fails_at_once(dsn: str, match: str) -> str:
    """The message of the OperationalError (not Unavailable) a first statement raises."""
    conn = db.connect(dsn, timeout=60)
    try:
        with pytest.raises(db.OperationalError, match=match) as info:
            conn.execute("SELECT 1")
        assert not isinstance(info.value, db.Unavailable)
        return str(info.value)
    finally:
        conn.close()


def test_a_client_certificate_of_another_ca_fails_at_once(cluster, tmp_path):
    """The cluster's CA beside a client certificate of another CA: every node refuses it. That
    is OperationalError at once, saying so, not Unavailable after the whole timeout with a
    TLS message that names no certificate (found by an outside-in operator run)."""
    import shutil

    from raftsql.server import certs as pki

    other = pki.CertsTree(tmp_path / "other")
    _, foreign = other.init()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(cluster.client_certs("mine") / "ca.crt", mixed / "ca.crt")
    for name in ("client.crt", "client.key"):
        shutil.copy(foreign.cert_path.parent / name, mixed / name)
    (mixed / "client.key").chmod(0o600)
    message = _fails_at_once(cluster.dsn_for(mixed), "refused this client certificate")
    assert "Every node refused it" in message
