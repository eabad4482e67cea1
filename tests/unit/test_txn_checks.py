"""Transactions in the state machine: previews of an open transaction's statements (its writes
kept live, parked as a changeset, or replayed), and version 5 commits that replay every
statement with what the client saw and apply only if each does the same again, identically on
every node (server/transactions.py, raftsql/txncheck.py)."""

from __future__ import annotations

import pytest

from raftsql import txncheck
from raftsql.command import Command, CommandError, CommandKind, Many
from raftsql.server.statemachine import StateMachine, TxnGone

T0 = 1_700_000_000_000


class Node:
    """One state machine and its log index."""

    def __init__(self, path, **kw):
        self.sm = StateMachine(str(path), **kw)
        self.index = 0

    def write(self, *sql):
        self.index += 1
        r = self.sm.apply(self.index, Command(statements=[(s, ()) for s in sql],
                                              leader_time_ms=T0, seed=1).encode())
        assert r.error is None, r.error
        return r

    def rows(self, sql):
        return self.sm.query(sql).rows


class Txn:
    """A client's transaction as the driver keeps it: steps with what each saw."""

    def __init__(self, sm: StateMachine, client_id="c", term=1):
        self.sm = sm
        self.state = None
        self.client_id = client_id
        self.term = term
        self.writes = 0
        self.steps: list[tuple[tuple, tuple]] = []
        self.controls: list[tuple[int, int, int]] = []

    def run(self, sql, params=(), base=None, env=None):
        if self.state is None:
            self.state = self.sm.txn_begin(self.client_id, self.term)
        result, readonly, lost = self.sm.txn_preview(
            self.state, (sql, params), self.writes if base is None else base, env)
        if lost:
            return result, lost
        self.writes = len(self.state.writes)  # the driver derives the same count
        if result.error:
            check = txncheck.failed_check(result.error["name"])
        else:
            d = txncheck.RowDigest(result.columns)
            d.add_all(result.rows)
            check = txncheck.ok_check(result.rowcount, d, True, None, env)
        self.steps.append(((sql, params), check))
        return result, lost

    def command(self, serial=1, last_ms=T0, t=T0, seed=2):
        return Command(kind=CommandKind.TXN, client_id=self.client_id, serial=serial,
                       statements=[s for s, _ in self.steps], checks=[c for _, c in self.steps],
                       controls=self.controls, last_ms=last_ms, leader_time_ms=t, seed=seed)


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path / "a.sqlite")
    n.write("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)",
            "INSERT INTO acct VALUES (1, 100), (2, 100), (3, 100)")
    yield n
    n.sm.close()


def commit(node: Node, txn: Txn, **kw):
    node.index += 1
    return node.sm.apply(node.index, txn.command(**kw).encode())


# --------------------------------------------------------------------------- command


def test_command_v4_round_trip_and_validation():
    d = txncheck.RowDigest(["bal"])
    d.add([100])
    c = Command(kind=CommandKind.TXN, client_id="c", serial=2, last_ms=9,
                statements=[("SELECT bal FROM acct", ()), ("INSERT INTO t VALUES (?)", Many(((1,), (2,))))],
                checks=[txncheck.ok_check(-1, d, False, None), txncheck.failed_check("SQLITE_CONSTRAINT_UNIQUE")],
                controls=[(0, txncheck.SAVEPOINT, 0), (2, txncheck.ROLLBACK_TO, 0)])
    assert c.version == 5
    assert Command.decode(c.encode()) == c
    with pytest.raises(CommandError, match="checks for"):
        Command(kind=CommandKind.TXN, statements=[("x", ())], checks=[])
    with pytest.raises(CommandError, match="no savepoint open"):
        Command(kind=CommandKind.TXN, statements=[("x", ())], checks=[None],
                controls=[(0, txncheck.RELEASE, 0)])
    with pytest.raises(CommandError, match="opens at depth"):
        Command(kind=CommandKind.TXN, statements=[("x", ())], checks=[None],
                controls=[(0, txncheck.SAVEPOINT, 1)])
    with pytest.raises(CommandError, match="out of order"):
        Command(kind=CommandKind.TXN, statements=[("x", ())], checks=[None],
                controls=[(1, txncheck.SAVEPOINT, 0), (0, txncheck.RELEASE, 0)])
    with pytest.raises(CommandError, match="digest"):
        Command(kind=CommandKind.TXN, statements=[("x", ())], checks=[(0, 1, 0, True, b"x", None)])
    with pytest.raises(CommandError, match="belong to TXN"):
        Command(statements=[("x", ())], checks=[None])


def test_digest_is_the_same_from_wire_values_and_from_sqlite_rows():
    import msgpack

    rows = [(1, 2.5, "é", b"\x00\xff", None), (-(2**63), 0.0, "", b"", None)]
    a = txncheck.RowDigest(["a", "b", "c", "d", "e"])
    a.add_all(rows)
    wire_rows = msgpack.unpackb(msgpack.packb(rows, use_bin_type=True), raw=False)  # lists
    b = txncheck.RowDigest(["a", "b", "c", "d", "e"])
    b.add_all(wire_rows)
    assert a.digest() == b.digest() and a.rows == b.rows == 2
    c = txncheck.RowDigest(["a", "b", "c", "d", "X"])
    c.add_all(rows)
    assert c.digest() != a.digest()


# --------------------------------------------------------------------------- previews


def test_statements_see_their_own_writes_and_later_commits(node):
    t = Txn(node.sm)
    r, _ = t.run("UPDATE acct SET bal = bal - 10 WHERE id = 1")
    assert r.rowcount == 1
    assert t.run("SELECT bal FROM acct WHERE id = 1")[0].rows == [[90]]
    node.write("UPDATE acct SET bal = 0 WHERE id = 2")  # parks the transaction
    r, _ = t.run("SELECT id, bal FROM acct ORDER BY id")
    assert r.rows == [[1, 90], [2, 0], [3, 100]]  # its own write, and the commit since
    assert node.rows("SELECT bal FROM acct WHERE id = 1") == [[100]]  # nobody else sees it


def test_earlier_writes_are_not_run_again(node):
    """A write's random() is drawn once: parked and resumed as a changeset, later statements
    see the same value (replaying the SQL would draw a new one)."""
    node.write("CREATE TABLE r (v INTEGER)")
    t = Txn(node.sm)
    t.run("INSERT INTO r VALUES (random())")
    (v,), = t.run("SELECT v FROM r")[0].rows
    for i in range(3):
        node.write(f"UPDATE acct SET bal = {i} WHERE id = 3")  # parks it each time
        assert t.run("SELECT v FROM r")[0].rows == [[v]]
    other = Txn(node.sm, client_id="d")
    assert other.run("SELECT count(*) FROM r")[0].rows == [[0]]  # another transaction: parked
    assert t.run("SELECT v FROM r")[0].rows == [[v]]


def test_a_small_transaction_parks_without_a_changeset_and_replays_its_writes(node, monkeypatch):
    """Few fast writes, each with its env: parking keeps no changeset; resuming runs them
    again with the same env, so random() and 'now' give what the client saw."""
    # The first run of a statement includes compiling it: not "fast" on a loaded machine.
    monkeypatch.setattr("raftsql.server.transactions.REPLAY_MAX_SECONDS", 1.0)
    node.write("CREATE TABLE r (v INTEGER, t TEXT)")
    t = Txn(node.sm)
    t.run("INSERT INTO r VALUES (random(), datetime('now'))", env=(7, T0 - 5000))
    t.run("UPDATE acct SET bal = bal - 1 WHERE id = 1", env=(8, T0 - 5000))
    seen = t.run("SELECT v, t FROM r")[0].rows
    node.write("UPDATE acct SET bal = 50 WHERE id = 2")  # parks it
    assert t.state.changeset is None and len(t.state.writes) == 2
    assert t.run("SELECT v, t FROM r")[0].rows == seen
    assert t.run("SELECT bal FROM acct ORDER BY id")[0].rows == [[99], [50], [100]]
    other = Txn(node.sm, client_id="d")
    assert other.run("SELECT count(*) FROM r")[0].rows == [[0]]  # parks it again
    assert t.run("SELECT v, t FROM r")[0].rows == seen
    assert commit(node, t).error is None
    assert node.rows("SELECT v, t FROM r") == seen


@pytest.mark.parametrize("why", ["writes", "time", "env"])
def test_a_transaction_past_the_replay_bounds_parks_as_a_changeset(node, monkeypatch, why):
    from raftsql.server import transactions

    if why == "time":
        monkeypatch.setattr(transactions, "REPLAY_MAX_SECONDS", 0.0)
    t = Txn(node.sm)
    n = transactions.REPLAY_MAX_WRITES if why == "writes" else 1
    for i in range(n):
        t.run("UPDATE acct SET bal = bal + 1 WHERE id = 1", env=None if why == "env" else (i, T0))
    node.write("UPDATE acct SET bal = 50 WHERE id = 2")  # parks it
    assert t.state.changeset  # resumes from the changeset, not by running the writes again
    assert t.run("SELECT bal FROM acct ORDER BY id")[0].rows == [[100 + n], [50], [100]]


def test_triggers_do_not_fire_again_when_a_transaction_resumes(node):
    node.write("CREATE TABLE log (v)",
               "CREATE TRIGGER tr AFTER UPDATE ON acct BEGIN INSERT INTO log VALUES (new.bal); END")
    t = Txn(node.sm)
    t.run("UPDATE acct SET bal = 5 WHERE id = 1")
    node.write("UPDATE acct SET bal = 7 WHERE id = 2")
    assert t.run("SELECT v FROM log ORDER BY rowid")[0].rows == [[7], [5]]


def test_a_schema_change_in_a_transaction_is_replayed(node):
    t = Txn(node.sm)
    t.run("CREATE TABLE n (v)")
    t.run("INSERT INTO n VALUES (1)")
    node.write("UPDATE acct SET bal = 1 WHERE id = 1")  # parks it: no changeset holds DDL
    assert t.run("SELECT v FROM n")[0].rows == [[1]]
    assert commit(node, t).error is None
    assert node.rows("SELECT v FROM n") == [[1]]


def test_a_big_transaction_stops_recording_its_session_and_is_replayed(node, monkeypatch):
    # Deleting a session holds the GIL ~50 ns per row it recorded: past the cap it stops
    # recording (the delete stays short) and the transaction resumes by replay instead.
    monkeypatch.setattr("raftsql.server.statemachine.MAX_LIVE_SESSION_BYTES", 64 << 10)
    node.write("CREATE TABLE big (v)")
    t = Txn(node.sm)
    r, _ = t.run("INSERT INTO big WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 "
                 "FROM c WHERE x < 20000) SELECT x FROM c")
    assert r.rowcount == 20000
    assert t.state.no_changeset and not node.sm._live_session.enabled
    t.run("UPDATE acct SET bal = 1 WHERE id = 1")
    node.write("UPDATE acct SET bal = 7 WHERE id = 2")  # parks it: no changeset was kept
    assert t.state.changeset is None
    assert t.run("SELECT count(*), sum(v) FROM big")[0].rows == [[20000, 200010000]]
    assert t.run("SELECT bal FROM acct ORDER BY id")[0].rows == [[1], [7], [100]]
    assert commit(node, t).error is None
    assert node.rows("SELECT count(*) FROM big") == [[20000]]
    assert node.rows("SELECT bal FROM acct ORDER BY id") == [[1], [7], [100]]


def test_rollback_to_a_savepoint_rebuilds_from_the_writes_kept(node):
    t = Txn(node.sm)
    t.run("UPDATE acct SET bal = 1 WHERE id = 1")
    t.run("UPDATE acct SET bal = 2 WHERE id = 2")
    r, _ = t.run("SELECT bal FROM acct ORDER BY id", base=1)  # the client dropped the second
    assert r.rows == [[1], [100], [100]]
    with pytest.raises(TxnGone):
        node.sm.txn_preview(t.state, ("SELECT 1", ()), 5)  # more writes than the node knows


def test_a_statement_that_rolls_back_loses_the_transaction(node):
    t = Txn(node.sm)
    t.run("UPDATE acct SET bal = 1 WHERE id = 1")
    r, lost = t.run("INSERT OR ROLLBACK INTO acct VALUES (1, 5)")
    assert lost and r.error["name"].startswith("SQLITE_CONSTRAINT")
    with pytest.raises(TxnGone):
        node.sm.txn_get(t.state.id, 1)


def test_executemany_keeps_the_sets_before_a_failure(node):
    t = Txn(node.sm)
    r, _ = t.run("INSERT INTO acct VALUES (?, 0)", Many(((10,), (11,), (1,), (12,))))
    assert r.error["set"] == 2
    assert t.state.writes == [("INSERT INTO acct VALUES (?, 0)", Many(((10,), (11,))))]
    assert t.run("SELECT count(*) FROM acct")[0].rows == [[5]]


def test_state_is_per_term_and_one_per_client(node):
    t = Txn(node.sm)
    t.run("UPDATE acct SET bal = 1 WHERE id = 1")
    with pytest.raises(TxnGone):
        node.sm.txn_get(t.state.id, 2)  # another term: another leader's transaction
    t2 = Txn(node.sm)
    t2.run("UPDATE acct SET bal = 2 WHERE id = 1")
    t3 = Txn(node.sm)  # the same client starts another: its previous one is gone
    t3.run("UPDATE acct SET bal = 3 WHERE id = 1")
    with pytest.raises(TxnGone):
        node.sm.txn_get(t2.state.id, 1)
    assert t3.run("SELECT bal FROM acct WHERE id = 1")[0].rows == [[3]]


def test_idle_state_is_dropped_and_room_is_bounded(tmp_path):
    n = Node(tmp_path / "db.sqlite", txn_idle_timeout_ms=50)
    try:
        n.write("CREATE TABLE t (v)")
        old = Txn(n.sm, client_id="old")
        old.run("INSERT INTO t VALUES (1)")
        import time

        time.sleep(0.1)
        Txn(n.sm, client_id="new").run("INSERT INTO t VALUES (2)")
        with pytest.raises(TxnGone):
            n.sm.txn_get(old.state.id, 1)
        n.sm.open_txns.max_open = 2
        ts = [Txn(n.sm, client_id=f"c{i}") for i in range(4)]
        for t in ts:
            t.run("INSERT INTO t VALUES (3)")
        assert len(n.sm.open_txns) == 2
        with pytest.raises(TxnGone):
            n.sm.txn_get(ts[0].state.id, 1)
    finally:
        n.sm.close()


# --------------------------------------------------------------------------- commit


class Pair:
    """Two state machines fed the same entries: every result must be identical."""

    def __init__(self, tmp_path, **kw):
        self.a = Node(tmp_path / "a.sqlite", **kw)
        self.b = Node(tmp_path / "b.sqlite", **kw)

    def write(self, *sql):
        self.a.write(*sql)
        self.b.write(*sql)

    def commit(self, txn: Txn, **kw):
        ra, rb = commit(self.a, txn, **kw), commit(self.b, txn, **kw)
        assert ra.to_wire() == rb.to_wire()
        return ra

    def close(self):
        assert self.a.sm.content_hash() == self.b.sm.content_hash()
        self.a.sm.close()
        self.b.sm.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    p.write("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)",
            "INSERT INTO acct VALUES (1, 100), (2, 100), (3, 100)")
    yield p
    p.close()


def transfer(sm, src, dst, amount, client_id="c"):
    t = Txn(sm, client_id=client_id)
    (a,), = t.run("SELECT bal FROM acct WHERE id = ?", (src,))[0].rows
    (b,), = t.run("SELECT bal FROM acct WHERE id = ?", (dst,))[0].rows
    t.run("UPDATE acct SET bal = ? WHERE id = ?", (a - amount, src))
    t.run("UPDATE acct SET bal = ? WHERE id = ?", (b + amount, dst))
    return t


def test_commit_applies_when_what_was_read_still_holds(pair):
    t = transfer(pair.a.sm, 1, 2, 10)
    pair.write("UPDATE acct SET bal = 7 WHERE id = 3")  # a row it did not read
    r = pair.commit(t)
    assert r.error is None and [x.rowcount for x in r.results] == [-1, -1, 1, 1]
    assert pair.a.rows("SELECT bal FROM acct ORDER BY id") == [[90], [110], [7]]


def test_commit_fails_when_a_row_read_changed_and_applies_nothing(pair):
    t = transfer(pair.a.sm, 1, 2, 10)
    pair.write("UPDATE acct SET bal = 50 WHERE id = 2")
    r = pair.commit(t)
    assert r.error["name"] == "RAFTSQL_SERIALIZATION" and r.error["code"] == 517
    assert r.error["statement"] == 1 and "different rows" in r.error["message"]
    assert pair.a.rows("SELECT bal FROM acct ORDER BY id") == [[100], [50], [100]]
    again = pair.commit(t)  # a resend (same client and serial): the stored outcome
    assert again.duplicate and again.error == r.error


@pytest.mark.parametrize("change, what", [
    ("DELETE FROM acct WHERE id = 3", "changed 1 row(s) and now changes 0"),
    ("INSERT INTO acct VALUES (9, 1)", "to fail"),
])
def test_rowcounts_and_errors_are_part_of_what_was_seen(pair, change, what):
    t = Txn(pair.a.sm)
    t.run("UPDATE acct SET bal = 0 WHERE id = 3")
    t.run("INSERT INTO acct VALUES (9, 9)") if "to fail" not in what else None
    if "to fail" in what:
        r, _ = t.run("INSERT INTO acct VALUES (1, 9)")  # fails: id 1 exists
        assert r.error is not None
        pair.write("DELETE FROM acct WHERE id = 1")  # now it would succeed
        r = pair.commit(t)
        assert "now succeeds" in r.error["message"]
    else:
        pair.write(change)
        r = pair.commit(t)
        assert what in r.error["message"]
    assert r.error["name"] == "RAFTSQL_SERIALIZATION"


def test_a_failed_statement_fails_the_same_way_and_is_rolled_back(pair):
    pair.write("CREATE TABLE u (v UNIQUE)", "INSERT INTO u VALUES (1)")
    t = Txn(pair.a.sm)
    t.run("INSERT INTO u VALUES (2)")
    r, _ = t.run("INSERT INTO u VALUES (1), (3)")  # fails, as a whole
    assert r.error["name"] == "SQLITE_CONSTRAINT_UNIQUE"
    t.run("INSERT INTO u VALUES (4)")
    assert pair.commit(t).error is None
    assert pair.a.rows("SELECT v FROM u ORDER BY v") == [[1], [2], [4]]


def test_a_write_that_now_fails_fails_the_commit_as_a_conflict_naming_its_error(pair):
    """The client saw the INSERT succeed; another client took the key since: a conflict to
    retry (the retry sees the key), not the IntegrityError, which retry loops let through."""
    pair.write("CREATE TABLE u (v UNIQUE)")
    t = Txn(pair.a.sm)
    t.run("INSERT INTO u VALUES (1)")
    pair.write("INSERT INTO u VALUES (1)")
    r = pair.commit(t)
    assert r.error["name"] == "RAFTSQL_SERIALIZATION" and r.error["statement"] == 0
    assert "succeeded and now fails (UNIQUE constraint failed: u.v)" in r.error["message"]


def test_blind_writes_rerun_on_the_newest_state(pair):
    """A write that shows nothing of what it read is re-run by the commit: no lost update."""
    t = Txn(pair.a.sm)
    t.run("UPDATE acct SET bal = bal + 1 WHERE id = 1")
    pair.write("UPDATE acct SET bal = bal + 10 WHERE id = 1")
    assert pair.commit(t).error is None
    assert pair.a.rows("SELECT bal FROM acct WHERE id = 1") == [[111]]


def test_savepoint_controls_replay_reads_where_they_ran(pair):
    t = Txn(pair.a.sm)
    t.controls.append((0, txncheck.SAVEPOINT, 0))
    t.run("DELETE FROM acct WHERE id = 1")
    t.run("SELECT count(*) FROM acct")  # saw 2 rows
    t.controls.append((2, txncheck.ROLLBACK_TO, 0))
    t.run("SELECT count(*) FROM acct", base=0)  # after the rollback: 3 rows
    t.run("UPDATE acct SET bal = 1 WHERE id = 2")
    t.controls.append((4, txncheck.RELEASE, 0))
    r = pair.commit(t)
    assert r.error is None
    assert pair.a.rows("SELECT id, bal FROM acct ORDER BY id") == [[1, 100], [2, 1], [3, 100]]


def test_a_partly_read_result_is_compared_on_what_was_read(pair):
    d = txncheck.RowDigest(["id"])
    d.add([1])
    statements = [("SELECT id FROM acct ORDER BY id", ()), ("UPDATE acct SET bal = 0 WHERE id = 3", ())]
    ok_upd = txncheck.ok_check(1, txncheck.RowDigest([]), True, None)

    def cmd(complete, serial):
        return Command(kind=CommandKind.TXN, client_id="p", serial=serial, last_ms=T0,
                       leader_time_ms=T0, seed=1, statements=statements,
                       checks=[txncheck.ok_check(-1, d, complete, None), ok_upd])

    for node in (pair.a, pair.b):
        node.index += 1
        assert node.sm.apply(node.index, cmd(True, 1).encode()).error["name"] == "RAFTSQL_SERIALIZATION"
    for node in (pair.a, pair.b):
        node.index += 1
        assert node.sm.apply(node.index, cmd(False, 2).encode()).error is None


def test_idle_transaction_cannot_commit(tmp_path):
    p = Pair(tmp_path, txn_idle_timeout_ms=1000)
    try:
        p.write("CREATE TABLE t (v)")
        t = Txn(p.a.sm)
        t.run("INSERT INTO t VALUES (1)")
        assert p.commit(t, last_ms=T0, t=T0 + 1001).error["name"] == "RAFTSQL_TXN_TIMEOUT"
        assert p.commit(t, serial=2, last_ms=T0 + 1001, t=T0 + 2001).error is None
    finally:
        p.close()


def test_broken_validation_hook_applies_what_it_should_refuse(tmp_path):
    n = Node(tmp_path / "db.sqlite", broken_txn_validation=True)
    try:
        n.write("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)",
                "INSERT INTO acct VALUES (1, 100), (2, 100)")
        t = transfer(n.sm, 1, 2, 10)
        n.write("UPDATE acct SET bal = 50 WHERE id = 2")
        assert commit(n, t).error is None  # a lost update
        assert n.rows("SELECT bal FROM acct ORDER BY id") == [[90], [110]]
    finally:
        n.sm.close()


# --------------------------------------------------------------------------- randomness and time


def test_random_and_now_the_client_saw_are_reproduced_by_the_commit(pair):
    """random(), randomblob() defaults and 'now' run with the leader's (seed, now_ms), which the
    client echoes in each statement's check: the commit gives the same values on every node."""
    pair.write("CREATE TABLE t (id INTEGER PRIMARY KEY, u BLOB DEFAULT (randomblob(8)), "
               "ts TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')))")
    t = Txn(pair.a.sm)
    (r,), = t.run("SELECT random()", env=(11, T0 - 500))[0].rows
    row = t.run("INSERT INTO t (id) VALUES (1) RETURNING u, ts", env=(12, T0 - 400))[0].rows[0]
    (now,), = t.run("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')", env=(13, T0 - 300))[0].rows
    assert now.endswith(".700") and row[1].endswith(".600")
    assert pair.commit(t, t=T0).error is None
    for n in (pair.a, pair.b):
        assert [tuple(x) for x in n.rows("SELECT u, ts FROM t")] == [tuple(row)]
    t2 = Txn(pair.a.sm, client_id="d")
    assert t2.run("SELECT random()", env=(11, T0))[0].rows == [[r]]  # same seed, same value


def test_a_statement_clock_outside_the_transaction_window_is_clamped(pair):
    """A check's now_ms later than the commit entry's time (or earlier than the transaction can
    have been open) is clamped on every node: 'now' then differs and the commit fails."""
    t = Txn(pair.a.sm)
    t.run("SELECT strftime('%s', 'now') * 1000", env=(1, T0 + 3_600_000))
    t.run("UPDATE acct SET bal = 0 WHERE id = 1", env=(2, T0))
    r = pair.commit(t, t=T0)
    assert r.error and r.error["name"] == "RAFTSQL_SERIALIZATION", r.error
    assert pair.a.rows("SELECT bal FROM acct WHERE id = 1") == [[100]]


def test_a_check_without_env_is_accepted():
    d = txncheck.RowDigest(["x"])
    six = txncheck.ok_check(1, d, True, None)[:6]
    assert txncheck.normalize_check(0, six) == (*six, None)
    assert txncheck.normalize_check(0, [*six, [5, 7]]) == (*six, (5, 7))
    with pytest.raises(ValueError, match="env"):
        txncheck.normalize_check(0, [*six, [-1, 7]])


def test_one_certificate_past_its_share_makes_room_from_its_own_transactions(tmp_path):
    """Open transactions are bounded per leader (count and bytes); one certificate may hold a
    quarter of each. A certificate opening more drops its own least recently used ones, not
    another client's (a write client opening 1,024 used to abort every other transaction)."""
    from raftsql.server.transactions import OpenTransactions, PreviewTxn

    box = OpenTransactions(max_open=16, max_bytes=1 << 20)
    assert box.max_open_per_owner == 4
    honest = PreviewTxn(id="h", client_id="h", term=1, owner="honest")
    box.add(honest)
    dropped = []
    for k in range(40):
        txn = PreviewTxn(id=f"e{k}", client_id=f"e{k}", term=1, owner="evil")
        box.add(txn)
        for victim in box.victims(txn, idle_s=60):
            box.remove(victim)
            dropped.append(victim.id)
    assert box.get("h") is honest and "h" not in dropped
    assert len(box) == 1 + 4 and dropped[:3] == ["e0", "e1", "e2"]
    # Bytes too: a certificate's transactions past a quarter of the byte bound.
    big = PreviewTxn(id="b", client_id="b", term=1, owner="evil")
    box.add(big)
    big.writes_size = 300_000
    box.resize(big)
    for victim in box.victims(big, idle_s=60):
        box.remove(victim)
    assert box.get("h") is honest and box.get("b") is big
    assert [t.id for t in box if t.owner == "evil"] == ["b"]
    # In-process callers (no certificate) share the global bounds only, as before.
    anon = OpenTransactions(max_open=16, max_bytes=1 << 20)
    for k in range(16):
        anon.add(PreviewTxn(id=f"a{k}", client_id=f"a{k}", term=1))
    assert anon.victims(None, idle_s=60) == []
