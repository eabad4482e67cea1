"""The state machine's VFS (server/determinism.py EntryClock) syncs its files with os.fsync,
which releases the GIL, before the base VFS's sync, which apsw calls with the GIL held: a
node's other threads (ticker, peer readers) keep running through a long fsync."""

import os

import apsw

from raftsql.server.determinism import EntryClock


def test_syncs_go_through_os_fsync_first_and_the_data_is_there(tmp_path, monkeypatch):
    vfs = EntryClock("test-gil-free-sync", 0)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = str(tmp_path / "db")
    try:
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

