"""Membership and backup pieces without a cluster: the membership file, the address book, the
--join setting, and the CLI's help and argument errors."""

import json

import pytest
from click.testing import CliRunner

from raftsql.cli import main
from raftsql.raft.types import ConfChange, ConfChangeType, Entry, EntryType
from raftsql.server import admin, membership
from raftsql.server.config import ConfigError, NodeConfig, load


def test_membership_file_round_trip_and_validation(tmp_path):
    assert membership.read_membership(str(tmp_path)) is None
    membership.write_membership(str(tmp_path), ["n2", "n1"], {"n1": "h:1", "n2": "h:2"})
    doc = membership.read_membership(str(tmp_path))
    assert doc["bootstrap_voters"] == ["n1", "n2"] and doc["addresses"] == {"n1": "h:1", "n2": "h:2"}
    (tmp_path / membership.MEMBERSHIP_FILE).write_text(json.dumps({"version": 1, "bootstrap_voters": []}))
    with pytest.raises(ValueError, match="malformed"):
        membership.read_membership(str(tmp_path))


def _cfg(tmp_path, nid="n1", peers=None):
    peers = {"n2": ("h", 2), "n3": ("h", 3)} if peers is None else peers
    return NodeConfig(id=nid, data_dir=str(tmp_path), listen=("h", 1), peers=peers, certs_dir=str(tmp_path))


def test_address_book_follows_changes_and_ignores_garbage(tmp_path):
    m = membership.Membership(_cfg(tmp_path, peers={}), ("n1",), {"n1": "h:1"})
    assert m.record(ConfChange(ConfChangeType.ADD_LEARNER, "n2", b"h:2"))
    assert not m.record(ConfChange(ConfChangeType.PROMOTE, "n2"))  # keeps the address
    assert not m.record(ConfChange(ConfChangeType.ADD_LEARNER, "n3", b"\xff not an address"))
    assert m.book == {"n1": "h:1", "n2": "h:2"}
    assert m.record(ConfChange(ConfChangeType.REMOVE, "n1"))
    assert m.book == {"n2": "h:2"}
    # What the transport is told: dial a new member, forget a removed one.
    assert m.apply(ConfChange(ConfChangeType.ADD_LEARNER, "n4", b"h:4")) == ("add", "n4", ("h", 4))
    assert m.apply(ConfChange(ConfChangeType.REMOVE, "n4")) == ("remove", "n4", None)


def test_first_start_records_the_bootstrap_voters_and_later_starts_keep_them(tmp_path):
    cfg = _cfg(tmp_path)
    membership.Membership.open(cfg, {}, [], 0)
    assert cfg.voters() == ("n1", "n2", "n3")
    # Restarted with one more --peer (say, an operator listing a node added later): the
    # bootstrap voters do not change, so the log replays onto the same base.
    cfg = _cfg(tmp_path, peers={"n2": ("h", 2), "n3": ("h", 3), "n4": ("h", 4)})
    membership.Membership.open(cfg, {}, [], 0)
    assert cfg.voters() == ("n1", "n2", "n3")


def test_a_first_start_that_never_ran_is_bootstrapped_again_from_the_peer_list(tmp_path):
    """A first start without --peer that failed before the node ran (its port was taken) left
    a one-node membership file; the corrected start with --peer uses the --peer list."""
    membership.Membership.open(_cfg(tmp_path, peers={}), {}, [], 0)
    cfg = _cfg(tmp_path)
    membership.Membership.open(cfg, {}, [], 0, pristine=True)
    assert cfg.voters() == ("n1", "n2", "n3")
    assert membership.read_membership(str(tmp_path))["bootstrap_voters"] == ["n1", "n2", "n3"]


def test_a_one_node_cluster_started_with_peers_it_never_had_is_refused(tmp_path):
    """Once it ran, a one-node cluster started with --peer naming strangers would elect itself
    alone beside the cluster the operator meant (split brain): refused, saying what to do."""
    membership.Membership.open(_cfg(tmp_path, peers={}), {}, [], 0)
    with pytest.raises(membership.MembershipMismatch, match="one-node cluster of n1.*n2, n3"):
        membership.Membership.open(_cfg(tmp_path), {}, [], 5)
    # Grown with `cluster add` (n2 and n3 are members now): the same --peer list is fine.
    add2 = Entry(1, 2, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_LEARNER, "n2", b"h:2").encode())
    add3 = Entry(1, 3, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_LEARNER, "n3", b"h:3").encode())
    cfg = _cfg(tmp_path)
    membership.Membership.open(cfg, {}, [Entry(1, 1), add2, add3], 3)
    assert cfg.voters() == ("n1",)  # the base the log's changes apply to


def test_a_data_directory_started_under_another_node_id_is_refused(tmp_path):
    membership.Membership.open(_cfg(tmp_path, nid="n2", peers={"n1": ("h", 1), "n3": ("h", 3)}), {}, [], 0)
    assert membership.read_membership(str(tmp_path))["node_id"] == "n2"
    with pytest.raises(membership.MembershipMismatch, match="holds the state of node n2, not of n1"):
        membership.Membership.open(_cfg(tmp_path), {}, [], 4)


def test_applied_changes_missing_from_the_book_are_recovered_from_the_log(tmp_path):
    cfg = _cfg(tmp_path)
    add4 = Entry(1, 2, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_LEARNER, "n4", b"h:4").encode())
    add5 = Entry(1, 3, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_LEARNER, "n5", b"h:5").encode())
    m = membership.Membership.open(cfg, {}, [Entry(1, 1), add4, add5], 2)
    assert m.book == {"n1": "h:1", "n2": "h:2", "n3": "h:3", "n4": "h:4"}
    assert membership.read_membership(str(tmp_path))["addresses"]["n4"] == "h:4"  # and saved
    assert m.addresses["n4"] == "h:4"  # n5's change is not applied yet: applying it adds it


def test_join_setting():
    base = {"id": "n4", "data_dir": "/tmp/x", "listen": "127.0.0.1:1", "certs": "/"}
    cfg = load({**base, "join": "raftsql://127.0.0.1:2/?certs=/c"}, env={})
    assert cfg.extra["join"] == "raftsql://127.0.0.1:2/?certs=/c" and cfg.peers == {}
    with pytest.raises(ConfigError, match="not a raftsql:// DSN"):
        load({**base, "join": "127.0.0.1:2"}, env={})


def test_max_request_size_setting():
    base = {"id": "n4", "data_dir": "/tmp/x", "listen": "127.0.0.1:1", "certs": "/"}
    assert load(base, env={}).max_request_size == 4 * 1024 * 1024
    assert load(base, env={"RAFTSQL_MAX_REQUEST_SIZE": "65536"}).max_request_size == 65536
    with pytest.raises(ConfigError, match="at most half of max_frame_size"):
        load({**base, "max_request_size": 40 << 20}, env={})
    with pytest.raises(ConfigError, match="must be positive"):
        load({**base, "max_request_size": 0}, env={})


def test_max_unreplicated_writes_setting():
    base = {"id": "n4", "data_dir": "/tmp/x", "listen": "127.0.0.1:1", "certs": "/"}
    assert load(base, env={}).max_unreplicated_writes == 64
    assert load(base, env={"RAFTSQL_MAX_UNREPLICATED_WRITES": "0"}).max_unreplicated_writes == 0
    assert load({**base, "max_unreplicated_writes": 5}, env={}).max_unreplicated_writes == 5
    with pytest.raises(ConfigError, match="must be 0 or more"):
        load({**base, "max_unreplicated_writes": -1}, env={})
    with pytest.raises(ConfigError, match="must be int"):
        load(base, env={"RAFTSQL_MAX_UNREPLICATED_WRITES": "lots"})


def test_cli_help_and_argument_errors(tmp_path):
    r = CliRunner()
    for cmd in (["cluster", "--help"], ["cluster", "add", "--help"], ["cluster", "promote", "--help"],
                ["cluster", "remove", "--help"], ["backup", "--help"], ["restore", "--help"]):
        res = r.invoke(main, cmd)
        assert res.exit_code == 0, (cmd, res.output)
    assert "--join DSN" in r.invoke(main, ["node", "--help"]).output
    res = r.invoke(main, ["cluster", "add", "raftsql://h:1/?certs=/c", "n4"])
    assert res.exit_code == 2 and "Missing argument" in res.output
    res = r.invoke(main, ["restore", str(tmp_path / "missing.db"), "raftsql://h:1/"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = r.invoke(main, ["backup", "raftsql://h:1/", str(tmp_path / "o.db")])
    assert res.exit_code == 1 and "certs" in res.output


def test_copy_database_drops_internal_tables_and_keeps_the_index(tmp_path):
    from raftsql.command import Command
    from raftsql.server.statemachine import StateMachine

    sm = StateMachine(str(tmp_path / "db.sqlite"))
    try:
        sm.apply(1, Command(client_id="c", serial=1, statements=(("CREATE TABLE t (x)", ()),),
                            leader_time_ms=1, seed=1).encode())
        sm.apply(2, Command(client_id="c", serial=2, statements=(("INSERT INTO t VALUES (7)", ()),),
                            leader_time_ms=2, seed=2).encode())
        index = admin.copy_database(sm.path, str(tmp_path / "copy.db"))
    finally:
        sm.close()
    import sqlite3

    db = sqlite3.connect(tmp_path / "copy.db")
    assert index == 2
    assert db.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchone() == (2,)
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'")} == {"t"}
    assert db.execute("SELECT count(*) FROM sqlite_raftsql_sessions").fetchone() == (0,)
    assert db.execute("SELECT x FROM t").fetchall() == [(7,)]
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()


def test_a_backup_target_must_be_a_new_or_regular_file_outside_a_data_directory(tmp_path):
    """`raftsql backup ADSN /dev/full` replaced /dev/full with a regular file, and a FIFO or a
    live node's db.sqlite were replaced as well."""
    import os

    from raftsql.driver._admin import AdminError, _backup_target

    assert _backup_target(str(tmp_path / "new.db")) == str(tmp_path / "new.db")
    (tmp_path / "old.db").write_bytes(b"x")
    assert _backup_target(str(tmp_path / "old.db")) == str(tmp_path / "old.db")
    os.symlink(tmp_path / "old.db", tmp_path / "latest.db")  # written through to its target
    assert _backup_target(str(tmp_path / "latest.db")) == str(tmp_path / "old.db")
    os.mkfifo(tmp_path / "pipe")
    for target in ("/dev/null", str(tmp_path / "pipe"), str(tmp_path)):
        with pytest.raises(AdminError, match="not a regular file|is a directory"):
            _backup_target(target)
    node = tmp_path / "n1"
    (node / "raft-log").mkdir(parents=True)
    with pytest.raises(AdminError, match="node's data directory"):
        _backup_target(str(node / "db.sqlite"))
    with pytest.raises(AdminError, match=f"{tmp_path / 'none'} is not a directory"):
        _backup_target(str(tmp_path / "none" / "x.db"))  # not a temp file's name


@pytest.mark.parametrize("args, code, message", [
    (["status", "garbage"], 1, "Error: DSN must start with raftsql://"),
    (["status", "raftsql://127.0.0.1:9/"], 1, "Error: the DSN needs ?certs=DIR"),
    (["shell", "raftsql://127.0.0.1:9/?certs=.&consistency=bogus"], 1, "Error: consistency must be one of"),
    (["certs", "node", "{tmp}", "--name", "n9", "--host", ""], 1, "Error: invalid host ''"),
    (["certs", "node", "{tmp}", "--name", "../evil", "--host", "127.0.0.1"], 1, "Error: invalid name '../evil'"),
    (["node", "--id", "n1", "--data-dir", "{tmp}/d", "--listen", "127.0.0.1:9", "--certs", "{tmp}",
      "--log-level", "bogus"], 2, "Invalid value for '--log-level'"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, args, code, message):
    runner = CliRunner()
    assert runner.invoke(main, ["certs", "init", str(tmp_path)]).exit_code == 0
    r = runner.invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output


def test_status_fails_when_no_node_answers(tmp_path):
    import socket

    runner = CliRunner()
    assert runner.invoke(main, ["certs", "init", str(tmp_path)]).exit_code == 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = runner.invoke(main, ["status", f"raftsql://127.0.0.1:{port}/?certs={tmp_path}/client"])
    assert r.exit_code == 1 and "unreachable" in r.output and "Error: no node answered" in r.output


@pytest.mark.parametrize("key, value, message", [
    ("tick_ms", 10**20, "at most 60000"),
    ("tick_ms", 1.5, "must be int"),
    ("frame_timeout_s", float("nan"), "finite"),
    ("client_idle_timeout_s", "inf", "finite"),
    ("request_timeout_s", "1e400", "finite"),
    ("advertise", "garbage", "is not host:port"),
    ("advertise", "0.0.0.0:4001", "clients must be able to dial it"),
    ("data_dir", 7, "must be a string"),
])
def test_settings_that_would_only_break_the_node_are_refused(key, value, message):
    base = {"id": "n1", "data_dir": "/tmp/x", "listen": "127.0.0.1:1", "certs": "/"}
    with pytest.raises(ConfigError, match=message):
        load({**base, key: value}, env={})


def test_a_binary_config_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bin.toml"
    bad.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load({}, config_file=str(bad), env={})


def test_a_peer_given_twice_with_two_addresses_is_refused():
    from raftsql.server.config import parse_peers

    assert parse_peers(["n2=h:1", "n2=h:1"], "--peer") == {"n2": "h:1"}
    with pytest.raises(ConfigError, match="peer n2 is given twice"):
        parse_peers(["n2=h:1", "n2=h:2"], "--peer")


def test_a_full_disk_names_the_place_and_what_to_do():
    """A full disk during a log write stopped the node with only "[Errno 28] No space left on
    device"."""
    import errno

    from raftsql.server.node import _explain

    e = _explain(OSError(errno.ENOSPC, "No space left on device"), "/var/lib/raftsql/db.sqlite")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert "in /var/lib/raftsql" in str(e) and "free space" in str(e)
    e = _explain(OSError(errno.ENOSPC, "No space left on device", "/x/raft-log/seg-1"), "/x/db.sqlite")
    assert "in /x/raft-log/seg-1" in str(e)


def test_backup_against_no_reachable_node_says_it_is_retrying(tmp_path):
    """It used to retry silently for its whole timeout (300 s by default)."""
    import socket

    runner = CliRunner()
    assert runner.invoke(main, ["certs", "init", str(tmp_path)]).exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = runner.invoke(main, ["backup", f"raftsql://127.0.0.1:{port}/?certs={tmp_path}/admin",
                             str(tmp_path / "b.db"), "--timeout", "1.5"])
    assert r.exit_code == 1 and "no node served the backup yet" in r.output, r.output


def test_a_join_that_no_node_answers_says_so_before_its_deadline(caplog):
    """`node --join` was silent for its whole 60 s before failing."""
    import logging
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="raftsql.membership"):
        with pytest.raises(membership.JoinError, match="did not add this node"):
            membership._ask_cluster([("127.0.0.1", port)], None, 1.0, {"op": "cluster_join"})
    assert "no node of the cluster has answered yet" in caplog.text


def test_join_after_a_first_start_that_never_ran_asks_to_join(tmp_path, monkeypatch):
    """A first start without --join that failed before the node ran left a one-node membership
    file; `--join` used to be ignored then ("already joined"), and the node started a cluster of
    its own beside the one meant. Now it joins; and a one-node cluster that has run is refused."""
    from raftsql.raft.types import HardState
    from raftsql.server.logstore import LogStore

    membership.Membership.open(_cfg(tmp_path, peers={}), {}, [], 0)
    asked = []

    def ask(hosts, context, timeout, req):
        asked.append(req["op"])
        return {"bootstrap_voters": ["a", "b", "c"], "members": {"a": "h:1", "b": "h:2", "c": "h:3"}}

    monkeypatch.setattr(membership, "_ask_cluster", ask)
    monkeypatch.setattr(membership, "node_client_context", lambda *a: None)
    monkeypatch.setattr(membership, "own_cert_covers", lambda *a: True)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    cfg = _cfg(tmp_path, peers={})
    cfg.listen = ("127.0.0.1", free)
    doc = membership.join_cluster(cfg, "raftsql://h:1/")
    assert asked == ["cluster_join"] and doc["bootstrap_voters"] == ["a", "b", "c"]

    ran = tmp_path / "ran"
    ran.mkdir()
    membership.Membership.open(_cfg(ran, peers={}), {}, [], 0)
    store = LogStore(str(ran / "raft-log"))
    store.set_hard_state(HardState(term=1, vote="n1", commit=0))
    store.sync()
    store.close()
    with pytest.raises(membership.JoinError, match="one-node cluster of n1 that has run"):
        membership.join_cluster(_cfg(ran, peers={}), "raftsql://h:1/")
    assert asked == ["cluster_join"]


def test_join_checks_its_certificate_and_its_port_before_asking(tmp_path, monkeypatch):
    """A node whose certificate does not hold its address, or that cannot listen, used to join
    anyway and leave a member behind that no peer could reach; now nothing is asked."""
    import socket

    from raftsql.server.certs import CertsTree

    tree = CertsTree(tmp_path / "certs")
    tree.init()
    tree.node("n5", ["127.0.0.15"])
    asked = []
    monkeypatch.setattr(membership, "_ask_cluster", lambda *a: asked.append(a) or {})
    data = tmp_path / "d5"
    data.mkdir()
    cfg = NodeConfig(id="n5", data_dir=str(data), listen=("127.0.0.16", 24701), peers={},
                     certs_dir=str(tree.own_dir("n5")))
    with pytest.raises(membership.JoinError, match="does not hold 127.0.0.16"):
        membership.join_cluster(cfg, "raftsql://127.0.0.1:1/")
    with socket.socket() as busy:
        busy.bind(("127.0.0.15", 0))
        busy.listen()
        cfg.listen = ("127.0.0.15", busy.getsockname()[1])
        with pytest.raises(membership.JoinError, match="cannot listen on 127.0.0.15"):
            membership.join_cluster(cfg, "raftsql://127.0.0.1:1/")
    assert asked == []


def test_a_node_started_on_another_nodes_directory_changes_nothing_in_it(tmp_path):
    """The refusal comes before the node opens anything there (it used to remove a snapshot
    file of the other node's, then refuse)."""
    from raftsql.server.node import Node

    data = tmp_path / "n2"
    data.mkdir()
    membership.Membership.open(_cfg(data, nid="n2"), {}, [], 0)
    (data / "snap-stale.db").write_bytes(b"x")
    before = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_mode) for p in data.iterdir())
    with pytest.raises(membership.MembershipMismatch, match="holds the state of node n2"):
        Node(_cfg(data, nid="n4"))
    assert sorted((p.name, p.stat().st_mtime_ns, p.stat().st_mode) for p in data.iterdir()) == before
