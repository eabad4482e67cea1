"""LIKE, GLOB, instr(), replace() and two-argument trim() on the apply connection
(server/costed.py): the same results as SQLite's own functions, and a bound of their work
counted against the step limit, the same on every node."""

from __future__ import annotations

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftsql.server.costed import COMPARES_PER_STEP, _match_work
from raftsql.server.statemachine import StateMachine

from .test_apply_failures import entry

CALLS = {
    "like2": "SELECT like(?, ?)",
    "like3": "SELECT like(?, ?, ?)",
    "glob": "SELECT glob(?, ?)",
    "instr": "SELECT instr(?, ?)",
    "replace": "SELECT replace(?, ?, ?)",
    "trim": "SELECT trim(?, ?)",
    "ltrim": "SELECT ltrim(?, ?)",
    "rtrim": "SELECT rtrim(?, ?)",
}

# Characters that mean something to one of the functions, in both cases, a non-ASCII letter
# (and its capital, which LIKE does not fold), NUL (where SQLite's matchers stop).
_ALPHABET = "aAbB%_*?[]^-\\xé\u00c9\0"
_text = st.text(_ALPHABET, max_size=12)
_value = st.one_of(
    _text, _text.map(lambda s: s.encode("utf-8")), st.none(),
    st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False, width=32),
)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    sm = StateMachine(str(tmp_path_factory.mktemp("costed") / "db.sqlite"))
    yield sm
    sm.close()


def _outcome(conn: apsw.Connection, sql: str, args: tuple) -> tuple:
    try:
        (value,) = conn.execute(sql, args).fetchone()
    except apsw.Error as e:
        return ("error", type(e).__name__, str(e))
    return ("ok", type(value).__name__, value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(CALLS)), a=_value, b=_value, c=_value)
def test_the_same_results_as_sqlites_own_functions(machine, name, a, b, c):
    plain = apsw.Connection(":memory:")
    try:
        sql = CALLS[name]
        args = (a, b, c)[: sql.count("?")]
        assert _outcome(machine._conn, sql, args) == _outcome(plain, sql, args), (name, args)
    finally:
        plain.close()


@pytest.mark.parametrize("sql, args, want", [
    ("SELECT 'abc' LIKE 'A_C', 'ABC' LIKE 'a%', 'é' LIKE 'É'", (), [1, 1, 0]),
    ("SELECT 'a%c' LIKE 'a\\%c' ESCAPE '\\', 'abc' LIKE 'a\\%c' ESCAPE '\\'", (), [1, 0]),
    ("SELECT 'abc' GLOB 'a[a-c]?', 'aBc' GLOB 'a[^b]c', 'a' GLOB '[]]'", (), [1, 1, 0]),
    ("SELECT instr('héllo', 'l'), instr(x'00ff01', x'01'), instr(12345, 34), instr('a', '')",
     (), [3, 3, 3, 1]),
    ("SELECT replace('aaa', 'a', 'bb'), replace('abc', '', 'x'), replace(123, 2, 'x')",
     (), ["bbbbbb", "abc", "1x3"]),
    ("SELECT trim('xxhixx', 'x'), ltrim('xxhi', 'x'), rtrim('hixx', 'x'), trim('  a  ')",
     (), ["hi", "hi", "hi", "a"]),
])
def test_known_answers(machine, sql, args, want):
    assert list(machine._conn.execute(sql, args).fetchone()) == want


def _two(tmp_path, limit=10_000_000):
    return [StateMachine(str(tmp_path / f"{n}.sqlite"), apply_vm_step_limit=limit) for n in "ab"]


# One LIKE of a 200,000-character value against a 5,000-character pattern compares a billion
# characters in a handful of VM steps: about a second, where 100 MB against the 50,000
# characters SQLite allows took an hour, in every node's apply thread.
_SLOW_LIKE = ("INSERT INTO t SELECT 1 WHERE printf('%.*c', 200000, 'a') LIKE ?",
              ("%" + "a" * 5000 + "b",))
_SLOW_GLOB = ("INSERT INTO t SELECT 1 WHERE printf('%.*c', 200000, 'a') GLOB ?",
              ("*" + "a" * 5000 + "b",))
_SLOW_TRIM = ("INSERT INTO t SELECT trim(printf('%.*c', 200000, 'a'), ?)",
              ("".join(map(chr, range(0x100, 0x1500))) + "a",))


@pytest.mark.parametrize("statement", [_SLOW_LIKE, _SLOW_GLOB, _SLOW_TRIM],
                         ids=["like", "glob", "trim"])
def test_a_call_past_the_step_budget_fails_before_it_runs_on_every_node(tmp_path, statement):
    machines = _two(tmp_path)
    try:
        wires = []
        for sm in machines:
            sm.apply(1, entry("CREATE TABLE t(x)"))
            wires.append(sm.apply(2, entry(statement, serial=1)).to_wire())
        assert wires[0] == wires[1]
        assert wires[0]["error"]["name"] == "RAFTSQL_STEP_LIMIT", wires[0]
        # The entry applied nothing, and the next one works.
        for sm in machines:
            assert sm.apply(3, entry("INSERT INTO t VALUES (1) RETURNING x", serial=2)).rows == [[1]]
    finally:
        for sm in machines:
            sm.close()


def test_ordinary_calls_on_big_values_stay_within_the_budget(tmp_path):
    # A LIKE '%word%' over 2 MB, and instr()/replace() of long strings (linear in Python),
    # cost a small part of a 10M-step budget.
    machines = _two(tmp_path)
    try:
        for sm in machines:
            sm.apply(1, entry("CREATE TABLE t(x)"))
            sm.apply(2, entry("INSERT INTO t SELECT printf('%.*c', 2000000, 'a') || 'needle'"))
        wires = [sm.apply(3, entry(
            ("SELECT x LIKE '%needle%', instr(x, ?), length(replace(x, ?, 'b')) FROM t",
             ("a" * 500000 + "n", "a" * 500000)), serial=1)).to_wire() for sm in machines]
        assert wires[0] == wires[1]
        assert wires[0]["error"] is None and wires[0]["rows"] == [[1, 1500001, 10]], wires[0]
    finally:
        for sm in machines:
            sm.close()


def test_the_work_bound_is_the_value_times_the_pattern_for_a_repeating_stretch():
    value, pattern = "a" * 1000, "%" + "a" * 10 + "b"
    assert _match_work(value, pattern, "%", "_", "", True) >= 1000 * 11
    # A stretch whose first character is rare costs about the value's length.
    assert _match_work("xyz" * 1000, "%zq%", "%", "_", "", True) < 3000 * 5
    # An escape character or a GLOB set may make a wildcard literal: the worst case.
    assert _match_work("a" * 100, "a\\%a", "%", "_", "\\", True) == 100 * 5 + 4
    assert _match_work("a" * 100, "[*]a", "*", "?", "[", False) == 100 * 5 + 4
    assert COMPARES_PER_STEP > 1


def test_a_replace_past_the_value_limit_fails_before_it_is_made(tmp_path):
    # SQLite's replace() stops as its result passes the limit; Python's would first make the
    # whole string (a 60 MB text, doubled: 120 MB more, on every node).
    import tracemalloc

    machines = _two(tmp_path, limit=100_000_000)
    try:
        wires = []
        for sm in machines:
            tracemalloc.start()
            try:
                wires.append(sm.apply(1, entry(
                    "SELECT length(replace(printf('%.*c', 60000000, 'a'), 'a', 'bb'))",
                    serial=1)).to_wire())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 100_000_000, peak
        assert wires[0] == wires[1]
        assert wires[0]["error"]["name"] == "SQLITE_TOOBIG", wires[0]
    finally:
        for sm in machines:
            sm.close()


def test_small_calls_and_wide_characters_are_charged_too(tmp_path):
    # An outside-in run: a loop of 50 tiny LIKEs a row ran 13.7 s to the 100M-step limit (each
    # call costs a Python call and a statement, which the work bound alone did not count), and a
    # LIKE over 4-byte characters cost 2.7x what its character count stood for (5.75 s).
    machines = _two(tmp_path)
    loop = ("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) "
            "SELECT count(*) FROM c WHERE like('a', i)")
    try:
        wires = [[sm.apply(k + 1, entry(sql, serial=k + 1)).to_wire() for k, sql in enumerate([
            (loop.format(n=20000), ()),
            (loop.format(n=300000), ()),  # 300,000 calls: 14M steps of calls alone
            ("SELECT printf('%.*c', 50000, '😀') LIKE ?", ("%" + "😀" * 2000 + "b",)),
            ("SELECT printf('%.*c', 50000, 'a') LIKE ?", ("%" + "a" * 2000 + "b",)),
        ])] for sm in machines]
        assert wires[0] == wires[1]
        names = [(w["error"] or {}).get("name") for w in wires[0]]
        assert names == [None, "RAFTSQL_STEP_LIMIT", "RAFTSQL_STEP_LIMIT", None], wires[0]
    finally:
        for sm in machines:
            sm.close()


def test_writes_using_them_leave_what_plain_sqlite_leaves(tmp_path):
    # Statement-level: UPDATE ... WHERE x LIKE ?, INSERT ... SELECT replace(...), DELETE ...
    # WHERE instr(...), on text with wildcards, wide characters, blobs, numbers and NULL. Each
    # outcome (applied or failed) and the final table match a plain SQLite database's, and the
    # two state machines hash alike. (Three seeds of 1,561 statements each, by hand, 2026-12-05.)
    import random

    rng = random.Random(7)
    alpha = "aAbB%_*?[]^-\\xé😀 "

    def val():
        r = rng.random()
        text = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 8)))
        return text if r < 0.5 else text.encode() if r < 0.65 else rng.randint(-5, 50) if r < 0.8 else None

    conds = ["a LIKE ?", "? LIKE a", "a GLOB ?", "like(?, a, ?)", "instr(a, ?)", "a NOT LIKE ? ESCAPE ?"]
    exprs = ["replace(a, ?, ?)", "trim(a, ?)", "ltrim(b, ?)", "rtrim(a, ?)", "instr(a, ?)", "b GLOB ?"]
    statements = [("CREATE TABLE t(id INTEGER PRIMARY KEY, a, b, c)", ())]
    statements += [("INSERT INTO t(a, b, c) VALUES (?, ?, ?)", (val(), val(), val())) for _ in range(40)]
    for _ in range(300):
        sql = rng.choice([
            f"UPDATE t SET c = {rng.choice(exprs)} WHERE {rng.choice(conds)}",
            f"INSERT INTO t(a, b, c) SELECT {rng.choice(exprs)}, a, b FROM t WHERE id % 7 = 3 LIMIT 2",
            f"DELETE FROM t WHERE {rng.choice(conds)} AND id % 5 = 0",
        ])
        statements.append((sql, tuple(val() for _ in range(sql.count("?")))))
    machines = _two(tmp_path)
    plain = apsw.Connection(str(tmp_path / "plain.sqlite"))
    try:
        for k, (sql, params) in enumerate(statements, 1):
            wires = [sm.apply(k, entry((sql, params))).to_wire() for sm in machines]
            assert wires[0] == wires[1], (sql, params)
            try:
                with plain:
                    plain.execute(sql, params).fetchall()
                failed = False
            except apsw.Error:
                failed = True
            assert (wires[0]["error"] is not None) == failed, (sql, params, wires[0]["error"])
        dump = "SELECT id, hex(a), typeof(a), hex(b), typeof(b), hex(c), typeof(c) FROM t ORDER BY id"
        assert [tuple(r) for r in machines[0].query(dump).rows] == plain.execute(dump).fetchall()
        assert machines[0].content_hash() == machines[1].content_hash()
    finally:
        plain.close()
        for sm in machines:
            sm.close()
