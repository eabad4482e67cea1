"""Real node processes started with umask 022 keep every file private: the data directory and
every directory in it 0700, every file 0600 (database, -wal, -shm, log segments, snapshots,
membership.json, node.log); a data directory left with wider modes is fixed at start."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

from raftsql.testing.cluster import LocalCluster


def modes(d: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(d.stat().st_mode)}
    for p in d.rglob("*"):
        out[str(p.relative_to(d))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_private(d: Path) -> None:
    wrong = {
        name: f"{m:04o}"
        for name, m in modes(d).items()
        if m != (0o700 if (d / name).is_dir() else 0o600)
    }
    assert not wrong, f"{d}: {wrong}"


def test_node_files_are_private_whatever_the_umask(tmp_path):
    old_umask = os.umask(0o022)
    try:
        with LocalCluster(tmp_path / "c", 3, env={"RAFTSQL_SNAPSHOT_ENTRIES": "20",
                                                  "RAFTSQL_SNAPSHOT_TRAILING": "5"}) as c:
            c.start()
            c.wait_leader()
            client = c.client()
            try:
                assert client.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])])["error"] is None
                for i in range(60):
                    assert client.execute([("INSERT INTO t (v) VALUES (?)", [f"row {i}"])])["error"] is None
                deadline = time.monotonic() + 30
                while not all(any((c.data_dir(n) / "snapshots").glob("*")) for n in c.ids):
                    assert time.monotonic() < deadline, "no snapshot files"
                    time.sleep(0.1)
                c.hashes()
                for n in c.ids:
                    names = set(modes(c.data_dir(n)))
                    assert {"db.sqlite", "db.sqlite-wal", "db.sqlite-shm", "membership.json",
                            "node.log", "raft-log", "snapshots"} <= names, names
                    assert any(name.startswith("raft-log/") and name.endswith(".seg") for name in names)
                    assert_private(c.data_dir(n))

                # A data directory from an older version, with the umask's modes: fixed at start.
                c.kill("n3", signal.SIGTERM)
                d3 = c.data_dir("n3")
                for p in [d3, *d3.rglob("*")]:
                    os.chmod(p, 0o755 if p.is_dir() else 0o644)
                c.start("n3")
                c.wait_leader()
                assert client.execute([("INSERT INTO t (v) VALUES ('after')", [])])["error"] is None
                c.hashes()
                assert_private(d3)
                assert "private (others could read them)" in (d3 / "node.log").read_text()
            finally:
                client.close()
            # The client's directory (the DSN's ?certs=) holds no CA key and no node key.
            assert sorted(p.name for p in c.certs.iterdir()) == ["ca.crt", "client.crt", "client.key"]
    finally:
        os.umask(old_umask)
