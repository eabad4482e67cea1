"""What a committed entry's statements can do to a node: every failure of a user statement ends
in a result value that is the same on every node (its writes rolled back, stored in the session
row), and only a fault of the node's own machine stops it (server/DESIGN.md, "What a statement
can do to a node").

Each test applies the same entries to two state machines in different directories and requires
identical results and content hashes, as replication does."""

import apsw
import pytest

from raftsql.command import Command
from raftsql.server.statemachine import (
    MAX_RESULT_BYTES,
    DatabaseDamagedError,
    StateMachine,
    StateMachineError,
)

T0 = 1_700_000_000_123


def entry(*statements, client_id="c", serial=0):
    stmts = [(s, ()) if isinstance(s, str) else s for s in statements]
    return Command(
        client_id=client_id, serial=serial, statements=stmts, leader_time_ms=T0, seed=7
    ).encode()


class Pair:
    def __init__(self, tmp_path):
        self.machines = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            self.machines.append(StateMachine(str(d / "db.sqlite")))
        self.index = 0
        self.serial = 0

    def apply(self, *statements, serial=None):
        """Apply one entry everywhere; results must agree. serial: reuse a serial (a resend)."""
        if serial is None:
            self.serial += 1
            serial = self.serial
        self.index += 1
        data = entry(*statements, serial=serial)
        wires = [sm.apply(self.index, data).to_wire() for sm in self.machines]
        first = dict(wires[0])
        for w in wires[1:]:
            assert w == first
        return wires[0]

    def rows(self, sql):
        out = {tuple(map(tuple, sm.query(sql).rows)) for sm in self.machines}
        assert len(out) == 1
        return [list(r) for r in out.pop()]

    def assert_same(self):
        assert len({sm.content_hash() for sm in self.machines}) == 1
        assert {sm.applied_index for sm in self.machines} == {self.index}

    def close(self):
        for sm in self.machines:
            sm.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


# -- virtual tables reporting corruption of their own content ---------------------------------


def test_fts5_integrity_check_on_external_content_is_an_error_value(pair):
    pair.apply("CREATE TABLE src(a)")
    pair.apply("CREATE VIRTUAL TABLE ftx USING fts5(a, content='src')")
    pair.apply("INSERT INTO src VALUES('hello')")
    r = pair.apply(
        "INSERT INTO src VALUES('before')",
        "INSERT INTO ftx(ftx, rank) VALUES('integrity-check', 1)",
    )
    assert r["error"]["name"] == "SQLITE_CORRUPT_VTAB" and r["error"]["statement"] == 1
    # The whole entry was rolled back, the session row keeps the error: a resend returns it.
    assert pair.rows("SELECT a FROM src") == [["hello"]]
    again = pair.apply("INSERT INTO src VALUES('before')",
                       "INSERT INTO ftx(ftx, rank) VALUES('integrity-check', 1)",
                       serial=pair.serial)
    assert again["duplicate"] and again["error"] == r["error"]
    # The node goes on applying.
    assert pair.apply("INSERT INTO src VALUES('after')")["error"] is None
    pair.assert_same()


@pytest.mark.parametrize(
    "setup, statement",
    [
        (
            ["CREATE TABLE c4(a)", "CREATE VIRTUAL TABLE f4 USING fts4(content='c4', a)",
             "INSERT INTO c4 VALUES('zz')"],
            "INSERT INTO f4(f4) VALUES('integrity-check')",
        ),
        (
            ["CREATE TABLE s5(a)", "CREATE VIRTUAL TABLE f5 USING fts5(a, content='s5')",
             "INSERT INTO f5(rowid, a) VALUES(1, 'hello world')",
             "INSERT INTO f5(f5, rowid, a) VALUES('delete', 1, 'other words')"],
            "INSERT INTO f5(f5, rowid, a) VALUES('delete', 7, 'hello')",
        ),
        (
            ["CREATE TABLE s5(a)", "CREATE VIRTUAL TABLE f5 USING fts5(a, content='s5')",
             "INSERT INTO f5(rowid, a) VALUES(1, 'hello world')"],
            "CREATE TABLE copy AS SELECT * FROM f5 WHERE f5 MATCH 'hello'",
        ),
    ],
    ids=["fts4-integrity-check", "fts5-delete-missing-row", "fts5-match-missing-content"],
)
def test_virtual_table_errors_are_values(pair, setup, statement):
    for s in setup:
        assert pair.apply(s)["error"] is None
    r = pair.apply(statement)
    assert r["error"]["name"] == "SQLITE_CORRUPT_VTAB", r["error"]
    assert pair.apply("CREATE TABLE later(x)")["error"] is None
    pair.assert_same()


def test_rtree_constraint_is_an_error_value(pair):
    pair.apply("CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)")
    r = pair.apply("INSERT INTO r VALUES(1, 5, 1)")
    assert r["error"]["name"] == "SQLITE_CONSTRAINT" and "rtree constraint" in r["error"]["message"]
    pair.assert_same()


# -- results over every size limit ------------------------------------------------------------


def test_returning_larger_than_the_result_limit_fails_and_applies_nothing(pair):
    pair.apply("CREATE TABLE big(v)")
    r = pair.apply(
        "INSERT INTO big(v) VALUES(zeroblob(60000000)),(zeroblob(60000000)) RETURNING v"
    )
    assert r["error"]["name"] == "RAFTSQL_RESULT_TOO_BIG" and r["error"]["code"] == 18
    assert str(MAX_RESULT_BYTES) in r["error"]["message"]
    assert pair.rows("SELECT count(*) FROM big") == [[0]]
    resent = pair.apply(
        "INSERT INTO big(v) VALUES(zeroblob(60000000)),(zeroblob(60000000)) RETURNING v",
        serial=pair.serial,
    )
    assert resent["duplicate"] and resent["error"] == r["error"]
    pair.assert_same()


def test_many_rows_over_the_limit_across_statements_of_one_entry(pair):
    pair.apply("CREATE TABLE t(v)")
    pair.apply("INSERT INTO t SELECT zeroblob(1000000) FROM (WITH RECURSIVE c(x) AS "
               "(SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 10) SELECT x FROM c)")
    # Each statement alone is under the limit (10 MB); together they are over it.
    r = pair.apply("SELECT v FROM t", "INSERT INTO t VALUES(1)", "SELECT v FROM t")
    assert r["error"]["name"] == "RAFTSQL_RESULT_TOO_BIG" and r["error"]["statement"] == 2
    assert pair.rows("SELECT count(*) FROM t") == [[10]]
    pair.assert_same()


def test_values_over_the_length_limit_are_too_big_values(pair):
    pair.apply("CREATE TABLE t(v)")
    for sql in (
        "INSERT INTO t VALUES(zeroblob(200000000))",
        "INSERT INTO t VALUES(randomblob(200000000))",
        "INSERT INTO t VALUES(printf('%.*c', 2000000000, 'x'))",
        "INSERT INTO t SELECT group_concat(zeroblob(60000000)) FROM (SELECT 1 UNION ALL SELECT 2)",
    ):
        assert pair.apply(sql)["error"]["name"] == "SQLITE_TOOBIG", sql
    pair.assert_same()


# -- errors inside triggers and RETURNING -----------------------------------------------------


@pytest.mark.parametrize("action", ["ABORT", "FAIL", "ROLLBACK"])
def test_errors_raised_inside_triggers_are_values(pair, action):
    pair.apply("CREATE TABLE t(x)")
    pair.apply("CREATE TABLE log(x)")
    pair.apply(
        "CREATE TRIGGER tr AFTER INSERT ON t WHEN new.x < 0 "
        f"BEGIN INSERT INTO log VALUES(new.x); SELECT RAISE({action}, 'negative'); END"
    )
    r = pair.apply("INSERT INTO t VALUES(1)", "INSERT INTO t VALUES(-1) RETURNING x")
    assert r["error"]["message"] == "negative" and r["error"]["statement"] == 1
    assert pair.rows("SELECT count(*) FROM t") == [[0]]
    assert pair.rows("SELECT count(*) FROM log") == [[0]]
    assert pair.apply("INSERT INTO t VALUES(2) RETURNING x")["rows"] == [[2]]
    pair.assert_same()


def test_returning_an_expression_that_fails(pair):
    pair.apply("CREATE TABLE t(x)")
    r = pair.apply("INSERT INTO t VALUES('{') RETURNING json(x)")
    assert r["error"]["message"] == "malformed JSON"
    assert pair.rows("SELECT count(*) FROM t") == [[0]]
    pair.assert_same()


# -- out of memory ----------------------------------------------------------------------------


def test_out_of_memory_from_a_statement_is_retried_then_an_error_value(pair):
    calls = []

    def greedy(n):
        calls.append(n)
        raise MemoryError()

    for sm in pair.machines:
        sm._conn.create_scalar_function("greedy", greedy, 1)
    pair.apply("CREATE TABLE t(x)")
    r = pair.apply("INSERT INTO t VALUES(1)", "INSERT INTO t VALUES(greedy(1))")
    assert r["error"]["name"] == "SQLITE_NOMEM" and r["error"]["statement"] == 1
    assert len(calls) == 4  # each node: once, then once more after freeing memory
    assert pair.rows("SELECT count(*) FROM t") == [[0]]
    pair.assert_same()


def test_a_passing_out_of_memory_is_retried_and_applies_normally(pair):
    failures = {"left": 1}

    def flaky(n):
        if failures["left"]:
            failures["left"] -= 1
            raise MemoryError()
        return n

    for sm in pair.machines:
        sm._conn.create_scalar_function("flaky", flaky, 1)
    pair.apply("CREATE TABLE t(x)")
    # Only the first machine sees the failure; after the retry both agree.
    r = pair.apply("INSERT INTO t VALUES(flaky(5)) RETURNING x")
    assert r["error"] is None and r["rows"] == [[5]]
    pair.assert_same()


def test_an_entry_over_the_heap_limit_is_applied_again_without_it(pair):
    # The node's heap limit counts what every connection of the process holds, so an entry
    # that met it on one node (whose reads held memory) must not fail there only: its second
    # attempt runs with no limit, as on a node that never met it (server/DESIGN.md, "Heap
    # limit"). `x BETWEEN 1 AND 2` nested 500 deep takes about 57 MB to prepare.
    nested = "(" * 500 + "x" + " BETWEEN 1 AND 2)" * 500
    pair.apply("CREATE TABLE t(x)", "INSERT INTO t VALUES (1)")
    before = apsw.hard_heap_limit(32 << 20)
    try:
        r = pair.machines[0].apply(pair.index + 1, entry(f"SELECT {nested} FROM t", serial=99))
        assert r.error is None, r.error
        assert apsw.hard_heap_limit(-1) == 32 << 20  # put back once the entry is applied
        apsw.hard_heap_limit(0)
        r = pair.machines[1].apply(pair.index + 1, entry(f"SELECT {nested} FROM t", serial=99))
        assert r.error is None, r.error
        pair.index += 1
        pair.assert_same()
    finally:
        apsw.hard_heap_limit(before)


# -- a damaged file is the node's fault, a corruption report from a statement is not ----------


def test_corruption_reported_by_a_statement_on_a_healthy_database_is_a_value(pair):
    def liar():
        raise apsw.CorruptError("this function says the database is corrupt")

    for sm in pair.machines:
        sm._conn.create_scalar_function("liar", liar, 0)
    pair.apply("CREATE TABLE t(x)")
    r = pair.apply("INSERT INTO t VALUES(liar())")
    assert "corrupt" in r["error"]["message"]
    assert pair.apply("INSERT INTO t VALUES(1)")["error"] is None
    pair.assert_same()


def test_a_damaged_database_stops_the_node_with_a_recovery_hint(tmp_path):
    sm = StateMachine(str(tmp_path / "db.sqlite"))
    sm.apply(1, entry("CREATE TABLE t(x TEXT)"))
    sm.apply(2, entry(("INSERT INTO t SELECT hex(randomblob(200)) FROM (WITH RECURSIVE c(i) AS "
                       "(SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 2000) SELECT i FROM c)", ())))
    path = sm.path
    sm.close()
    # Checkpointed into the main file on close; damage one of t's b-tree pages.
    with open(path, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096)
    sm = StateMachine(path)
    try:
        with pytest.raises(DatabaseDamagedError) as info:
            sm.apply(3, entry("UPDATE t SET x = x || 'y'"))
        assert "quick_check" in str(info.value) and "--reseed" in str(info.value)
        assert sm.applied_index == 2  # nothing recorded
    finally:
        sm.close()


def test_machine_faults_still_stop_the_node(tmp_path):
    sm = StateMachine(str(tmp_path / "db.sqlite"))
    try:
        sm.apply(1, entry("CREATE TABLE t(x)"))

        def full():
            raise apsw.FullError("database or disk is full")

        sm._conn.create_scalar_function("full", full, 0)
        # An apsw exception raised by a function carries no result code: a suspect, checked
        # against the database, which is healthy, so it is a value.
        assert sm.apply(2, entry("INSERT INTO t VALUES(full())")).error is not None
        # A real SQLITE_FULL from SQLite (a read-only file system looks the same) stops it.
        sm._internal("PRAGMA max_page_count = 2")
        with pytest.raises(StateMachineError) as info:
            sm.apply(3, entry("INSERT INTO t SELECT zeroblob(100000)"))
        assert "machine" in str(info.value) and "SQLITE_FULL" in str(info.value)
        assert sm.applied_index == 2
    finally:
        sm.close()


# -- sqlite_sequence is SQLite's to maintain, and the user's to write -------------------------


def test_autoincrement_tables_can_be_renamed_dropped_and_their_sequences_reset(pair):
    pair.apply("CREATE TABLE a(id INTEGER PRIMARY KEY AUTOINCREMENT, v)")
    pair.apply("INSERT INTO a(v) VALUES('x')")
    assert pair.apply("ALTER TABLE a RENAME TO b")["error"] is None
    assert pair.rows("SELECT name, seq FROM sqlite_sequence") == [["b", 1]]
    assert pair.apply("DELETE FROM sqlite_sequence")["error"] is None
    assert pair.apply("UPDATE b SET v = 'y'")["error"] is None
    assert pair.apply("DROP TABLE b")["error"] is None
    assert pair.rows("SELECT count(*) FROM sqlite_sequence") == [[0]]
    pair.assert_same()


@pytest.mark.parametrize("sql", [
    "INSERT INTO t SELECT data_version FROM pragma_data_version",
    "INSERT INTO t SELECT x FROM dv",
    "UPDATE t SET x = (SELECT data_version FROM pragma_data_version())",
])
def test_a_write_may_not_read_data_version_in_its_table_valued_form(pair, sql):
    """PRAGMA data_version counts per connection. Its table-valued form is authorized as a
    PRAGMA only while the statement runs (nested, where FTS5's own reads of it must pass), so
    a write reading it is refused at prepare, directly or through a view."""
    pair.apply("CREATE TABLE t(x)")
    pair.apply("INSERT INTO t VALUES (0)")
    pair.apply("CREATE VIEW dv AS SELECT data_version AS x FROM pragma_data_version")
    result = pair.apply(sql)
    assert result["error"] is not None
    assert "data_version" in result["error"]["message"]
    assert pair.rows("SELECT x FROM t") == [[0]]
    pair.assert_same()


# -- randomblob ----------------------------------------------------------------------------------


def test_randomblob_bytes_count_against_the_step_limit(tmp_path):
    # A few VM steps could call randomblob() for 100 MB each: a loop of 120 held every node's
    # apply for 42 s (outside-in hunt, 2026-12-05). Its bytes now count against the step limit,
    # the same on every node, and its output is the same as before.
    machines = [StateMachine(str(tmp_path / f"{n}.sqlite"), apply_vm_step_limit=10_000_000)
                for n in ("a", "b")]
    try:
        loop = ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 120) "
                "SELECT sum(length(randomblob(20000000))) FROM r")
        wires = [sm.apply(1, entry(loop, serial=1)).to_wire() for sm in machines]
        assert wires[0] == wires[1]
        assert wires[0]["error"]["name"] == "RAFTSQL_STEP_LIMIT", wires[0]
        # Under the limit: one blob of 40 MB is 5M steps' worth of the 10M.
        wires = [sm.apply(2, entry("SELECT hex(randomblob(16)), length(randomblob(40000000))",
                                   serial=2)).to_wire() for sm in machines]
        assert wires[0] == wires[1] and wires[0]["error"] is None, wires[0]
        assert wires[0]["rows"][0][1] == 40000000
    finally:
        for sm in machines:
            sm.close()


def test_randomblob_in_pieces_gives_the_bytes_of_one_call():
    import random

    from raftsql.server.determinism import EntryRandom

    rand = EntryRandom()
    rand.seed, rand.stmt_no = 7, 3
    big = rand.randomblob(5 * (1 << 20) + 13)
    assert big == random.Random((7 << 32) | 3).randbytes(5 * (1 << 20) + 13)
