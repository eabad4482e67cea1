"""Who may do what (server/access.py), the records the state machine keeps for it
(server/records.py: audit trail, deny list), the membership change context that names who
asked, revocation targets, ADMIN commands and the metrics' histograms. One layer each; the
real-cluster tests are tests/cluster/test_access.py, test_revocation.py and test_metrics.py."""

from __future__ import annotations

import json
import logging

import pytest

from raftsql.command import Command, CommandError, CommandKind
from raftsql.driver._admin import AdminError, revocation_target
from raftsql.protocol import ErrorKind, RequestError
from raftsql.raft.types import ConfChange, ConfChangeType
from raftsql.server import metrics
from raftsql.server.access import Principal
from raftsql.server.membership import change_context, member_change
from raftsql.server.records import MemberChange, valid_target
from raftsql.server.statemachine import StateMachine

T0 = 1_700_000_000_000


def client(role: str | None, name: str = "app") -> Principal:
    return Principal("client", role, name, "abc123")


# --------------------------------------------------------------------------- access


@pytest.mark.parametrize("op,needed", [
    ("execute", "read"), ("fetch", "read"), ("status", "read"), ("ping", "read"), ("trace", "read"),
    ("hash", "admin"), ("cluster_add", "admin"), ("cluster_promote", "admin"),
    ("cluster_remove", "admin"), ("backup_begin", "admin"), ("backup_read", "admin"),
    ("restore_begin", "admin"), ("revoke", "admin"),
])
def test_each_request_needs_a_role(op, needed):
    order = ["read", "write", "admin"]
    for role in order:
        who = client(role)
        if order.index(role) >= order.index(needed):
            who.check(op)
        else:
            with pytest.raises(RequestError) as info:
                who.check(op)
            assert info.value.kind == ErrorKind.FORBIDDEN
            assert f"client 'app' (role {role})" in info.value.message
            assert f"it needs the {needed} role" in info.value.message


def test_every_request_of_the_protocol_has_a_decision_and_a_new_one_is_for_admins_only():
    from raftsql.protocol import ADMIN_OPS, SIMPLE_OPS, CloseCursor, Execute, Fetch
    from raftsql.server.access import NEEDS, NODE_OPS

    ops = {*SIMPLE_OPS, *ADMIN_OPS, Execute.OP, Fetch.OP, CloseCursor.OP}
    assert ops - NEEDS.keys() - NODE_OPS == set()
    # A request the protocol might gain later, before anyone decides who may send it.
    for role in ("read", "write"):
        with pytest.raises(RequestError, match="may not run future_op: it needs the admin role"):
            client(role).check("future_op")
    client("admin").check("future_op")


def test_only_a_node_certificate_joins_or_forwards_audit_records_and_it_sends_no_sql():
    node = Principal("node", None, "n2", "ff")
    for op in ("status", "ping", "cluster_join", "audit"):
        node.check(op)
    for op in ("execute", "hash", "backup_begin", "revoke", "cluster_remove"):
        with pytest.raises(RequestError, match="node certificates are for Raft traffic"):
            node.check(op)
    for op in ("cluster_join", "audit"):
        with pytest.raises(RequestError, match="only a node's own certificate may"):
            client("admin").check(op)


def test_no_certificate_no_privileges():
    nobody = Principal.of(None)
    with pytest.raises(RequestError) as info:
        nobody.check("status")
    assert info.value.kind == ErrorKind.FORBIDDEN
    conflicting = client(None)  # a certificate with conflicting client roles
    with pytest.raises(RequestError):
        conflicting.check("execute")
    assert conflicting.refuse_write([("INSERT INTO t VALUES (1)", ())]) is not None


def test_refuse_write_names_the_statement_and_the_role():
    assert client("write").refuse_write([("INSERT INTO t VALUES (1)", ())]) is None
    assert client("admin").refuse_write([("DELETE FROM t", ())]) is None
    err = client("read", "reports").refuse_write([("INSERT   INTO t\nVALUES (1)", ()), ("x", ())])
    assert err.kind == ErrorKind.FORBIDDEN
    assert err.message == ("permission denied: client 'reports' (role read) may not write: "
                           "'INSERT INTO t VALUES (1)' (and 1 more) needs the write role; "
                           "nothing was applied")
    long = client("read").refuse_write([("UPDATE t SET v = '" + "x" * 200 + "'", ())])
    assert "..." in long.message and len(long.message) < 200


def test_the_principal_comes_from_the_connection():
    class Conn:
        role, client_role, peer_name, peer_serial = "client", "read", "r1", "1f"

    who = Principal.of(Conn())
    assert (who.kind, who.role, who.name, who.serial) == ("client", "read", "r1", "1f")
    assert who.audit() == {"by": "r1", "by_serial": "1f"}

    class NodeConn(Conn):
        role, client_role = "node", "admin"  # a client role on a node certificate means nothing

    assert Principal.of(NodeConn()).role is None


# --------------------------------------------------------------------------- revocation targets


@pytest.mark.parametrize("text,target", [
    ("alice", "name:alice"),
    ("deadbeef", "name:deadbeef"),  # too short for a serial: a name
    ("2A:7f:00:00:00:00:00:01:9c", "serial:2a7f0000000000019c"),
    ("000000000000000000001f", "serial:1f"),
    ("name:0123456789abcdef0123", "name:0123456789abcdef0123"),
    ("serial:1F", "serial:1f"),
])
def test_revocation_targets(text, target):
    assert revocation_target(text) == target
    assert valid_target(target)


@pytest.mark.parametrize("text", ["", "serial:xyz", "serial:0", "name:" + "a" * 65])
def test_bad_revocation_targets(text):
    with pytest.raises(AdminError):
        revocation_target(text)


def test_valid_targets_are_canonical():
    assert not valid_target("serial:01")
    assert not valid_target("serial:AB")
    assert not valid_target("cn:alice")
    assert not valid_target(None)


# --------------------------------------------------------------------------- ADMIN commands


def test_admin_commands_round_trip_and_are_checked():
    cmd = Command(kind=CommandKind.ADMIN, leader_time_ms=T0, seed=3,
                  record={"op": "revoke", "by": "admin", "by_serial": "ab", "target": "name:x",
                          "n": 7, "none": None})
    assert cmd.version == 4
    assert Command.decode(cmd.encode()) == cmd
    for record, why in [(None, "must be a map"), ({"by": "x"}, "needs an 'op'"),
                        ({"op": "x", "v": 1.5}, "must be str, int or nil"),
                        ({"op": "x", "v": "y" * 5000}, "over 4096 characters")]:
        with pytest.raises(CommandError, match=why):
            Command(kind=CommandKind.ADMIN, record=record)
    with pytest.raises(CommandError, match="no statements"):
        Command(kind=CommandKind.ADMIN, record={"op": "x"}, statements=[("SELECT 1", ())])
    with pytest.raises(CommandError, match="belongs to ADMIN"):
        Command(statements=[("SELECT 1", ())], record={"op": "x"})


# --------------------------------------------------------------------------- membership context


def test_a_change_context_names_who_asked_and_old_contexts_still_read():
    audit = {"op": "cluster_add", "by": "admin", "by_serial": "ab", "ignored": 1}
    cc = ConfChange(ConfChangeType.ADD_LEARNER, "n4", change_context("10.0.0.4:4001", audit))
    assert member_change(cc) == MemberChange(
        "n4", address="10.0.0.4:4001", audit={"op": "cluster_add", "by": "admin", "by_serial": "ab"})
    old = ConfChange(ConfChangeType.ADD_LEARNER, "n4", b"10.0.0.4:4001")  # before the audit trail
    assert member_change(old) == MemberChange("n4", address="10.0.0.4:4001")
    assert change_context("10.0.0.4:4001", None) == b"10.0.0.4:4001"
    rm = ConfChange(ConfChangeType.REMOVE, "n2", change_context(None, {"op": "cluster_remove", "by": "a"}))
    assert member_change(rm) == MemberChange("n2", removed=True,
                                             audit={"op": "cluster_remove", "by": "a"})


@pytest.mark.parametrize("context", [b"garbage", b"\x81\xa7address\xa3bad", b"\x82\xc1", b"\xff\xfe"])
def test_a_malformed_change_context_is_ignored(context):
    mc = member_change(ConfChange(ConfChangeType.ADD_LEARNER, "n4", context))
    assert mc.address is None


# --------------------------------------------------------------------------- records


def admin_entry(record, t=T0):
    return Command(kind=CommandKind.ADMIN, leader_time_ms=t, seed=1, record=record).encode()


def test_revocations_and_audit_records_are_applied_alike_everywhere_and_reloaded(tmp_path, caplog):
    seen = []
    machines = [StateMachine(str(tmp_path / f"{n}.sqlite"), on_admin=lambda sm, e: seen.append(e))
                for n in ("a", "b")]
    try:
        entries = [
            (1, admin_entry({"op": "revoke", "by": "admin", "by_serial": "ab", "target": "name:leaky"})),
            (2, MemberChange("n4", address="10.0.0.4:1", audit={"op": "cluster_add", "by": "admin",
                                                                 "by_serial": "ab"})),
            (3, admin_entry({"op": "backup", "by": "admin", "by_serial": "ab", "node": "n2"}, T0 + 5)),
            (4, admin_entry({"op": "revoke", "by": "admin", "by_serial": "ab", "target": "name:leaky"})),
            (5, admin_entry({"op": "revoke", "by": "x", "target": "bogus"})),
        ]
        with caplog.at_level(logging.INFO, logger="raftsql.audit"):
            results = [sm.apply_many(entries) for sm in machines]
        assert [r.rowcount for r in results[0] if r is not None] == [1, 0, 0, 0]  # revoked once
        assert results[0] == results[1]
        assert machines[0].content_hash() == machines[1].content_hash()
        for sm in machines:
            assert sm.records.revoked == frozenset({"name:leaky"})
            assert sm.records.is_revoked("leaky", "1") and sm.records.is_revoked("x", None) is False
            assert sm.records.revocations() == [{"target": "name:leaky", "index": 1, "time_ms": T0,
                                                 "by": "admin", "by_serial": "ab"}]
        ops = [r[0] for r in machines[0].query("SELECT operation FROM sqlite_raftsql_audit "
                                               "ORDER BY entry_index").rows]
        assert ops == ["revoke", "cluster_add", "backup", "revoke", "revoke"]
        lines = [r.getMessage() for r in caplog.records if r.name == "raftsql.audit"]
        assert "audit: index=2 op=cluster_add by=admin serial=ab address=10.0.0.4:1 node_id=n4" in lines
        assert len(lines) == 10  # five records, logged once by each machine
        assert [len(e) for e in seen] == [0, 0, 5, 5]  # opened (deny list read), then applied
        path = machines[0].path
        machines[0].close()
        again = StateMachine(path, on_admin=lambda sm, e: seen.append(e))
        machines[0] = again
        assert again.records.revoked == frozenset({"name:leaky"})
        assert again.apply_many(entries) == [None] * 5  # a replay applies (and logs) nothing
    finally:
        for sm in machines:
            sm.close()


def test_users_cannot_write_the_deny_list_or_the_audit_trail(tmp_path):
    sm = StateMachine(str(tmp_path / "db.sqlite"))
    try:
        for index, sql in enumerate(("INSERT INTO sqlite_raftsql_revoked VALUES ('name:x', 1, 1, NULL, NULL)",
                                     "DELETE FROM sqlite_raftsql_audit"), 1):
            r = sm.apply(index, Command(statements=[(sql, ())], leader_time_ms=T0, seed=1).encode())
            assert r.error is not None and "internal to raftsql and cannot be modified" in r.error["message"]
        assert sm.records.revoked == frozenset()
    finally:
        sm.close()


# --------------------------------------------------------------------------- metrics


def test_histogram_buckets_sum_and_summary():
    h = metrics.Histogram("t_seconds", "test", (0.001, 0.01, 0.1))
    assert h.summary() == {"count": 0, "mean_s": None, "p50_le_s": None, "p99_le_s": None}
    for v in (0.0005, 0.001, 0.002, 0.05, 5.0):
        h.observe(v)
    cumulative, total, count = h.snapshot()
    assert cumulative == [(0.001, 2), (0.01, 3), (0.1, 4), (float("inf"), 5)]
    assert count == 5 and total == pytest.approx(5.0535)
    s = h.summary()
    # Past the top bucket: no +Inf (not JSON), the top bound as "above" instead.
    assert s["p50_le_s"] == 0.01 and s["p99_le_s"] is None and s["p99_above_s"] == 0.1
    json.dumps(s, allow_nan=False)


def test_counters_and_leader_changes():
    before = metrics.LEADER_CHANGES.value
    metrics.leader_changed(None, "n1")
    metrics.leader_changed("n1", "n1")
    metrics.leader_changed("n1", None)
    metrics.leader_changed(None, "n2")
    assert metrics.LEADER_CHANGES.value == before + 2
    c = metrics.LabeledCounter("x_total", "test", "reason")
    c.inc("revoked")
    c.inc("revoked", 2)
    assert c.values() == {"revoked": 3}
