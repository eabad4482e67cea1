"""The SQLite state machine: determinism, atomicity, exactly-once, replay, sandbox, limits.

Most tests apply the same entries to two machines in different directories and require
byte-identical results and content hashes: that is the property replication depends on."""

import os
import threading
import time

import msgpack
import pytest

from raftsql.command import Command
from raftsql.server.statemachine import (
    CorruptEntryError,
    Result,
    SQLError,
    StateMachine,
    StateMachineError,
)

T0 = 1_700_000_000_123  # 2023-11-14 22:13:20.123 UTC
T0_DATETIME = "2023-11-14 22:13:20"
T0_JULIAN = (T0 + 210866760000000) / 86400000.0


def entry(*statements, client_id="", serial=0, t=T0, seed=1):
    stmts = [(s, ()) if isinstance(s, str) else s for s in statements]
    return Command(
        client_id=client_id, serial=serial, statements=stmts, leader_time_ms=t, seed=seed
    ).encode()


@pytest.fixture
def make(tmp_path):
    opened = []

    def _make(name="a", **kwargs):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        sm = StateMachine(str(d / "db.sqlite"), **kwargs)
        opened.append(sm)
        return sm

    yield _make
    for sm in opened:
        sm.close()


@pytest.fixture
def pair(make):
    return make("a"), make("b")


class Cluster:
    """Applies every entry to all machines and checks they agree."""

    def __init__(self, *machines):
        self.machines = machines
        self.index = machines[0].applied_index

    def apply(self, data):
        self.index += 1
        results = [sm.apply(self.index, data) for sm in self.machines]
        wires = [None if r is None else r.to_wire() for r in results]
        assert all(w == wires[0] for w in wires), wires
        return results[0]

    def assert_same(self):
        hashes = {sm.content_hash() for sm in self.machines}
        assert len(hashes) == 1
        assert len({sm.applied_index for sm in self.machines}) == 1


# -- determinism ------------------------------------------------------------------------------


def test_time_and_random_are_identical_on_every_node_and_equal_the_stamp(pair):
    c = Cluster(*pair)
    c.apply(
        entry(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, "
            "created DEFAULT CURRENT_TIMESTAMP, r DEFAULT (random()), b DEFAULT (randomblob(8)))"
        )
    )
    r = c.apply(entry("INSERT INTO t(id) VALUES(1), (2)", seed=77))
    assert r.error is None and r.rowcount == 2
    r = c.apply(
        entry(
            "SELECT random(), randomblob(16), datetime('now'), CURRENT_TIMESTAMP, "
            "strftime('%s','now'), julianday('now'), unixepoch('now', 'subsec'), "
            "datetime('now', 'localtime'), date(), time()",
            seed=12345,
        )
    )
    (rnd, blob, dt, ts, secs, jd, subsec, local, d, tm) = r.rows[0]
    assert isinstance(rnd, int) and isinstance(blob, bytes) and len(blob) == 16
    assert dt == ts == local == T0_DATETIME
    assert secs == str(T0 // 1000)
    assert jd == pytest.approx(T0_JULIAN, abs=1e-9)
    assert subsec == pytest.approx(T0 / 1000, abs=1e-6)
    assert (d, tm) == ("2023-11-14", "22:13:20")
    rows = pair[0].query("SELECT created, r, b FROM t ORDER BY id").rows
    assert rows[0][0] == rows[1][0] == T0_DATETIME
    assert rows[0][1] != rows[1][1] and rows[0][2] != rows[1][2]  # one stream per statement
    c.assert_same()

    # Another seed gives other values; the same seed gives the same ones again.
    again = c.apply(entry("SELECT random(), randomblob(16)", seed=12345)).rows[0]
    other = c.apply(entry("SELECT random(), randomblob(16)", seed=54321)).rows[0]
    assert again == [rnd, blob]
    assert other[0] != rnd and other[1] != blob
    # Statements of one entry get different streams.
    r = c.apply(entry("SELECT random()", "SELECT random()", seed=9))
    assert r.results[0].rows != r.results[1].rows


def test_order_by_random_is_deterministic(pair):
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(x)"))
    c.apply(
        entry(
            "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r LIMIT 50) "
            "INSERT INTO t SELECT x FROM r"
        )
    )
    r = c.apply(entry("SELECT x FROM t ORDER BY random() LIMIT 10", seed=3))
    assert len(r.rows) == 10  # and identical on both nodes (Cluster.apply checks)


def test_entry_time_never_goes_backwards(pair):
    c = Cluster(*pair)
    c.apply(entry("SELECT 1", t=T0 + 5000))
    r = c.apply(entry("SELECT strftime('%s', 'now')", t=T0))  # a new leader with a slow clock
    assert r.rows == [[str((T0 + 5000) // 1000)]]
    assert pair[0].last_time_ms == T0 + 5000


def test_changes_and_last_insert_rowid_do_not_depend_on_restarts(make, tmp_path):
    a = make("a")
    entries = [
        entry("CREATE TABLE t(x)"),
        entry("INSERT INTO t VALUES(1), (2), (3)"),
        entry("SELECT changes(), last_insert_rowid()"),
    ]
    expected = [a.apply(i, e).to_wire() for i, e in enumerate(entries, 1)]
    path = str(tmp_path / "b" / "db.sqlite")
    os.makedirs(os.path.dirname(path))
    got = []
    for i, e in enumerate(entries, 1):
        b = StateMachine(path)  # every entry on a fresh connection
        got.append(b.apply(i, e).to_wire())
        b.close()
    assert got == expected
    assert expected[2]["rows"] == [[1, 0]]


# -- atomicity and errors ---------------------------------------------------------------------


def test_batch_rolls_back_on_error_and_still_advances(pair):
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(x UNIQUE)"))
    r = c.apply(entry(("INSERT INTO t VALUES(?)", (1,)), "INSERT INTO nope VALUES(1)"))
    assert r.error == {
        "code": 1,
        "name": "SQLITE_ERROR",
        "message": "no such table: nope",
        "statement": 1,
    }
    assert r.rows == [] and r.results is None and r.index == 2
    r = c.apply(entry("INSERT INTO t VALUES(5)", "INSERT INTO t VALUES(5)"))
    assert r.error["name"] == "SQLITE_CONSTRAINT_UNIQUE"
    assert r.error["code"] == 2067 and r.error["statement"] == 1
    assert pair[0].query("SELECT count(*) FROM t").rows == [[0]]
    assert pair[0].applied_index == pair[1].applied_index == 3
    c.assert_same()


def test_batch_results_per_statement(pair):
    c = Cluster(*pair)
    r = c.apply(
        entry(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
            ("INSERT INTO t(v) VALUES(?), (?)", ("a", "b")),
            ("UPDATE t SET v = :v WHERE id = 1", {"v": "z"}),
            "SELECT id, v FROM t ORDER BY id",
        )
    )
    assert r.error is None and r.index == 1
    assert [x.rowcount for x in r.results] == [-1, 2, 1, -1]
    assert r.results[1].lastrowid == 2
    assert (r.columns, r.decltypes, r.rows) == (
        ["id", "v"],
        ["INTEGER", "TEXT"],
        [[1, "z"], [2, "b"]],
    )
    assert Result.from_wire(msgpack.unpackb(msgpack.packb(r.to_wire()))) == r


def test_statement_that_rolls_back_the_transaction_keeps_the_rest_of_the_batch(pair):
    """ON CONFLICT ROLLBACK (like an interrupted write) ends SQLite's whole transaction,
    including earlier entries of an apply_many batch: they must survive."""
    a, b = pair
    es = [
        entry("CREATE TABLE u(k PRIMARY KEY ON CONFLICT ROLLBACK)"),
        entry("INSERT INTO u VALUES(1)"),
        entry("INSERT INTO u VALUES(2)", "INSERT INTO u VALUES(1)", client_id="c", serial=1),
        entry("INSERT INTO u VALUES(3)"),
    ]
    many = a.apply_many(list(enumerate(es, 1)))
    one = [b.apply(i, e) for i, e in enumerate(es, 1)]
    assert [r.to_wire() for r in many] == [r.to_wire() for r in one]
    assert many[2].error["name"] == "SQLITE_CONSTRAINT_PRIMARYKEY"
    assert a.query("SELECT k FROM u ORDER BY k").rows == [[1], [3]]
    assert a.content_hash() == b.content_hash()


def test_apply_many_matches_apply(pair):
    a, b = pair
    es = [entry("CREATE TABLE t(x, y DEFAULT (random()))")]
    es += [
        entry(("INSERT INTO t(x) VALUES(?)", (i,)), client_id="c", serial=i, seed=i)
        for i in range(1, 40)
    ]
    es += [b"", entry("INSERT INTO t(x) VALUES(1)", client_id="c", serial=5)]  # no-op, stale
    many = a.apply_many(list(enumerate(es, 1)))
    one = [b.apply(i, e) for i, e in enumerate(es, 1)]
    assert [r and r.to_wire() for r in many] == [r and r.to_wire() for r in one]
    assert many[-2] is None
    assert many[-1].error["name"] == "RAFTSQL_STALE_SERIAL"
    assert a.applied_index == b.applied_index == len(es)
    assert a.content_hash() == b.content_hash()


# -- exactly-once -----------------------------------------------------------------------------


def test_duplicate_serial_returns_stored_result_without_executing(pair):
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(id INTEGER PRIMARY KEY, x)"))
    first = c.apply(entry("INSERT INTO t(x) VALUES('a') RETURNING id", client_id="c1", serial=1))
    assert first.rows == [[1]] and not first.duplicate and first.index == 2
    retry = c.apply(entry("INSERT INTO t(x) VALUES('a') RETURNING id", client_id="c1", serial=1))
    assert retry.duplicate and retry.index == 2 and retry.rows == [[1]]
    assert pair[0].query("SELECT count(*) FROM t").rows == [[1]]
    # An error result is stored and returned the same way.
    bad = c.apply(entry("INSERT INTO nope VALUES(1)", client_id="c1", serial=2))
    again = c.apply(entry("INSERT INTO nope VALUES(1)", client_id="c1", serial=2))
    assert again.duplicate and again.error == bad.error and again.index == bad.index
    # Serials below the latest are stale; other clients and anonymous writes are independent.
    stale = c.apply(entry("INSERT INTO t(x) VALUES('s')", client_id="c1", serial=1))
    assert stale.error["name"] == "RAFTSQL_STALE_SERIAL"
    assert stale.error["message"] == "stale serial 1 < latest 2 for client c1"
    c.apply(entry("INSERT INTO t(x) VALUES('o')", client_id="c2", serial=1))
    c.apply(entry("INSERT INTO t(x) VALUES('n')"))
    c.apply(entry("INSERT INTO t(x) VALUES('n')"))
    assert pair[0].query("SELECT x FROM t ORDER BY id").rows == [["a"], ["o"], ["n"], ["n"]]
    c.assert_same()


def test_sessions_expire_by_leader_time(make):
    a, b = make("a", session_timeout_ms=1000), make("b", session_timeout_ms=1000)
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x)"))
    c.apply(entry("INSERT INTO t VALUES(1)", client_id="old", serial=1, t=T0))
    c.apply(entry("INSERT INTO t VALUES(2)", client_id="c", serial=7, t=T0))
    for k in (1, 2, 3):  # the session clock moves at most timeout/4 per entry
        c.apply(entry("SELECT 1", t=T0 + 250 * k))
    dup = c.apply(entry("INSERT INTO t VALUES(2)", client_id="c", serial=7, t=T0 + 1000))
    assert dup.duplicate  # exactly at the timeout: still alive (and touched)
    # 'old' was last seen at T0: expired now; the retry runs again (the documented window).
    rerun = c.apply(entry("INSERT INTO t VALUES(1)", client_id="old", serial=1, t=T0 + 1001))
    assert not rerun.duplicate and rerun.error is None
    assert a.query("SELECT count(*) FROM t WHERE x = 1").rows == [[2]]
    # Garbage collection removes expired sessions, identically on both nodes.
    for k in range(1, 20):
        c.apply(entry("SELECT 1", t=T0 + 1001 + 250 * k))
    assert a.query("SELECT client_id FROM sqlite_raftsql_sessions").rows == []
    c.assert_same()


def test_a_leader_clock_jump_does_not_expire_sessions(make):
    """A forward jump of the leader's wall clock by more than the session timeout moves SQL's
    'now' but not the session clock, so a resend across the jump is still a duplicate."""
    a, b = make("a"), make("b")  # default timeout: 6 h
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x, at DEFAULT CURRENT_TIMESTAMP)"))
    c.apply(entry("INSERT INTO t(x) VALUES(1)", client_id="c", serial=1, t=T0))
    jump = T0 + 7 * 3600 * 1000
    c.apply(entry("INSERT INTO t(x) VALUES(2)", client_id="other", serial=1, t=jump))
    dup = c.apply(entry("INSERT INTO t(x) VALUES(1)", client_id="c", serial=1, t=jump + 1000))
    assert dup.duplicate
    assert a.query("SELECT count(*) FROM t WHERE x = 1").rows == [[1]]
    assert a.query("SELECT at FROM t WHERE x = 2").rows == [["2023-11-15 05:13:20"]]
    c.assert_same()


def test_sessions_still_expire_when_time_passes_in_small_steps(make):
    a, b = make("a", session_timeout_ms=120_000), make("b", session_timeout_ms=120_000)
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x)"))
    c.apply(entry("INSERT INTO t VALUES(1)", client_id="c", serial=1, t=T0))
    for k in range(1, 6):  # five steps of 25 s (below the per-entry cap, 30 s here): 125 s
        c.apply(entry("SELECT 1", t=T0 + k * 25_000))
    rerun = c.apply(entry("INSERT INTO t VALUES(1)", client_id="c", serial=1, t=T0 + 125_001))
    assert not rerun.duplicate
    assert a.query("SELECT count(*) FROM t").rows == [[2]]
    c.assert_same()


def test_a_clock_jump_counts_a_quarter_of_the_timeout_per_entry(make):
    a = make("a", session_timeout_ms=60_000)
    c = Cluster(a)
    c.apply(entry("CREATE TABLE t(x)"))
    c.apply(entry("INSERT INTO t VALUES(1)", client_id="c", serial=1, t=T0))
    c.apply(entry("SELECT 1", t=T0 + 120_000))  # +120 s at once: the session clock moves 15 s
    assert c.apply(entry("INSERT INTO t VALUES(1)", client_id="c", serial=1, t=T0 + 120_001)).duplicate


def test_format_1_database_gets_a_session_clock(tmp_path):
    import apsw

    path = str(tmp_path / "db.sqlite")
    old = apsw.Connection(path)
    old.execute(
        "CREATE TABLE _raftsql_meta(id INTEGER PRIMARY KEY CHECK (id = 1), applied_index INTEGER "
        "NOT NULL, time_ms INTEGER NOT NULL, gc_ms INTEGER NOT NULL, format INTEGER NOT NULL);"
        f"INSERT INTO _raftsql_meta VALUES(1, 5, {T0}, {T0}, 1)"
    )
    old.close()
    sm = StateMachine(path)
    try:
        assert sm.applied_index == 5
        assert sm.query("SELECT format, session_ms FROM sqlite_raftsql_meta").rows == [[2, T0]]
    finally:
        sm.close()


# -- replay and restart -----------------------------------------------------------------------


def test_replay_is_skipped_and_reopen_keeps_applied_index(tmp_path):
    path = str(tmp_path / "db.sqlite")
    sm = StateMachine(path)
    assert sm.applied_index == 0
    sm.apply(1, entry("CREATE TABLE t(x)"))
    sm.apply(2, entry("INSERT INTO t VALUES(1)"))
    assert sm.apply(3, b"") is None  # a leader's no-op advances the index only
    h = sm.content_hash()
    sm.close()
    sm = StateMachine(path)
    try:
        assert sm.applied_index == 3
        assert sm.apply(2, entry("INSERT INTO t VALUES(1)")) is None
        assert sm.apply_many([(1, entry("CREATE TABLE t(x)")), (3, b"")]) == [None, None]
        assert sm.content_hash() == h
        with pytest.raises(StateMachineError, match="does not follow"):
            sm.apply(5, entry("SELECT 1"))
        assert sm.apply(4, entry("INSERT INTO t VALUES(2)")).index == 4
        assert sm.query("SELECT x FROM t").rows == [[1], [2]]
    finally:
        sm.close()


def test_corrupt_entry_stops_the_node(make):
    sm = make()
    sm.apply(1, entry("CREATE TABLE t(x)"))
    for garbage in (b"\x00garbage", msgpack.packb([9, 9])):
        with pytest.raises(CorruptEntryError):
            sm.apply(2, garbage)
    with pytest.raises(CorruptEntryError):
        sm.apply_many([(2, entry("INSERT INTO t VALUES(1)")), (3, b"\xc1")])
    assert sm.applied_index == 1
    assert sm.query("SELECT count(*) FROM t").rows == [[0]]


# -- validate ---------------------------------------------------------------------------------


def test_validate_reports_readonly_without_executing(make):
    sm = make()
    sm.apply(1, entry("CREATE TABLE t(x)"))
    flags = sm.validate(
        [
            ("SELECT * FROM t", ()),
            ("INSERT INTO t VALUES(?)", (1,)),
            ("WITH v(x) AS (SELECT 1) INSERT INTO t SELECT x FROM v", ()),
            ("WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r) SELECT x FROM r", ()),
            ("PRAGMA table_info(t)", ()),
            ("PRAGMA user_version", ()),
            ("PRAGMA user_version = 3", ()),
            ("SELECT 1; -- a trailing comment", ()),
            ("-- only a comment", ()),
            ("DELETE FROM t WHERE x = :x", {"x": 1}),
        ]
    )
    assert flags == [True, False, False, True, True, True, False, True, True, False]
    assert sm.query("SELECT count(*) FROM t").rows == [[0]]


@pytest.mark.parametrize(
    "statements, code, name, fragment, position",
    [
        ([("SELEC 1", ())], 1, "SQLITE_ERROR", "syntax error", 0),
        ([("SELECT * FROM nope", ())], 1, "SQLITE_ERROR", "no such table: nope", 0),
        (
            [("SELECT 1", ()), ("SELECT 1; SELECT 2", ())],
            1,
            "RAFTSQL_MULTIPLE_STATEMENTS",
            "one statement at a time",
            1,
        ),
        ([("SELECT 1; garbage", ())], 1, "RAFTSQL_MULTIPLE_STATEMENTS", "one statement", 0),
        ([("SELECT ?", (1, 2))], 25, "RAFTSQL_BINDINGS", "Incorrect number of bindings", 0),
        ([("SELECT :a", {"b": 1})], 25, "RAFTSQL_BINDINGS", "binding parameter :a", 0),
        ([("CREATE TABLE n(x)", ()), ("SELEC", ())], 1, "SQLITE_ERROR", "syntax error", 1),
    ],
)
def test_validate_errors(make, statements, code, name, fragment, position):
    sm = make()
    with pytest.raises(SQLError) as info:
        sm.validate(statements)
    e = info.value
    assert (e.code, e.name, e.statement) == (code, name, position)
    assert fragment in e.message
    assert e.error["name"] == name


def test_validate_leaves_names_created_earlier_in_the_batch_to_apply(make):
    sm = make()
    batch = [("CREATE TABLE n(x)", ()), ("INSERT INTO n VALUES(1)", ()), ("SELECT x FROM n", ())]
    assert sm.validate(batch) == [False, False, False]
    with pytest.raises(SQLError):
        sm.validate([("INSERT INTO n VALUES(1)", ())])  # no DDL before it: checked


# -- sandbox ----------------------------------------------------------------------------------

REFUSED = [
    ("ATTACH DATABASE '{dir}/other.db' AS other", "ATTACH"),
    ("DETACH DATABASE main", "DETACH"),
    ("SELECT load_extension('/tmp/evil.so')", "load_extension"),
    ("VACUUM", "VACUUM"),
    ("VACUUM INTO '{dir}/copy.db'", "VACUUM"),
    ("PRAGMA journal_mode=DELETE", "PRAGMA journal_mode"),
    ("PRAGMA synchronous=OFF", "PRAGMA synchronous"),
    ("PRAGMA writable_schema=ON", "PRAGMA writable_schema"),
    ("PRAGMA foreign_keys=ON", "PRAGMA foreign_keys cannot be changed"),
    ("PRAGMA database_list", "PRAGMA database_list"),
    ("INSERT INTO sqlite_raftsql_sessions VALUES('x', 1, x'', 0)", "sqlite_raftsql_sessions is internal"),
    ("UPDATE sqlite_raftsql_meta SET applied_index = 99", "_raftsql_meta is internal"),
    ("DELETE FROM sqlite_raftsql_sessions", "internal"),
    ("CREATE TABLE _raftsql_mine(x)", "reserved"),
    ("CREATE TEMP TABLE scratch(x)", "TEMP"),
    # The same through a qualified name, which SQLite reports as a plain CREATE in "temp"
    # (a temp table hid the main one of its name: acknowledged writes went to it).
    ("CREATE TABLE temp.scratch(x)", "TEMP"),
    ("CREATE VIEW temp.v AS SELECT 1", "TEMP"),
    ("CREATE VIRTUAL TABLE temp.f USING fts5(b)", "TEMP"),
    ("PRAGMA temp.user_version = 5", "TEMP"),
    ("BEGIN", "transaction control"),
    ("SAVEPOINT s", "transaction control"),
    ("SELECT total_changes()", "total_changes"),
    ("SELECT count(*) FROM dbstat", "dbstat"),
]


@pytest.mark.parametrize(
    "sql, message",
    [
        ("DROP TABLE sqlite_raftsql_meta", "may not be dropped"),
        ("ALTER TABLE sqlite_raftsql_meta ADD COLUMN x", "may not be altered"),
        ("CREATE INDEX i ON sqlite_raftsql_sessions(last_ms)", "may not be indexed"),
        ("CREATE TRIGGER trg AFTER INSERT ON sqlite_raftsql_sessions BEGIN SELECT 1; END",
         "system table"),
        ("CREATE TABLE sqlite_raftsql_mine(x)", "reserved for internal use"),
    ],
)
def test_raftsqls_own_tables_are_sqlites_to_protect(pair, sql, message):
    """raftsql's tables carry SQLite's reserved sqlite_ prefix: SQLite itself refuses DDL on
    them (and listings, dumps and reflection skip them)."""
    c = Cluster(*pair)
    r = c.apply(entry(sql))
    # Refused by SQLite itself, or by raftsql's authorizer before SQLite gets to it.
    assert message in r.error["message"] or "reserved for raftsql" in r.error["message"], r.error
    names = pair[0].query("SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'").rows
    assert names == []
    c.assert_same()


def test_legacy_internal_tables_are_renamed_on_open(tmp_path):
    import apsw

    path = str(tmp_path / "db.sqlite")
    sm = StateMachine(path)
    sm.apply(1, entry("CREATE TABLE t(x)"))
    sm.close()
    # Rename them back to their old names, as a database from before the rename has them.
    raw = apsw.Connection(path)
    raw.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 0)
    raw.config(apsw.SQLITE_DBCONFIG_WRITABLE_SCHEMA, 1)
    raw.execute("PRAGMA writable_schema=ON")
    for t in ("meta", "sessions", "tables", "members"):
        raw.execute("UPDATE sqlite_schema SET name=?, tbl_name=?, sql=replace(sql, ?, ?) "
                    "WHERE name=?", (f"_raftsql_{t}", f"_raftsql_{t}", f"sqlite_raftsql_{t}",
                                     f"_raftsql_{t}", f"sqlite_raftsql_{t}"))
    raw.close()
    sm = StateMachine(path)
    try:
        assert sm.applied_index == 1
        names = sorted(r[0] for r in sm.query("SELECT name FROM sqlite_schema").rows)
        assert names == ["sqlite_raftsql_audit", "sqlite_raftsql_cluster",
                         "sqlite_raftsql_members", "sqlite_raftsql_meta",
                         "sqlite_raftsql_revoked", "sqlite_raftsql_sessions",
                         "sqlite_raftsql_tables", "t"]
    finally:
        sm.close()


@pytest.mark.parametrize("sql, fragment", REFUSED)
def test_sandbox_refuses_in_apply_and_validate(pair, tmp_path, sql, fragment):
    sql = sql.format(dir=tmp_path)
    c = Cluster(*pair)
    r = c.apply(entry(sql))
    assert r.error["code"] == 23 and r.error["name"] == "SQLITE_AUTH", r.error
    assert r.error["message"].startswith("not authorized: ") and fragment in r.error["message"]
    with pytest.raises(SQLError) as info:
        pair[0].validate([(sql, ())])
    assert info.value.name == "SQLITE_AUTH" and fragment in info.value.message
    assert not (tmp_path / "copy.db").exists() and not (tmp_path / "other.db").exists()
    c.assert_same()


def test_no_temp_object_can_shadow_or_watch_a_main_table(pair):
    """A temp table named like a main table took every later write meant for the main one (all
    acknowledged, all lost); a temp trigger on a main table fired on one node and not on a
    restarted one. Both are refused, as CREATE TEMP is, and the main table gets the writes."""
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT)"))
    for sql in ("CREATE TABLE temp.orders(id INTEGER PRIMARY KEY, item TEXT)",
                "CREATE TRIGGER temp.tr AFTER INSERT ON main.orders BEGIN "
                "INSERT INTO orders(item) SELECT 'dup' WHERE new.item <> 'dup'; END",
                "CREATE INDEX temp.i ON orders(item)"):
        r = c.apply(entry(sql))
        assert r.error is not None and "TEMP" in r.error["message"], (sql, r.error)
    r = c.apply(entry("INSERT INTO orders(item) VALUES ('paid')"))
    assert r.error is None and r.rowcount == 1
    assert pair[0].query("SELECT item FROM orders").rows == [["paid"]]
    # Describing the (empty) temp schema stays allowed: SQLAlchemy's reflection asks it.
    for sm in pair:
        assert sm.query('PRAGMA temp.table_info("orders")').error is None
    assert c.apply(entry('PRAGMA temp.table_info("orders")')).error is None
    c.assert_same()


def test_internal_statement_texts_do_not_bypass_the_sandbox(pair):
    """apsw caches prepared statements by text and authorizes only at prepare: a user statement
    identical to one the state machine runs must still be refused."""
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(x)", client_id="c", serial=1))
    for sql, params in [
        ("BEGIN IMMEDIATE", ()),
        ("COMMIT", ()),
        ("ROLLBACK", ()),
        ("SAVEPOINT raftsql_entry", ()),
        ("RELEASE raftsql_entry", ()),
        (
            "UPDATE sqlite_raftsql_meta SET applied_index=?, time_ms=?, gc_ms=?, session_ms=? WHERE id=1",
            (99, 0, 0, 0),
        ),
        ("UPDATE sqlite_raftsql_sessions SET last_ms=? WHERE client_id=?", (0, "c")),
        ("DELETE FROM sqlite_raftsql_sessions WHERE last_ms < ?", (T0 * 2,)),
    ]:
        r = c.apply(entry(("INSERT INTO t VALUES(1)", ()), (sql, params)))
        assert r.error["name"] == "SQLITE_AUTH", (sql, r.error)
    assert pair[0].query("SELECT count(*) FROM t").rows == [[0]]
    assert pair[0]._internal("SELECT count(*) FROM sqlite_raftsql_sessions") == [(1,)]
    c.assert_same()


def test_allowed_pragmas_and_internal_reads(pair):
    c = Cluster(*pair)
    assert c.apply(entry("PRAGMA user_version = 7")).error is None
    assert c.apply(entry("PRAGMA user_version")).rows == [[7]]
    assert c.apply(entry("CREATE TABLE t(x)", "PRAGMA table_info(t)")).error is None
    assert pair[0].query("PRAGMA foreign_keys").rows == [[0]]
    assert pair[0].query("SELECT applied_index FROM sqlite_raftsql_meta").rows == [[3]]
    # Each client's stored result is its own: no statement reads the sessions table.
    c.apply(entry("INSERT INTO t VALUES ('secret') RETURNING x", client_id="c1", serial=1))
    for sql in ("SELECT * FROM sqlite_raftsql_sessions",
                "SELECT count(*) FROM (SELECT result FROM SQLITE_RAFTSQL_SESSIONS)"):
        assert "cannot be read" in c.apply(entry(sql)).error["message"]
        assert "cannot be read" in pair[0].query(sql).error["message"]
    c.assert_same()


def test_fts5_and_rtree_work_inside_the_sandbox(pair):
    c = Cluster(*pair)
    r = c.apply(
        entry(
            "CREATE VIRTUAL TABLE f USING fts5(body)",
            "INSERT INTO f VALUES('hello world'), ('goodbye')",
            "CREATE VIRTUAL TABLE g USING rtree(id, x0, x1)",
            "INSERT INTO g VALUES(1, 0, 1)",
        )
    )
    assert r.error is None
    assert c.apply(entry("SELECT body FROM f WHERE f MATCH 'hello'")).rows == [["hello world"]]
    assert pair[0].query("SELECT body FROM f WHERE f MATCH 'good*'").rows == [["goodbye"]]
    # FTS5 may read PRAGMA data_version internally; a user's write may not (per connection).
    assert c.apply(entry("PRAGMA data_version")).error["name"] == "SQLITE_AUTH"
    c.assert_same()


def test_multiple_statements_in_one_string_fail_in_apply(pair):
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(x)"))
    r = c.apply(entry("INSERT INTO t VALUES(1); INSERT INTO t VALUES(2)"))
    assert r.error["name"] == "RAFTSQL_MULTIPLE_STATEMENTS"
    assert c.apply(entry("INSERT INTO t VALUES(3); -- fine")).error is None
    assert pair[0].query("SELECT x FROM t").rows == [[3]]


def test_the_largest_rowid_is_refused(pair):
    """Past rowid 2**63-1 SQLite picks rowids with its own, unseedable PRNG."""
    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
    for sql in (
        "INSERT INTO t VALUES(9223372036854775807, 'x')",
        "INSERT INTO t VALUES(9223372036854775806, 'y')",
    ):
        r = c.apply(entry(sql, "INSERT INTO t(v) VALUES('next')"))
        assert r.error["name"] == "RAFTSQL_MAX_ROWID" and r.error["code"] == 19
    c.apply(entry("INSERT INTO t VALUES(1, 'a')"))
    assert c.apply(entry("UPDATE t SET id = 9223372036854775807")).error["name"] == (
        "RAFTSQL_MAX_ROWID"
    )
    assert pair[0].query("SELECT id FROM t").rows == [[1]]
    # AUTOINCREMENT at the maximum would fail with SQLITE_FULL ("disk full": fatal in apply),
    # so sqlite_sequence may be written, but never to the maximum.
    c.apply(
        entry("CREATE TABLE s(id INTEGER PRIMARY KEY AUTOINCREMENT)", "INSERT INTO s VALUES(1)")
    )
    r = c.apply(entry("UPDATE sqlite_sequence SET seq = 9223372036854775807"))
    assert r.error["name"] == "RAFTSQL_MAX_ROWID" and "sqlite_sequence" in r.error["message"]
    assert c.apply(entry("UPDATE sqlite_sequence SET seq = 10")).error is None
    assert c.apply(entry("INSERT INTO s VALUES(NULL) RETURNING id")).rows == [[11]]
    c.assert_same()


def test_read_path_refuses_writes_and_unsafe_statements(make):
    sm = make()
    sm.apply(1, entry("CREATE TABLE t(x)"))
    r = sm.query("INSERT INTO t VALUES(1)")
    assert r.error["name"] == "RAFTSQL_NOT_READONLY" and r.index == 1
    assert sm.query("PRAGMA journal_mode=DELETE").error["name"] == "SQLITE_AUTH"
    assert sm.query("ATTACH 'x.db' AS x").error["name"] == "SQLITE_AUTH"
    assert sm.query("SELECT 1; SELECT 2").error["name"] == "RAFTSQL_MULTIPLE_STATEMENTS"
    assert sm.query("SELECT * FROM nope").error["message"] == "no such table: nope"
    assert sm.query("SELECT count(*) FROM t").rows == [[0]]


# -- limits -----------------------------------------------------------------------------------

RUNAWAY = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r) "


def test_step_limit_stops_runaway_statements_identically(make):
    a = make("a", apply_vm_step_limit=200_000)
    b = make("b", apply_vm_step_limit=200_000)
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x)"))
    for sql in (RUNAWAY + "SELECT count(*) FROM r", RUNAWAY + "INSERT INTO t SELECT x FROM r"):
        r = c.apply(entry("INSERT INTO t VALUES(0)", sql))
        assert r.error == {
            "code": 9,
            "name": "RAFTSQL_STEP_LIMIT",
            "message": "statement exceeded the step limit (200000 VM steps)",
            "statement": 1,
        }
    # Just under the budget succeeds; the budget is per statement.
    bounded = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r LIMIT 1000) "
    ok = c.apply(entry(bounded + "INSERT INTO t SELECT x FROM r"))
    assert ok.error is None and ok.rowcount == -1  # WITH ... INSERT: -1, as in sqlite3
    assert a.query("SELECT count(*) FROM t").rows == [[1000]]
    c.assert_same()



def test_the_step_limit_does_not_depend_on_what_a_node_ran_before(make):
    """SQLite keeps a statement's VM step count across runs from apsw's cache, and the progress
    handler's first call comes after what is left of the previous run's 1000-step period: a
    statement just under the limit failed on a node that had run its text before (the leader,
    in a transaction's preview) and passed on one that had not. Around the limit, the two
    machines must agree on every size."""
    a = make("a", apply_vm_step_limit=200_000)
    b = make("b", apply_vm_step_limit=200_000)
    c = Cluster(a, b)
    sql = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r LIMIT ?) INSERT INTO t SELECT x FROM r"
    c.apply(entry("CREATE TABLE t(x)"))
    c.apply(entry((sql, (1,))))
    txn = a.txn_begin("warm", 1)  # only `a` runs it again (a preview, rolled back)
    a.txn_preview(txn, (sql, (40,)), 0, (1, T0))
    a.txn_end(txn.id)
    outcomes = set()
    for n in range(8800, 9300, 7):  # straddles the limit: about 22 steps per row
        r = c.apply(entry((sql, (n,)), "DELETE FROM t"))
        outcomes.add(r.error["name"] if r.error else None)
    assert outcomes == {None, "RAFTSQL_STEP_LIMIT"}
    c.assert_same()


@pytest.mark.parametrize("module", ["fts3", "fts4"])
def test_last_insert_rowid_carries_over_alike_in_a_batch_and_alone(make, module):
    """FTS3/4 write their pending terms at the next SAVEPOINT, which is the next entry's: in one
    batch, those inserts reset the rowid the client's next write starts from (0 instead of
    1), so a node catching up in a batch stored another value than one applying alone."""
    a, b = make("a"), make("b")
    first = [entry(f"CREATE VIRTUAL TABLE v USING {module}(body)", "CREATE TABLE t(x)")]
    writes = [entry("INSERT INTO v(body) VALUES ('hello world')", client_id="c", serial=1),
              entry("INSERT INTO t VALUES (last_insert_rowid()) RETURNING x", client_id="c", serial=2)]
    for sm in (a, b):
        sm.apply(1, first[0])
    alone = [a.apply(2, writes[0]).to_wire(), a.apply(3, writes[1]).to_wire()]
    batched = [r.to_wire() for r in b.apply_many([(2, writes[0]), (3, writes[1])])]
    assert alone == batched and alone[1]["rows"] == [[1]]
    assert a.content_hash() == b.content_hash()


def test_a_restarted_node_records_the_same_tables_written_around_an_rtree(make):
    """rtree prepares statements on its shadow tables when a connection first uses the table,
    inside the user's prepare: a restarted node recorded rt_node, rt_parent and rt_rowid as
    written by a statement that only read rt, and its sqlite_raftsql_tables differed."""
    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry("CREATE VIRTUAL TABLE rt USING rtree(id, x0, x1)"))
    c.apply(entry("INSERT INTO rt VALUES (1, 0, 5)", "CREATE TABLE lg(x)"))
    b.close()
    b = make("b")  # its connection has not used rt yet
    c = Cluster(a, b)
    c.apply(entry("INSERT INTO lg SELECT id FROM rt"))
    c.apply(entry("INSERT INTO rt VALUES (2, 1, 3)"))
    c.assert_same()
    written = dict(b.query("SELECT name, modified_index FROM sqlite_raftsql_tables").rows)
    assert "rt" in written and not any(name.startswith("rt_") for name in written)


def test_planner_statistics_edited_by_hand_reach_every_node_alike(make):
    """SQLite loads sqlite_stat1/4 at ANALYZE and at start: a hand edit (or a dump loaded
    from sqlite3, which inserts them) reached the planner of a restarted node only, and an
    INSERT ... SELECT ... LIMIT 1 without ORDER BY took another row there. Apply loads them
    again after an entry that wrote them."""
    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(a INT, b INT, x INT)", "CREATE INDEX ia ON t(a, x)",
                  "CREATE INDEX ib ON t(b, x)", "CREATE TABLE out(v)",
                  "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r LIMIT 1000) "
                  "INSERT INTO t SELECT n % 2, n % 3, n FROM r"))
    c.apply(entry("ANALYZE"))
    c.apply(entry("DELETE FROM sqlite_stat4", "UPDATE sqlite_stat1 SET stat = '1000 1 1' WHERE idx = 'ia'",
                  "UPDATE sqlite_stat1 SET stat = '1000 900 1' WHERE idx = 'ib'"))
    plan = "EXPLAIN QUERY PLAN SELECT x FROM t WHERE a = 1 AND b = 1 LIMIT 1"
    a._guard.internal = True
    warm = [r[3] for r in a._conn.execute(plan)]
    a._guard.internal = False
    b.close()
    b = make("b")  # loads the statistics from the file
    b._guard.internal = True
    assert [r[3] for r in b._conn.execute(plan)] == warm == ["SEARCH t USING INDEX ia (a=?)"]
    b._guard.internal = False
    c = Cluster(a, b)
    c.apply(entry("INSERT INTO out SELECT x FROM t WHERE a = 1 AND b = 1 LIMIT 1"))
    c.assert_same()


def test_an_analyze_its_entry_rolled_back_leaves_no_statistics_in_the_planner(make):
    """ANALYZE loads what it computed at once; the entry's later failure rolls its rows back,
    and a rollback that changes no schema does not reload: live nodes planned with the
    rolled-back statistics and a restarted one with the file's."""
    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(a INT, b INT, x INT, y INT)", "CREATE INDEX ia ON t(a, x)",
                  "CREATE INDEX ib ON t(b, y)", "CREATE TABLE out(v)", "CREATE TABLE uq(k PRIMARY KEY)",
                  "INSERT INTO uq VALUES (1)",
                  "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r LIMIT 1000) "
                  "INSERT INTO t SELECT n % 2, n % 3, n, 1000 - n FROM r"))
    c.apply(entry("ANALYZE"))
    c.apply(entry("DELETE FROM sqlite_stat4", "UPDATE sqlite_stat1 SET stat = '1000 1 1' WHERE idx = 'ia'",
                  "UPDATE sqlite_stat1 SET stat = '1000 900 1' WHERE idx = 'ib'"))
    assert c.apply(entry("ANALYZE", "INSERT INTO uq VALUES (1)")).error is not None  # rolled back
    b.close()
    b = make("b")
    c = Cluster(a, b)
    c.apply(entry("INSERT INTO out SELECT x FROM t WHERE a = 1 AND b = 1 LIMIT 1"))
    c.assert_same()


def test_analyze_inside_a_transaction_is_refused_alike_in_preview_and_commit(make):
    """A preview's ANALYZE would load its statistics into the leader's planner alone, and they
    would stay there after the preview rolled back."""
    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x)", "CREATE INDEX ix ON t(x)"))
    txn = a.txn_begin("c1", 1)
    r, _, _ = a.txn_preview(txn, ("ANALYZE", ()), 0, (1, T0))
    assert r.error is not None and "cannot run inside a transaction" in r.error["message"]
    a.txn_end(txn.id)
    c.apply(entry("ANALYZE"))  # outside one: every node
    c.assert_same()


def test_returning_text_that_is_not_utf8_fails_the_write_and_stops_no_node(make):
    """The row decode failed with the RETURNING statement still open; apply took the insert it
    had already made for SQLite's doing (OR FAIL keeps such changes), released the entry's
    savepoint under the open statement, and that failure stopped every node, again at each
    restart. Now the write fails, nothing applied, as a non-SQLite error."""
    from raftsql.command import Many

    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x)"))
    for st in (("INSERT INTO t VALUES (CAST(x'ff' AS TEXT)) RETURNING x", ()),
               ("INSERT INTO t VALUES (CAST(? AS TEXT)) RETURNING x", Many([(b"a",), (b"\xff",), (b"c",)])),
               ("INSERT INTO t VALUES (CAST(? AS TEXT)) RETURNING x", Many([(b"\xff",), (b"b",)]))):
        r = c.apply(entry(st))
        assert r.error is not None and "not valid UTF-8" in r.error["message"], r.error
        assert a.query("SELECT count(*) FROM t").rows == [[0]]
    assert c.apply(entry("INSERT INTO t VALUES (1) RETURNING x")).rows == [[1]]
    c.assert_same()


def test_schema_version_is_not_for_user_statements(make):
    """Each file's own counter: SQLite's backup API (a snapshot) renumbers it, so a write that
    stored it, or a transaction whose check read it, differed on a node installed from a
    snapshot. user_version is replicated."""
    a = make("a")
    a.apply(1, entry("CREATE TABLE t(x)"))
    for sql in ("INSERT INTO t SELECT schema_version FROM pragma_schema_version", "PRAGMA schema_version"):
        r = a.apply(a.applied_index + 1, entry(sql))
        assert r.error["name"] == "SQLITE_AUTH" and "user_version is" in r.error["message"]
        assert a.query(sql.replace("INSERT INTO t ", "")).error["name"] == "SQLITE_AUTH"
    assert a.query("PRAGMA user_version").rows == [[0]]


@pytest.mark.parametrize("module", ["fts3", "fts4"])
def test_fts_automerge_is_refused_and_left_off(make, module):
    """FTS3/4's automerge merges at each SQLite COMMIT by how much the transaction wrote: a
    node that caught up in one batch merged its segments otherwise than one applying entry by
    entry (v_segdir held 1 row there, 15 elsewhere). Setting it fails; 'merge=X,Y' works."""
    import json
    import random

    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry(f"CREATE VIRTUAL TABLE v USING {module}(body)"))
    r = c.apply(entry("INSERT INTO v(v) VALUES ('automerge=2')"))
    assert r.error is not None and "automerge is not supported" in r.error["message"]
    rng = random.Random(5)
    words = [f"w{k}" for k in range(3000)]
    entries = [entry(("INSERT INTO v(body) SELECT value FROM json_each(?)",
                      (json.dumps([" ".join(rng.choice(words) for _ in range(30)) for _ in range(20)]),)))
               for _ in range(30)] + [entry("INSERT INTO v(v) VALUES ('merge=4,4')")]
    first = a.applied_index + 1
    for i, e in enumerate(entries):
        a.apply(first + i, e)  # one commit per entry
    b.apply_many([(first + i, e) for i, e in enumerate(entries)])  # one commit for all
    assert a.content_hash() == b.content_hash()
    txn = a.txn_begin("c1", 1)
    r, _, _ = a.txn_preview(txn, ("INSERT INTO v(v) VALUES ('automerge=8')", ()), 0, (1, T0))
    assert "automerge is not supported" in r.error["message"]
    a.txn_end(txn.id)


def test_an_error_message_of_100_mb_is_cut_and_stops_no_node(make):
    """RAISE() takes any expression: a 99,999,999-character message made the session row
    storing the entry's result longer than SQLite allows, and that failure of raftsql's own
    statement stopped every node, again at each restart."""
    from raftsql.protocol import MAX_ERROR_MESSAGE

    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry("CREATE TABLE t(x)",
                  "CREATE TRIGGER tr BEFORE INSERT ON t BEGIN "
                  "SELECT RAISE(ABORT, printf('%.*c', new.x, 'y')); END"))
    r = c.apply(entry("INSERT INTO t VALUES (99999999)", client_id="c", serial=1))
    assert r.error["name"] == "SQLITE_CONSTRAINT_TRIGGER"
    assert MAX_ERROR_MESSAGE < len(r.error["message"]) < MAX_ERROR_MESSAGE + 100
    assert r.error["message"].endswith("(the message is cut here: 99999999 characters)")
    txn = a.txn_begin("c2", 1)  # a preview's error too (it goes back to the client)
    p, _, _ = a.txn_preview(txn, ("INSERT INTO t VALUES (99999999)", ()), 0, (1, T0))
    assert len(p.error["message"]) < MAX_ERROR_MESSAGE + 100
    a.txn_end(txn.id)
    assert c.apply(entry("INSERT INTO t VALUES (3)", client_id="c", serial=2)).error is not None  # 'yyy'
    c.assert_same()


def test_a_parked_transaction_replays_from_the_clients_last_rowid(make):
    """A transaction starts from the client's last write's rowid; rebuilt by replay after
    another write parked it, it started from 0, so last_insert_rowid() gave another value."""
    a = make("a")
    a.apply(1, entry("CREATE TABLE t(x)", "CREATE TABLE u(x)"))
    a.apply(2, entry("INSERT INTO t VALUES (10)", client_id="c1", serial=1))
    txn = a.txn_begin("c1", 1)
    r, _, _ = a.txn_preview(txn, ("INSERT INTO t VALUES (last_insert_rowid())", ()), 0, (1, T0))
    assert r.error is None
    a.apply(3, entry("INSERT INTO u VALUES (0)", client_id="c2", serial=1))  # parks it
    r, _, _ = a.txn_preview(txn, ("SELECT x FROM t ORDER BY rowid", ()), 1, (1, T0))
    assert r.rows == [[10], [1]]
    a.txn_end(txn.id)


@pytest.mark.parametrize("table,command", [("fts5(x)", "rebuild"), ("fts5(x, content='')", "delete-all")])
def test_fts5_rebuild_writes_the_same_bytes_on_a_restarted_node(make, table, command):
    """'rebuild' and 'delete-all' write the config cookie the connection holds: 0 on one that
    had not loaded it yet (a restarted or snapshot-installed node), 1 after a 'pgsz'."""
    a, b = make("a"), make("b")
    c = Cluster(a, b)
    c.apply(entry(f"CREATE VIRTUAL TABLE f USING {table}", "INSERT INTO f(rowid, x) VALUES (1, 'a b c')"))
    c.apply(entry("INSERT INTO f(f, rank) VALUES ('pgsz', 64)"))
    b.close()
    b = make("b")
    c = Cluster(a, b)
    c.apply(entry(f"INSERT INTO f(f) VALUES ('{command}')",
                  "CREATE TABLE keep(b)", "INSERT INTO keep SELECT block FROM f_data WHERE id = 10"))
    c.assert_same()

def test_read_timeout(make):
    sm = make(query_timeout_s=0.2)
    t = time.monotonic()
    r = sm.query(RUNAWAY + "SELECT count(*) FROM r")
    assert r.error["name"] == "RAFTSQL_TIMEOUT" and r.error["code"] == 9
    assert time.monotonic() - t < 5
    assert sm.query("SELECT 1").rows == [[1]]  # the connection is usable afterwards


# -- reads ------------------------------------------------------------------------------------


def test_query_shape_and_at_index(make):
    sm = make()
    sm.apply(1, entry("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, b BLOB)"))
    sm.apply(2, entry(("INSERT INTO t(name, b) VALUES(?, ?)", ("x", b"\x00\x01"))))
    r = sm.query("SELECT id, name, b, 1.5 FROM t WHERE id = ?", (1,))
    assert r.to_wire() == {
        "columns": ["id", "name", "b", "1.5"],
        "decltypes": ["INTEGER", "TEXT", "BLOB", None],
        "rows": [[1, "x", b"\x00\x01", 1.5]],
        "rowcount": -1,
        "lastrowid": None,
        "index": 2,
        "error": None,
        "duplicate": False,
        "results": None,
    }
    empty = sm.query("SELECT name FROM t WHERE id = 99")
    assert empty.columns == ["name"] and empty.rows == []

    def later():
        time.sleep(0.05)
        sm.apply(3, entry("INSERT INTO t(name) VALUES('later')"))

    th = threading.Thread(target=later)
    th.start()
    r = sm.query("SELECT count(*) FROM t", at_index=3)
    th.join()
    assert r.rows == [[2]] and r.index == 3


def test_content_hash_detects_differences(pair):
    a, b = pair
    for sm in pair:
        sm.apply(1, entry("CREATE TABLE t(x)", "CREATE TABLE w(k PRIMARY KEY, v) WITHOUT ROWID"))
    assert a.content_hash() == b.content_hash()
    a.apply(2, entry("INSERT INTO w VALUES(1, 'a')"))
    b.apply(2, entry("INSERT INTO w VALUES(1, 'b')"))
    assert a.content_hash() != b.content_hash()


def test_closed_machine_refuses_work(make):
    sm = make()
    sm.close()
    sm.close()
    with pytest.raises(StateMachineError):
        sm.apply(1, entry("SELECT 1"))
    with pytest.raises(StateMachineError):
        sm.query("SELECT 1")


def test_stored_rowid_reads_small_and_big_stored_results():
    """Every write of a client reads the lastrowid its previous write stored; a big stored
    result (RETURNING rows) is walked without building its rows."""
    from raftsql.protocol import Result
    from raftsql.server.reads import stored_rowid

    assert stored_rowid(Result(rowcount=1, lastrowid=7).encode()) == 7
    big = Result(columns=["a"], rows=[[i, "x" * 50] for i in range(5000)], lastrowid=9).encode()
    assert len(big) > 4096 and stored_rowid(big) == 9
    assert stored_rowid(Result(error={"name": "X"}).encode()) == 0
    assert stored_rowid(b"\xc1 not msgpack") == 0


def admin_entry(record, t=T0):
    from raftsql.command import CommandKind

    return Command(client_id="", serial=0, statements=(), kind=CommandKind.ADMIN, record=record,
                   leader_time_ms=t, seed=1).encode()


def test_the_first_cluster_id_applied_wins_and_survives_reopen(make, tmp_path):
    a, b = make("a"), make("b")
    c = Cluster(a, b)
    assert a.records.cluster_id is None
    first, second = "ab" * 16, "cd" * 16
    assert c.apply(admin_entry({"op": "cluster", "cluster_id": first})).rowcount == 1
    assert c.apply(admin_entry({"op": "cluster", "cluster_id": second})).rowcount == 0
    assert c.apply(admin_entry({"op": "cluster", "cluster_id": "not hex"})).rowcount == 0
    assert a.records.cluster_id == b.records.cluster_id == first
    audit = a.query("SELECT operation, detail FROM sqlite_raftsql_audit").rows
    assert [row[0] for row in audit] == ["cluster"], audit  # the ignored ones leave no record
    # Users cannot change it: the table is raftsql's.
    for sql in ("UPDATE sqlite_raftsql_cluster SET cluster_id = 'x'",
                "DELETE FROM sqlite_raftsql_cluster",
                "INSERT OR REPLACE INTO sqlite_raftsql_cluster VALUES (1, 'x', 0, 0)"):
        assert c.apply(entry(sql)).error is not None, sql
    c.assert_same()
    a.close()
    again = StateMachine(str(tmp_path / "a" / "db.sqlite"))
    try:
        assert again.records.cluster_id == first
    finally:
        again.close()


def test_one_failed_statement_keeps_what_sqlite_keeps_on_every_node(pair):
    """An entry of one statement that SQLite failed after keeping changes (OR FAIL, an
    executemany's earlier sets) applies them, with its error; raftsql's own checks after a
    statement ran and batches of several statements still keep nothing."""
    from raftsql.command import Many

    c = Cluster(*pair)
    c.apply(entry("CREATE TABLE t(id INTEGER PRIMARY KEY, v)"))
    r = c.apply(entry(("INSERT INTO t VALUES(?, ?)", Many(((1, "a"), (2, "b"), (1, "dup"))))))
    assert r.error["name"] == "SQLITE_CONSTRAINT_PRIMARYKEY" and r.error["kept_changes"], r.error
    r = c.apply(entry("INSERT OR FAIL INTO t VALUES(3, 'c'), (1, 'dup'), (4, 'd')"))
    assert r.error["kept_changes"]
    r = c.apply(entry("INSERT INTO t VALUES(5, 'e'), (1, 'dup')"))  # ABORT: nothing kept
    assert "kept_changes" not in r.error
    r = c.apply(entry("INSERT OR FAIL INTO t VALUES(6, 'f'), (1, 'dup')", "SELECT 1"))
    assert "kept_changes" not in r.error  # a batch: all or nothing
    r = c.apply(entry("INSERT INTO t VALUES(7, 'g'), (9223372036854775807, 'max')"))
    assert r.error["name"] == "RAFTSQL_MAX_ROWID" and "kept_changes" not in r.error
    assert pair[0].query("SELECT id FROM t ORDER BY id").rows == [[1], [2], [3]]
    c.assert_same()
