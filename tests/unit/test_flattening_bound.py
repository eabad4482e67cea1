"""The bound on statements SQLite flattens into one deep expression (server/sandbox.py,
prepare_bounded; server/DESIGN.md, "Flattening"), on the state machine's apply path: what passes
is decided by the text and the schema alone, so a node whose connection is fresh decides like
one that has used every table before.

Each test runs in a thread with the node's stack size, as the apply thread does."""

import threading

from raftsql.command import Command
from raftsql.server.sandbox import SELECT_CAP, THREAD_STACK_BYTES
from raftsql.server.statemachine import StateMachine


def start_node_thread(target):
    """A started thread with the stack size node threads get."""
    old = threading.stack_size(THREAD_STACK_BYTES)
    try:
        t = threading.Thread(target=target)
        t.start()
    finally:
        threading.stack_size(old)
    return t


def in_node_thread(fn):
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    start_node_thread(body).join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def deep(term, depth):
    return "(" * depth + term + "+1)" * depth


def cte_chain(levels, depth, source="base"):
    parts, prev = [], source
    for i in range(levels):
        parts.append(f"c{i} AS (SELECT {deep('x', depth)} AS x FROM {prev})")
        prev = f"c{i}"
    return "WITH " + ", ".join(parts) + f" SELECT x FROM {prev}"


class Machines:
    def __init__(self, tmp_path):
        self.paths = [str(tmp_path / f"{n}.sqlite") for n in ("a", "b")]
        self.machines = [StateMachine(p) for p in self.paths]
        self.index = 0

    def apply(self, *sqls):
        self.index += 1
        data = Command(client_id="c", serial=self.index, statements=[(s, ()) for s in sqls],
                       leader_time_ms=1_700_000_000_000, seed=7).encode()
        wires = [sm.apply(self.index, data).to_wire() for sm in self.machines]
        assert all(w == wires[0] for w in wires), wires
        return wires[0]

    def restart(self, i):
        self.machines[i].close()
        self.machines[i] = StateMachine(self.paths[i])

    def close(self):
        for sm in self.machines:
            sm.close()


def error_of(wire):
    return (wire.get("error") or {}).get("message", "") if isinstance(wire, dict) else str(wire)


def test_the_bound_is_the_same_on_a_fresh_and_a_warm_connection(tmp_path):
    def run():
        m = Machines(tmp_path)
        try:
            m.apply("CREATE TABLE base(x)", "INSERT INTO base VALUES (0)",
                    "CREATE VIRTUAL TABLE rt USING rtree(id, x0, x1)", "INSERT INTO rt VALUES (1, 0, 1)",
                    "CREATE TABLE sink(x)")
            m.apply("INSERT INTO sink SELECT count(*) FROM rt")  # both connections use rt
            m.restart(1)  # b's connection has not used rt since it opened
            # SELECT_CAP SELECTs in all (the chain, its outer query, the scalar subquery over
            # rt), with expressions deeper than the shallow limit: passes only under the cap.
            # A first use of rt inside the prepare adds the rtree module's own statements,
            # which a node counting them would have refused.
            chain = cte_chain(SELECT_CAP - 3, 150)
            sql = f"INSERT INTO sink {chain} WHERE (SELECT count(*) FROM rt) = 1"
            ok = m.apply(sql)
            assert "too complex" not in error_of(ok), ok
            refused = m.apply(f"INSERT INTO sink {cte_chain(SELECT_CAP + 4, 150)}")
            assert "too complex" in str(refused), refused
            assert len({sm.content_hash() for sm in m.machines}) == 1
            return [r[0] for r in m.machines[0].query("SELECT x FROM sink").rows]
        finally:
            m.close()

    assert in_node_thread(run) == [1, (SELECT_CAP - 3) * 150]


def test_a_view_may_not_lie_on_a_chain_of_more_than_the_limit(tmp_path):
    from raftsql.server.sandbox import MAX_VIEW_CHAIN

    def run():
        m = Machines(tmp_path)
        try:
            m.apply("CREATE TABLE base(x)", "INSERT INTO base VALUES (1)")
            prev = "base"
            for i in range(MAX_VIEW_CHAIN):
                r = m.apply(f'CREATE VIEW "v{i}" AS SELECT x + 1 AS x FROM {prev}')
                assert r["error"] is None, r
                prev = f'"v{i}"'
            r = m.apply(f"CREATE VIEW over AS SELECT x FROM {prev}")
            assert "views nested too deep" in r["error"]["message"], r
            assert f"chain of {MAX_VIEW_CHAIN + 1} views" in r["error"]["message"]
            # Redefining the bottom of the chain to read one more view lengthens every chain
            # above it: refused too, and the old definition stays.
            r = m.apply("CREATE VIEW extra AS SELECT x FROM base", "DROP VIEW v0",
                        "CREATE VIEW v0 AS SELECT x + 1 AS x FROM extra")
            assert "views nested too deep" in r["error"]["message"], r
            # A view beside the chain, or one whose text only mentions the chain's names in
            # comments, is fine. A string is taken as a name (SQLite reads FROM 'v31' as one).
            r = m.apply("CREATE VIEW beside AS SELECT 1 AS x /* v31 */ FROM v0")
            assert r["error"] is None, r
            r = m.apply(f"CREATE VIEW quoted AS SELECT x FROM 'v{MAX_VIEW_CHAIN - 1}'")
            assert "views nested too deep" in r["error"]["message"], r
            top = m.machines[0].query(f"SELECT x FROM {prev}").rows
            assert top == [[MAX_VIEW_CHAIN + 1]]
            assert len({sm.content_hash() for sm in m.machines}) == 1
        finally:
            m.close()

    in_node_thread(run)


def test_identifiers_skip_strings_and_comments():
    from raftsql.sqltext import identifiers

    sql = """CREATE VIEW "v 1"(a) AS SELECT 'it''s v0', [v2], `v``3` /* v9 */ -- v8
             FROM v0 JOIN "q""r" WHERE y = 1e5"""
    ids = identifiers(sql)
    assert {"v 1", "a", "v2", "v`3", "v0", 'q"r', "y", "it's v0"} <= ids
    assert not ids & {"v9", "v8", "it", "s", "e5"}
    # SQLite's white space is ASCII only: a no-break space is part of a name.
    assert "\xa0v1" in identifiers("SELECT * FROM \xa0v1")


def test_a_generated_column_may_not_lie_on_a_chain_of_more_than_the_limit(tmp_path):
    from raftsql.server.sandbox import MAX_GENERATED_CHAIN

    def chain(count, start=1):
        return ", ".join(f"g{i} AS (g{i - 1} + 1)" for i in range(start, count + 1))

    def run():
        m = Machines(tmp_path)
        try:
            n = MAX_GENERATED_CHAIN - 1  # g0 is a plain column: g1..gn, n generated
            assert m.apply(f"CREATE TABLE ok(g0, {chain(n + 1)})")["error"] is None
            assert m.apply("INSERT INTO ok(g0) VALUES (0)")["error"] is None
            r = m.apply(f"CREATE TABLE deep(g0, {chain(n + 2)})")
            assert "generated columns nested too deep" in r["error"]["message"], r
            assert f"chain of {MAX_GENERATED_CHAIN + 1} generated" in r["error"]["message"]
            # Names that begin with a no-break space (a name character to SQLite).
            nb = ", ".join(f"\xa0g{i} AS (\xa0g{i - 1} + 1)" for i in range(1, n + 3))
            r = m.apply(f"CREATE TABLE nb(\xa0g0, {nb})")
            assert "generated columns nested too deep" in r["error"]["message"], r
            # Adding one more to the chain of `ok` is refused, and the table stays as it was.
            r = m.apply(f"ALTER TABLE ok ADD COLUMN g{n + 2} AS (g{n + 1} * 2)")
            assert "generated columns nested too deep" in r["error"]["message"], r
            # Many generated columns that read only plain columns are fine ('gX' in a string
            # and a comment are not reads).
            wide = ", ".join(f"j{i} AS (json_extract(doc, '$.k{i}') /* g{i} */)" for i in range(40))
            assert m.apply(f"CREATE TABLE wide(doc, {wide})")["error"] is None
            assert m.machines[0].query(f"SELECT g{n + 1} FROM ok").rows == [[n + 1]]
            assert len({sm.content_hash() for sm in m.machines}) == 1
        finally:
            m.close()

    in_node_thread(run)


def test_a_slow_check_of_one_write_holds_up_no_other(tmp_path):
    # A statement whose prepare takes SQLite seconds (each distinct window definition is
    # rewritten into a subquery that copies the others, before any SELECT is counted) used to
    # hold the one connection that checks every write on the leader.
    import time

    from raftsql.server.statemachine import SQLError

    sm = StateMachine(str(tmp_path / "db.sqlite"))
    slow = "WITH c(x) AS (SELECT 1) SELECT " + ",".join(
        f"sum(x) OVER (ORDER BY coalesce({'x,' * 200}{i}))" for i in range(200)) + " FROM c"
    state = {}

    def check_slow():
        state["started"] = time.monotonic()
        try:
            sm.reads.validate([(slow, ())])
        except SQLError as e:
            state["error"] = str(e)
        state["ended"] = time.monotonic()

    try:
        t = start_node_thread(check_slow)
        time.sleep(0.3)
        assert sm.reads.validate([("CREATE TABLE t(x)", ())]) == [False]
        quick_done = time.monotonic()
        t.join()
        assert "too complex" in state["error"]
        # The quick check did not wait for the slow one (which takes about 2.5 s).
        assert quick_done < state["ended"], (quick_done - state["started"], state)
    finally:
        sm.close()


def test_a_rollback_that_discards_the_schema_reconnects_the_virtual_tables(tmp_path):
    # SQLite discards its in-memory schema (virtual table connections, FTS5's loaded config)
    # when a savepoint is rolled back in a transaction that changed the schema, and the cookie
    # comes back to the value it had. A node that had not restarted then counted rtree's own
    # SELECTs against the cap, and wrote another FTS5 config cookie at 'rebuild' (outside-in
    # divergence hunt, 2026-12-05).
    def run():
        m = Machines(tmp_path)
        try:
            m.apply("CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)", "CREATE TABLE t(a)",
                    "CREATE TABLE d(a)", "INSERT INTO d VALUES (1), (1)",
                    "CREATE VIRTUAL TABLE f USING fts5(x)", "INSERT INTO f VALUES ('hello world')",
                    "INSERT INTO f(f, rank) VALUES ('pgsz', 100)")
            # Fails after its own schema change: the entry's savepoint is rolled back.
            r = m.apply("ALTER TABLE d ADD COLUMN b INT CHECK (b IS NOT NULL)")
            assert "CHECK constraint failed" in r["error"]["message"], r
            m.restart(1)
            # SELECT_CAP SELECTs, one expression deeper than the shallow limit.
            scalar = " + ".join(["(SELECT 1)"] * (SELECT_CAP - 3))
            r = m.apply(f"INSERT INTO t SELECT {deep('1', 150)} + {scalar} + "
                        "(SELECT count(*) FROM r)")
            assert r["error"] is None, r
            m.apply("INSERT INTO f(f) VALUES ('rebuild')")
            assert len({sm.content_hash() for sm in m.machines}) == 1
        finally:
            m.close()

    in_node_thread(run)


def test_a_later_entry_of_a_batch_that_changed_the_schema_sees_connected_tables(tmp_path):
    def run():
        paths = [str(tmp_path / f"{n}.sqlite") for n in ("a", "b")]
        a, b = (StateMachine(p) for p in paths)
        try:
            scalar = " + ".join(["(SELECT 1)"] * (SELECT_CAP - 3))
            sqls = [["CREATE VIRTUAL TABLE r USING rtree(id, x0, x1)", "CREATE TABLE t(a)"],
                    ["SELECT * FROM nosuch"],
                    [f"INSERT INTO t SELECT {deep('1', 150)} + {scalar} + (SELECT count(*) FROM r)"]]
            data = [Command(client_id="c", serial=i + 1, statements=[(s, ()) for s in one],
                            leader_time_ms=1_700_000_000_000, seed=7).encode()
                    for i, one in enumerate(sqls)]
            batched = a.apply_many([(i + 1, d) for i, d in enumerate(data)])
            single = [b.apply(i + 1, d) for i, d in enumerate(data)]
            assert [r.to_wire() for r in batched] == [r.to_wire() for r in single]
            assert single[2].error is None, single[2].error
            assert a.content_hash() == b.content_hash()
        finally:
            a.close()
            b.close()

    in_node_thread(run)


def test_a_statement_with_more_than_the_window_limit_is_refused_before_it_is_prepared(tmp_path):
    # SQLite's time to prepare grows with about the cube of the window functions of a SELECT
    # (1,000 distinct ones took over 58 s, in one C call): the text is refused first, in apply,
    # in the leader's check and in reads alike.
    from raftsql.server.sandbox import MAX_WINDOWS

    def windows(n):
        # One window, n functions (n distinct windows past about 50 already meet the flattening
        # bound: SQLite makes a subquery of each).
        return ", ".join("sum(x) OVER (ORDER BY x)" for _ in range(n))

    def run():
        m = Machines(tmp_path)
        try:
            m.apply("CREATE TABLE base(x)", "INSERT INTO base VALUES (1)", "CREATE TABLE sink(x)")
            ok = m.apply(f"INSERT INTO sink SELECT count(*) FROM (SELECT {windows(MAX_WINDOWS)} FROM base)",
                         "CREATE TABLE overdue(over)", "INSERT INTO overdue SELECT over FROM overdue",
                         # A column named over is no window, whatever follows it.
                         "INSERT INTO overdue SELECT count(*) FROM (SELECT "
                         + ", ".join(["over AS x"] * (MAX_WINDOWS + 1)) + " FROM overdue "
                         "WHERE over IS NOT NULL ORDER BY over DESC)")
            assert ok["error"] is None, ok
            refused = m.apply(f"INSERT INTO sink SELECT count(*) FROM (SELECT {windows(MAX_WINDOWS + 1)} FROM base)")
            assert "window functions" in error_of(refused) and refused["error"]["name"] == "SQLITE_AUTH"
            sm = m.machines[0]
            read = sm.query(f"SELECT {windows(MAX_WINDOWS + 1)} FROM base")
            assert "window functions" in error_of(read.to_wire()), read
            assert len(sm.query(f"SELECT {windows(MAX_WINDOWS)} FROM base").rows[0]) == MAX_WINDOWS
            try:
                sm.reads.validate([(f"INSERT INTO sink SELECT {windows(MAX_WINDOWS + 1)} FROM base", ())])
            except Exception as e:  # noqa: BLE001 - the check's refusal
                assert "window functions" in str(e), e
            else:
                raise AssertionError("the leader's check let it through")
        finally:
            m.close()

    in_node_thread(run)
