"""The state machine's VFS (server/determinism.py EntryClock): SQLite's clock from the entry,
file I/O never through Python. Natively, its sqlite3_vfs is rewritten to the unix VFS's own
methods (no Python file object, no GIL on a read, write or fsync); where that cannot be done,
its Python files sync with os.fsync, which releases the GIL, before the base VFS's sync."""

import os

import apsw
import pytest

from raftsql.server import determinism
from raftsql.server.determinism import EntryClock


def _exercise(path: str, vfs_name: str) -> None:
    conn = apsw.Connection(path, vfs=vfs_name)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (x, at DEFAULT CURRENT_TIMESTAMP)")
    conn.execute("INSERT INTO t (x) VALUES (zeroblob(100000))")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_native_files_never_pass_through_python_and_the_clock_is_the_entrys(tmp_path, monkeypatch):
    opened: list[object] = []
    real_init = determinism._GilFreeSyncFile.__init__

    def recording_init(self, *args):
        opened.append(args)
        real_init(self, *args)

    monkeypatch.setattr(determinism._GilFreeSyncFile, "__init__", recording_init)
    vfs = EntryClock("test-native-clock", 86_400_000)  # 1970-01-02
    path = str(tmp_path / "db")
    try:
        assert vfs.native
        _exercise(path, "test-native-clock")
        assert opened == []  # SQLite's own unix files: no Python object, no GIL
        again = apsw.Connection(path, vfs="test-native-clock")
        assert again.execute("SELECT length(x), at FROM t").fetchall() == [(100000, "1970-01-02 00:00:00")]
        vfs.now_ms = 1_700_000_000_123
        assert again.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now'), CURRENT_DATE").fetchall() == [
            ("2023-11-14 22:13:20.123", "2023-11-14")]
        again.close()
    finally:
        vfs.unregister()
    assert "test-native-clock" not in apsw.vfs_names()


def test_many_clocks_registered_and_dropped_in_any_order_keep_the_vfs_list_sound(tmp_path):
    # Restoring a VFS must not put back a stale link of SQLite's VFS list (a VFS registered
    # after it and unregistered first relinks through it).
    clocks = {i: EntryClock(f"test-order-{i}", i) for i in range(6)}
    for i in (3, 0, 5, 1):
        clocks.pop(i).unregister()
    del clocks[2]  # collected without unregister(): apsw unregisters it
    _exercise(str(tmp_path / "db4"), "test-order-4")
    clocks.pop(4).unregister()
    names = apsw.vfs_names()
    assert not any(n.startswith("test-order-") for n in names), names
    fresh = EntryClock("test-order-again", 0)
    try:
        assert fresh.native
        _exercise(str(tmp_path / "again"), "test-order-again")
    finally:
        fresh.unregister()


def test_without_native_files_syncs_go_through_os_fsync_first(tmp_path, monkeypatch):
    def refuse(self, name):
        raise RuntimeError("test: no native VFS")

    monkeypatch.setattr(EntryClock, "_go_native", refuse)
    vfs = EntryClock("test-gil-free-sync", 0)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = str(tmp_path / "db")
    try:
        assert not vfs.native
        conn = apsw.Connection(path, vfs="test-gil-free-sync")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
        assert any(p.endswith("db-wal") for p in synced), synced
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert any(p == path for p in synced), synced
        conn.close()
        again = apsw.Connection(path, vfs="test-gil-free-sync")
        assert again.execute("SELECT length(x) FROM t").fetchall() == [(100000,)]
        assert again.execute("SELECT julianday('now')").fetchall()[0][0] == 2440587.5  # its clock
        again.close()
    finally:
        vfs.unregister()


@pytest.mark.parametrize("field", ["pAppData", "xCurrentTimeInt64"])
def test_a_struct_that_does_not_match_apsws_details_is_left_alone(monkeypatch, field):
    real = apsw.vfs_details

    def lying():
        out = real()
        for d in out:
            if d["zName"] == "test-mismatch":
                d[field] = (d[field] or 0) + 8
        return out

    monkeypatch.setattr(apsw, "vfs_details", lying)
    vfs = EntryClock("test-mismatch", 0)
    try:
        assert not vfs.native
    finally:
        vfs.unregister()
