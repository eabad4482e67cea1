"""Client roles on a real cluster: every role (read, write, admin) against every operation
(read, write, transaction, executemany, membership, backup, restore, hash, revoke), through the
real driver and CLI. A refused operation raises a clear error naming the role and the
operation, and leaves every node's database exactly as it was (same applied index, same
content hash)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import raftsql.driver as db
from raftsql.driver import _admin
from raftsql.driver._client import Forbidden
from raftsql.testing.cluster import LocalCluster

ROLES = ("read", "write", "admin")
OPERATIONS = ("read", "write", "transaction", "executemany", "membership", "backup", "restore",
              "hash", "revoke")
ALLOWED = {
    "read": {"read"},
    "write": {"read", "write", "transaction", "executemany"},
    "admin": set(OPERATIONS),
}
# How each operation is named in a refusal.
NAMED = {"write": "may not write", "transaction": "may not write", "executemany": "may not write",
         "membership": "may not run cluster add", "backup": "may not run backup",
         "restore": "may not run restore", "hash": "may not run hash", "revoke": "may not run revoke"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "raftsql.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """A 3-node cluster with a table, and an empty 1-node cluster to restore into."""
    main = LocalCluster(tmp_path_factory.mktemp("access"), 3)
    empty = LocalCluster(tmp_path_factory.mktemp("access-restore"), 1)
    try:
        for c in (main, empty):
            c.start()
        for c in (main, empty):
            c.wait_leader()
        setup = db.connect(main.dsn, autocommit=True, timeout=20)
        setup.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        setup.execute("INSERT INTO t (v) VALUES ('first')")
        setup.close()
        yield main, empty
    finally:
        main.close()
        empty.close()


def _certs(cluster: LocalCluster, role: str):
    """The certificate directory of a client with `role`: `raftsql certs client` with --role
    read, without --role for write (the default), and the admin directory `certs init` made."""
    if role == "admin":
        return cluster.admin_certs
    name = f"app-{role}"
    args = ["certs", "client", str(cluster.tree.root), "--name", name]
    if role == "read":
        args += ["--role", "read"]
    p = _cli(*args)
    assert p.returncode == 0 and f"(role {role}" in p.stdout, p.stdout + p.stderr
    return cluster.tree.own_dir(name)


def _run(op: str, main: LocalCluster, empty: LocalCluster, certs, tmp_path, role: str) -> None:
    """Run one operation with the client certificate in `certs`; raises what the driver
    (or the admin calls) raise."""
    dsn = main.dsn_for(certs)
    if op in ("read", "write", "executemany"):
        conn = db.connect(dsn, autocommit=True, timeout=20)
        try:
            if op == "read":
                assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("first",)
            elif op == "write":
                conn.execute("INSERT INTO t (v) VALUES (?)", (f"{role} write",))
            else:
                conn.executemany("INSERT INTO t (v) VALUES (?)", [(f"{role} many {i}",) for i in range(3)])
        finally:
            conn.close()
    elif op == "transaction":
        conn = db.connect(dsn, timeout=20)  # sqlite3's default: the INSERT opens a transaction
        try:
            assert conn.execute("SELECT count(*) FROM t").fetchone()[0] >= 1
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"{role} txn",))
            conn.execute("UPDATE t SET v = v WHERE id = 1")
            conn.commit()
        finally:
            conn.close()
    elif op == "membership":
        r = _admin.cluster_add(dsn, "n9", "127.0.0.1:9", timeout=20)  # a learner never started
        assert r["role"] == "learner"
        r = _admin.cluster_remove(dsn, "n9", timeout=20)
        assert "n9" not in r["members"]
    elif op == "backup":
        r = _admin.backup(dsn, str(tmp_path / f"backup-{role}.db"), timeout=30)
        assert r["index"] > 0
    elif op == "restore":
        source = tmp_path / "restore-source.db"
        if not source.exists():
            _admin.backup(main.admin_dsn, str(source), timeout=30)
        r = _admin.restore(empty.dsn_for(_certs(empty, role)), str(source), timeout=30)
        assert r["tables"] == 1
    elif op == "hash":
        client = main.client(certs=certs, timeout=10)
        try:
            r = client._call({"op": "hash"}, 10, None)
        finally:
            client.close()
        assert len(r["hash"]) == 64
    elif op == "revoke":
        spare = main.client_certs(f"spare-{role}", "write")
        assert spare.is_dir()
        r = _admin.revoke(dsn, f"spare-{role}", timeout=20)
        assert r["target"] == f"name:spare-{role}" and not r["already"]
    else:
        raise AssertionError(op)


def test_every_role_against_every_operation(clusters, tmp_path):
    main, empty = clusters
    table: dict[str, dict[str, str]] = {}
    for role in ROLES:
        certs = _certs(main, role)
        table[role] = {}
        for op in OPERATIONS:
            target = empty if op == "restore" else main
            before = target.hashes()
            try:
                _run(op, main, empty, certs, tmp_path, role)
            except (db.PermissionDenied, Forbidden, _admin.AdminError) as e:
                message = str(e)
                table[role][op] = "refused"
                assert op not in ALLOWED[role], f"{role} was refused {op}: {message}"
                # One clear message: who, the role, the operation.
                assert "permission denied" in message and f"(role {role})" in message, message
                assert NAMED[op] in message, message
                if op in ("write", "transaction", "executemany"):
                    assert isinstance(e, db.PermissionDenied) and isinstance(e, db.OperationalError)
                # Nothing was applied: every node holds what it held (index and content).
                assert target.hashes() == before, (role, op)
            else:
                table[role][op] = "allowed"
                assert op in ALLOWED[role], f"{role} was allowed {op}"
    print("\nrole    " + " ".join(f"{op:>12}" for op in OPERATIONS))
    for role in ROLES:
        print(f"{role:7} " + " ".join(f"{table[role][op]:>12}" for op in OPERATIONS))
    # The restore went into the empty cluster only once (by the admin); the refused ones left
    # no table there.
    c = db.connect(empty.admin_dsn, timeout=20)
    assert c.execute("SELECT count(*) FROM t").fetchone() == (1,)
    c.close()


def test_a_read_only_transaction_is_refused_at_its_first_write(clusters):
    main, _ = clusters
    conn = db.connect(main.dsn_for(_certs(main, "read")), timeout=20, autocommit=False)
    try:
        before = main.hashes()
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("first",)
        with pytest.raises(db.PermissionDenied, match=r"may not write: 'DELETE FROM t'"):
            conn.execute("DELETE FROM t")
        conn.rollback()
        # The connection keeps working for reads after the refusal.
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("first",)
        conn.rollback()
        with pytest.raises(db.PermissionDenied):
            conn.executescript("INSERT INTO t (v) VALUES ('script'); SELECT 1;")
        assert main.hashes() == before
    finally:
        conn.close()


def test_a_read_only_certificate_commits_reads_but_no_forged_write(clusters):
    """An explicit transaction that only read commits: its reads are checked on the leader at a
    ReadIndex and nothing reaches the log (a read certificate once added log entries this way,
    and made every node run its SELECTs in apply); a write between its read and its commit
    still fails it. A commit that carries a write it never previewed is refused before the
    log."""
    main, _ = clusters
    conn = db.connect(main.dsn_for(_certs(main, "read")), timeout=20, autocommit=True)
    writer = db.connect(main.dsn, timeout=20, autocommit=True)
    try:
        before = main.hashes()
        conn.execute("BEGIN")
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("first",)
        conn.execute("COMMIT")
        result = conn._send([("SELECT 1", ())],
                            commit={"last_ms": 0, "checks": [None], "controls": [], "txn": None})
        assert result.get("error") is None
        assert main.hashes() == before  # no log entry
        with pytest.raises(db.PermissionDenied, match="may not write"):
            conn._send([("DELETE FROM t", ())],
                       commit={"last_ms": 0, "checks": [None], "controls": [], "txn": None})
        assert main.hashes() == before
        conn.execute("BEGIN")
        assert conn.execute("SELECT v FROM t WHERE id = 1").fetchone() == ("first",)
        writer.execute("UPDATE t SET v = 'changed' WHERE id = 1")
        with pytest.raises(db.SerializationError, match="returns different rows now"):
            conn.execute("COMMIT")
    finally:
        writer.execute("UPDATE t SET v = 'first' WHERE id = 1")
        writer.close()
        conn.close()


def test_refusals_are_one_line_in_the_cli_and_the_shell(clusters, tmp_path):
    main, _ = clusters
    dsn = main.dsn  # the client certificate `certs init` made: role write
    p = _cli("cluster", "remove", dsn, "n2")
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "Error: permission denied: client 'client' (role write) may not run cluster remove: "
        "it needs the admin role"
    ], p.stderr
    p = _cli("backup", dsn, str(tmp_path / "out.db"))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "out.db").exists()
    assert "may not run backup: it needs the admin role" in p.stderr, p.stderr
    reader = main.dsn_for(_certs(main, "read"))
    p = subprocess.run([sys.executable, "-m", "raftsql.cli", "shell", reader],
                       input="SELECT count(*) > 0 FROM t;\nINSERT INTO t (v) VALUES ('shell');\n",
                       capture_output=True, text=True, timeout=60)
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error")]
    assert errors == ["Error: near line 2: permission denied: client 'app-read' (role read) may not write: "
                      "\"INSERT INTO t (v) VALUES ('shell');\" needs the write role; nothing was "
                      "applied"], p.stderr
    assert "1" in p.stdout


def test_node_certificates_send_no_sql(clusters):
    from raftsql.driver._client import Client
    from raftsql.driver._conn import DSN
    from raftsql.server.tls import node_client_context

    main, _ = clusters
    client = Client(DSN.parse(main.dsn).hosts, node_client_context(main.node_certs("n1"), "n1"),
                    timeout=10)
    try:
        assert client.status()["id"] in main.ids  # status is fine
        with pytest.raises(Forbidden, match="node certificate 'n1' may not run execute"):
            client.execute([("SELECT 1", [])])
    finally:
        client.close()


def test_status_shows_the_refusals(clusters):
    main, _ = clusters
    p = _cli("status", main.dsn)
    assert p.returncode == 0, p.stderr
    assert "metrics" in p.stdout and "refused" in p.stdout
    rows = _admin.cluster_status(main.dsn)
    assert sum(r["metrics"]["raftsql_client_refusals_total"].get("permission", 0) for r in rows) > 0


def test_a_backup_served_by_a_follower_is_recorded_by_the_leader(clusters, tmp_path):
    main, _ = clusters
    leader = main.wait_leader()
    follower = next(n for n in main.ids if n != leader)
    dsn = f"raftsql://{main.address(follower)}/?certs={main.admin_certs}"
    r = _admin.backup(dsn, str(tmp_path / "f.db"), timeout=30)
    assert r["node"] == follower
    main.hashes()  # every node has applied the record
    for nid in main.ids:
        c = db.connect(main.admin_dsn, hosts=[main.address(nid)], consistency="stale", timeout=20)
        rows = c.execute("SELECT by_name, detail FROM sqlite_raftsql_audit WHERE operation = 'backup' "
                         "AND detail LIKE ?", (f'%"node": "{follower}"%',)).fetchall()
        c.close()
        assert rows and rows[-1][0] == "admin", (nid, rows)
    log = (main.data_dir(leader) / "node.log").read_text()
    assert "op=backup by=admin" in log and f"node={follower}" in log
