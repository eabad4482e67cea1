"""The rest of the sqlite3 surface that applications and SQLAlchemy's pysqlite layer lean on:
converters and detect_types, adapters and __conform__, backup(), iterdump(), interrupt(),
getlimit()/setlimit(), timeout values, and the sqlite3 methods a networked database cannot
offer (NotSupportedError). As in test_sqlite3_habits.py, each behaviour runs on sqlite3 first
(a file in tmp_path), which proves the expectation, then on the driver against the shared
cluster. Also: a transaction's lastrowid is exact at commit."""

from __future__ import annotations

import datetime
import sqlite3
import threading
import uuid

import pytest

import raftsql.driver as raftsql


@pytest.fixture(params=["sqlite3", "raftsql"])
def connect(request, tmp_path):
    opened = []
    if request.param == "sqlite3":
        path = tmp_path / "surface.db"

        def _open(admin=False, **kw):
            return sqlite3.connect(path, **kw)
        module = sqlite3
    else:
        cluster = request.getfixturevalue("cluster")

        def _open(admin=False, **kw):
            # admin: backup() and iterdump() copy the database, which needs an admin certificate
            kw.setdefault("timeout", 20)
            return raftsql.connect(cluster.admin_dsn if admin else cluster.dsn, **kw)
        module = raftsql

    def _connect(**kw):
        c = _open(**kw)
        opened.append(c)
        return c

    _connect.db = module
    _connect.kind = request.param
    yield _connect
    for c in opened:
        c.close()


@pytest.fixture
def table():
    return "s_" + uuid.uuid4().hex[:10]


@pytest.fixture
def point_converter(connect):
    db = connect.db
    db.register_converter("point", lambda b: tuple(map(float, b.split(b";"))))
    yield
    del db.converters["POINT"]


# --------------------------------------------------------------------------- converters


def test_detect_types_decltypes_and_colnames(connect, table, point_converter):
    conn = connect(detect_types=connect.db.PARSE_DECLTYPES | connect.db.PARSE_COLNAMES,
                   isolation_level=None)
    conn.execute(f"CREATE TABLE {table} (p point, q POINT(2) NOT NULL, d date, ts timestamp, "
                 "n INTEGER, t TEXT)")
    conn.execute(f"INSERT INTO {table} VALUES ('1;2', '3;4.5', ?, ?, 7, '8;9')",
                 (datetime.date(2024, 2, 29), datetime.datetime(2024, 2, 29, 12, 30, 1, 5)))
    cur = conn.execute(
        f'SELECT p, q, d, ts, n, t, t AS "c [point]", t AS "c2[point]", t AS "c3  [point] x", '
        f'n AS "i [point]", 1.5 AS "r [point]", NULL AS "z [point]" FROM {table}')
    assert cur.fetchone() == (
        (1.0, 2.0), (3.0, 4.5), datetime.date(2024, 2, 29),
        datetime.datetime(2024, 2, 29, 12, 30, 1, 5), 7, "8;9", (8.0, 9.0), (8.0, 9.0),
        (8.0, 9.0), (7.0,), (1.5,), None)
    assert [d[0] for d in cur.description] == [
        "p", "q", "d", "ts", "n", "t", "c", "c2", "c3 ", "i", "r", "z"]


def test_without_detect_types_no_converter_runs(connect, table, point_converter):
    conn = connect(isolation_level=None)
    conn.execute(f"CREATE TABLE {table} (p point)")
    conn.execute(f"INSERT INTO {table} VALUES ('1;2')")
    cur = conn.execute(f'SELECT p, p AS "x [point]" FROM {table}')
    assert cur.fetchone() == ("1;2", "1;2") and cur.description[1][0] == "x [point]"


def test_converter_names_are_case_insensitive_and_text_factory_skips_them(connect, table):
    db = connect.db
    db.register_converter("Upper", lambda b: b.decode().upper())
    try:
        conn = connect(detect_types=db.PARSE_DECLTYPES, isolation_level=None)
        conn.text_factory = bytes
        conn.execute(f"CREATE TABLE {table} (a UPPER, b upper, c TEXT)")
        conn.execute(f"INSERT INTO {table} VALUES ('x', 'y', 'z')")
        assert conn.execute(f"SELECT a, b, c FROM {table}").fetchone() == ("X", "Y", b"z")
    finally:
        del db.converters["UPPER"]


# --------------------------------------------------------------------------- adapters


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __conform__(self, protocol):
        if protocol is sqlite3.PrepareProtocol or protocol is raftsql.PrepareProtocol:
            return f"{self.x};{self.y}"
        return None


def test_conform_protocol_and_adapt(connect):
    db = connect.db
    conn = connect()
    assert conn.execute("SELECT ?", (Point(1, 2),)).fetchone() == ("1;2",)
    assert db.adapt(Point(3, 4)) == "3;4"
    assert db.adapt(object(), db.PrepareProtocol, "alt") == "alt"
    with pytest.raises(db.ProgrammingError, match="can't adapt"):
        db.adapt(object())
    # A registered adapter wins over __conform__.
    db.register_adapter(Point, lambda p: "registered")
    try:
        assert conn.execute("SELECT ?", (Point(1, 2),)).fetchone() == ("registered",)
        assert (Point, db.PrepareProtocol) in db.adapters
    finally:
        del db.adapters[(Point, db.PrepareProtocol)]


# --------------------------------------------------------------------------- backup, iterdump


def test_backup_into_a_local_sqlite3_database(connect, table, tmp_path):
    conn = connect(isolation_level=None, admin=True)
    conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
    conn.execute(f"CREATE INDEX {table}_v ON {table} (v)")
    conn.executemany(f"INSERT INTO {table} (v) VALUES (?)", [(f"v{i}",) for i in range(300)])
    target = sqlite3.connect(tmp_path / "copy.db")
    calls = []
    conn.backup(target, pages=1, progress=lambda status, remaining, total: calls.append(total))
    assert calls  # paced page by page, as sqlite3's
    assert target.execute(f"SELECT count(*), max(v) FROM {table}").fetchone() == (300, "v99")
    assert target.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    names = {n for (n,) in target.execute("SELECT name FROM sqlite_master")}
    assert {table, f"{table}_v", "sqlite_sequence"} <= names
    assert not [n for n in names if "raftsql" in n]  # raftsql's own tables are left out
    target.close()
    with pytest.raises(TypeError, match="must be sqlite3.Connection"):
        conn.backup(str(tmp_path / "x.db"))


def test_iterdump_matches_sqlite3(connect, table):
    conn = connect(isolation_level=None, admin=True)
    conn.executescript(f"""
        CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT, b BLOB, r REAL);
        INSERT INTO {table} VALUES (1, 'it''s', x'00ff', 1.5), (2, NULL, NULL, -2.0);
        CREATE VIEW {table}_view AS SELECT v FROM {table};
    """)
    lines = [line for line in conn.iterdump() if table in line or line in ("BEGIN TRANSACTION;", "COMMIT;")]
    assert lines == [
        "BEGIN TRANSACTION;",
        f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT, b BLOB, r REAL);",
        f"INSERT INTO \"{table}\" VALUES(1,'it''s',X'00FF',1.5);",
        f"INSERT INTO \"{table}\" VALUES(2,NULL,NULL,-2.0);",
        f"CREATE VIEW {table}_view AS SELECT v FROM {table};",
        "COMMIT;",
    ]


# --------------------------------------------------------------------------- interrupt


def test_interrupt_aborts_a_result_being_read(connect, table):
    conn = connect(isolation_level=None)
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.executemany(f"INSERT INTO {table} VALUES (?)", [(i,) for i in range(5)])
    cur = conn.execute(f"SELECT x FROM {table} ORDER BY x")
    assert cur.fetchone() == (0,)
    t = threading.Thread(target=conn.interrupt)  # from another thread, as it is meant
    t.start()
    t.join()
    with pytest.raises(connect.db.OperationalError, match="interrupted"):
        cur.fetchone()
    assert cur.fetchall() == []
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (5,)  # later ones run
    conn.close()
    with pytest.raises(connect.db.ProgrammingError):
        conn.interrupt()


# --------------------------------------------------------------------------- limits, timeout


def test_getlimit_and_setlimit(connect):
    db = connect.db
    conn = connect()
    with pytest.raises(db.ProgrammingError, match="'category' is out of bounds"):
        conn.getlimit(99)
    with pytest.raises(db.ProgrammingError, match="'category' is out of bounds"):
        conn.setlimit(-5, 1)
    if connect.kind == "sqlite3":
        assert conn.getlimit(db.SQLITE_LIMIT_VARIABLE_NUMBER) > 0
    else:
        # A limit belongs to every node, for every client: a connection cannot change one, and
        # the nodes do not report theirs yet (driver/DESIGN.md, "Server changes wanted").
        with pytest.raises(db.NotSupportedError):
            conn.setlimit(db.SQLITE_LIMIT_VARIABLE_NUMBER, 10)
        try:
            assert conn.getlimit(db.SQLITE_LIMIT_VARIABLE_NUMBER) > 0
        except db.NotSupportedError:
            pass


@pytest.mark.parametrize("timeout", [0, 0.25, 3, 2.5, True])
def test_timeout_accepts_what_sqlite3_accepts(connect, timeout):
    conn = connect(timeout=timeout)
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_timeout_refuses_what_sqlite3_refuses(connect):
    with pytest.raises(TypeError, match="must be real number, not str"):
        connect(timeout="1")


def test_connection_timeout_attribute_takes_zero():
    conn = raftsql.Connection.__new__(raftsql.Connection)

    class _C:
        timeout = 10.0

    conn._client = _C()
    conn.timeout = 0  # fail fast: the smallest budget that still lets one request through
    assert conn.timeout == raftsql._connection.MIN_TIMEOUT
    conn.timeout = 4
    assert conn.timeout == 4.0


# --------------------------------------------------------------------------- not here


@pytest.mark.parametrize("call", [
    lambda c: c.create_function("f", 1, len),
    lambda c: c.create_aggregate("a", 1, object),
    lambda c: c.create_collation("c", lambda a, b: 0),
    lambda c: c.set_authorizer(lambda *a: 0),
    lambda c: c.enable_load_extension(True),
    lambda c: c.blobopen("t", "c", 1),
])
def test_what_runs_in_this_process_is_not_supported(cluster, call):
    conn = raftsql.connect(cluster.dsn)
    try:
        with pytest.raises(raftsql.NotSupportedError):
            call(conn)
        conn.set_trace_callback(None)  # unsetting what was never set is fine
    finally:
        conn.close()


# --------------------------------------------------------------------------- lastrowid


def test_a_transactions_lastrowid_is_the_committed_one(cluster, table):
    """A previewed INSERT's rowid depends on the table when the transaction ran: looking at it
    puts the table in the read set, so the commit fails if another insert came first (the rowid
    would differ); when nobody looked, the commit succeeds and lastrowid is the committed one."""
    auto = raftsql.connect(cluster.dsn, autocommit=True, timeout=20)
    a = raftsql.connect(cluster.dsn, timeout=20)
    b = raftsql.connect(cluster.dsn, timeout=20)
    try:
        auto.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, who TEXT)")
        cur = a.execute(f"INSERT INTO {table} (who) VALUES ('a')")
        assert cur.lastrowid == 1  # seen: the table joins the read set
        auto.execute(f"INSERT INTO {table} (who) VALUES ('other')")  # takes rowid 1
        with pytest.raises(raftsql.SerializationError):
            a.commit()

        cur = b.execute(f"INSERT INTO {table} (who) VALUES ('b')")  # previewed as rowid 2
        auto.execute(f"INSERT INTO {table} (who) VALUES ('other2')")  # takes rowid 2
        b.commit()  # write-only: no conflict, the entry assigns rowid 3
        assert cur.lastrowid == 3
        assert auto.execute(f"SELECT who FROM {table} WHERE id = ?", (cur.lastrowid,)).fetchone() == ("b",)
    finally:
        for c in (auto, a, b):
            c.close()


# --------------------------------------------------------------------------- executemany in a transaction


def test_executemany_in_a_transaction_keeps_the_sets_before_a_failure(connect, table):
    """sqlite3's executemany inside a transaction: the sets before a failing one stay in the
    transaction. raftsql previews a plain INSERT's sets in one request."""
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (v INTEGER UNIQUE)")
    cur = conn.executemany(f"INSERT INTO {table} VALUES (?)", [(i,) for i in range(400)])
    assert cur.rowcount == 400 and conn.in_transaction
    with pytest.raises(connect.db.IntegrityError):
        conn.executemany(f"INSERT INTO {table} VALUES (?)", [(i,) for i in range(400, 700)] + [(5,), (9999,)])
    conn.commit()
    other = connect()
    assert other.execute(f"SELECT count(*), max(v) FROM {table}").fetchone() == (700, 699)


def test_an_executemany_too_big_for_one_transaction_fails_at_once(cluster, table):
    conn = raftsql.connect(cluster.dsn, timeout=20)
    try:
        conn.execute(f"CREATE TABLE {table} (v TEXT)")
        rows = [("x" * 100,) for _ in range(60_000)]  # about 6 MB of writes
        with pytest.raises(raftsql.DataError, match="autocommit"):
            conn.executemany(f"INSERT INTO {table} VALUES (?)", rows)
        conn.rollback()
        conn.autocommit = True  # the way to load it: one entry per call, under the limit
        conn.executemany(f"INSERT INTO {table} VALUES (?)", rows[:30_000])
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (30_000,)
    finally:
        conn.close()


def test_sqlite3_connect_keywords_are_accepted_and_checked(cluster, tmp_path):
    """check_same_thread=False (Flask, FastAPI), cached_statements and uri: accepted as in
    sqlite3, type errors as in sqlite3, and they change nothing here."""
    import sqlite3

    for kw in ({"check_same_thread": False}, {"cached_statements": 10}, {"uri": True},
               {"check_same_thread": True, "cached_statements": 0, "uri": False}):
        sqlite3.connect(str(tmp_path / "ref.db"), **kw).close()
        c = raftsql.connect(cluster.dsn, timeout=20, **kw)
        assert c.execute("SELECT 1").fetchone() == (1,)
        c.close()
    for kw in ({"cached_statements": "10"}, {"cached_statements": 1.5}):
        with pytest.raises(TypeError):
            sqlite3.connect(str(tmp_path / "ref.db"), **kw)
        with pytest.raises(TypeError):
            raftsql.connect(cluster.dsn, **kw)


def test_a_closed_connection_refuses_in_transaction_and_with(cluster, tmp_path):
    for c, error in ((sqlite3.connect(str(tmp_path / "ref.db")), sqlite3.ProgrammingError),
                     (raftsql.connect(cluster.dsn, timeout=20), raftsql.ProgrammingError)):
        c.close()
        with pytest.raises(error, match="Cannot operate on a closed database"):
            c.in_transaction  # noqa: B018 - the property raises
        with pytest.raises(error, match="Cannot operate on a closed database"):
            with c:
                pass


@pytest.mark.parametrize("kw", [{"isolation_level": None}, {}])
def test_last_insert_rowid_carries_over_between_writes_as_on_one_connection(connect, table, kw):
    """A parent row, then a child row pointing at it through last_insert_rowid(): each
    autocommit write is its own log entry, and the function starts from what the client's
    previous write left (its session), as on one sqlite3 connection; an UPDATE in between
    keeps it, and cursor.lastrowid follows the connection's value."""
    c = connect(**kw)
    c.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, parent INTEGER, v TEXT)")
    c.commit()
    got = []
    for v in ("a", "b"):
        c.execute(f"INSERT INTO {table} (v) VALUES (?)", (v,))
        c.commit()
        cur = c.execute(f"UPDATE {table} SET v = v || '!' WHERE id = 1")
        got.append(cur.lastrowid)
        c.commit()
        c.execute(f"INSERT INTO {table} (parent, v) VALUES (last_insert_rowid(), 'child')")
        c.commit()
    rows = c.execute(f"SELECT id, parent FROM {table} WHERE v = 'child' ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [(2, 1), (4, 3)]
    assert got == [1, 3]
    # As a read too (outside a transaction in autocommit mode): the connection's value, and
    # another connection sees its own (0: it never inserted).
    assert tuple(c.execute("SELECT last_insert_rowid()").fetchone()) == (4,)
    assert tuple(connect(**kw).execute("SELECT last_insert_rowid()").fetchone()) == (0,)


def test_argument_checks_as_in_sqlite3(connect):
    c = connect()
    cur = c.cursor()
    with pytest.raises(TypeError):
        cur.arraysize = "a"
    cur.arraysize = 2
    assert cur.arraysize == 2
    cur.execute("SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3")
    with pytest.raises(TypeError):
        cur.fetchmany(None)
    assert len(cur.fetchmany()) == 2
    if connect.kind == "raftsql":  # Python 3.12's sqlite3 checks autocommit the same way
        for bad in (1, 0, "yes", 2):
            with pytest.raises(ValueError, match="autocommit must be True, False"):
                connect(autocommit=bad)


def test_row_keys_fold_ascii_only_and_bad_indexes_raise_index_error(connect):
    conn = connect()
    conn.row_factory = connect.db.Row
    row = conn.execute("SELECT 1 AS é, 2 AS B").fetchone()
    assert row["é"] == 1 and row["b"] == 2 and row[0:1] == (1,) and row[-1] == 2
    for key in ("É", 2.0, b"B", None):
        with pytest.raises(IndexError):
            row[key]


def test_fetchmany_of_zero_or_less_fetches_every_row(connect, table):
    """sqlite3 stops a fetchmany only when it has `size` rows, so a size of 0 (or less, or an
    arraysize of 0) fetches the rest: code ported from sqlite3 must not get [] instead."""
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.executemany(f"INSERT INTO {table} VALUES (?)", [(i,) for i in range(5)])
    conn.commit()
    cur = conn.execute(f"SELECT x FROM {table} ORDER BY x")
    assert cur.fetchmany(1) == [(0,)]
    assert cur.fetchmany(0) == [(1,), (2,), (3,), (4,)]
    cur = conn.execute(f"SELECT x FROM {table} ORDER BY x")
    cur.arraysize = 0
    assert cur.fetchmany() == [(i,) for i in range(5)]
    assert conn.execute(f"SELECT x FROM {table} ORDER BY x").fetchmany(-3) == [(i,) for i in range(5)]


def test_executemany_into_an_fts5_table_counts_its_rows(connect, table):
    """FTS5 writes shadow tables of its own: their changes are not the statement's rows. The
    leader's preview counted 3 and the commit 7, a false SerializationError; later batches
    counted 4 for 2 rows."""
    conn = connect()
    conn.execute(f"CREATE VIRTUAL TABLE {table} USING fts5(body)")
    counts = []
    for batch in ([("a",), ("b",), ("c",)], [("d",), ("e",)]):
        counts.append(conn.executemany(f"INSERT INTO {table} VALUES (?)", batch).rowcount)
        conn.commit()
    conn.isolation_level = None
    counts.append(conn.executemany(f"INSERT INTO {table} VALUES (?)", [("f",), ("g",)]).rowcount)
    assert counts == [3, 2, 2]
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 7
    assert conn.execute(f"SELECT body FROM {table} WHERE {table} MATCH 'e'").fetchall() == [("e",)]


def test_more_than_one_statement_runs_none_of_them(connect, table):
    """sqlite3 refuses a second statement before running the first. The node used to run the
    first, then refuse: in a transaction (legacy mode) the first one's row was committed by the
    next commit() although execute() had raised."""
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (v)")
    conn.commit()
    calls = [
        lambda: conn.execute(f"INSERT INTO {table} VALUES (1); INSERT INTO {table} VALUES (2)"),
        lambda: conn.execute(f"INSERT INTO {table} VALUES (3); garbage"),
        lambda: conn.executemany(f"INSERT INTO {table} VALUES (?); INSERT INTO {table} VALUES (99)",
                                 [(5,), (6,)]),
        lambda: conn.execute(f"INSERT INTO {table} VALUES (4) ; -- a comment, then\n ;"),
    ]
    for call in calls:
        with pytest.raises(connect.db.ProgrammingError, match="one statement at a time"):
            call()
    conn.execute(f"INSERT INTO {table} VALUES (7) ; -- a comment after it\n /* and */ ")
    conn.commit()
    assert conn.execute(f"SELECT v FROM {table}").fetchall() == [(7,)]


def test_connect_time_tuning_pragmas_are_answered_as_sqlite3_answers_them(connect):
    """Recipes set synchronous, temp_store, cache_size, mmap_size and busy_timeout and run
    PRAGMA optimize: the node refused them all (per connection, not replicated); the driver
    answers them as sqlite3 does and sends nothing (they would tune one node's connection,
    the apply connection's durability even)."""
    conn = connect()
    recipe = ["PRAGMA synchronous=NORMAL", "pragma main.synchronous = OFF;", "PRAGMA temp_store=MEMORY",
              "PRAGMA cache_size=-64000", "PRAGMA mmap_size=268435456", "PRAGMA busy_timeout = 5000",
              "PRAGMA optimize", "PRAGMA optimize(0x10002)"]
    out = []
    for sql in recipe:
        cur = conn.execute(sql)
        out.append((cur.fetchall(), [d[0] for d in cur.description or ()]))
    assert out == [([], [])] * 4 + [([(268435456,)], ["mmap_size"]), ([(5000,)], ["timeout"]),
                                     ([], ["optimize"]), ([], ["optimize"])]
    conn.executescript("PRAGMA synchronous=NORMAL; PRAGMA temp_store=MEMORY;")


def test_a_null_character_in_sql_is_refused_as_sqlite3_refuses_it(connect):
    conn = connect()
    with pytest.raises(connect.db.ProgrammingError, match="the query contains a null character"):
        conn.execute("SELECT 'a\x00b'")
    with pytest.raises(connect.db.ProgrammingError, match="the query contains a null character"):
        conn.executemany("INSERT INTO nowhere VALUES (?)\x00", [(1,)])
    with pytest.raises(ValueError, match="embedded null character"):
        conn.executescript("SELECT 1;\x00")
    assert conn.execute("SELECT ?", ("a\x00b",)).fetchone() == ("a\x00b",)  # in a value: fine
