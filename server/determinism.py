"""Deterministic time and randomness for apply (server/DESIGN.md, "Determinism of SQL").

Every node applies the same entry at the same stamped time with the same seed, so 'now',
CURRENT_TIMESTAMP, column DEFAULTs, random() and randomblob() give byte-identical results
everywhere: EntryClock serves SQLite's clock from the entry, EntryRandom its PRNG.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import random
import threading
import time
import weakref
from typing import Any

import apsw

from raftsql.server.sandbox import MAX_VALUE_BYTES

log = logging.getLogger("raftsql.server.statemachine")

# Julian day number of the unix epoch, in ms: what SQLite's xCurrentTimeInt64 returns at unix 0.
UNIX_EPOCH_JULIAN_MS = 210866760000000


def ensure_utc() -> None:
    """SQLite's 'localtime' and 'utc' modifiers read the process time zone: pin it to UTC so
    that they give the same answer on every node."""
    if time.timezone != 0 or time.altzone != 0 or time.daylight:
        log.warning("setting TZ=UTC so that SQLite's 'localtime' is identical on every node")
        os.environ["TZ"] = "UTC"
        time.tzset()


class EntryClock(apsw.VFS):
    """The default VFS with SQLite's clock replaced: 'now', CURRENT_TIME/DATE/TIMESTAMP and
    column DEFAULTs read now_ms, which apply sets to the entry's time. SQLite caches the time
    per statement, so this runs at most once per statement that asks.

    File I/O must not pass through Python. A Python VFS's files do (apsw holds the GIL across
    every read, write, lock and sync of the base VFS): each apply paid a Python call per page
    and per lock, and a write that the kernel throttled (dirty pages of a 400 MB statement)
    froze every other thread of the node, ticks and heartbeats included: an election. So once
    apsw has registered this VFS, `_go_native` rewrites its sqlite3_vfs in place: every method
    and field becomes the base unix VFS's own (files opened through it are SQLite's C unix
    files, the GIL never taken) except the two clock methods, which become ctypes callbacks that
    read now_ms. apsw exposes no pointer to the struct, so it is found with
    SQLITE_FCNTL_VFS_POINTER on a throwaway :memory: connection and checked against
    apsw.vfs_details() (name, clock method, app data) before anything is written; the original
    values (all but the list link) are put back before apsw unregisters and frees it. Where any check fails (another
    platform, another apsw), the VFS stays a Python one whose files sync without the GIL
    (_GilFreeSyncFile) and a warning says so."""

    def __init__(self, name: str, now_ms: int):
        self.now_ms = now_ms
        super().__init__(name, "")
        self.native = False
        self._struct: _VfsStruct | None = None
        self._saved = b""
        self._callbacks: tuple[Any, ...] = ()
        try:
            self._go_native(name)
        except Exception as e:  # noqa: BLE001 - any surprise: keep the Python VFS, say so
            log.warning("clock VFS: SQLite file I/O goes through Python (slower; a big write "
                        "holds the GIL): %s", e)

    def _go_native(self, name: str) -> None:
        details = {d["zName"]: d for d in apsw.vfs_details()}
        mine, base = details.get(name), details.get("unix")
        if mine is None or base is None or apsw.vfs_names()[0] != "unix":
            raise RuntimeError("the default VFS is not SQLite's unix VFS")
        probe = apsw.Connection(":memory:", vfs=name)
        try:
            out = ctypes.c_void_p(0)
            probe.file_control("main", apsw.SQLITE_FCNTL_VFS_POINTER, ctypes.addressof(out))
            addr = out.value
        finally:
            probe.close()
        if not addr:
            raise RuntimeError("SQLITE_FCNTL_VFS_POINTER gave no pointer")
        st = _VfsStruct.from_address(addr)
        if (not st.zName or ctypes.string_at(st.zName) != name.encode() or st.pAppData != mine["pAppData"]
                or st.xCurrentTimeInt64 != mine["xCurrentTimeInt64"] or st.iVersion < 2
                or base["iVersion"] < 2):
            raise RuntimeError("the sqlite3_vfs found does not match apsw.vfs_details()")
        clock = weakref.ref(self)

        def now_int64(_vfs: int, out: Any) -> int:
            me = clock()
            out[0] = (me.now_ms if me is not None else 0) + UNIX_EPOCH_JULIAN_MS
            return 0

        def now_double(_vfs: int, out: Any) -> int:
            me = clock()
            out[0] = ((me.now_ms if me is not None else 0) + UNIX_EPOCH_JULIAN_MS) / 86400000.0
            return 0

        cb64, cbd = _TIME_INT64(now_int64), _TIME_DOUBLE(now_double)
        self._callbacks = (cb64, cbd)
        self._saved = ctypes.string_at(addr, ctypes.sizeof(_VfsStruct))
        self._struct = st
        # Nothing uses this VFS yet: the struct can be rewritten field by field.
        st.iVersion = min(base["iVersion"], 3)
        st.szOsFile, st.mxPathname, st.pAppData = base["szOsFile"], base["mxPathname"], base["pAppData"]
        for f in _VFS_METHODS:
            setattr(st, f, base.get(f) or None)
        st.xCurrentTimeInt64 = ctypes.cast(cb64, ctypes.c_void_p).value
        st.xCurrentTime = ctypes.cast(cbd, ctypes.c_void_p).value
        self.native = True

    def _restore(self) -> None:
        """Put apsw's own values back, all but pNext: SQLite relinks the VFS list through it
        when a VFS registered after this one is unregistered."""
        st, self._struct = self._struct, None
        if st is not None:
            saved = _VfsStruct.from_buffer_copy(self._saved)
            for f, _ in _VfsStruct._fields_:
                if f not in ("pNext", "zName"):  # zName is never changed
                    setattr(st, f, getattr(saved, f))

    def unregister(self) -> None:
        self._restore()
        super().unregister()

    def __del__(self) -> None:  # collected without unregister(): apsw unregisters it itself
        try:
            self._restore()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to restore for
            pass

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:  # noqa: N802 - SQLite's name
        return _GilFreeSyncFile(name, flags)

    def xCurrentTimeInt64(self) -> int:  # noqa: N802 - SQLite's name
        return self.now_ms + UNIX_EPOCH_JULIAN_MS

    def xCurrentTime(self) -> float:  # noqa: N802
        return (self.now_ms + UNIX_EPOCH_JULIAN_MS) / 86400000.0


# sqlite3_vfs (sqlite3.h, iVersion 3): the methods _go_native copies from the unix VFS, in order
# after the fields, and the struct itself.
_VFS_METHODS = ("xOpen", "xDelete", "xAccess", "xFullPathname", "xDlOpen", "xDlError", "xDlSym",
                "xDlClose", "xRandomness", "xSleep", "xCurrentTime", "xGetLastError",
                "xCurrentTimeInt64", "xSetSystemCall", "xGetSystemCall", "xNextSystemCall")


class _VfsStruct(ctypes.Structure):
    _fields_ = [("iVersion", ctypes.c_int), ("szOsFile", ctypes.c_int), ("mxPathname", ctypes.c_int),
                ("pNext", ctypes.c_void_p), ("zName", ctypes.c_void_p), ("pAppData", ctypes.c_void_p),
                *[(f, ctypes.c_void_p) for f in _VFS_METHODS]]


_TIME_INT64 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64))
_TIME_DOUBLE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double))


# path -> (fd, inode) of the descriptors _GilFreeSyncFile fsyncs through. Never closed while the
# file lives: closing any descriptor of a file drops every POSIX lock this process holds on it
# (SQLite's own connections' locks included), which SQLite's unix VFS takes care never to do.
_sync_fds: dict[str, tuple[int, int]] = {}
_sync_fds_lock = threading.Lock()


def _sync_fd(path: str) -> int:
    """A read-only descriptor of the file now at `path` (reopened if the file was replaced;
    only then is the old one closed: its inode is no longer this file)."""
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        with _sync_fds_lock:
            gone = _sync_fds.pop(path, None)
        if gone is not None:
            os.close(gone[0])  # the file is gone: its locks with it
        raise
    with _sync_fds_lock:
        known = _sync_fds.get(path)
        if known is not None and known[1] == ino:
            return known[0]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        _sync_fds[path] = (fd, os.fstat(fd).st_ino)
        if known is not None:
            os.close(known[0])
        return fd


class _GilFreeSyncFile(apsw.VFSFile):
    """A default-VFS file whose xSync does the slow part (os.fsync) without the GIL."""

    def __init__(self, name: Any, flags: list[int]):
        super().__init__("", name, flags)
        if isinstance(name, apsw.URIFilename):
            name = name.filename()
        self._path: str | None = name or None  # None: a temporary file SQLite names itself

    def xSync(self, flags: int) -> None:  # noqa: N802 - SQLite's name
        if self._path is not None:
            try:
                os.fsync(_sync_fd(self._path))
            except OSError:
                pass  # the base xSync below does the sync that counts, and reports its error
        super().xSync(flags)


def as_int(value: Any) -> int:
    """randomblob(N)'s N converted the way SQLite mostly does; identical on every node."""
    if type(value) is int:
        return value
    if type(value) is float:
        return int(value) if math.isfinite(value) else 0
    if type(value) is str:
        try:
            f = float(value.strip())
        except ValueError:
            return 0
        return int(f) if math.isfinite(f) else 0
    return 0



_BLOB_CHUNK = 1 << 20


class EntryRandom:
    """random() and randomblob(N) of the entry being applied: a stream per statement, seeded by
    (entry seed, statement number), created only if the statement asks. random.Random(int) is
    seeded identically on every platform and process (unlike hash())."""

    __slots__ = ("seed", "stmt_no", "rng")

    def __init__(self) -> None:
        self.seed = 0
        self.stmt_no = 0
        self.rng: random.Random | None = None

    def start_statement(self, stmt_no: int) -> None:
        self.stmt_no = stmt_no
        self.rng = None

    def _stream(self) -> random.Random:
        if self.rng is None:
            self.rng = random.Random((self.seed << 32) | self.stmt_no)
        return self.rng

    def random(self) -> int:
        return self._stream().getrandbits(64) - (1 << 63)

    def randomblob(self, n: Any) -> bytes:
        size = max(1, as_int(n))
        if size > MAX_VALUE_BYTES:
            raise apsw.TooBigError("string or blob too big")
        stream = self._stream()
        if size <= _BLOB_CHUNK:
            return stream.randbytes(size)
        # In pieces, so that other threads get the GIL in between: one randbytes(100 MB) held
        # it for 0.34 s, and a loop of them starved the Raft threads into elections. Pieces of
        # a multiple of 4 bytes give the same bytes as one call.
        parts = [stream.randbytes(_BLOB_CHUNK) for _ in range(size // _BLOB_CHUNK)]
        parts.append(stream.randbytes(size % _BLOB_CHUNK))
        return b"".join(parts)
