""""Many" statements (executemany as one statement prepared once): the command envelope
(version 3) and the state machine's apply, which must match running the same parameter sets as
separate statements of one batch."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftsql.command import MANY_VERSION, VERSION, Command, CommandError, CommandKind, Many
from raftsql.server.statemachine import StateMachine

T0 = 1_700_000_000_123
INSERT = "INSERT INTO t(v) VALUES(?)"


def many_entry(*statements, serial=0, seed=1):
    return Command(
        client_id="c" if serial else "", serial=serial, statements=statements,
        leader_time_ms=T0, seed=seed,
    ).encode()


@pytest.fixture
def machines(tmp_path):
    out = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        out.append(StateMachine(str(tmp_path / name / "db.sqlite")))
    yield out
    for sm in out:
        sm.close()


class Pair:
    def __init__(self, machines):
        self.machines = machines
        self.index = 0

    def apply(self, data):
        self.index += 1
        results = [sm.apply(self.index, data) for sm in self.machines]
        assert results[0].to_wire() == results[1].to_wire()
        return results[0]

    def rows(self, sql):
        return self.machines[0].query(sql).rows

    def same(self):
        return self.machines[0].content_hash() == self.machines[1].content_hash()


# -- envelope ---------------------------------------------------------------------------------


def test_a_many_statement_makes_a_version_3_write_that_round_trips():
    cmd = Command(statements=[("CREATE TABLE t(v)", ()), (INSERT, Many(([1], (2,), ("x",))))])
    assert cmd.version == MANY_VERSION and cmd.kind is CommandKind.WRITE
    assert cmd.statements[1] == (INSERT, Many(((1,), (2,), ("x",))))
    again = Command.decode(cmd.encode())
    assert again == cmd
    fields = msgpack.unpackb(cmd.encode())
    assert fields[4][1] == [INSERT, [[1], [2], ["x"]], 1]  # the SQL text once


def test_writes_without_a_many_statement_keep_version_1_bytes():
    cmd = Command(statements=[(INSERT, (1,)), (INSERT, (2,))])
    assert cmd.version == VERSION
    assert msgpack.unpackb(cmd.encode())[0] == 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"statements": [(INSERT, Many(()))]}, "at least one parameter set"),
        ({"statements": [(INSERT, Many(((object(),),)))]}, "unsupported parameter type"),
        ({"statements": [(INSERT, Many(((1 << 70,),)))]}, "signed 64 bits"),
        ({"statements": [(INSERT, Many("ab"))]}, "tuple or list of parameter sets"),
        ({"statements": [(INSERT, Many(((1,),)))], "kind": CommandKind.TXN}, "WRITE command"),
        ({"statements": [(INSERT, (1,))], "version": MANY_VERSION}, "expected 1"),
    ],
)
def test_malformed_many_commands_are_refused(kwargs, fragment):
    with pytest.raises(CommandError, match=fragment):
        Command(**kwargs)


@pytest.mark.parametrize(
    "statements, fragment",
    [
        ([[INSERT, [[1]], 2]], "must be a \\[sql, \\[params, ...\\], 1\\] array"),
        ([[INSERT, [[1]], True]], "must be a \\[sql, \\[params, ...\\], 1\\] array"),
        ([[INSERT, [1], 1]], "params must be an array or a map"),
        ([[INSERT, "x", 1]], "must be a \\[sql, \\[params, ...\\], 1\\] array"),
        ([[INSERT, [], 1]], "at least one parameter set"),
        ([[INSERT, [1]]], "needs at least one many statement"),
    ],
)
def test_decode_rejects_malformed_version_3(statements, fragment):
    data = msgpack.packb([3, 1, "", 0, statements, T0, 1])
    with pytest.raises(CommandError, match=fragment):
        Command.decode(data)


def test_version_3_is_not_a_txn():
    data = msgpack.packb([3, 2, "", 0, [[INSERT, [[1]], 1]], T0, 1])
    with pytest.raises(CommandError, match="version 3 for kind 2"):
        Command.decode(data)


# -- apply -------------------------------------------------------------------------------------


def test_many_applies_every_set_and_sums_rowcount(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(id INTEGER PRIMARY KEY, v)", ())))
    r = p.apply(many_entry((INSERT, Many(tuple((f"r{i}",) for i in range(500))))))
    assert r.error is None and r.rowcount == 500 and r.lastrowid == 500 and r.results is None
    r = p.apply(many_entry(("UPDATE t SET v = 'u' WHERE id <= ?", Many(((10,), (20,), (5,))))))
    assert r.rowcount == 10 + 20 + 5
    r = p.apply(many_entry(("DELETE FROM t WHERE id = :id", Many(({"id": 1}, {"id": 999})))))
    assert r.rowcount == 1
    assert p.rows("SELECT count(*), min(id), max(id) FROM t") == [[499, 2, 500]]
    assert p.same()


def test_trigger_changes_are_not_counted_as_in_sqlite3(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(v)", ()), ("CREATE TABLE log(v)", ()),
                       ("CREATE TRIGGER tr AFTER INSERT ON t BEGIN "
                        "INSERT INTO log VALUES (new.v); INSERT INTO log VALUES (new.v); END", ())))
    r = p.apply(many_entry(("INSERT INTO t VALUES(?)", Many(((1,), (2,), (3,))))))
    assert r.rowcount == 3
    assert p.rows("SELECT count(*) FROM log") == [[6]]


def test_a_failing_set_applies_nothing_and_names_the_set(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(v UNIQUE)", ())))
    for bad in (0, 2):
        sets = [(100,), (101,), (102,)]
        sets[bad] = (7,)
        r = p.apply(many_entry(("INSERT INTO t VALUES(7)", ()), ("INSERT INTO t VALUES(?)", Many(tuple(sets)))))
        assert r.error["name"] == "SQLITE_CONSTRAINT_UNIQUE"
        assert r.error["statement"] == 1 and r.error["set"] == bad
    assert p.rows("SELECT count(*) FROM t") == [[0]]
    assert p.same()


def test_random_differs_between_sets_but_not_between_nodes(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(k, r, b)", ())))
    p.apply(many_entry(("INSERT INTO t VALUES(?, random(), randomblob(8))",
                        Many(tuple((i,) for i in range(50)))), seed=42))
    rows = p.rows("SELECT r, b FROM t")
    assert len({r for r, _ in rows}) == 50 and len({b for _, b in rows}) == 50
    assert p.same()


def test_several_statements_in_the_text_are_refused(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(v)", ())))
    r = p.apply(many_entry(("INSERT INTO t VALUES(1); INSERT INTO t VALUES(2)", Many(((), ())))))
    assert r.error["name"] == "RAFTSQL_MULTIPLE_STATEMENTS"
    assert p.rows("SELECT count(*) FROM t") == [[0]]


def test_the_step_limit_applies_to_each_set(tmp_path):
    sms = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sms.append(StateMachine(str(tmp_path / name / "db"), apply_vm_step_limit=200_000))
    try:
        p = Pair(sms)
        p.apply(many_entry(("CREATE TABLE t(x)", ())))
        loop = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM r LIMIT ?) INSERT INTO t SELECT x FROM r"
        r = p.apply(many_entry((loop, Many(((1000,), (1000,), (1000,))))))
        assert r.error is None
        r = p.apply(many_entry((loop, Many(((1000,), (10**9,))))))
        assert r.error["name"] == "RAFTSQL_STEP_LIMIT" and r.error["set"] == 1
        assert p.rows("SELECT count(*) FROM t") == [[3000]]
    finally:
        for sm in sms:
            sm.close()


def test_the_largest_rowid_is_refused_in_a_later_set(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(id INTEGER PRIMARY KEY)", ())))
    r = p.apply(many_entry(("INSERT INTO t VALUES(?)", Many(((1,), (9223372036854775807,))))))
    assert r.error["name"] == "RAFTSQL_MAX_ROWID" and r.error["set"] == 1
    # A later set that would get a rowid from SQLite's own PRNG never runs.
    sets = ((1,), (9223372036854775807,), (None,), (None,))
    r = p.apply(many_entry(("INSERT INTO t VALUES(?)", Many(sets))))
    assert r.error["name"] == "RAFTSQL_MAX_ROWID" and r.error["set"] == 1
    assert p.rows("SELECT count(*) FROM t") == [[0]]
    assert p.same()


def test_returning_rows_are_discarded(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(id INTEGER PRIMARY KEY, v)", ())))
    r = p.apply(many_entry(("INSERT INTO t(v) VALUES(?) RETURNING id", Many((("a",), ("b",))))))
    assert r.error is None and r.rows == [] and r.rowcount == 2


def test_a_duplicate_serial_returns_the_stored_result(machines):
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(v)", ())))
    data = many_entry((INSERT.replace("t(v)", "t"), Many(((1,), (2,)))), serial=1)
    first = p.apply(data)
    again = p.apply(data)
    assert again.duplicate and again.rowcount == first.rowcount == 2
    assert p.rows("SELECT count(*) FROM t") == [[2]]


def test_validate_checks_the_first_set_and_apply_fails_at_a_later_bad_shape(machines):
    """A wrong number of parameters in the first set refuses the request; in a later set the
    request is proposed and fails at that set, keeping the sets before it (as sqlite3's
    executemany): on every node alike, naming the set."""
    p = Pair(machines)
    sm = machines[0]
    p.apply(many_entry(("CREATE TABLE t(a, b)", ())))
    assert sm.validate([("INSERT INTO t VALUES(?, ?)", Many(((1, 2), (3, 4))))]) == [False]
    from raftsql.server.statemachine import SQLError

    with pytest.raises(SQLError) as info:
        sm.validate([("INSERT INTO t VALUES(?, ?)", Many(((3,), (1, 2))))])
    assert info.value.statement == 0 and info.value.name == "RAFTSQL_BINDINGS"
    bad = ("INSERT INTO t VALUES(?, ?)", Many(((1, 2), (5, 6), (3,), (7, 8))))
    assert sm.validate([bad]) == [False]
    r = p.apply(many_entry(bad))
    assert r.error["name"] == "RAFTSQL_BINDINGS" and r.error["set"] == 2, r.error
    assert p.rows("SELECT a, b FROM t ORDER BY a") == [[1, 2], [5, 6]]
    assert p.same()
    assert sm.validate([("SELECT ?", Many(((1,),)))]) == [True]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-5, 5), st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3))),
        min_size=1,
        max_size=12,
    )
)
def test_many_matches_separate_statements(tmp_path_factory, sets):
    """The same parameter sets as one many statement, as a batch of separate statements, and as
    one entry per set up to the first failure (sqlite3's executemany in autocommit mode): the
    same error (a UNIQUE column makes some fail); the many statement keeps the sets before the
    failing one, as the entries per set do, where the batch keeps nothing."""
    d = tmp_path_factory.mktemp("m")
    a, b, c = StateMachine(str(d / "a")), StateMachine(str(d / "b")), StateMachine(str(d / "c"))
    try:
        schema = many_entry(("CREATE TABLE t(k UNIQUE, v)", ()))
        for sm in (a, b, c):
            sm.apply(1, schema)
        sql = "INSERT INTO t VALUES(?, ?)"
        ra = a.apply(2, many_entry((sql, Many(tuple(sets)))))
        rb = b.apply(2, many_entry(*[(sql, s) for s in sets]))
        failed_at = None
        for j, s in enumerate(sets):
            if c.apply(2 + j, many_entry((sql, s))).error is not None:
                failed_at = j
                break
        if rb.error is None:
            assert ra.error is None and ra.rowcount == len(sets) and failed_at is None
            assert a.content_hash() == b.content_hash()
        else:
            assert ra.error["name"] == rb.error["name"]
            assert ra.error["set"] == rb.error["statement"] if len(sets) > 1 else True
            assert ra.error["set"] == failed_at
            assert bool(ra.error.get("kept_changes")) == (failed_at > 0)
            assert b.query("SELECT count(*) FROM t").rows == [[0]]
        kept = "SELECT k, v FROM t ORDER BY rowid"
        assert a.query(kept).rows == c.query(kept).rows
    finally:
        a.close()
        b.close()
        c.close()


def test_or_rollback_in_a_later_set_fails_the_whole_entry(machines):
    """ON CONFLICT ROLLBACK ends the entry's transaction in the middle of the parameter sets:
    the entry is redone with that error, identically on both nodes, and nothing is kept."""
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE t(v UNIQUE)", ())))
    r = p.apply(many_entry(("INSERT INTO t VALUES(-1)", ()),
                           ("INSERT OR ROLLBACK INTO t VALUES(?)", Many(((1,), (2,), (1,), (3,))))))
    assert r.error["name"] == "SQLITE_CONSTRAINT_UNIQUE" and r.error["statement"] == 1
    assert p.rows("SELECT count(*) FROM t") == [[0]]
    assert p.apply(many_entry(("INSERT INTO t VALUES(?)", Many(((1,), (2,)))))).rowcount == 2
    assert p.same()


def test_foreign_keys_stay_off_as_in_sqlite3(machines):
    """foreign_keys is OFF and cannot be set, so a cascade never runs (the fast path checks for
    self-referencing actions anyway)."""
    p = Pair(machines)
    p.apply(many_entry(("CREATE TABLE n(id INTEGER PRIMARY KEY, up REFERENCES n(id) ON DELETE CASCADE)", ()),
                       ("INSERT INTO n VALUES(1, NULL), (2, 1), (3, 2), (4, NULL), (5, 4)", ())))
    r = p.apply(many_entry(("DELETE FROM n WHERE id = ?", Many(((1,), (4,))))))
    assert r.error is None and r.rowcount == 2
    assert p.rows("SELECT id FROM n ORDER BY id") == [[2], [3], [5]]
    assert p.same()


def test_plain_inserts_skip_the_per_set_tracer_and_triggers_use_it(machines):
    sm = machines[0]
    calls = []
    traced = sm._many_cursor.exec_trace
    sm._many_cursor.exec_trace = lambda *a: calls.append(1) or traced(*a)
    sm.apply(1, many_entry(("CREATE TABLE t(v)", ()), ("CREATE TABLE u(v)", ())))
    sm.apply(2, many_entry(("INSERT INTO t VALUES(?)", Many(((1,), (2,), (3,))))))
    assert calls == []  # the fast path
    sm.apply(3, many_entry(("CREATE TRIGGER tr AFTER INSERT ON u BEGIN SELECT 1; END", ())))
    r = sm.apply(4, many_entry(("INSERT INTO u VALUES(?)", Many(((1,), (2,), (3,))))))
    assert r.rowcount == 3 and len(calls) == 2  # traced: sets 1 and 2


def test_a_virtual_tables_rowcount_is_its_rows_on_a_warm_node_and_a_cold_one(machines):
    """FTS5 writes its shadow tables through statements it prepares once per connection. The
    fast path's total_changes() then counted them too, once they were cached: 3 rows gave
    rowcount 7 on a node that had written the table before and 3 on one that had not, a
    different stored result on each (and a false SerializationError for the preview's 3)."""
    pair = Pair(machines)
    pair.apply(many_entry(("CREATE VIRTUAL TABLE f USING fts5(body)", ())))
    warm = machines[0]
    # Only machines[0] has written the table: its FTS5 statements are prepared and cached.
    txn = warm.txn_begin("warmer", 1)
    warm.txn_preview(txn, ("INSERT INTO f VALUES ('w')", ()), 0, (1, T0))
    warm.txn_end(txn.id)
    for rows in (3, 2):
        r = pair.apply(many_entry(("INSERT INTO f VALUES (?)", Many([(str(i),) for i in range(rows)])),
                                  serial=6 - rows, seed=rows))
        assert r.error is None and r.rowcount == rows
    assert pair.rows("SELECT count(*) FROM f") == [[5]]
    assert pair.same()
