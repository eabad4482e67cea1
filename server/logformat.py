"""The log store's on-disk format (server/DESIGN.md, "Log store"): segment files, the records
in them and their codecs. server/logstore.py is the store that writes and reads them."""

from __future__ import annotations

import os
import re
import struct
import zlib
from bisect import bisect_right

from raftsql.raft.types import Entry, EntryType, HardState, SnapshotMeta

DEFAULT_SEGMENT_SIZE = 64 << 20

_MAGIC = b"RSQLLOG"
_VERSION = 1
_SEG_HEADER = struct.Struct("<7sBQII")
_REC_HEADER = struct.Struct("<IIB")
_LEN_TYPE = struct.Struct("<IB")
_HDR = _REC_HEADER.size
_U32 = struct.Struct("<I")

# Record types. The numbers are on disk: never renumber.
# ENTRIES: [first_index, [[term, type, data], ...]]; drops every entry >= first_index, then appends.
ENTRIES = 1
HARD_STATE = 2  # [term, vote, commit]
SNAPSHOT_META = 3  # [index, term, voters, learners]: entries <= index are gone
# INSTALL: [index, term, voters, learners]: a snapshot from the leader replaced the state
# machine; *every* entry is gone (also those after index) and the log resumes at index + 1.
INSTALL = 4
_RECORD_TYPES = bytes((ENTRIES, HARD_STATE, SNAPSHOT_META, INSTALL))

_ENTRY_TYPES = {int(t): t for t in EntryType}
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.seg$")
_crc32 = zlib.crc32


class _Segment:
    __slots__ = ("seq", "path", "salt", "fd", "rfd", "size", "durable", "base_size", "buf")

    def __init__(self, seq: int, path: str, salt: int, fd: int | None, size: int):
        self.seq = seq
        self.path = path
        self.salt = salt
        self.fd = fd  # open only for the current segment and for ones with unsynced data
        self.rfd: int | None = None  # read_entries()'s descriptor, opened on first use
        self.size = size  # bytes on disk + bytes in buf
        self.durable = size  # bytes fsynced: read_entries() never reads past them
        self.base_size = size  # size after header + checkpoint: never roll over an empty segment
        self.buf = bytearray()  # written to the file by sync(), not before

    def close_reader(self) -> None:
        if self.rfd is not None:
            os.close(self.rfd)
            self.rfd = None


def _segment_path(directory: str, seq: int) -> str:
    return os.path.join(directory, f"{seq:016x}.seg")


def _pack_hs(hs: HardState) -> list:
    return [hs.term, hs.vote, hs.commit]


def _pack_meta(meta: SnapshotMeta) -> list:
    return [meta.index, meta.term, list(meta.voters), list(meta.learners)]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_at(data: memoryview, pos: int, salt: int) -> tuple[int, int] | None:
    """(type, end) of the intact record at pos, or None."""
    n = len(data)
    if n - pos < _HDR:
        return None
    crc, length, rtype = _REC_HEADER.unpack_from(data, pos)
    end = pos + _HDR + length
    if end > n or rtype not in _RECORD_TYPES:
        return None
    if _crc32(data[pos + _HDR : end], _crc32(data[pos + 4 : pos + _HDR], salt)) != crc:
        return None
    return rtype, end


def _header_intact(raw: bytes) -> bool:
    if len(raw) < _SEG_HEADER.size:
        return False
    magic, _, _, _, crc = _SEG_HEADER.unpack_from(raw)
    return magic == _MAGIC and crc == _crc32(raw[: _SEG_HEADER.size - 4])


def _read_record_at(f, size: int, pos: int, salt: int) -> tuple[int, int, bytes] | None:
    """(type, end, payload) of the intact record at pos of file f (size bytes), or None: the
    streaming twin of _record_at, so recovery never holds more than one record."""
    if size - pos < _HDR:
        return None
    f.seek(pos)
    head = f.read(_HDR)
    crc, length, rtype = _REC_HEADER.unpack(head)
    end = pos + _HDR + length
    if end > size or rtype not in _RECORD_TYPES:
        return None
    payload = f.read(length)
    if len(payload) != length or _crc32(payload, _crc32(head[4:], salt)) != crc:
        return None
    return rtype, end, payload


def _find_record_after(data: memoryview, start: int, salt: int) -> int | None:
    """The offset of any intact record at or after start (any byte offset), or None.
    Only run after a bad record, so its cost does not matter on the hot path."""
    types = _RECORD_TYPES
    for q in range(start, len(data) - _HDR + 1):
        if data[q + 8] in types and _record_at(data, q, salt) is not None:
            return q
    return None


def _run_first(run: list[int]) -> int:
    return run[0]


class _TermRuns:
    """Recovery's run-length record of the live entries' terms: (first index, term) runs."""

    __slots__ = ("firsts", "terms")

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.terms: list[int] = []

    def add(self, index: int, term: int) -> None:
        if not self.terms or self.terms[-1] != term:
            self.firsts.append(index)
            self.terms.append(term)

    def truncate(self, first: int) -> None:
        """Forget the terms of first and every later index."""
        r = bisect_right(self.firsts, first - 1)
        del self.firsts[r:]
        del self.terms[r:]

    def drop_through(self, index: int) -> None:
        """Forget the terms up to index; the run holding index + 1 now starts there."""
        r = bisect_right(self.firsts, index)
        if r == 0:
            return
        term = self.terms[r - 1]
        del self.firsts[:r]
        del self.terms[:r]
        if not self.firsts or self.firsts[0] != index + 1:
            self.firsts.insert(0, index + 1)
            self.terms.insert(0, term)

    def runs(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.firsts, self.terms, strict=True))


def _append_record(seg: _Segment, rtype: int, payload: bytes) -> None:
    lt = _LEN_TYPE.pack(len(payload), rtype)
    buf = seg.buf
    buf += _U32.pack(_crc32(payload, _crc32(lt, seg.salt)))
    buf += lt
    buf += payload
    seg.size += _HDR + len(payload)


def _write_rest(fd: int, buf: bytearray, done: int) -> None:
    while done < len(buf):
        done += os.write(fd, bytes(buf[done:]))


def _decode_entry(index: int, row: list) -> Entry:
    term, etype, data = row
    if not isinstance(term, int) or not isinstance(data, bytes):
        raise ValueError(f"bad entry at index {index}")
    return Entry(term, index, _ENTRY_TYPES[etype], data)


def _decode_hs(value: list) -> HardState:
    term, vote, commit = value
    if (
        not isinstance(term, int)
        or not isinstance(commit, int)
        or not (vote is None or isinstance(vote, str))
    ):
        raise ValueError("bad hard state")
    return HardState(term, vote, commit)


def _decode_meta(value: list) -> SnapshotMeta:
    index, term, voters, learners = value
    if not isinstance(index, int) or not isinstance(term, int):
        raise ValueError("bad snapshot meta")
    if not all(isinstance(v, str) for v in voters) or not all(isinstance(v, str) for v in learners):
        raise ValueError("bad snapshot membership")
    return SnapshotMeta(index, term, tuple(voters), tuple(learners))
