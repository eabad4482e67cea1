"""The durable Raft log and hard state: append-only segment files of CRC-framed msgpack records.

Implements raftsql.raft.storage.LogStorage. See server/DESIGN.md ("Log store") for why the
format and the recovery rules are what they are. One thread (the node's Ready loop) writes;
read_entries() may be called from any thread at the same time (the core reads evicted entries
back under the node's lock, from whichever thread stepped it): an internal lock guards the
index and the segment list, never an fsync.

On-disk layout of a directory:
    LOCK                     flock()ed while open, so two stores never share a directory
    0000000000000001.seg     segments, replayed in sequence order; sequence numbers have no holes
    ...
Segment = header, then a checkpoint (HARD_STATE, SNAPSHOT_META records of the state when the
segment was started), then records:
    header  <7s B Q I I>  magic b"RSQLLOG", version, sequence number, CRC salt, crc32(first 20 bytes)
    record  <I I B> + payload   crc32(length|type|payload, seeded with the salt), length, type
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import Sequence

import msgpack

from raftsql.raft.storage import StoredLog
from raftsql.raft.types import Entry, EntryType, HardState, SnapshotMeta
from raftsql.server import metrics
from raftsql.server.logformat import (
    _HDR,
    _MAGIC,
    _REC_HEADER,
    _SEG_HEADER,
    _SEGMENT_NAME,
    _U32,
    _VERSION,
    DEFAULT_SEGMENT_SIZE,
    ENTRIES,
    HARD_STATE,
    INSTALL,
    SNAPSHOT_META,
    _append_record,
    _crc32,
    _decode_entry,
    _decode_hs,
    _decode_meta,
    _find_record_after,
    _fsync_dir,
    _header_intact,
    _pack_hs,
    _pack_meta,
    _read_record_at,
    _run_first,
    _Segment,
    _segment_path,
    _TermRuns,
    _write_rest,
)

logger = logging.getLogger("raftsql.logstore")

class LogCorruptError(Exception):
    """Raised on open when the log is damaged anywhere but its torn tail, or when an entry read
    back later fails its CRC: refusing to go on is better than silently forgetting (or
    replicating) entries or votes this node has acknowledged."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path}: corrupt log at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset


class LogLockedError(Exception):
    """Raised when another LogStore, in this or another process, has the directory open."""


class LogStoreFailedError(Exception):
    """Raised by every call after a write or fsync failed: the page cache state is unknown then,
    so the only safe way on is to restart and recover from what is on disk."""


class LogStore:
    """A LogStorage on a directory. append/set_hard_state buffer in memory; sync() writes and
    fsyncs (group commit); compact() is durable when it returns."""

    def __init__(
        self, directory: str | os.PathLike[str], *, segment_size: int = DEFAULT_SEGMENT_SIZE
    ):
        if segment_size <= 0:
            raise ValueError("segment_size must be positive")
        self._dir = os.path.abspath(os.fspath(directory))
        self._segment_size = segment_size
        self._packer = msgpack.Packer(use_bin_type=True)
        self._failed: BaseException | None = None
        self._closed = False
        self._segments: list[_Segment] = []  # ascending seq; the last one is current
        self._rolled: list[_Segment] = []  # rolled-over segments with data not yet synced
        self._dir_dirty = False  # a segment was created/removed since the last directory fsync
        self._hs = HardState()
        self._meta = SnapshotMeta()
        self._last = 0  # last entry index (meta.index when there are no entries)
        # Which segment holds which live entries: [[first_index, seq], ...], ascending. Run i
        # covers first_index..(next run's first_index - 1). Compaction keeps the segment of the
        # run holding meta.index + 1 and every later one.
        self._runs: list[list[int]] = []
        # Where each live entry is: _offs[index - meta.index - 1] is the byte offset, in the
        # segment that _runs names, of the ENTRIES record holding it. 8 bytes per entry, so a
        # read is a seek, a read and a CRC check of that one record, never a scan.
        self._offs = array("Q")
        # Guards _runs, _offs, _segments, _meta, _last and the read descriptors against
        # read_entries() from other threads. Held for index updates and reads, never an fsync.
        self._mu = threading.RLock()
        # Segments made useless by install(): removed once the INSTALL record is synced.
        self._obsolete: list[_Segment] = []

        if not os.path.isdir(self._dir):
            os.makedirs(self._dir, exist_ok=True)
            _fsync_dir(os.path.dirname(self._dir))
        self._lock_fd = os.open(
            os.path.join(self._dir, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(self._lock_fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(self._lock_fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise LogLockedError(f"{self._dir} is open in another LogStore{who}: is a node already "
                                 "running on this data directory? Stop it first") from None
        # Who holds it, for the message above (the lock itself is the flock, not this text).
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self._dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._initial: tuple[HardState, SnapshotMeta, StoredLog] | None = self._recover()
        except BaseException:
            self._abandon()
            raise

    # LogStorage ---------------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, SnapshotMeta, StoredLog]:
        """The state recovered on open, without entry data (what a node boots from). Call once,
        right after opening (or load() instead)."""
        if self._initial is None:
            raise RuntimeError("LogStore.initial_state()/load() may be called once, right after opening")
        initial, self._initial = self._initial, None
        return initial

    def load(self) -> tuple[HardState, SnapshotMeta, list[Entry]]:
        """The state recovered on open with every entry read back from the segments: for tests
        and tools (it holds the whole log in memory). Call once, right after opening."""
        hs, meta, stored = self.initial_state()
        if stored.last_index == meta.index:
            return hs, meta, []
        return hs, meta, self.read_entries(meta.index + 1, stored.last_index + 1)

    def read_entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Durable entries [lo, hi), at least one, stopping before max_bytes of Entry.size()
        (raftsql.raft.storage.limit_size). Each ENTRIES record is read once, with its CRC
        checked: a mismatch is LogCorruptError(file, offset), and the store then refuses
        every call (the node stops, as for corruption found on open)."""
        with self._mu:
            self._check()
            base = self._meta.index
            if lo <= base or hi > self._last + 1 or lo >= hi:
                raise ValueError(f"entries [{lo}, {hi}) are not in the log ({base + 1}..{self._last})")
            runs, offs, segs = self._runs, self._offs, self._segments
            out: list[Entry] = []
            total = 0
            i = lo
            while i < hi:
                r = bisect_right(runs, i, key=_run_first) - 1
                run_end = runs[r + 1][0] if r + 1 < len(runs) else self._last + 1
                seg = segs[runs[r][1] - segs[0].seq]
                off = offs[i - base - 1]
                first, rows = self._read_record(seg, off, i)
                stop = min(hi, run_end, first + len(rows))
                j = i
                # A later ENTRIES record may have replaced the tail of this one (truncation).
                while j < stop and offs[j - base - 1] == off:
                    try:
                        e = _decode_entry(j, rows[j - first])
                    except Exception as exc:  # noqa: BLE001 - an intact CRC over a bad payload
                        raise self._corrupt(seg, off, f"undecodable entry {j}: {exc}") from None
                    if max_bytes is not None:
                        total += e.size()
                        if total > max_bytes and out:
                            return out
                    out.append(e)
                    j += 1
                i = j
            return out

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        if self._failed is not None or self._closed:
            self._check()
        first = entries[0].index
        if first <= self._meta.index:  # already in the snapshot
            entries = [e for e in entries if e.index > self._meta.index]
            if not entries:
                return
            first = entries[0].index
        if first > self._last + 1:
            raise ValueError(f"append at index {first} leaves a gap after last index {self._last}")
        index = first
        rows = []
        for e in entries:
            if e.index != index:
                raise ValueError(f"entries not contiguous: expected index {index}, got {e.index}")
            rows.append((e.term, e.type, e.data))
            index += 1
        payload = self._packer.pack([first, rows])
        with self._mu:
            off = self._write(ENTRIES, payload)
            runs, offs = self._runs, self._offs
            if first <= self._last:
                while runs and runs[-1][0] >= first:
                    runs.pop()
                del offs[first - self._meta.index - 1 :]
            seq = self._segments[-1].seq
            if not runs or runs[-1][1] != seq:
                runs.append([first, seq])
            offs.extend([off] * len(rows))
            self._last = index - 1

    def set_hard_state(self, hs: HardState) -> None:
        self._check()
        if hs.vote is not None and not isinstance(hs.vote, str):
            raise TypeError(f"vote must be a node id string or None, not {hs.vote!r}")
        if hs != self._hs:
            with self._mu:  # may start a segment
                self._write(HARD_STATE, self._packer.pack(_pack_hs(hs)))
            self._hs = hs

    def disk_bytes(self) -> int:
        """Bytes in the log's segment files (including records buffered for the next sync)."""
        with self._mu:
            return sum(seg.size for seg in self._segments)

    def sync(self) -> None:
        self._check()
        started = time.monotonic()
        cur = self._segments[-1]
        segs = self._rolled + [cur] if self._rolled else [cur]
        self._rolled = []
        wrote = False
        try:
            for seg in segs:
                if not seg.buf:
                    continue
                wrote = True
                if seg.fd is None:
                    # Directory entries in sequence order: a later segment's name must never be
                    # durable while an earlier one's is not (a hole reads as a lost segment).
                    if self._dir_dirty:
                        os.fsync(self._dir_fd)
                        self._dir_dirty = False
                    seg.fd = os.open(
                        seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                    )
                    self._dir_dirty = True
                written = os.write(seg.fd, seg.buf)
                if written != len(seg.buf):
                    _write_rest(seg.fd, seg.buf, written)
                seg.buf.clear()
                # Earlier segments are fsynced before later ones get data: on disk, only the
                # last segment can ever end in a torn record.
                os.fsync(seg.fd)
                seg.durable = seg.size
                if seg is not cur:
                    os.close(seg.fd)
                    seg.fd = None
            if self._dir_dirty:
                os.fsync(self._dir_fd)
                self._dir_dirty = False
            if self._obsolete:
                with self._mu:
                    self._remove_obsolete()
        except OSError as e:
            self._failed = e
            raise
        if wrote:
            metrics.FSYNC.observe(time.monotonic() - started)

    def compact(self, meta: SnapshotMeta) -> None:
        """Durable on return (it syncs): the SNAPSHOT_META record must be on disk before any
        segment holding entries it covers is removed."""
        self._check()
        if meta.index <= self._meta.index:
            return
        with self._mu:
            self._write(SNAPSHOT_META, self._packer.pack(_pack_meta(meta)))
            first = meta.index + 1
            runs = self._runs
            if first > self._last:
                self._last = meta.index
                runs.clear()
                self._offs = array("Q")
            else:
                while len(runs) > 1 and runs[1][0] <= first:
                    runs.pop(0)
                runs[0][0] = first
                del self._offs[: meta.index - self._meta.index]
            self._meta = meta
        self.sync()
        keep = runs[0][1] if runs else self._segments[-1].seq
        try:
            while self._segments[0].seq < keep:
                seg = self._segments[0]
                with self._mu:
                    seg.close_reader()
                    self._segments.pop(0)
                try:
                    os.unlink(seg.path)
                except FileNotFoundError:
                    pass
                # One directory fsync per removal keeps removals in order, so a crash can
                # only leave a suffix of the segments (no holes).
                os.fsync(self._dir_fd)
        except OSError as e:
            self._failed = e
            raise

    def install(self, meta: SnapshotMeta) -> None:
        """A snapshot from the leader replaced the state machine: forget every entry (also any
        after meta.index) and resume at meta.index + 1. Buffered like append(): durable, and
        atomic, at the next sync(). The INSTALL record starts a new segment, so every earlier
        segment is useless once it is synced; sync() then removes them, oldest first."""
        self._check()
        if meta.index < self._meta.index:
            raise ValueError(f"install at {meta.index} is below the snapshot at {self._meta.index}")
        with self._mu:
            self._start_segment(self._segments[-1].seq + 1)
            _append_record(self._segments[-1], INSTALL, self._packer.pack(_pack_meta(meta)))
            self._obsolete = self._segments[:-1]
            self._meta = meta
            self._last = meta.index
            self._runs = []
            self._offs = array("Q")

    def _remove_obsolete(self) -> None:
        # Oldest first with a directory fsync after each, as in compact(): a crash leaves a
        # suffix of the segments, which still begins with the INSTALL record's segment or
        # replays to it.
        while self._obsolete:
            seg = self._obsolete[0]
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
            seg.close_reader()
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass
            os.fsync(self._dir_fd)
            self._obsolete.pop(0)
            self._segments.remove(seg)

    def close(self) -> None:
        """Sync and release the directory. A failed store is closed without syncing."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.sync()
        finally:
            self._abandon()

    # internals ----------------------------------------------------------------------------

    def _abandon(self) -> None:
        """Close every descriptor without writing buffered data. Tests use it to model a process
        crash: everything since the last sync() is lost."""
        self._closed = True
        for seg in self._segments:
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
            seg.close_reader()
        for name in ("_dir_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, None)

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("LogStore is closed")
        if self._failed is not None:
            raise LogStoreFailedError(f"{self._dir}: an earlier write failed: {self._failed}")

    def _write(self, rtype: int, payload: bytes) -> int:
        """Buffer one record in the current segment (rolling over first if it is full); returns
        its byte offset in that segment."""
        seg = self._segments[-1]
        if seg.size >= self._segment_size and seg.size > seg.base_size:
            seg = self._start_segment(seg.seq + 1)
        off = seg.size
        _append_record(seg, rtype, payload)
        return off

    def _corrupt(self, seg: _Segment, off: int, reason: str) -> LogCorruptError:
        """A record read back is damaged: from now on the store refuses every call."""
        err = LogCorruptError(seg.path, off, reason)
        self._failed = err
        logger.critical("%s", err)
        return err

    def _read_record(self, seg: _Segment, off: int, index: int) -> tuple[int, list]:
        """(first index, rows) of the durable ENTRIES record at off, which must hold index."""
        if seg.rfd is None:
            seg.rfd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        if off + _HDR > seg.durable:
            # sync() makes whole records durable, so this is a caller's bug, not damage.
            raise ValueError(f"entry {index} at {seg.path}:{off} is not synced yet")
        head = os.pread(seg.rfd, _HDR, off)
        if len(head) < _HDR:
            raise self._corrupt(seg, off, f"short record header reading back entry {index}")
        crc, length, rtype = _REC_HEADER.unpack(head)
        if rtype != ENTRIES:
            raise self._corrupt(seg, off, f"record type {rtype} where entry {index} should be")
        if off + _HDR + length > seg.durable:
            raise self._corrupt(seg, off, f"record length {length} runs past the synced data")
        payload = os.pread(seg.rfd, length, off + _HDR)
        if len(payload) != length:
            raise self._corrupt(seg, off, f"short record reading back entry {index}")
        if _crc32(payload, _crc32(head[4:], seg.salt)) != crc:
            raise self._corrupt(seg, off, f"CRC mismatch reading back entry {index}")
        try:
            first, rows = msgpack.unpackb(payload, raw=False, use_list=True)
            if not isinstance(first, int) or not isinstance(rows, list):
                raise ValueError("bad batch")
        except Exception as e:  # noqa: BLE001 - an intact CRC over a bad payload
            raise self._corrupt(seg, off, f"undecodable ENTRIES record: {e}") from None
        if not first <= index < first + len(rows):
            raise self._corrupt(seg, off, f"record holds {first}..{first + len(rows) - 1}, not {index}")
        return first, rows

    def _start_segment(self, seq: int) -> _Segment:
        """A new current segment, buffered: its file is created by the next sync()."""
        if self._segments:
            old = self._segments[-1]
            if old.buf:
                self._rolled.append(old)
            elif old.fd is not None:
                os.close(old.fd)
                old.fd = None
        salt = int.from_bytes(os.urandom(4), "little")
        seg = _Segment(seq, _segment_path(self._dir, seq), salt, None, 0)
        head = _SEG_HEADER.pack(_MAGIC, _VERSION, seq, salt, 0)[:-4]
        seg.buf += head
        seg.buf += _U32.pack(_crc32(head))
        seg.size = len(seg.buf)
        # The checkpoint makes every segment self-sufficient for hard state and snapshot meta,
        # so compaction may delete any prefix of segments.
        _append_record(seg, HARD_STATE, self._packer.pack(_pack_hs(self._hs)))
        _append_record(seg, SNAPSHOT_META, self._packer.pack(_pack_meta(self._meta)))
        seg.base_size = seg.size
        self._segments.append(seg)
        return seg

    def _recover(self) -> tuple[HardState, SnapshotMeta, StoredLog]:
        found = []
        for name in os.listdir(self._dir):
            m = _SEGMENT_NAME.match(name)
            if m:
                found.append((int(m.group(1), 16), os.path.join(self._dir, name)))
        found.sort()
        for (prev, _), (seq, path) in zip(found, found[1:], strict=False):
            if seq != prev + 1:
                raise LogCorruptError(path, 0, f"segment {prev + 1:016x} is missing")

        hs = HardState()
        meta = SnapshotMeta()
        # The live entries, without their data: offs[i] is where entry base + 1 + i is (its
        # record's offset, in the segment runs names); terms and confs are for StoredLog.
        offs = array("Q")
        terms = _TermRuns()
        confs: list[Entry] = []
        base = 0
        runs: list[list[int]] = []
        origin = ("", 0)  # the record that started the current run of entries, for errors
        reopen: tuple[int, str, int, int] | None = None  # (seq, path, salt, size) to append to
        next_seq = 1

        for i, (seq, path) in enumerate(found):
            is_last = i == len(found) - 1
            # Record by record, not the whole segment at once: recovery holds one record (and
            # the index) in memory, whatever the size of the log.
            f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
            try:
                size = os.fstat(f.fileno()).st_size
                raw = f.read(_SEG_HEADER.size)
                if not _header_intact(raw):
                    f.seek(0)
                    raw = f.read()  # the torn-or-zeroed check looks at the whole file
                salt = self._check_header(path, seq, raw, is_last)
                if salt is None:  # torn header of the last segment: it holds nothing
                    self._remove_torn_segment(path, f"torn segment header ({size} bytes)")
                    next_seq = seq
                    break
                pos = _SEG_HEADER.size
                nrec = 0
                while pos < size:
                    rec = _read_record_at(f, size, pos, salt)
                    if rec is None:
                        if not is_last:
                            raise LogCorruptError(path, pos, "bad record in a sealed segment")
                        f.seek(0)
                        later = _find_record_after(memoryview(f.read()), pos + 1, salt)
                        if later is not None:
                            raise LogCorruptError(
                                path, pos, f"bad record followed by an intact record at offset {later}"
                            )
                        self._truncate_torn_tail(path, pos, size)
                        break
                    rtype, end, payload = rec
                    if nrec < 2 and rtype != (HARD_STATE, SNAPSHOT_META)[nrec]:
                        raise LogCorruptError(path, pos, "segment does not start with its checkpoint")
                    try:
                        value = msgpack.unpackb(payload, raw=False, use_list=True)
                        if rtype == ENTRIES:
                            first, rows = value
                            if not rows or not isinstance(first, int) or first < 1:
                                raise ValueError("empty or misplaced batch")
                            new = [_decode_entry(first + j, row) for j, row in enumerate(rows)]
                        elif rtype == HARD_STATE:
                            hs = _decode_hs(value)
                        elif rtype == INSTALL:
                            m = _decode_meta(value)
                            if m.index < meta.index:
                                raise ValueError(
                                    f"installed snapshot {m.index} is below the snapshot {meta.index}"
                                )
                            meta = m
                        else:
                            m = _decode_meta(value)
                            if m.index < meta.index:
                                raise ValueError(
                                    f"snapshot index went back from {meta.index} to {m.index}"
                                )
                            meta = m
                    except Exception as e:  # noqa: BLE001 - an intact CRC over a bad payload
                        raise LogCorruptError(path, pos, f"undecodable {rtype=} record: {e}") from None
                    del payload, value  # only the index below stays in memory

                    if rtype == INSTALL:
                        offs, terms, confs, runs, base = array("Q"), _TermRuns(), [], [], meta.index
                        origin = (path, pos)
                    elif rtype == ENTRIES:
                        if first <= base + 1 or first > base + len(offs) + 1:
                            # Replaces every entry (a truncation from below the first one), or
                            # starts after a gap: legal only where compaction removed the
                            # segments in between, which the final check below verifies.
                            offs, terms, confs = array("Q"), _TermRuns(), []
                            base = first - 1
                            runs = [[first, seq]]
                            origin = (path, pos)
                        else:
                            del offs[first - base - 1 :]
                            terms.truncate(first)
                            while confs and confs[-1].index >= first:
                                confs.pop()
                            while runs and runs[-1][0] >= first:
                                runs.pop()
                            if not runs or runs[-1][1] != seq:
                                runs.append([first, seq])
                        offs.extend([pos] * len(new))
                        for e in new:
                            terms.add(e.index, e.term)
                            if e.type == EntryType.CONF_CHANGE:
                                confs.append(e)
                        del new
                    if base < meta.index:  # drop what the snapshot covers
                        drop = meta.index - base
                        if drop >= len(offs):
                            offs, terms, confs, runs = array("Q"), _TermRuns(), [], []
                        else:
                            del offs[:drop]
                            terms.drop_through(meta.index)
                            confs = [e for e in confs if e.index > meta.index]
                            while len(runs) > 1 and runs[1][0] <= meta.index + 1:
                                runs.pop(0)
                            runs[0][0] = meta.index + 1
                        base = meta.index
                    nrec += 1
                    pos = end
            finally:
                f.close()
            if nrec < 2:
                if not is_last:
                    raise LogCorruptError(path, pos, "sealed segment without a complete checkpoint")
                # A torn new segment: everything it held is also in the one before it.
                self._remove_torn_segment(path, "segment torn inside its checkpoint")
                next_seq = seq
                break
            if is_last:
                reopen = (seq, path, salt, pos)
            else:
                self._segments.append(_Segment(seq, path, salt, None, size))
            next_seq = seq + 1

        if base != meta.index:
            raise LogCorruptError(
                origin[0],
                origin[1],
                f"entries start at {base + 1} but the snapshot ends at {meta.index}",
            )
        self._hs, self._meta, self._runs, self._offs = hs, meta, runs, offs
        self._last = base + len(offs)
        if reopen is not None:
            seq, path, salt, size = reopen
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.lseek(fd, 0, os.SEEK_END)
            self._segments.append(_Segment(seq, path, salt, fd, size))
        else:  # empty directory, or the last segment was torn away
            self._start_segment(next_seq)
        return hs, meta, StoredLog(self._last, terms.runs(), tuple(confs))

    def _check_header(self, path: str, seq: int, raw: bytes, is_last: bool) -> int | None:
        """The segment's CRC salt; None for a torn header of the last segment."""
        size = _SEG_HEADER.size
        if len(raw) >= size:
            magic, version, hseq, salt, crc = _SEG_HEADER.unpack_from(raw)
            if magic == _MAGIC and crc == _crc32(raw[: size - 4]):
                if version != _VERSION:
                    raise LogCorruptError(path, 0, f"unsupported log format version {version}")
                if hseq != seq:
                    raise LogCorruptError(path, 0, f"header says segment {hseq:016x}")
                return salt
        # A new file whose header never fully reached the disk reads short or as zeros.
        if is_last and (len(raw) < size or not any(raw)):
            return None
        raise LogCorruptError(path, 0, "bad segment header")

    def _truncate_torn_tail(self, path: str, pos: int, size: int) -> None:
        logger.warning(
            "%s: truncating torn tail at byte offset %d (%d bytes dropped)", path, pos, size - pos
        )
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, pos)
            os.fsync(fd)  # before anything new is appended after it
        finally:
            os.close(fd)

    def _remove_torn_segment(self, path: str, why: str) -> None:
        logger.warning("%s: removing torn last segment: %s", path, why)
        os.unlink(path)
        os.fsync(self._dir_fd)
