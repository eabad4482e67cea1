"""Snapshots of the SQLite state machine: taking them in the background, keeping them on disk,
receiving them from a leader, and putting one in place of the database (see server/DESIGN.md,
"Snapshots and InstallSnapshot").

A snapshot is a plain SQLite file copied with the backup API: the applied index lives in the
same database (`sqlite_raftsql_meta`), so a copy made in one read transaction is a consistent state
*at* an applied index. Files, all in DATA_DIR/snapshots:

    snap-<index:020d>-<sha256 hex>.db   a durable snapshot (fsynced, renamed into place)
    recv-<index:020d>-<sha256 hex>.db   a verified snapshot received from a leader, not installed
    tmp-*                               in progress; removed on startup

The log store's snapshot index names the one snap- file that must exist (`current`); a newer
one (`pending`) waits there until the log is compacted to it. Everything else is removed on
startup. Content hash and index are in the name, so a file and its identity are made durable
by one rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from raftsql import wire
from raftsql.raft.types import Message, MsgType, SnapshotMeta
from raftsql.server import metrics
from raftsql.server.logformat import _fsync_dir
from raftsql.server.logstore import LogStore

if TYPE_CHECKING:
    from raftsql.server.statemachine import StateMachine

log = logging.getLogger("raftsql.snapshot")

DEFAULT_SNAPSHOT_ENTRIES = 10_000
DEFAULT_SNAPSHOT_BYTES = 64 << 20
DEFAULT_SNAPSHOT_TRAILING = 5_000
CHUNK_SIZE = 256 << 10  # bytes of file per SNAPSHOT frame

_NAME = re.compile(r"^(snap|recv)-(\d{20})-([0-9a-f]{64})\.db$")
_COPY_BLOCK = 1 << 20


class SnapshotError(Exception):
    """Raised when a snapshot cannot be taken, found or installed."""


@dataclass(frozen=True)
class SnapshotFile:
    """A complete, fsynced snapshot file: the database at applied index `index`."""

    index: int
    digest: str  # sha256 of the file, hex
    size: int
    path: str

    def open(self) -> BinaryIO:
        return open(self.path, "rb")  # noqa: SIM115 - the caller (the transport) closes it


def _fsync_and_hash(path: str) -> tuple[str, int]:
    """fsync the file at path; return (sha256 hex, size) of its contents."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb+") as f:
        while True:
            block = f.read(_COPY_BLOCK)
            if not block:
                break
            h.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return h.hexdigest(), size


def _name(kind: str, index: int, digest: str) -> str:
    return f"{kind}-{index:020d}-{digest}.db"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


COPY_STEP_PAGES = 64  # pages per backup step (256 KiB at 4 KiB pages)
COPY_PAUSE_S = 0.005  # between steps: the copy must not starve the write path
COPY_SYNC_EVERY = 4  # steps between fsyncs of the copy (1 MiB), so writeback comes in small bursts


def copy_database(db_path: str, dest: str, *, paced: bool = True) -> int:
    """A consistent copy of the SQLite database at db_path in the new file dest (fsynced if
    paced); returns the copy's applied index.

    The source connection holds one read transaction for the whole copy, so every backup step
    reads the same committed state (WAL lets writers go on meanwhile, and a backup whose source
    is already in a read transaction neither opens a new one nor restarts). Paced: small steps
    with a pause and an fsync every few MiB, trading a longer copy for a write path that barely
    notices it (the 2x p99 target in benchmarks/snapshot.py)."""
    import apsw

    src = apsw.Connection(db_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        src.execute("BEGIN")
        src.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchone()  # the read txn starts
        dst = apsw.Connection(dest)
        fd = os.open(dest, os.O_RDONLY)
        try:
            with dst.backup("main", src, "main") as b:
                steps = 0
                while not b.done:
                    b.step(COPY_STEP_PAGES if paced else -1)
                    steps += 1
                    if paced and not b.done:
                        if steps % COPY_SYNC_EVERY == 0:
                            os.fsync(fd)
                        time.sleep(COPY_PAUSE_S)
            row = dst.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchone()
        finally:
            os.close(fd)
            dst.close()
        src.execute("COMMIT")
    finally:
        src.close()
    if row is None or type(row[0]) is not int:
        raise SnapshotError(f"{db_path} has no applied index")
    return row[0]


def database_index(path: str) -> int:
    """The applied index recorded in the SQLite file at path (read-only)."""
    import apsw

    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchone()[0]
    finally:
        conn.close()


class Snapshots:
    """The snapshot files of one node and the policy for taking them.

    Thread use: the node's Ready loop calls everything except the taking itself (a background
    thread started by maybe_take) and the receivers (transport reader threads). `busy` is held
    while a thread reads or replaces the database file as a whole (taking, installing)."""

    def __init__(
        self,
        data_dir: str,
        db_path: str,
        *,
        entries: int = DEFAULT_SNAPSHOT_ENTRIES,
        max_bytes: int = DEFAULT_SNAPSHOT_BYTES,
        trailing: int = DEFAULT_SNAPSHOT_TRAILING,
        node_id: str = "",
    ):
        if entries <= 0 or max_bytes <= 0 or trailing < 0:
            raise ValueError("snapshot thresholds must be positive and trailing >= 0")
        self.dir = os.path.join(data_dir, "snapshots")
        self.db_path = db_path
        self.entries = entries
        self.max_bytes = max_bytes
        self.trailing = trailing
        self.node_id = node_id
        self.busy = threading.Lock()
        self._lock = threading.Lock()  # the fields below
        self.current: SnapshotFile | None = None  # at the log store's snapshot index
        self.pending: SnapshotFile | None = None  # newer, waiting for compaction
        self._received: dict[int, SnapshotFile] = {}  # verified, not installed, by index
        self._taking: threading.Thread | None = None
        self._taken_from = 0  # index the next threshold counts from
        self._bytes_since = 0  # bytes of entry data applied since the last snapshot started
        self.stats: dict[str, Any] = {
            "taken": 0,
            "last_taken_index": None,
            "last_taken_at": None,  # unix time
            "last_taken_ms": None,  # how long the copy + fsync took
            "last_size": None,
            "installed": 0,
            "last_installed_index": None,
            "received": 0,
            "rejected": 0,
            "take_failures": 0,
        }
        os.makedirs(self.dir, exist_ok=True)

    # ------------------------------------------------------------------ startup

    def recover(self, log_snapshot_index: int) -> SnapshotFile | None:
        """Startup: keep the snap- file at the log store's snapshot index (the `current` one),
        remove every other file here. Returns it (None if the log was never compacted)."""
        keep: SnapshotFile | None = None
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            m = _NAME.match(name)
            if m and m.group(1) == "snap" and int(m.group(2)) == log_snapshot_index and keep is None:
                keep = SnapshotFile(int(m.group(2)), m.group(3), os.path.getsize(path), path)
                continue
            log.info("%s: removing %s (not the log's snapshot at %d)", self.node_id, name, log_snapshot_index)
            _unlink(path)
        _fsync_dir(self.dir)
        if log_snapshot_index and keep is None:
            log.warning(
                "%s: no snapshot file for the log's snapshot index %d: a follower that needs it "
                "waits for the next snapshot",
                self.node_id,
                log_snapshot_index,
            )
        self.current = keep
        self._taken_from = log_snapshot_index
        return keep

    def restore_needed(self, db_applied: int | None, log_snapshot_index: int) -> bool:
        """Must the database be replaced by `current` before the node starts? Yes if a replace
        was interrupted (marker file), or if the database is behind the log's snapshot (its
        last transactions were lost: synchronous=NORMAL, or an install crashed in between)."""
        if os.path.exists(_marker(self.db_path)):
            return True
        return db_applied is not None and db_applied < log_snapshot_index

    # ------------------------------------------------------------------ taking

    def note_applied(self, nbytes: int, applied: int) -> bool:
        """The apply thread applied nbytes more, up to `applied`. True if that makes snapshot
        work due (taking one, or compacting to a taken one): the caller has it done in the
        log store's writer thread (after_apply)."""
        with self._lock:
            self._bytes_since += nbytes
            if self._taking is not None:
                return False
            if self.pending is not None:
                return applied >= self.pending.index + self.trailing
        return self._threshold_passed(applied)

    def _threshold_passed(self, applied: int) -> bool:
        # Each node's threshold is offset by 0-44% (from its id), so the nodes of a cluster
        # drift apart and do not all copy their databases at the same moment.
        stagger = 1 + (zlib.crc32(self.node_id.encode()) % 8) / 16
        return applied > self._taken_from and (
            applied - self._taken_from >= self.entries * stagger
            or self._bytes_since >= self.max_bytes * stagger
        )

    def maybe_take(self, applied: int, on_done: Callable[[], None]) -> bool:
        """Start taking a snapshot in the background if the log grew past a threshold since the
        last one and none is being taken or waiting for compaction. on_done() is called from
        that thread when it finished (or failed)."""
        with self._lock:
            if self._taking is not None or self.pending is not None:
                return False
            if not self._threshold_passed(applied):
                return False
            self._bytes_since = 0
            self._taken_from = applied  # do not retry at every entry if taking fails
            t = threading.Thread(
                target=self._take, args=(on_done,), name=f"{self.node_id}-snapshot", daemon=True
            )
            self._taking = t
        t.start()
        return True

    def _take(self, on_done: Callable[[], None]) -> None:
        start = time.monotonic()
        tmp = os.path.join(self.dir, f"tmp-take-{uuid.uuid4().hex}.db")
        try:
            with self.busy:
                index = copy_database(self.db_path, tmp)
                digest, size = _fsync_and_hash(tmp)
                path = os.path.join(self.dir, _name("snap", index, digest))
                os.rename(tmp, path)
                _fsync_dir(self.dir)
            f = SnapshotFile(index, digest, size, path)
            ms = round((time.monotonic() - start) * 1000, 1)
            with self._lock:
                self.pending = f
                self._taken_from = max(self._taken_from, index)
                self.stats.update(
                    taken=self.stats["taken"] + 1,
                    last_taken_index=index,
                    last_taken_at=time.time(),
                    last_taken_ms=ms,
                    last_size=size,
                )
            metrics.SNAPSHOT_TAKE.observe(ms / 1000)
            log.info("%s: took snapshot at %d (%d bytes, %.1f ms)", self.node_id, index, size, ms)
        except Exception as e:  # noqa: BLE001 - a failed snapshot is retried at the next threshold
            _unlink(tmp)
            with self._lock:
                self.stats["take_failures"] += 1
            log.error("%s: taking a snapshot failed: %s: %s", self.node_id, type(e).__name__, e)
        finally:
            with self._lock:
                self._taking = None
            on_done()

    def compaction_due(self, applied: int) -> SnapshotFile | None:
        """The pending snapshot if the log may now be compacted to it: `trailing` entries after
        it are applied, so a follower slightly behind still catches up from the log."""
        with self._lock:
            p = self.pending
        if p is not None and applied >= p.index + self.trailing:
            return p
        return None

    def promote(self, f: SnapshotFile) -> None:
        """The log is now compacted to f (durably): f becomes `current`, older files go."""
        with self._lock:
            old = self.current
            self.current = f
            if self.pending is not None and self.pending.index <= f.index:
                self.pending = None
        if old is not None and old.path != f.path:
            _unlink(old.path)

    def wait_idle(self, timeout: float | None = None) -> None:
        with self._lock:
            t = self._taking
        if t is not None:
            t.join(timeout)

    # ------------------------------------------------------------------ receiving

    def receiver(self, peer_id: str) -> Receiver:
        """A sink for the SNAPSHOT frames of one connection from peer_id."""
        return Receiver(self, peer_id)

    def _received_file(self, f: SnapshotFile) -> None:
        with self._lock:
            old = self._received.get(f.index)
            self._received[f.index] = f
            self.stats["received"] += 1
            # Keep the two newest: one may be in the core's hands while another arrives.
            drop = sorted(self._received)[:-2]
            gone = [self._received.pop(i) for i in drop]
        if old is not None and old.path != f.path:
            gone.append(old)
        for g in gone:
            _unlink(g.path)

    def has_received(self, index: int) -> bool:
        """Was a snapshot at index received and verified (so its SNAPSHOT message may be
        stepped into the core)?"""
        with self._lock:
            return index in self._received

    def adopt_received(self, index: int) -> SnapshotFile:
        """Install, step 1 (the Ready loop, holding `busy`): the received file at index becomes
        a durable snap- file. Raises SnapshotError if there is none."""
        with self._lock:
            r = self._received.pop(index, None)
            if r is None:
                raise SnapshotError(f"no verified snapshot at index {index} was received")
        path = os.path.join(self.dir, _name("snap", r.index, r.digest))
        os.rename(r.path, path)
        _fsync_dir(self.dir)
        return SnapshotFile(r.index, r.digest, r.size, path)

    def installed(self, f: SnapshotFile) -> None:
        """Install, last step: the database is f; f is `current`, every other file goes."""
        with self._lock:
            old, pending = self.current, self.pending
            self.current, self.pending = f, None
            stale = [r for i, r in self._received.items() if i <= f.index]
            self._received = {i: r for i, r in self._received.items() if i > f.index}
            self._taken_from = f.index
            self._bytes_since = 0
            self.stats["installed"] += 1
            self.stats["last_installed_index"] = f.index
        for o in (old, pending, *stale):
            if o is not None and o.path != f.path:
                _unlink(o.path)

    def status(self) -> dict[str, Any]:
        with self._lock:
            st = dict(self.stats)
            st["current_index"] = self.current.index if self.current else None
            st["current_size"] = self.current.size if self.current else None
            st["pending_index"] = self.pending.index if self.pending else None
            st["taking"] = self._taking is not None
        return st

    # ------------------------------------------------------------------ the node's side
    # Called by server/node.py at fixed points of its startup and Ready handling, so that the
    # snapshot rules live in one file. Nothing here holds the node: what it needs is passed in.

    def open_state_machine(self, log_snapshot_index: int,
                           make_sm: Callable[[str], StateMachine]) -> StateMachine:
        """Startup: recover the snapshot files, then open the StateMachine, restored from the
        current snapshot file first if restore_needed()."""
        db_path = self.db_path
        current = self.recover(log_snapshot_index)
        _unlink(db_path + ".install-tmp")
        if not os.path.exists(_marker(db_path)):
            sm = make_sm(db_path)
            if not self.restore_needed(sm.applied_index, log_snapshot_index):
                return sm
            log.warning(
                "%s: the database is at %d, behind the log's snapshot at %d: restoring the snapshot",
                self.node_id, sm.applied_index, log_snapshot_index,
            )
            sm.close()
        else:
            log.warning("%s: an interrupted database replacement: restoring the snapshot", self.node_id)
        if current is None:
            raise SnapshotError(
                f"{db_path} must be restored from the snapshot at {log_snapshot_index}, "
                f"but {self.dir} holds no such file"
            )
        replace_database(current, db_path)
        sm = make_sm(db_path)
        if sm.applied_index != current.index:
            sm.close()
            raise SnapshotError(f"snapshot {current.path} holds index {sm.applied_index}, not {current.index}")
        return sm

    def install(self, meta: SnapshotMeta, store: LogStore, sm: StateMachine,
                make_sm: Callable[[str], StateMachine]) -> StateMachine:
        """Ready.snapshot on a follower (before the Ready's entries are persisted): replace the
        database with the received snapshot and return the new StateMachine. Crash-safe order:
          1. the verified received file becomes a durable snap- file;
          2. the log store records the install (INSTALL record, fsync): from here a restart
             finds the database behind the log's snapshot and restores it from that file;
          3. the database file is replaced (replace_database) and reopened at exactly
             meta.index.
        Raises (and the node stops) if anything is missing: the core has already moved on."""
        started = time.monotonic()
        with self.busy:  # no snapshot is being copied from the file we replace
            f = self.adopt_received(meta.index)
            store.install(meta)
            store.sync()
            sm.close()
            replace_database(f, sm.path)
            new = make_sm(sm.path)
            if new.applied_index != meta.index:
                raise SnapshotError(f"installed snapshot holds index {new.applied_index}, not {meta.index}")
        self.installed(f)
        metrics.SNAPSHOT_INSTALL.observe(time.monotonic() - started)
        sm.wake_waiters()  # readers still waiting on the old one: time out, do not hang
        log.info("%s: installed snapshot at %d (term %d, %d bytes)", self.node_id, meta.index,
                 meta.term, f.size)
        return new

    def after_apply(self, applied: int,
                    compact_core: Callable[[int], SnapshotMeta | None], store: LogStore,
                    on_taken: Callable[[], None]) -> None:
        """When note_applied() said work is due (in the log store's writer thread): maybe
        start taking a snapshot in the background; compact the log to a pending snapshot once
        `trailing` entries are applied past it. compact_core(index) compacts the core and
        returns the meta, or None if it cannot yet (not stable: the apply thread asks again
        after its next batch)."""
        self.maybe_take(applied, on_taken)
        due = self.compaction_due(applied)
        if due is None:
            return
        meta = compact_core(due.index)
        if meta is None:
            return
        # The core may now name this snapshot in SNAPSHOT messages; they are sent only after
        # this returns (same thread), and the file is `current` by then.
        store.compact(meta)  # durable on return; only then can the older file go
        self.promote(due)
        log.info("%s: compacted the log to %d", self.node_id, meta.index)

    def outgoing(self, msgs: list[Message],
                 send_snapshot: Callable[[Message, BinaryIO, int, bytes, Callable[[bool], None]], None],
                 report: Callable[[str, bool], None]) -> list[Message]:
        """Leader, Ready step 1: hand each SNAPSHOT message with its file to the transport
        (send_snapshot); returns the other messages. report(peer, ok): the outcome."""
        if not any(m.type == MsgType.SNAPSHOT for m in msgs):
            return msgs
        rest = []
        for m in msgs:
            if m.type != MsgType.SNAPSHOT:
                rest.append(m)
                continue
            f = self.current
            if f is None or f.index != m.index:
                log.error("%s: no snapshot file at %d for %s", self.node_id, m.index, m.to)
                report(m.to, False)
                continue
            try:
                file = f.open()
            except OSError as e:
                log.error("%s: cannot open snapshot %s: %s", self.node_id, f.path, e)
                report(m.to, False)
                continue
            send_snapshot(m, file, f.size, bytes.fromhex(f.digest),
                          lambda ok, to=m.to: report(to, ok))
        return rest

    def accept(self, m: Message) -> bool:
        """May this message from the network be stepped? A SNAPSHOT only once its data arrived
        and was verified (the same connection carried it just before)."""
        if m.type != MsgType.SNAPSHOT:
            return True
        if self.has_received(m.index):
            return True
        log.warning("%s: dropping SNAPSHOT at %d from %s: its data did not arrive intact",
                    self.node_id, m.index, m.sender)
        return False



class Receiver:
    """Receives one connection's SNAPSHOT frames into a temp file, checking each chunk's crc
    and offset and, at the end, the size and sha256 of the whole file; then fsyncs it and
    renames it to a recv- file. Any bad chunk discards the transfer: the leader sends it again
    from the start (a new transfer begins with a chunk at offset 0). Never raises on bad input
    from the peer; returns False and logs instead."""

    def __init__(self, snapshots: Snapshots, peer_id: str):
        self.s = snapshots
        self.peer = peer_id
        self._file: BinaryIO | None = None
        self._tmp = ""
        self._index = 0
        self._term = 0
        self._offset = 0
        self._hash: Any = None
        self._failed_index = 0  # ignore the rest of a rejected transfer

    def feed(self, c: wire.SnapshotChunk) -> bool:
        if c.offset == 0 and not c.final:
            self.abort()
            self._start(c)
        elif self._file is None or (c.index, c.term) != (self._index, self._term):
            if c.index != self._failed_index:
                self._reject(c, "chunk of a transfer that never started")
            return False
        if c.offset != self._offset:
            return self._reject(c, f"chunk at offset {c.offset}, expected {self._offset}")
        if c.final:
            return self._finish(c)
        if zlib.crc32(c.data) != c.crc:
            return self._reject(c, f"corrupted chunk at offset {c.offset} (crc mismatch)")
        assert self._file is not None
        self._file.write(c.data)
        self._hash.update(c.data)
        self._offset += len(c.data)
        return True

    def _start(self, c: wire.SnapshotChunk) -> None:
        self._tmp = os.path.join(self.s.dir, f"tmp-recv-{self.peer}-{uuid.uuid4().hex}.db")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by _finish/abort
        self._index, self._term, self._offset = c.index, c.term, 0
        self._hash = hashlib.sha256()
        self._failed_index = 0
        log.info("%s: receiving snapshot at %d from %s", self.s.node_id, c.index, self.peer)

    def _finish(self, c: wire.SnapshotChunk) -> bool:
        assert self._file is not None and c.digest is not None
        if c.digest != self._hash.digest():
            return self._reject(c, "sha256 of the received file does not match")
        f, self._file = self._file, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        digest = c.digest.hex()
        path = os.path.join(self.s.dir, _name("recv", c.index, digest))
        os.rename(self._tmp, path)
        _fsync_dir(self.s.dir)
        self.s._received_file(SnapshotFile(c.index, digest, self._offset, path))
        log.info("%s: received snapshot at %d from %s (%d bytes)", self.s.node_id, c.index, self.peer, self._offset)
        return True

    def _reject(self, c: wire.SnapshotChunk, why: str) -> bool:
        log.warning(
            "%s: rejecting snapshot at %d from %s: %s", self.s.node_id, c.index, self.peer, why
        )
        with self.s._lock:
            self.s.stats["rejected"] += 1
        self.abort()
        self._failed_index = c.index
        return False

    def abort(self) -> None:
        """Discard a transfer in progress (the connection ended, or it went wrong)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            _unlink(self._tmp)


# ---------------------------------------------------------------------- replacing the database


def _marker(db_path: str) -> str:
    return db_path + ".restoring"


def replace_database(snapshot: SnapshotFile, db_path: str) -> None:
    """Make db_path a copy of the snapshot file, crash-safely. The caller has closed every
    connection to db_path, and the log store already records snapshot.index durably, so a
    crash anywhere here restarts into restore_needed() -> this function again.

    1. a durable marker says "db_path is being replaced": from here on the old database (whose
       WAL is about to go) is never opened again;
    2. copy to a temp file, fsync; 3. remove the old WAL and shm (SQLite would otherwise apply
    the old WAL to the new file); 4. rename into place, fsync the directory; 5. drop the marker."""
    directory = os.path.dirname(os.path.abspath(db_path))
    marker = _marker(db_path)
    with open(marker, "w") as m:
        m.write(f"{snapshot.index}\n")
        m.flush()
        os.fsync(m.fileno())
    _fsync_dir(directory)
    tmp = db_path + ".install-tmp"
    with open(snapshot.path, "rb") as src, open(tmp, "wb") as dst:
        while True:
            block = src.read(_COPY_BLOCK)
            if not block:
                break
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    for suffix in ("-wal", "-shm", "-journal"):
        _unlink(db_path + suffix)
    os.rename(tmp, db_path)
    _fsync_dir(directory)
    os.unlink(marker)
    _fsync_dir(directory)
