"""server/fileperms.py: a node's data directory is 0700 and its files 0600, whatever the umask."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from raftsql.server import fileperms


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022():
    """Run with the common 022 umask, and give pytest back its own afterwards."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_new_data_dir_and_new_files_are_private(tmp_path, umask_022):
    d = tmp_path / "data" / "n1"
    assert fileperms.secure_data_dir(d) == []
    assert mode(d) == 0o700
    with open(d / "db.sqlite", "w") as f:  # any later file, from anywhere in the process
        f.write("x")
    (d / "snapshots").mkdir()
    assert mode(d / "db.sqlite") == 0o600
    assert mode(d / "snapshots") == 0o700


def test_sqlite_wal_and_shm_follow_the_database_file(tmp_path, umask_022):
    import apsw

    d = tmp_path / "n1"
    fileperms.secure_data_dir(d)
    db = apsw.Connection(str(d / "db.sqlite"))
    try:
        assert db.execute("PRAGMA journal_mode=WAL").fetchall() == [("wal",)]
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        names = sorted(os.listdir(d))
        assert names == ["db.sqlite", "db.sqlite-shm", "db.sqlite-wal"]
        assert all(mode(d / n) == 0o600 for n in names)
    finally:
        db.close()


def test_an_existing_data_dir_is_fixed_and_the_changes_logged(tmp_path, umask_022, caplog):
    d = tmp_path / "n1"
    (d / "raft-log").mkdir(parents=True)
    (d / "raft-log" / "0000000000000001.seg").write_bytes(b"x")
    (d / "node.log").write_text("old")
    (d / "membership.json").write_text("{}")
    os.chmod(d / "membership.json", 0o600)  # already private: left alone
    os.chmod(d, 0o755)
    os.symlink("/etc/hostname", d / "link")  # never followed, never changed
    before = mode("/etc/hostname")
    with caplog.at_level(logging.WARNING, logger="raftsql.fileperms"):
        changed = fileperms.secure_data_dir(d)
    assert sorted((os.path.relpath(p, d), old, new) for p, old, new in changed) == [
        (".", 0o755, 0o700),
        ("node.log", 0o644, 0o600),
        ("raft-log", 0o755, 0o700),
        ("raft-log/0000000000000001.seg", 0o644, 0o600),
    ]
    for p in (d, d / "raft-log"):
        assert mode(p) == 0o700
    for p in (d / "node.log", d / "membership.json", d / "raft-log" / "0000000000000001.seg"):
        assert mode(p) == 0o600
    assert mode("/etc/hostname") == before
    assert "made 4 path(s)" in caplog.text and "node.log 0644->0600" in caplog.text
    assert fileperms.secure_data_dir(d) == []  # nothing left to do


def test_umask_is_only_narrowed(umask_022):
    os.umask(0o027)
    fileperms.private_umask()
    assert os.umask(0o022) == 0o077
    os.umask(0o177)
    fileperms.private_umask()
    assert os.umask(0o022) == 0o177  # a stricter umask stays


def test_node_log_is_created_private_and_an_old_one_narrowed(tmp_path, umask_022):
    p = tmp_path / "node.log"
    with fileperms.open_private_log(p) as f:
        f.write(b"a\n")
    assert mode(p) == 0o600
    os.chmod(p, 0o644)
    with fileperms.open_private_log(p) as f:
        f.write(b"b\n")
    assert mode(p) == 0o600
    assert p.read_bytes() == b"a\nb\n"  # appended, not truncated
