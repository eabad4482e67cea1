"""User statements once ran from apsw's statement cache (sandbox.StatementMemo); on the apply
connection every run is now prepared afresh (server/DESIGN.md, "Step limit"), and these tests
keep checking that warm and cold machines decide alike. What the authorizer
said at a statement's fresh prepare is replayed for its cached runs, and only under the same
schema state. Each test applies the same entries to a state machine whose cache is warm and to
one whose cache is cold (or differently warm), and requires identical results and content
hashes: a cached run must decide exactly what a fresh prepare decides."""

import pytest

from raftsql.server import sandbox
from tests.unit.test_apply_failures import T0
from tests.unit.test_apply_failures import Pair as _Pair


class Pair(_Pair):
    """machines[0] also runs previews that machines[1] never sees (its statement cache and
    memo hold more); every entry goes to both."""

    def warm_only(self, sql, times=3):
        """Run sql on machines[0] alone, in previews that are rolled back (its cache and memo
        fill; its database does not change)."""
        sm = self.machines[0]
        for _ in range(times):
            txn = sm.txn_begin("warmer", 1)
            sm.txn_preview(txn, (sql, ()), len(txn.writes), (1, T0))
            sm.txn_end(txn.id)


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


class Counting:
    """Counts calls of the apply connections' authorizers (user statements only)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = sandbox.Guard.__call__

        def counted(guard, *args):
            if not guard.internal:
                self.calls += 1
            return original(guard, *args)

        monkeypatch.setattr(sandbox.Guard, "__call__", counted)


def test_a_repeated_statement_is_prepared_afresh_every_run(pair, monkeypatch):
    """Never from apsw's cache on the apply connection: a cached statement's VM step counter
    carries over between runs, which made the step limit depend on a node's history
    (server/DESIGN.md, "Step limit"). Every run is authorized as its first was."""
    pair.apply("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    pair.apply(("INSERT INTO t(v) VALUES (?)", (1,)))
    counting = Counting(monkeypatch)
    calls = []
    for v in range(2, 5):
        assert pair.apply(("INSERT INTO t(v) VALUES (?)", (v,)))["error"] is None
        calls.append(counting.calls)
        counting.calls = 0
    assert calls[0] > 0 and len(set(calls)) == 1
    pair.assert_same()


def test_the_write_set_of_a_cached_statement_is_the_fresh_one(pair):
    """sqlite_raftsql_tables (which entry last wrote each table) is replicated state: a cached
    run must report the same tables written, triggers included."""
    pair.apply("CREATE TABLE t(x)")
    pair.apply("CREATE TABLE audit(x)")
    pair.apply("CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO audit VALUES (new.x); END")
    for x in range(4):
        pair.warm_only("INSERT INTO t VALUES (99)")
        assert pair.apply(("INSERT INTO t VALUES (?)", (x,)))["error"] is None
    pair.assert_same()
    for sm in pair.machines:
        rows = dict(sm.query("SELECT name, modified_index FROM sqlite_raftsql_tables").rows)
        assert rows["t"] == rows["audit"] == pair.index


def test_a_view_redefined_is_authorized_again(pair):
    """The same text means something else after its view changes: it is prepared afresh and
    refused if the new meaning is (a cached run would not call the authorizer at all)."""
    pair.apply("CREATE TABLE t(x)")
    pair.apply("CREATE VIEW v AS SELECT 1 AS x")
    for _ in range(3):
        assert pair.apply("INSERT INTO t SELECT x FROM v")["error"] is None
    pair.apply("DROP VIEW v")
    pair.apply("CREATE VIEW v AS SELECT data_version AS x FROM pragma_data_version")
    result = pair.apply("INSERT INTO t SELECT x FROM v")
    assert result["error"] is not None
    assert "data_version" in result["error"]["message"]
    assert pair.machines[0].query("SELECT count(*) FROM t").rows == [[3]]
    pair.assert_same()


def test_a_schema_change_rolled_back_by_a_failed_entry_is_not_seen_by_the_cache(pair):
    """DDL that an entry's failure rolls back moves the schema back to an earlier state: the
    same text must then fail as it would on a machine that never saw that DDL."""
    pair.apply("CREATE TABLE t(x UNIQUE)")
    pair.apply("INSERT INTO t VALUES (1)")
    for _ in range(3):
        r = pair.apply("CREATE TABLE later(y)", "INSERT INTO later VALUES (5)", "INSERT INTO t VALUES (1)")
        assert r["error"] is not None and "UNIQUE" in r["error"]["message"]
        r = pair.apply("INSERT INTO later VALUES (5)")
        assert r["error"] is not None and "no such table" in r["error"]["message"]
    pair.apply("CREATE TABLE later(y, z DEFAULT 7)")
    assert pair.apply("INSERT INTO later VALUES (5)")["error"] is not None  # 2 columns now
    assert pair.apply("INSERT INTO later(y) VALUES (5)")["error"] is None
    pair.assert_same()


def test_a_preview_schema_change_parked_away_is_not_seen_by_the_cache(pair):
    """A transaction preview creates a table and writes it (that statement is cached on the
    leader); parking the preview rolls the table back, and an autocommit write of the same
    text must fail on the leader as on a follower that never previewed anything."""
    pair.apply("CREATE TABLE t(x)")
    leader = pair.machines[0]
    txn = leader.txn_begin("client", 1)
    for i, sql in enumerate(["CREATE TABLE p(x)", "INSERT INTO p VALUES (1)", "INSERT INTO p VALUES (1)"]):
        result, _, _ = leader.txn_preview(txn, (sql, ()), i, (1, T0))
        assert result.error is None
    r = pair.apply("INSERT INTO p VALUES (1)")  # the apply parks the preview first
    assert r["error"] is not None and "no such table" in r["error"]["message"]
    result, _, _ = leader.txn_preview(txn, ("INSERT INTO p VALUES (1)", ()), 3, (1, T0))
    assert result.error is None  # resumed: its table is back for it
    leader.txn_end(txn.id)
    r = pair.apply("INSERT INTO p VALUES (1)")
    assert r["error"] is not None and "no such table" in r["error"]["message"]
    pair.assert_same()


def test_long_statements_and_schema_statements_are_never_cached(pair):
    pair.apply("CREATE TABLE t(x)")
    long_sql = "INSERT INTO t VALUES (1) " + "-- pad\n" * 1000
    for _ in range(3):
        assert pair.apply(long_sql)["error"] is None
        assert pair.apply("CREATE TABLE IF NOT EXISTS t(x)")["error"] is None
    for sm in pair.machines:
        keys = [k[0] for k in sm._memo._effects]
        assert long_sql not in keys
        assert "CREATE TABLE IF NOT EXISTS t(x)" not in keys
    pair.assert_same()



def touched(sm):
    return dict(sm.query("SELECT name, modified_index FROM sqlite_raftsql_tables").rows)


def test_a_trigger_rolled_back_with_its_entry_leaves_no_write_set_behind(pair):
    """The same text writes another table while a trigger exists. An entry creates the trigger,
    runs the text, then fails: everything rolls back. The text's next run must report only its
    own table, on the machine that ran it under the trigger as on one that restarted since
    (its memo empty), or sqlite_raftsql_tables would differ between them."""
    pair.apply("CREATE TABLE t(x)")
    pair.apply("CREATE TABLE audit(x)")
    pair.apply("CREATE TABLE u(x UNIQUE)")
    pair.apply("INSERT INTO u VALUES (1)")
    r = pair.apply(
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO audit VALUES (new.x); END",
        "INSERT INTO t VALUES (1)",
        "INSERT INTO u VALUES (1)",
    )
    assert r["error"] is not None and "UNIQUE" in r["error"]["message"]
    audit_before = touched(pair.machines[0]).get("audit")
    pair.machines[1]._memo._effects.clear()  # as after a restart
    assert pair.apply("INSERT INTO t VALUES (1)")["error"] is None
    assert pair.machines[0].query("SELECT count(*) FROM audit").rows == [[0]]
    for sm in pair.machines:
        assert touched(sm).get("audit") == audit_before
        assert touched(sm)["t"] == pair.index
    pair.assert_same()


def test_a_preview_schema_change_parked_away_leaves_no_write_set_behind(pair):
    """A preview on the leader creates a trigger and runs a text under it; parking the
    preview rolls the trigger back, and a committed entry then changes the schema (the cookie
    is back where the preview had it). The text's write set must be the one without the
    trigger, as on a follower that never previewed."""
    pair.apply("CREATE TABLE t(x)")
    pair.apply("CREATE TABLE audit(x)")
    leader = pair.machines[0]
    txn = leader.txn_begin("client", 1)
    steps = ["CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO audit VALUES (new.x); END",
             "INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (1)"]
    for i, sql in enumerate(steps):
        result, _, _ = leader.txn_preview(txn, (sql, ()), i, (1, T0))
        assert result.error is None
    pair.apply("CREATE TABLE other(x)")  # parks the preview: the trigger is rolled back
    leader.txn_end(txn.id)
    audit_before = touched(leader).get("audit")
    assert pair.apply("INSERT INTO t VALUES (1)")["error"] is None
    for sm in pair.machines:
        assert touched(sm).get("audit") == audit_before
    pair.assert_same()


@pytest.mark.parametrize("change", [
    ["ALTER TABLE t ADD COLUMN b DEFAULT 'B'"],
    ["DROP TABLE t", "CREATE TABLE t(x, y)", "INSERT INTO t VALUES ('X', 'Y')"],
])
def test_a_cached_statement_names_the_columns_of_the_schema_it_runs_under(pair, change):
    """A statement from apsw's cache that the schema changed under is re-prepared by SQLite only
    when it steps; its columns must be the new schema's at once, in apply (RETURNING), in a
    preview and on a reader, on a node whose cache held it and on one whose cache did not."""
    pair.apply("CREATE TABLE t(a)")
    pair.apply("INSERT INTO t VALUES (1)")
    stmts = ["SELECT * FROM t", "INSERT INTO t DEFAULT VALUES RETURNING *"]
    for sql in stmts * 3:  # fresh, then cached, on both machines
        pair.apply(sql)
    pair.warm_only(stmts[0])
    for sm in pair.machines:
        for _ in range(3):
            sm.query(stmts[0])
    for sql in change:
        pair.apply(sql)
    want = ["a", "b"] if len(change) == 1 else ["x", "y"]
    for sql in stmts * 3:  # fresh under the new schema, then from the (stale) cache
        result = pair.apply(sql)
        assert result["columns"] == want, (sql, result)
        assert all(len(r) == len(want) for r in result["rows"])
    for sm in pair.machines:
        for _ in range(3):
            got = sm.query(stmts[0])
            assert got.columns == want and all(len(r) == len(want) for r in got.rows), got
            txn = sm.txn_begin("c", 1)
            preview, _, _ = sm.txn_preview(txn, (stmts[0], ()), 0, (1, T0))
            sm.txn_end(txn.id)
            assert preview.columns == want, preview
    pair.assert_same()


def test_memories_keyed_by_text_keep_short_texts_only(pair):
    """Caches keyed by a statement's text keep texts up to MAX_CACHED_SQL: 4,096 distinct 4 MiB
    statements held about 16 GiB on every node (first_keyword's cache filled on apply)."""
    from raftsql import sqltext
    from raftsql.driver import _sql

    sm = pair.machines[0]
    pair.apply("CREATE TABLE t(x)")
    pad = "x" * (sqltext.MAX_CACHED_SQL + 10)
    sqltext._first_keyword_cached.cache_clear()
    _sql._named_parameters_cached.cache_clear()
    for k in range(3):
        long_write = f"DELETE FROM t WHERE 0 AND x = '{k}{pad}'"
        assert sqltext.first_keyword(long_write) == "DELETE"
        assert pair.apply(long_write)["error"] is None
        assert _sql.named_parameters(f"SELECT :a, '{k}{pad}'") == ("a",)
        got = sm.query(f"SELECT count(*) FROM t WHERE x = '{k}{pad}'")
        assert got.error is None and got.rows == [[0]]
    assert sqltext._first_keyword_cached.cache_info().currsize <= 3
    assert _sql._named_parameters_cached.cache_info().currsize == 0
    assert all(len(sql) <= sqltext.MAX_CACHED_SQL for sql in sm.reads._volatile)
    reader = sm.reads.checkout()
    try:
        assert all(len(sql) <= sqltext.MAX_CACHED_SQL for sql, _ in reader.descriptions)
    finally:
        sm.reads.checkin(reader)
