"""The driver's pure parts, without a cluster: DSN and connect() arguments, Row, type objects and
description type codes, error mapping (checked against the stdlib sqlite3 module), parameter
adaptation, script splitting, the transaction protocol and the retry loop (with fakes)."""

from __future__ import annotations

import datetime
import enum
import sqlite3
import subprocess
import sys

import pytest

import raftsql.driver as db
from raftsql.driver import _client, _sql
from raftsql.driver._conn import ConnectionLost, NodeUnreachable
from raftsql.driver._connection import Connection, parse_settings
from raftsql.driver._exceptions import error_from_map, exception_class
from raftsql.driver._types import adapt_params, affinity

# --------------------------------------------------------------------------- module surface


def test_module_globals():
    assert db.apilevel == "2.0"
    assert db.threadsafety == 2
    assert db.paramstyle == "qmark"
    assert db.Binary is memoryview
    assert db.Date(2002, 12, 25) == datetime.date(2002, 12, 25)
    assert db.Time(13, 45, 30) == datetime.time(13, 45, 30)
    assert db.Timestamp(2002, 12, 25, 13, 45, 30) == datetime.datetime(2002, 12, 25, 13, 45, 30)
    ticks = 1_000_000_000
    assert db.DateFromTicks(ticks) == sqlite3.DateFromTicks(ticks)
    assert db.TimeFromTicks(ticks) == sqlite3.TimeFromTicks(ticks)
    assert db.TimestampFromTicks(ticks) == sqlite3.TimestampFromTicks(ticks)
    assert db.complete_statement("SELECT 1;") and not db.complete_statement("SELECT 'a;")


def test_result_code_constants_match_sqlite3():
    names = [n for n in dir(sqlite3) if n.startswith("SQLITE_") and n in db.RESULT_CODES]
    assert len(names) > 90
    for name in names:
        assert getattr(db, name) == getattr(sqlite3, name), name


def test_exception_tree_is_sqlite3s():
    names = ["Warning", "Error", "InterfaceError", "DatabaseError", "DataError",
             "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
             "NotSupportedError"]
    for name in names:
        ours, theirs = getattr(db, name), getattr(sqlite3, name)
        assert [c.__name__ for c in ours.__mro__] == [c.__name__ for c in theirs.__mro__], name
        assert getattr(Connection, name) is ours


def test_driver_errors_are_distinct_operational_errors():
    classes = [db.Unavailable, db.OutcomeUnknown, db.TransactionAborted]
    for c in classes:
        assert issubclass(c, db.OperationalError)
        for other in classes:
            assert c is other or not issubclass(c, other)
    e = db.OutcomeUnknown("x", serial=7, statements=[("INSERT", [])], client_id="c")
    assert (e.serial, e.client_id) == (7, "c")


def test_driver_never_imports_apsw_or_cryptography():
    code = ("import sys, raftsql.driver as d; d.Row; d.connect; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('apsw', 'cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- connect() settings

DSN = "raftsql://127.0.0.1:4001,127.0.0.1:4002,127.0.0.1:4003/?certs=/abs/certs"


def test_dsn_as_printed_by_cluster_up():
    s = parse_settings(DSN)
    assert s.hosts == [("127.0.0.1", 4001), ("127.0.0.1", 4002), ("127.0.0.1", 4003)]
    assert (s.cafile, s.certfile, s.keyfile) == ("/abs/certs/ca.crt", "/abs/certs/client.crt",
                                                  "/abs/certs/client.key")
    assert (s.timeout, s.autocommit, s.consistency) == (10.0, -1, "linearizable")
    assert s.autocommit == db.LEGACY_TRANSACTION_CONTROL and s.isolation_level == ""


def test_dsn_parameters_and_keyword_overrides():
    s = parse_settings(DSN + "&consistency=stale&timeout=2.5&autocommit=true")
    assert (s.timeout, s.autocommit, s.consistency) == (2.5, True, "stale")
    s = parse_settings(DSN + "&consistency=stale&timeout=2.5&autocommit=true",
                       hosts=["10.0.0.1:5000", ("10.0.0.2", 5001)], cafile="/ca.pem",
                       keyfile="/k.pem", timeout=7, autocommit=False, consistency="leader")
    assert s.hosts == [("10.0.0.1", 5000), ("10.0.0.2", 5001)]
    assert (s.cafile, s.certfile, s.keyfile) == ("/ca.pem", "/abs/certs/client.crt", "/k.pem")
    assert (s.timeout, s.autocommit, s.consistency) == (7.0, False, "leader")
    s = parse_settings(hosts="[::1]:4001, h:4002", cafile="a", certfile="b")
    assert s.hosts == [("::1", 4001), ("h", 4002)] and s.keyfile is None


@pytest.mark.parametrize("dsn, kw", [
    ("postgres://h:1/?certs=c", {}),
    ("raftsql:///?certs=c", {}),
    ("raftsql://h/?certs=c", {}),
    ("raftsql://h:1/?certs=c&consitency=stale", {}),
    ("raftsql://h:1/", {}),
    ("raftsql://h:1/?certs=c&timeout=soon", {}),
    ("raftsql://h:1/?certs=c&consistency=eventual", {}),
    ("raftsql://h:1/?certs=c&autocommit=maybe", {}),
    ("raftsql://h:1/?certs=c", {"hosts": ["nohost"]}),
    (None, {"cafile": "a", "certfile": "b"}),
])
def test_bad_connect_arguments_raise_programming_error(dsn, kw):
    with pytest.raises(db.ProgrammingError):
        parse_settings(dsn, **kw)


def test_autocommit_and_isolation_level_arguments():
    assert parse_settings(DSN + "&autocommit=legacy").autocommit == -1
    assert parse_settings(DSN, autocommit=db.LEGACY_TRANSACTION_CONTROL).autocommit == -1
    assert parse_settings(DSN, isolation_level=None).isolation_level is None
    assert parse_settings(DSN, isolation_level="exclusive").isolation_level == "EXCLUSIVE"
    # sqlite3's exceptions and messages (Python 3.11), from connect() as from the attribute
    with pytest.raises(TypeError, match="^isolation_level must be str or None$"):
        parse_settings(DSN, isolation_level=1)
    with pytest.raises(ValueError, match="^isolation_level string must be '', 'DEFERRED', "
                                         "'IMMEDIATE', or 'EXCLUSIVE'$"):
        parse_settings(DSN, isolation_level="SERIALIZABLE")
    with pytest.raises(ValueError, match="^embedded null character$"):
        parse_settings(DSN, isolation_level="DEFERRED\0")


def test_isolation_level_attribute_as_sqlite3():
    conn = Connection(_StubClient())
    assert conn.isolation_level == "" and conn.autocommit == db.LEGACY_TRANSACTION_CONTROL
    for value, stored in (("deferred", "DEFERRED"), ("Immediate", "IMMEDIATE"), ("", ""),
                          (None, None), ("EXCLUSIVE", "EXCLUSIVE")):
        conn.isolation_level = value
        assert conn.isolation_level == stored
    for bad in (1, b"DEFERRED", 1.5, True):
        with pytest.raises(TypeError, match="^isolation_level must be str or None$"):
            conn.isolation_level = bad
    for bad in ("bogus", "ımmediate", "BEGIN"):  # a dotless i is not ASCII case folding
        with pytest.raises(ValueError, match="^isolation_level string must be"):
            conn.isolation_level = bad
    assert conn.isolation_level == "EXCLUSIVE"
    with pytest.raises(AttributeError, match="cannot delete attribute"):
        del conn.isolation_level
    for bad in (1, 0, "x", None, -2):  # Python 3.12's check: only True, False and -1
        with pytest.raises(ValueError, match="^autocommit must be True, False, or "
                                             "sqlite3.LEGACY_TRANSACTION_CONTROL$"):
            conn.autocommit = bad
    conn.close()
    for call in (lambda: conn.isolation_level, lambda: setattr(conn, "isolation_level", None),
                 lambda: conn.autocommit):
        with pytest.raises(db.ProgrammingError, match="closed database"):
            call()


def test_missing_certificates_raise_operational_error(tmp_path):
    with pytest.raises(db.OperationalError, match="certificates"):
        db.connect(f"raftsql://127.0.0.1:1/?certs={tmp_path}")


# --------------------------------------------------------------------------- Row


class _FakeCursor:
    description = (("id", "INTEGER", None, None, None, None, None),
                   ("Name", "TEXT", None, None, None, None, None))


def test_row_behaves_like_sqlite3_row():
    r = db.Row(_FakeCursor(), (1, "ann"))
    assert r[0] == 1 and r[-1] == "ann" and r[0:2] == (1, "ann")
    assert r["name"] == r["NAME"] == r["Name"] == "ann"
    assert r.keys() == ["id", "Name"]
    assert len(r) == 2 and list(r) == [1, "ann"] and tuple(r) == (1, "ann")
    assert r == db.Row(_FakeCursor(), (1, "ann"))
    assert r != db.Row(_FakeCursor(), (2, "ann"))
    assert hash(r) == hash(db.Row(_FakeCursor(), (1, "ann")))
    assert dict(zip(r.keys(), r, strict=True)) == {"id": 1, "Name": "ann"}
    with pytest.raises(IndexError):
        r["missing"]
    with pytest.raises(IndexError):
        r[2]
    assert r != (1, "ann")  # like sqlite3.Row: only equal to another Row


def test_row_matches_sqlite3_row_on_the_same_query():
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    theirs = conn.execute("SELECT 1 AS a, 'x' AS B").fetchone()

    class C:
        description = (("a", None) + (None,) * 5, ("B", None) + (None,) * 5)

    ours = db.Row(C(), (1, "x"))
    for key in (0, 1, "a", "b", "B", slice(0, 2)):
        assert ours[key] == theirs[key]
    assert ours.keys() == theirs.keys() and len(ours) == len(theirs)


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("decltype, expected", [
    ("INT", "INTEGER"), ("INTEGER", "INTEGER"), ("BIGINT", "INTEGER"), ("FLOATING POINT", "INTEGER"),
    ("VARCHAR(20)", "TEXT"), ("NCHAR(55)", "TEXT"), ("CLOB", "TEXT"), ("text", "TEXT"),
    ("BLOB", "BLOB"), ("", "BLOB"), ("REAL", "REAL"), ("DOUBLE PRECISION", "REAL"),
    ("FLOAT", "REAL"), ("NUMERIC", "NUMERIC"), ("DECIMAL(10,5)", "NUMERIC"),
    ("BOOLEAN", "NUMERIC"), ("DATETIME", "NUMERIC"), ("STRING", "NUMERIC"), (None, None),
])
def test_affinity_follows_sqlite_rules(decltype, expected):
    assert affinity(decltype) == expected


@pytest.mark.parametrize("decltype, matches", [
    ("VARCHAR(20)", {"STRING"}), ("TEXT", {"STRING"}), ("CHARACTER(2)", {"STRING"}),
    ("BLOB", {"BINARY"}),
    ("INTEGER", {"NUMBER", "ROWID"}), ("int", {"NUMBER"}), ("REAL", {"NUMBER"}),
    ("NUMERIC", {"NUMBER"}), ("BOOLEAN", {"NUMBER"}),
    ("DATE", {"DATETIME"}), ("DATETIME", {"DATETIME"}), ("TIMESTAMP", {"DATETIME"}),
    ("TIME", {"DATETIME"}),
    (None, set()),
])
def test_type_objects_compare_equal_to_declared_types(decltype, matches):
    objects = {"STRING": db.STRING, "BINARY": db.BINARY, "NUMBER": db.NUMBER,
               "DATETIME": db.DATETIME, "ROWID": db.ROWID}
    for name, obj in objects.items():
        assert (decltype == obj) == (name in matches), (decltype, name)
        assert (obj == decltype) == (name in matches), (decltype, name)
        assert (obj != decltype) == (name not in matches), (decltype, name)
    assert db.STRING != db.NUMBER and db.STRING == db.STRING
    assert len({db.STRING, db.BINARY, db.NUMBER, db.DATETIME, db.ROWID}) == 5


class _StubClient:
    """Just enough of _client.Client for Connection objects that never touch the network."""

    timeout = 5.0
    client_id = "stub"
    last_index = 0

    def __init__(self):
        self.sent: list = []  # ("execute", statements, serial) / ("txn", statement, base, term, leader)
        self.previews: list[dict] = []  # results to return from execute_in_transaction
        self.results: list[dict] = []  # results to return from execute
        self.kw: list[dict] = []  # the other keyword arguments of each call
        self.idempotent: list[bool] = []  # execute(): did the driver know it only reads?
        self.lose_responses = False  # execute() fails as _client.Client does on a lost response
        self.serial = 0
        self.closed = False

    def next_serial(self):
        self.serial += 1
        return self.serial

    def execute(self, statements, *, consistency=None, min_index=None, serial=None,
                idempotent=False, timeout=None, stream=False, **kw):
        self.sent.append(("execute", list(statements), serial))
        self.kw.append(kw)  # commit={...} (serializable transactions)
        self.idempotent.append(idempotent)
        if self.lose_responses:  # sent, no answer by the deadline
            if idempotent:
                raise _client.Unavailable("no node served the request")
            raise _client.OutcomeUnknown("the write may have been applied", serial)
        return self.results.pop(0) if self.results else _result()

    def execute_in_transaction(self, statement, term, *, leader=None, base=0, timeout=None,
                               stream=False, **kw):
        self.sent.append(("txn", statement, base, term, leader))
        self.kw.append(kw)
        res = self.previews.pop(0)
        if isinstance(res, Exception):
            raise res
        return res, "127.0.0.1:4001"

    def close(self):
        self.closed = True


def _result(**kw):
    r = {"columns": [], "decltypes": [], "rows": [], "rowcount": -1, "lastrowid": None,
         "index": 5, "error": None, "duplicate": False, "results": None}
    r.update(kw)
    return r


def test_description_type_codes_are_declared_types():
    conn = Connection(_StubClient(), autocommit=True)
    conn._client.results.append(_result(columns=["id", "name", "born", "expr"],
                                        decltypes=["INTEGER", "VARCHAR(20)", "DATE", None],
                                        rows=[[1, "a", "2000-01-01", 3]]))
    cur = conn.execute("SELECT id, name, born, 1+2 AS expr FROM people")
    assert [d[0] for d in cur.description] == ["id", "name", "born", "expr"]
    assert all(len(d) == 7 and d[2:] == (None,) * 5 for d in cur.description)
    codes = [d[1] for d in cur.description]
    assert codes == ["INTEGER", "VARCHAR(20)", "DATE", None]
    assert codes[0] == db.NUMBER and codes[0] == db.ROWID
    assert codes[1] == db.STRING and codes[2] == db.DATETIME
    assert cur.rowcount == -1 and cur.fetchall() == [(1, "a", "2000-01-01", 3)]


class Color(enum.IntEnum):
    RED = 1


def test_parameters_are_adapted_like_sqlite3():
    dt = datetime.datetime(2024, 5, 6, 7, 8, 9, 123)
    assert adapt_params((None, 1, 2.5, "s", b"b", bytearray(b"ba"), memoryview(b"mv"), True,
                         Color.RED, datetime.date(2024, 5, 6), dt, datetime.time(1, 2, 3))) == [
        None, 1, 2.5, "s", b"b", b"ba", b"mv", 1, 1, "2024-05-06",
        "2024-05-06 07:08:09.000123", "01:02:03"]
    # sqlite3's (deprecated) default adapters give the same strings
    assert sqlite3.adapters[(datetime.datetime, sqlite3.PrepareProtocol)](dt) == dt.isoformat(" ")
    assert adapt_params({"a": 1, "b": datetime.date(2020, 1, 2)}) == {"a": 1, "b": "2020-01-02"}
    assert adapt_params(None) == [] and adapt_params(()) == []
    with pytest.raises(OverflowError):
        adapt_params((2**63,))
    # A memoryview: its bytes if contiguous (a 2-D one too), else sqlite3's BufferError.
    assert adapt_params((memoryview(b"abcdef")[1:3], memoryview(b"abcdef").cast("B", (2, 3)))) == [
        b"bc", b"abcdef"]
    with pytest.raises(BufferError, match="not C-contiguous"):
        adapt_params((memoryview(b"abcdef")[::2],))
    assert adapt_params((-(2**63),)) == [-(2**63)]
    with pytest.raises(db.ProgrammingError, match="Error binding parameter 1: type 'object'"):
        adapt_params((object(),))
    with pytest.raises(db.ProgrammingError):
        adapt_params(42)


def test_register_adapter():
    class Point:
        def __init__(self, x, y):
            self.x, self.y = x, y

    db.register_adapter(Point, lambda p: f"{p.x};{p.y}")
    try:
        assert adapt_params((Point(1, 2),)) == ["1;2"]
    finally:
        del db.adapters[Point]


# --------------------------------------------------------------------------- error mapping


def test_error_mapping_matches_sqlite3_on_real_errors():
    """Make SQLite itself fail in known ways through the stdlib module, and check that the class
    we pick from (code, name) is the class sqlite3 raised."""
    conn = sqlite3.connect(":memory:")
    conn.executescript("""
        CREATE TABLE t (id INTEGER PRIMARY KEY, u UNIQUE, n NOT NULL, c CHECK (c > 0));
        CREATE TABLE s (x INTEGER) STRICT;
        INSERT INTO t VALUES (1, 1, 1, 1);
    """)
    failing = [
        "INSERT INTO t VALUES (2, 1, 1, 1)",  # UNIQUE
        "INSERT INTO t VALUES (1, 2, 1, 1)",  # PRIMARY KEY
        "INSERT INTO t VALUES (3, 3, NULL, 1)",  # NOT NULL
        "INSERT INTO t VALUES (4, 4, 1, -1)",  # CHECK
        "INSERT INTO s VALUES ('x')",  # STRICT datatype
        "SELEC 1",  # syntax
        "SELECT * FROM nope",  # no such table
        "SELECT nope FROM t",  # no such column
        "SELECT abs(-9223372036854775808)",  # integer overflow
        "SELECT zeroblob(2000000000)",  # too big
    ]
    seen = set()
    for sql in failing:
        with pytest.raises(sqlite3.Error) as info:
            conn.execute(sql)
        e = info.value
        ours = error_from_map({"code": e.sqlite_errorcode, "name": e.sqlite_errorname,
                               "message": str(e)})
        assert type(ours).__name__ == type(e).__name__, sql
        assert (ours.sqlite_errorcode, ours.sqlite_errorname, str(ours)) == (
            e.sqlite_errorcode, e.sqlite_errorname, str(e))
        seen.add(type(e).__name__)
    assert {"IntegrityError", "OperationalError", "DataError"} <= seen


@pytest.mark.parametrize("code, cls", [
    (1, db.OperationalError), (2, db.InternalError), (3, db.OperationalError),
    (4, db.OperationalError), (5, db.OperationalError), (6, db.OperationalError),
    (7, db.OperationalError), (8, db.OperationalError), (9, db.OperationalError),
    (10, db.OperationalError), (11, db.DatabaseError), (12, db.InternalError),
    (13, db.OperationalError), (14, db.OperationalError), (15, db.OperationalError),
    (16, db.OperationalError), (17, db.OperationalError), (18, db.DataError),
    (19, db.IntegrityError), (20, db.IntegrityError), (21, db.InterfaceError),
    (22, db.DatabaseError), (23, db.DatabaseError), (24, db.DatabaseError),
    (25, db.InterfaceError), (26, db.DatabaseError), (2067, db.IntegrityError),
    (1299, db.IntegrityError), (266, db.OperationalError), (None, db.DatabaseError),
])
def test_primary_code_table_is_cpythons(code, cls):
    assert exception_class(code) is cls


@pytest.mark.parametrize("name, code, cls", [
    ("RAFTSQL_MULTIPLE_STATEMENTS", 1, db.ProgrammingError),
    ("RAFTSQL_BINDINGS", 25, db.ProgrammingError),
    ("RAFTSQL_PROGRAMMING", 21, db.ProgrammingError),
    ("RAFTSQL_NOT_READONLY", 8, db.OperationalError),
    ("RAFTSQL_STEP_LIMIT", 9, db.OperationalError),
    ("RAFTSQL_TIMEOUT", 9, db.OperationalError),
    ("RAFTSQL_STALE_SERIAL", 1, db.InterfaceError),
    ("RAFTSQL_MAX_ROWID", 19, db.IntegrityError),
    ("SQLITE_AUTH", 23, db.DatabaseError),
])
def test_raftsql_error_names(name, code, cls):
    e = error_from_map({"code": code, "name": name, "message": "m", "statement": 2})
    assert type(e) is cls
    assert (e.sqlite_errorcode, e.sqlite_errorname, e.statement, str(e)) == (code, name, 2, "m")


def test_error_name_defaults_from_code():
    e = error_from_map({"code": 2067, "message": "UNIQUE constraint failed: t.u"})
    assert e.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE" and isinstance(e, db.IntegrityError)


# --------------------------------------------------------------------------- SQL helpers


def test_split_script_uses_complete_statements():
    script = """
        -- a comment; with a semicolon
        CREATE TABLE t (x TEXT);  /* block; comment */
        INSERT INTO t VALUES ('a;b');
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN
            INSERT INTO t VALUES ('c'); SELECT 1;
        END;
        ;;
        SELECT 'last without semicolon'
    """
    parts = _sql.split_script(script)
    assert len(parts) == 4
    assert parts[0].endswith("CREATE TABLE t (x TEXT);")
    assert parts[1] == "/* block; comment */\n        INSERT INTO t VALUES ('a;b');"
    assert parts[2].startswith("CREATE TRIGGER") and parts[2].endswith("END;")
    assert parts[3] == "SELECT 'last without semicolon'"
    assert _sql.split_script("  -- nothing\n ; ") == []


def test_statement_classification():
    ro = _sql.is_read_only
    assert ro("  -- c\n select 1") and ro("VALUES (1)")
    assert ro("WITH x(a) AS (SELECT 1) SELECT a FROM x")
    assert ro("with recursive c(n) as (select 1 union all select n+1 from c where n<5) "
              "select n from c")
    assert ro("WITH x AS NOT MATERIALIZED (SELECT ')insert') /* delete */ VALUES (1)")
    assert not ro("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x")
    assert not ro("INSERT INTO t SELECT 1") and not ro("PRAGMA table_info(t)")
    # Quoted names, strings and comments that look like verbs do not count.
    assert _sql.statement_verb('WITH "select" AS (SELECT 1) UPDATE t SET a = 1') == "UPDATE"
    assert _sql.statement_verb("WITH [values] AS (SELECT 'select') DELETE FROM t") == "DELETE"
    assert _sql.statement_verb("WITH x AS (SELECT 1) -- select\n REPLACE INTO t VALUES (1)") \
        == "REPLACE"
    assert _sql.statement_verb("WITH x AS (SELECT 1)") == "WITH"  # incomplete: may write
    # sqlite3's legacy implicit BEGIN: only before these four first words
    assert _sql.is_dml(" /* c */ insert into t values (1)") and _sql.is_dml("REPLACE INTO t VALUES (1)")
    assert not _sql.is_dml("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x")
    assert not _sql.is_dml("CREATE TABLE t (x)") and not _sql.is_dml("SELECT 1")
    for s in ("BEGIN", "begin transaction;", "BEGIN IMMEDIATE", "COMMIT;", "END TRANSACTION"):
        assert _sql.is_begin_or_commit(s), s
    for s in ("ROLLBACK", "BEGIN; SELECT 1", "SAVEPOINT a", "COMMITTED"):
        assert not _sql.is_begin_or_commit(s), s


# --------------------------------------------------------------------------- Connection (stub)


def test_closed_objects_raise_programming_error():
    conn = Connection(_StubClient())
    cur = conn.cursor()
    cur.close()
    with pytest.raises(db.ProgrammingError, match="closed cursor"):
        cur.execute("SELECT 1")
    cur2 = conn.cursor()
    conn.close()
    conn.close()  # idempotent, as sqlite3
    assert conn._client.closed and conn.closed
    for call in (conn.cursor, conn.commit, conn.rollback, lambda: conn.execute("SELECT 1"),
                 lambda: cur2.execute("SELECT 1"), cur2.fetchall):
        with pytest.raises(db.ProgrammingError, match="closed database"):
            call()


def test_fetch_without_result_set_is_empty_as_sqlite3():
    conn = Connection(_StubClient(), autocommit=True)
    cur = conn.cursor()
    assert (cur.fetchone(), cur.fetchall(), cur.fetchmany()) == (None, [], [])
    cur.execute("INSERT INTO t VALUES (1)")
    assert (cur.fetchone(), cur.fetchall(), cur.fetchmany(5)) == (None, [], [])
    assert cur.description is None and list(cur) == []


def test_transaction_protocol_with_a_stub_client():
    client = _StubClient()
    conn = Connection(client, autocommit=False)  # PEP 249: DDL joins the transaction too
    assert conn.autocommit is False and not conn.in_transaction
    # A SELECT before any write takes the normal read path.
    conn.execute("SELECT 1")
    assert client.sent[-1][0] == "execute"
    client.previews += [
        _result(readonly=False, term=3, rowcount=-1, index=10),  # CREATE TABLE
        _result(readonly=False, term=3, rowcount=1, lastrowid=1),  # INSERT
        _result(readonly=True, term=3, columns=["x"], decltypes=[None], rows=[[1]]),  # SELECT
        _result(readonly=False, term=3, error={"code": 19, "name": "SQLITE_CONSTRAINT", "message": "no"}),
    ]
    conn.execute("CREATE TABLE t (x)")
    assert client.sent[-1] == ("txn", ("CREATE TABLE t (x)", []), 0, None, None)
    conn.execute("INSERT INTO t VALUES (?)", (1,))
    assert client.sent[-1] == ("txn", ("INSERT INTO t VALUES (?)", [1]), 1, 3, "127.0.0.1:4001")
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    with pytest.raises(db.IntegrityError):
        conn.execute("INSERT INTO t VALUES (2)")
    assert conn.in_transaction
    assert len(conn._txn.writes) == 2  # neither the reads nor the failed insert
    n = len(client.sent)
    conn.commit()
    # Every statement it ran goes with the commit, each with what it saw.
    assert client.sent[n:] == [("execute", [("SELECT 1", []), ("CREATE TABLE t (x)", []),
                                            ("INSERT INTO t VALUES (?)", [1]),
                                            ("SELECT x FROM t", []),
                                            ("INSERT INTO t VALUES (2)", [])], 2)]
    checks = client.kw[-1]["commit"]["checks"]
    assert [c[0] for c in checks] == [0, 0, 0, 0, 1] and checks[4][1] == "SQLITE_CONSTRAINT"
    assert [c[1] for c in checks[:4]] == [-1, -1, 1, -1] and checks[3][2] == 1  # rowcount, rows
    assert not conn.in_transaction
    conn.commit()  # empty: nothing sent
    assert len(client.sent) == n + 1


def test_legacy_transaction_control_with_a_stub_client():
    """The default (autocommit=LEGACY_TRANSACTION_CONTROL, isolation_level=""): a transaction
    opens before INSERT/UPDATE/DELETE/REPLACE; anything else outside one is its own write."""
    client = _StubClient()
    conn = Connection(client)
    conn.execute("SELECT 1")  # a read, checked by the commit of the transaction to come
    assert client.sent[-1][0] == "execute" and client.kw[-1] == {}
    assert not conn.in_transaction and len(conn._txn.steps) == 1
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")  # outside any transaction: applied now
    assert client.sent[-1][:2] == ("execute", [("CREATE TABLE IF NOT EXISTS t (x)", [])])
    assert client.kw[-1] == {} and not client.idempotent[-1]
    # It ended the window of the earlier reads (they were in no transaction in sqlite3).
    assert not conn._txn.steps and not conn.in_transaction
    client.previews += [
        _result(readonly=False, term=3, error={"code": 19, "name": "SQLITE_CONSTRAINT",
                                               "message": "no"}),
        _result(readonly=False, term=3, rowcount=-1),  # CREATE INDEX, now in the transaction
    ]
    with pytest.raises(db.IntegrityError):
        conn.execute("INSERT INTO t VALUES (1)")
    # sqlite3 sent BEGIN before the failed INSERT, and that transaction stays open.
    assert conn.in_transaction and not conn._txn.writes
    with pytest.raises(db.OperationalError, match="cannot start a transaction within"):
        conn.execute("BEGIN")
    conn.execute("CREATE INDEX i ON t (x)")
    assert client.sent[-1][0] == "txn" and conn._txn.writes == [("CREATE INDEX i ON t (x)", [])]
    conn.rollback()
    assert not conn.in_transaction
    with pytest.raises(db.OperationalError, match="cannot commit - no transaction is active"):
        conn.execute("COMMIT")
    n = len(client.sent)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x")  # not DML to sqlite3
    assert [c[0] for c in client.sent[n:]] == ["execute", "execute"] and not conn.in_transaction
    client.previews += [_result(readonly=False, term=3, rowcount=2)]
    cur = conn.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
    assert client.sent[-1][0] == "txn" and conn.in_transaction and cur.rowcount == 2
    conn.isolation_level = None  # commits the pending writes first, as sqlite3
    assert client.sent[-1][:2] == ("execute", [("INSERT INTO t VALUES (?)", ([1], [2]))])
    assert not conn.in_transaction
    conn.execute("INSERT INTO t VALUES (3)")  # autocommit now
    assert client.sent[-1][:2] == ("execute", [("INSERT INTO t VALUES (3)", [])])


def test_switching_autocommit_modes_as_python_312():
    client = _StubClient()
    conn = Connection(client, autocommit=False)
    client.previews.append(_result(readonly=False, term=1))
    conn.execute("INSERT INTO t VALUES (1)")
    conn.autocommit = db.LEGACY_TRANSACTION_CONTROL  # the transaction stays open
    assert conn.in_transaction and client.sent[-1][0] == "txn"
    client.previews.append(_result(readonly=False, term=1))
    conn.execute("CREATE TABLE u (x)")  # in the open transaction
    assert len(conn._txn.writes) == 2
    conn.autocommit = True  # commits
    assert client.sent[-1][0] == "execute" and len(client.sent[-1][1]) == 2
    assert not conn.in_transaction and conn.autocommit is True
    conn.isolation_level = None  # ignored with autocommit=True, nothing to commit
    conn.execute("BEGIN")
    with conn:  # does nothing with autocommit=True (Python 3.12)
        pass
    assert conn.in_transaction


def test_a_lost_response_to_a_read_is_unavailable_even_after_with():
    """A read applied nothing, so a lost response is Unavailable (resend anywhere), never
    OutcomeUnknown; a WITH ... SELECT is a read, a WITH ... INSERT may write."""
    client = _StubClient()
    conn = Connection(client, autocommit=True)
    client.lose_responses = True
    for sql in ("SELECT 1", "WITH x(a) AS (SELECT 1) SELECT a FROM x", "VALUES (1)"):
        with pytest.raises(db.Unavailable):
            conn.execute(sql)
        assert client.idempotent[-1], sql
    for sql in ("WITH x(a) AS (SELECT 1) INSERT INTO t SELECT a FROM x", "PRAGMA table_info(t)",
                "CREATE TABLE t (x)"):
        with pytest.raises(db.OutcomeUnknown) as info:
            conn.execute(sql)
        assert info.value.serial == client.sent[-1][2], sql
    # In a transaction, a WITH ... SELECT before the first write takes the read path too.
    conn = Connection(client)
    client.lose_responses = False
    conn.execute("WITH x(a) AS (SELECT 1) SELECT a FROM x")
    assert client.sent[-1][0] == "execute" and client.idempotent[-1]
    with pytest.raises(db.ProgrammingError, match="can only execute DML"):
        conn.executemany("WITH x(a) AS (SELECT ?) SELECT a FROM x", [(1,)])


def test_transaction_aborted_resets_the_transaction():
    client = _StubClient()
    conn = Connection(client)
    client.previews += [_result(readonly=False, term=3),
                        _client.TxnAborted("leadership changed")]
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(db.TransactionAborted):
        conn.execute("INSERT INTO t VALUES (2)")
    assert not conn.in_transaction and conn._txn.term is None
    n = len(client.sent)
    conn.commit()
    assert len(client.sent) == n


def test_context_manager_and_autocommit_switch():
    client = _StubClient()
    conn = Connection(client)
    client.previews.append(_result(readonly=False, term=1))
    with conn:
        conn.execute("INSERT INTO t VALUES (1)")
    assert client.sent[-1][0] == "execute" and not conn.in_transaction
    client.previews.append(_result(readonly=False, term=1))
    with pytest.raises(KeyError), conn:
        conn.execute("INSERT INTO t VALUES (2)")
        raise KeyError
    assert not conn.in_transaction and client.sent[-1][0] == "txn"  # rolled back, not sent
    client.previews.append(_result(readonly=False, term=1))
    conn.execute("INSERT INTO t VALUES (3)")
    conn.autocommit = True  # commits the pending transaction, as sqlite3
    assert client.sent[-1][:2] == ("execute", [("INSERT INTO t VALUES (3)", [])])
    with pytest.raises(ValueError):
        conn.autocommit = "yes"


def test_executemany_is_one_batch_in_autocommit_mode():
    client = _StubClient()
    conn = Connection(client, autocommit=True)
    client.results.append(_result(rowcount=3, lastrowid=3))
    cur = conn.executemany("INSERT INTO t VALUES (?)", ((i,) for i in range(3)))
    # One "many" statement carrying every parameter set, not one statement per set.
    [(sql, sets)] = client.sent[-1][1]
    assert sql == "INSERT INTO t VALUES (?)" and type(sets).__name__ == "ManyParams"
    assert list(sets) == [[i] for i in range(3)]
    assert cur.rowcount == 3 and cur.lastrowid is None  # sqlite3: unchanged by executemany
    assert conn.executemany("INSERT INTO t VALUES (?)", []).rowcount == 0
    with pytest.raises(db.ProgrammingError, match="DML"):
        conn.executemany("SELECT ?", [(1,)])


# --------------------------------------------------------------------------- Client retry loop


class _FakeNode:
    """Replaces NodeConnection: answers from a script shared by every 'connection'."""

    script: list = []
    log: list = []
    streams = 0  # NodeConnection's bookkeeping of streamed results (none here)
    detached = False
    closed = False

    def __init__(self, host, port, context, timeout):
        self.address = (host, port)
        step = _FakeNode.script[0] if _FakeNode.script else None
        if isinstance(step, NodeUnreachable):
            _FakeNode.script.pop(0)
            _FakeNode.log.append(("connect-failed", self.address))
            raise step

    def request(self, payload, timeout):
        _FakeNode.log.append((self.address, payload.get("serial"), payload.get("txn", {}).get("term")))
        step = _FakeNode.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    def close(self):
        pass


@pytest.fixture
def fake_nodes(monkeypatch):
    monkeypatch.setattr(_client, "NodeConnection", _FakeNode)
    monkeypatch.setattr(_client.Client, "BACKOFF_MIN", 0.001)
    _FakeNode.script = []
    _FakeNode.log = []
    return _FakeNode


def _ok(**result):
    return {"ok": True, "result": _result(**result)}


def _err(kind, leader_addr=None):
    return {"ok": False, "error": {"kind": kind, "message": kind.lower(), "leader": None,
                                   "leader_addr": leader_addr}}


def test_client_follows_redirects_and_resends_the_same_serial(fake_nodes):
    c = _client.Client([("a", 1), ("b", 2), ("c", 3)], None, timeout=2)
    fake_nodes.script += [_err("NOT_LEADER", "c:3"), ConnectionLost("gone"),
                          _err("UNAVAILABLE"), _ok(index=9, duplicate=True)]
    res = c.execute([("INSERT INTO t VALUES (1)", ())])
    assert res["duplicate"] and c.last_index == 9
    serials = {entry[1] for entry in fake_nodes.log}
    assert serials == {1}  # every attempt carried the same serial
    assert fake_nodes.log[1][0] == ("c", 3)  # the redirect was followed


def test_client_keeps_unavailable_apart_from_outcome_unknown(fake_nodes):
    c = _client.Client([("a", 1)], None, timeout=0.3)
    fake_nodes.script += [_err("NOT_LEADER")] * 1000
    with pytest.raises(_client.Unavailable):
        c.execute([("INSERT INTO t VALUES (1)", ())])
    fake_nodes.script[:] = [ConnectionLost("lost after sending")] + [_err("NOT_LEADER")] * 1000
    with pytest.raises(_client.OutcomeUnknown) as info:
        c.execute([("INSERT INTO t VALUES (1)", ())], serial=41)
    assert info.value.serial == 41
    fake_nodes.script[:] = [ConnectionLost("lost")] + [_err("NOT_LEADER")] * 1000
    with pytest.raises(_client.Unavailable):  # a read is never "outcome unknown"
        c.execute([("SELECT 1", ())], idempotent=True)


def test_client_transaction_statements_are_pinned_to_their_leader(fake_nodes):
    c = _client.Client([("a", 1), ("b", 2)], None, timeout=2)
    fake_nodes.script += [_err("NOT_LEADER", "b:2"), _ok(readonly=False, term=4, txn="x")]
    res, leader = c.execute_in_transaction(("INSERT INTO t VALUES (1)", ()), None)
    assert leader == "b:2" and res["term"] == 4  # the first statement may follow redirects
    fake_nodes.script += [ConnectionLost("blip"), _ok(readonly=True, term=4)]
    c.execute_in_transaction(("SELECT 1", ()), 4, leader="b:2", txn_id="x", base=1)
    assert [e[0] for e in fake_nodes.log[-2:]] == [("b", 2), ("b", 2)]  # retried on its leader
    for failure in (_err("NOT_LEADER", "a:1"), _err("TXN_ABORTED"), NodeUnreachable("down")):
        c.close()
        fake_nodes.script[:] = [failure]
        with pytest.raises(_client.TxnAborted):
            c.execute_in_transaction(("SELECT 1", ()), 4, leader="b:2", txn_id="x", base=1)


def test_client_believes_sql_errors_without_a_status_round_trip(fake_nodes):
    """A follower that has not applied a CREATE TABLE yet answers NOT_LEADER, not "no such
    table" (server/node.py), so an SQL error is the answer, in one request. Only a stale read,
    which a follower serves, is retried until the node has applied min_index."""
    c = _client.Client([("a", 1)], None, timeout=2)
    no_table = {"code": 1, "name": "SQLITE_ERROR", "message": "no such table: t"}
    fake_nodes.script += [_ok(error=no_table, index=9)]
    assert c.execute([("SELECT * FROM t", ())])["error"] == no_table
    assert len(fake_nodes.log) == 1  # no status request after the error
    # A stale read is retried until the node has applied min_index.
    fake_nodes.script += [_ok(error=no_table, index=3), _ok(rows=[[1]], index=9)]
    assert c.execute([("SELECT * FROM t", ())], consistency="stale", min_index=9)["rows"] == [[1]]
