"""Version 2 transaction commits in the state machine (entries written before version 5):
per-table "last modified at" bookkeeping on apply, read sets collected by readers, and the table
commit check of TXN entries (deterministic on every node, stored in the session row so a resend
gets the same outcome). Version 5 commits and previews: test_txn_checks.py."""

import pytest

from raftsql.command import Command, CommandError, CommandKind
from raftsql.server.statemachine import SCHEMA, StateMachine

T0 = 1_700_000_000_000


def write(*sql, t=T0, client_id="", serial=0):
    return Command(client_id=client_id, serial=serial, statements=[(s, ()) for s in sql],
                   leader_time_ms=t, seed=1).encode()


def commit(*sql, read_index, reads, last_ms=T0, t=T0, client_id="c", serial=1):
    return Command(kind=CommandKind.TXN, client_id=client_id, serial=serial,
                   statements=[(s, ()) for s in sql], leader_time_ms=t, seed=1,
                   read_index=read_index, read_set=reads, last_ms=last_ms).encode()


class Pair:
    """Two machines fed the same entries; every result must be identical."""

    def __init__(self, tmp_path, **kw):
        self.a = StateMachine(str(tmp_path / "a.sqlite"), **kw)
        self.b = StateMachine(str(tmp_path / "b.sqlite"), **kw)
        self.index = 0

    def apply(self, data):
        self.index += 1
        ra, rb = self.a.apply(self.index, data), self.b.apply(self.index, data)
        assert ra.to_wire() == rb.to_wire()
        return ra

    def close(self):
        assert self.a.content_hash() == self.b.content_hash()
        self.a.close()
        self.b.close()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def modified(sm, name):
    rows = sm.query("SELECT modified_index FROM sqlite_raftsql_tables WHERE name = ?", (name,)).rows
    return rows[0][0] if rows else None


def test_command_txn_round_trip_and_version():
    c = Command(kind=CommandKind.TXN, client_id="c", serial=2, statements=[("x", ())],
                read_index=5, read_set=["b", "a", "b"], last_ms=9)
    assert c.version == 2 and c.read_set == ("a", "b")
    assert Command.decode(c.encode()) == c
    w = Command(statements=[("x", ())])
    assert w.version == 1 and len(w.encode()) < len(c.encode())
    with pytest.raises(CommandError, match="belong to TXN"):
        Command(statements=[("x", ())], read_index=3)
    with pytest.raises(CommandError, match="unsupported command version"):
        Command(kind=CommandKind.TXN, version=1)


def test_apply_records_the_last_index_that_wrote_each_table_including_trigger_effects(pair):
    pair.apply(write("CREATE TABLE t (id INTEGER PRIMARY KEY, v)", "CREATE TABLE log (v)",
                     "CREATE TABLE w (k PRIMARY KEY, v) WITHOUT ROWID",
                     "CREATE TRIGGER tr AFTER UPDATE ON t BEGIN INSERT INTO log VALUES (new.v); END"))
    assert modified(pair.a, SCHEMA) == 1
    pair.apply(write("INSERT INTO t (v) VALUES (1)"))
    assert modified(pair.a, "t") == 2 and modified(pair.a, "log") is None
    pair.apply(write("UPDATE T SET v = 2"))  # the trigger writes log; names are lower case
    assert modified(pair.a, "t") == 3 and modified(pair.a, "log") == 3
    pair.apply(write("INSERT INTO w VALUES (1, 1)"))  # WITHOUT ROWID: no update hook, still seen
    assert modified(pair.a, "w") == 4
    pair.apply(write("INSERT INTO t (v) VALUES (1)", "INSERT INTO nope VALUES (1)"))  # fails
    assert modified(pair.a, "t") == 3  # a failed entry changed nothing, not even the bookkeeping
    pair.apply(write("SELECT * FROM t"))  # reads write nothing
    assert modified(pair.a, "t") == 3
    pair.apply(write("PRAGMA user_version = 7"))
    assert modified(pair.a, SCHEMA) == 7


def test_commit_applies_when_nothing_read_changed_and_fails_when_something_did(pair):
    pair.apply(write("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal)", "CREATE TABLE other (x)",
                     "INSERT INTO acct VALUES (1, 100), (2, 100)"))  # index 1
    pair.apply(write("INSERT INTO other VALUES (1)"))  # index 2: not in the read set
    ok = pair.apply(commit("UPDATE acct SET bal = 90 WHERE id = 1",
                           "UPDATE acct SET bal = 110 WHERE id = 2",
                           read_index=1, reads=["acct"], serial=1))  # index 3
    assert ok.error is None and modified(pair.a, "acct") == 3
    # A second transaction that read acct at index 2 lost the race: nothing is applied.
    lost = pair.apply(commit("UPDATE acct SET bal = 0 WHERE id = 1", read_index=2,
                             reads=["acct"], client_id="d", serial=1))  # index 4
    assert lost.error["name"] == "RAFTSQL_SERIALIZATION" and lost.error["code"] == 517
    assert "table acct was modified at log index 3" in lost.error["message"]
    assert pair.a.query("SELECT bal FROM acct ORDER BY id").rows == [[90], [110]]
    assert modified(pair.a, "acct") == 3
    # Exactly once: the resend (same client, same serial) gets the stored outcome, even
    # though by now the check would pass (read_index 4 is after every write to acct).
    again = pair.apply(commit("UPDATE acct SET bal = 0 WHERE id = 1", read_index=2,
                              reads=["acct"], client_id="d", serial=1))
    assert again.duplicate and again.error == lost.error
    assert pair.a.query("SELECT bal FROM acct WHERE id = 1").rows == [[90]]


def test_write_only_transaction_never_conflicts_but_a_schema_change_fails_readers(pair):
    pair.apply(write("CREATE TABLE t (v)"))  # 1
    pair.apply(write("INSERT INTO t VALUES (1)"))  # 2
    blind = pair.apply(commit("INSERT INTO t VALUES (2)", read_index=1, reads=[]))  # 3
    assert blind.error is None
    pair.apply(write("CREATE INDEX i ON t (v)"))  # 4: changes the schema
    # A reader of some other table still conflicts: every non-empty read set includes the schema.
    pair.apply(write("CREATE TABLE u (v)"))  # 5
    r = pair.apply(commit("INSERT INTO u VALUES (1)", read_index=3, reads=["x"], serial=2))
    assert r.error["name"] == "RAFTSQL_SERIALIZATION" and "the schema" in r.error["message"]


def test_idle_transaction_cannot_commit(tmp_path):
    p = Pair(tmp_path, txn_idle_timeout_ms=1000)
    try:
        p.apply(write("CREATE TABLE t (v)"))
        r = p.apply(commit("INSERT INTO t VALUES (1)", read_index=1, reads=["t"],
                           last_ms=T0, t=T0 + 1001))
        assert r.error["name"] == "RAFTSQL_TXN_TIMEOUT"
        r = p.apply(commit("INSERT INTO t VALUES (1)", read_index=1, reads=["t"],
                           last_ms=T0 + 1001, t=T0 + 2001, serial=2))
        assert r.error is None
        assert p.a.query("SELECT count(*) FROM t").rows == [[1]]
    finally:
        p.close()


def test_readers_collect_read_sets_and_detect_table_conflicts(tmp_path):
    """The table read sets of version 2 commits, as a reader connection collects them."""
    sm = StateMachine(str(tmp_path / "db.sqlite"))
    try:
        sm.apply(1, write("CREATE TABLE a (id INTEGER PRIMARY KEY, v)", "CREATE TABLE b (v)",
                          "CREATE VIEW av AS SELECT v FROM a", "INSERT INTO a VALUES (1, 1)"))
        for sql, expected in [
            ("SELECT v FROM av", {"a", "av"}),
            ("SELECT count(*) FROM b", {"b"}),
            ("PRAGMA user_version", {SCHEMA}),
        ]:
            # Twice: the second run must not come from a statement cache that skips the
            # authorizer (which is what records the reads).
            for _ in range(2):
                seen: set[str] = set()
                assert sm.query(sql, (), reads=seen).error is None and seen == expected
        sm.apply(2, write("UPDATE b SET v = 2"))
        res = sm.query("SELECT * FROM b", start_index=1, reads=set())
        assert res.error["name"] == "RAFTSQL_SERIALIZATION"
        res = sm.query("SELECT * FROM b", start_index=2, reads=set())
        assert res.error is None
    finally:
        sm.close()
