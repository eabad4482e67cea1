"""Deterministic time and randomness for apply (server/DESIGN.md, "Determinism of SQL").

Every node applies the same entry at the same stamped time with the same seed, so 'now',
CURRENT_TIMESTAMP, column DEFAULTs, random() and randomblob() give byte-identical results
everywhere: EntryClock serves SQLite's clock from the entry, EntryRandom its PRNG.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
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

    Being a Python VFS, every file operation passes through apsw with the GIL held, and apsw
    holds it across the base VFS's call too: an fsync of a WAL holding 400 MB froze the whole
    node for seconds (no tick, no heartbeat: an election). So its files (_GilFreeSyncFile) sync
    first with os.fsync, which lets the GIL go, and only then through the base VFS, which finds
    nothing left to write (and still syncs the directory of a new file, as SQLite wants)."""

    def __init__(self, name: str, now_ms: int):
        self.now_ms = now_ms
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:  # noqa: N802 - SQLite's name
        return _GilFreeSyncFile(name, flags)

    def xCurrentTimeInt64(self) -> int:  # noqa: N802 - SQLite's name
        return self.now_ms + UNIX_EPOCH_JULIAN_MS

    def xCurrentTime(self) -> float:  # noqa: N802
        return (self.now_ms + UNIX_EPOCH_JULIAN_MS) / 86400000.0


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
        return self._stream().randbytes(size)
