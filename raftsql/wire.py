"""Sans-I/O framing and msgpack codec shared by the server (node-to-node and client service) and
the driver. Bytes in, frames out: no sockets, no threads, no clocks.

A frame on the wire::

    +----------------------+---------------------------------------------+
    | N: uint32 big-endian | N bytes of msgpack: [kind: int, payload]     |
    +----------------------+---------------------------------------------+

`kind` is a FrameKind. A connection starts with a HELLO frame each way; node-to-node
connections then carry RAFT frames (a batch of Messages), client connections REQUEST/RESPONSE
frames (string-keyed maps, see check_map). ERROR is sent once, just before closing.

Everything from the other side is hostile until validated: msgpack is unpacked with bounded
sizes, no ext types and UTF-8 strings only, and every decoded field is type- and range-checked.
Any malformed input raises FrameError (or its subclass DecodeError), never another exception;
the connection must then be closed.

Only stdlib, msgpack and raftsql.raft.types may be imported here: the driver ships this module.
"""

from __future__ import annotations

import contextlib
import gc
import reprlib
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from raftsql.raft.types import Entry, EntryType, HardState, Message, MsgType

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_REQUEST_SIZE",
    "HEADER_SIZE",
    "MAX_NODE_ID_LEN",
    "MAX_UINT",
    "PROTOCOL_VERSION",
    "DecodeError",
    "FrameDecoder",
    "FrameError",
    "FrameKind",
    "Hello",
    "SnapshotChunk",
    "check_map",
    "decode_entry",
    "decode_hard_state",
    "decode_message",
    "decode_raft_batch",
    "decode_snapshot_chunk",
    "encode_entry",
    "encode_frame",
    "encode_hard_state",
    "encode_message",
    "encode_raft_batch",
    "encode_snapshot_chunk",
    "make_error",
    "make_hello",
    "parse_error",
    "parse_hello",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024
# The largest client REQUEST a node accepts by default. A request is unpacked, checked and
# encoded while holding the GIL (about 25 ms per MiB): bigger ones would stall heartbeats long
# enough for the followers to elect a new leader, which would get the same request. etcd's
# default is 1.5 MiB (--max-request-bytes).
DEFAULT_MAX_REQUEST_SIZE = 4 * 1024 * 1024
HEADER_SIZE = 4
MAX_NODE_ID_LEN = 64
MAX_UINT = 2**63  # decoded ints must be in [0, MAX_UINT): they fit a signed 64-bit column
_MAX_ENCODABLE = 2**32 - 1  # the length prefix is a uint32

_HEADER = struct.Struct(">I")


class FrameError(ValueError):
    """Raised when bytes from the peer violate the framing or handshake protocol (oversized or
    undecodable frame, unknown kind, protocol version mismatch). The connection is unusable."""


class DecodeError(FrameError):
    """Raised when a well-framed payload is malformed: a field is missing, of the wrong type or
    out of range."""


class FrameKind(IntEnum):
    """The first element of every frame body. The numbers are on the wire: never renumber."""

    HELLO = 1  # payload: {"version": int, "node_id": str | None, "role": "node" | "client"}
    RAFT = 2  # payload: [encoded Message, ...] (a batch)
    REQUEST = 3  # client -> node, payload: a string-keyed map
    RESPONSE = 4  # node -> client, payload: a string-keyed map
    ERROR = 5  # payload: {"message": str}; a fatal protocol error, sent just before closing
    SNAPSHOT = 6  # node -> node, payload: a SnapshotChunk (see encode_snapshot_chunk)


_FRAME_KINDS = {int(k): k for k in FrameKind}
_MSG_TYPES = {int(t): t for t in MsgType}
_ENTRY_TYPES = {int(t): t for t in EntryType}


# --- framing -------------------------------------------------------------------------------


def encode_frame(
    kind: FrameKind, payload: Any, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """One whole frame: length prefix + msgpack([kind, payload]).

    Raises FrameError if the body would exceed max_frame_size (the peer would reject it: split
    the batch instead). A payload msgpack cannot encode (an int >= 2**64, an unknown type) is a
    bug in the caller and raises msgpack's TypeError/OverflowError unchanged.
    """
    body = msgpack.packb((int(kind), payload), use_bin_type=True)
    n = len(body)
    if n > max_frame_size or n > _MAX_ENCODABLE:
        raise FrameError(
            f"{FrameKind(kind).name} frame of {n} bytes exceeds the {max_frame_size}-byte limit"
        )
    return _HEADER.pack(n) + body


def _reject_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack ext type {code} is not allowed")


# Frames at least this big are unpacked piece by piece (_walk): msgpack's C unpacker holds the
# GIL for a whole call, and one executemany request of 1,000,000 small rows (2 MB) took 0.5 s,
# long enough for the followers of a leader decoding it to elect another (server/DESIGN.md,
# "Heavy requests").
INCREMENTAL_BYTES = 1 << 18
_SMALL = 16  # containers up to this many elements, deeper than _SHALLOW, are unpacked whole
_SHALLOW = 3


_gc_lock = threading.Lock()
_gc_state = {"depth": 0, "restore": False}  # threads inside gc_paused(); was gc on before


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the body builds many objects that hold no cycles (a
    big frame's containers): with a million new lists alive, CPython ran eight full collections
    in one 2 MB frame, each holding the GIL for up to 65 ms. Collection resumes (if it was on)
    when the last thread inside leaves."""
    with _gc_lock:
        if _gc_state["depth"] == 0:
            _gc_state["restore"] = gc.isenabled()
            gc.disable()
        _gc_state["depth"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["depth"] -= 1
            if _gc_state["depth"] == 0 and _gc_state["restore"]:
                gc.enable()


def _unpack_body(body: Any, n: int) -> Any:
    """Unpacks one frame body of n bytes with every size bounded by n (a container cannot hold
    more elements than it has bytes), so a hostile length field cannot make us preallocate."""
    limits = dict(
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_bin_len=n,
        max_str_len=n,
        max_array_len=n,
        max_map_len=n // 2,
        max_ext_len=0,
        ext_hook=_reject_ext,
    )
    if n < INCREMENTAL_BYTES:
        return msgpack.unpackb(body, **limits)
    unpacker = msgpack.Unpacker(max_buffer_size=n, **limits)
    unpacker.feed(body)
    with gc_paused():
        obj = _walk(unpacker, body, 0, n)
    if unpacker.tell() != n:
        raise ValueError(f"extra data after the first object ({n - unpacker.tell()} bytes)")
    return obj


def _container(body: Any, pos: int) -> tuple[str | None, int]:
    """("array" | "map" | None, element count) of the msgpack object starting at body[pos]."""
    b = body[pos]
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F
    if b in (0xDC, 0xDE):
        return ("array" if b == 0xDC else "map"), int.from_bytes(body[pos + 1:pos + 3], "big")
    if b in (0xDD, 0xDF):
        return ("array" if b == 0xDD else "map"), int.from_bytes(body[pos + 1:pos + 5], "big")
    return None, 0


def _walk(unpacker: Any, body: Any, depth: int, n: int) -> Any:
    """The next object, equal to what unpackb would give, built one element at a time for
    every container near the top or longer than _SMALL elements: each unpack() call is then
    short, and between two of them the interpreter can hand the GIL to the node's ticker and
    Raft threads."""
    kind, count = _container(body, unpacker.tell())
    if kind is None or (count <= _SMALL and depth > _SHALLOW):
        return unpacker.unpack()
    # read_*_header() do not apply the Unpacker's max_*_len: check as unpackb would.
    if kind == "array":
        if count > n:
            raise ValueError(f"{count} exceeds max_array_len({n})")
        count = unpacker.read_array_header()
        return [_walk(unpacker, body, depth + 1, n) for _ in range(count)]
    if count > n // 2:
        raise ValueError(f"{count} exceeds max_map_len({n // 2})")
    count = unpacker.read_map_header()
    out = {}
    for _ in range(count):
        key = unpacker.unpack()
        if type(key) not in (str, bytes):
            raise ValueError(f"{type(key).__name__} is not allowed for map key")
        out[key] = _walk(unpacker, body, depth + 1, n)
    return out


class FrameDecoder:
    """Turns a byte stream into (FrameKind, payload) pairs.

    feed() may be given any chunking of the stream; partial frames are buffered (appended to a
    bytearray and consumed by offset, so a big frame arriving in small pieces costs O(size),
    not O(size**2)). The payload is returned as unpacked msgpack, not yet validated: pass it
    to decode_raft_batch / parse_hello / check_map / parse_error according to its kind.

    Raises FrameError on the first protocol violation; the decoder is then closed for good
    (every later feed() raises) and so must the connection be. Frames decoded earlier in the
    same feed() call are discarded with it.

    Note: msgpack can expand a frame ~64x in memory (one byte per empty list), so max_frame_size
    also bounds memory: use a smaller limit on connections not yet authenticated.
    """

    __slots__ = ("max_frame_size", "_buf", "_off", "_error")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        if type(max_frame_size) is not int or not 0 < max_frame_size <= _MAX_ENCODABLE:
            raise ValueError(f"max_frame_size must be an int in [1, {_MAX_ENCODABLE}]")
        self.max_frame_size = max_frame_size
        # Invariant: _buf[_off:] is the unconsumed tail of the stream (a partial frame).
        self._buf = bytearray()
        self._off = 0
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for more data."""
        return len(self._buf) - self._off

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[FrameKind, Any]]:
        if self._error is not None:
            raise FrameError(f"frame decoder closed after an earlier error: {self._error}")
        try:
            return self._feed(data)
        except FrameError as e:
            self._error = str(e)
            self._buf = bytearray()
            self._off = 0
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[tuple[FrameKind, Any]]:
        buf = self._buf
        if self._off == len(buf):
            # Nothing buffered: decode straight from `data` (the common case, no copy).
            if buf:
                buf.clear()
            src: Any = data
            off = 0
        else:
            buf += data
            src = buf
            off = self._off
        end = len(src)
        frames: list[tuple[FrameKind, Any]] = []
        limit = self.max_frame_size
        while end - off >= HEADER_SIZE:
            (n,) = _HEADER.unpack_from(src, off)
            if n > limit:
                raise FrameError(f"frame of {n} bytes exceeds the {limit}-byte limit")
            start = off + HEADER_SIZE
            stop = start + n
            if stop > end:
                break
            frames.append(self._decode_body(src, start, stop))
            off = stop
        if src is buf:
            if off == end:
                buf.clear()
                off = 0
            elif off > 65536 and 2 * off > end:
                del buf[:off]  # compact: the consumed prefix outweighs the kept tail
                off = 0
            self._off = off
        else:
            if off < end:
                buf += memoryview(data)[off:]
            self._off = 0
        return frames

    @staticmethod
    def _decode_body(src: Any, start: int, stop: int) -> tuple[FrameKind, Any]:
        n = stop - start
        try:
            # The views must be released before `src` (maybe our bytearray) is resized.
            with memoryview(src) as view, view[start:stop] as body:
                obj = _unpack_body(body, n)
        except FrameError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpack failure of peer bytes is one error
            raise FrameError(f"frame of {n} bytes is not valid msgpack: {e}") from None
        if type(obj) is not list or len(obj) != 2:
            raise FrameError(
                f"frame body must be a 2-element array [kind, payload], got {_describe(obj)}"
            )
        kind = obj[0]
        fk = _FRAME_KINDS.get(kind) if type(kind) is int else None
        if fk is None:
            raise FrameError(f"unknown frame kind {kind!r}")
        return fk, obj[1]


# --- validation helpers ---------------------------------------------------------------------


_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # a hostile value may nest 1,000 deep: plain repr() raises RecursionError
_REPR.maxstring = _REPR.maxother = 60


def _describe(value: Any) -> str:
    r = _REPR.repr(value)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{type(value).__name__} {r}"


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < MAX_UINT:
        raise DecodeError(f"{what}: expected an int in [0, 2**63), got {_describe(value)}")
    return value


def _node_id(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NODE_ID_LEN:
        raise DecodeError(
            f"{what}: expected a node id (non-empty str of at most {MAX_NODE_ID_LEN} chars), "
            f"got {_describe(value)}"
        )
    return value


def _bytes(value: Any, what: str) -> bytes:
    if type(value) is not bytes:
        raise DecodeError(f"{what}: expected bytes, got {_describe(value)}")
    return value


def _list(value: Any, what: str, length: int | None = None) -> list:
    if type(value) is not list:
        raise DecodeError(f"{what}: expected an array, got {_describe(value)}")
    if length is not None and len(value) != length:
        raise DecodeError(f"{what}: expected {length} elements, got {len(value)}")
    return value


def check_map(
    payload: Any,
    required: dict[str, type | tuple[type, ...]],
    optional: dict[str, type | tuple[type, ...]] | None = None,
) -> dict[str, Any]:
    """Validates a REQUEST/RESPONSE-style payload: a map with str keys where every key of
    `required` is present and every key of `required`/`optional` that is present has one of the
    given types (bool is not accepted as int unless bool is listed; use type(None) to allow nil).
    Unknown keys are allowed (forward compatibility). Returns the payload; raises DecodeError."""
    if type(payload) is not dict:
        raise DecodeError(f"expected a map, got {_describe(payload)}")
    for key in payload:
        if type(key) is not str:
            raise DecodeError(f"map keys must be str, got {_describe(key)}")
    for key, types in required.items():
        if key not in payload:
            raise DecodeError(f"missing field {key!r}")
        _check_type(payload[key], key, types)
    if optional:
        for key, types in optional.items():
            if key in payload:
                _check_type(payload[key], key, types)
    return payload


def _check_type(value: Any, key: str, types: type | tuple[type, ...]) -> None:
    allowed = types if isinstance(types, tuple) else (types,)
    if isinstance(value, allowed) and (type(value) is not bool or bool in allowed):
        return
    names = " or ".join("nil" if t is type(None) else t.__name__ for t in allowed)
    raise DecodeError(f"field {key!r}: expected {names}, got {_describe(value)}")


# --- hello / error --------------------------------------------------------------------------

_ROLES = ("node", "client")


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame each side sends. node_id is set for role 'node' (and optional for a
    client)."""

    protocol_version: int
    node_id: str | None
    role: str
    # A dialing node's advertised host:port, so a node that never applied the change adding
    # it (a snapshot skipped it, or it was down) can still answer it. Optional.
    address: str | None = None
    # A node answering a client: the largest REQUEST frame it accepts (bytes). Optional.
    max_request: int | None = None
    # Between nodes: the id of the cluster whose data this node holds (CLUSTER_ID_LEN hex
    # digits), once it has applied the entry that named the cluster. Optional.
    cluster: str | None = None


MAX_ADDRESS_LEN = 300
CLUSTER_ID_LEN = 32


def valid_cluster_id(value: Any) -> bool:
    """A cluster id: CLUSTER_ID_LEN lower-case hex digits (16 random bytes)."""
    return (type(value) is str and len(value) == CLUSTER_ID_LEN
            and all(c in "0123456789abcdef" for c in value))


def make_hello(
    node_id: str | None, role: str, address: str | None = None, max_request: int | None = None,
    cluster: str | None = None,
) -> bytes:
    """A whole HELLO frame for this side of a connection."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
    if node_id is not None or role == "node":
        _node_id(node_id, "hello node_id")
    doc: dict[str, Any] = {"version": PROTOCOL_VERSION, "node_id": node_id, "role": role}
    if address is not None:
        doc["address"] = address
    if max_request is not None:
        doc["max_request"] = max_request
    if cluster is not None:
        if not valid_cluster_id(cluster):
            raise ValueError(f"cluster must be {CLUSTER_ID_LEN} lower-case hex digits, got {cluster!r}")
        doc["cluster"] = cluster
    return encode_frame(FrameKind.HELLO, doc)


def parse_hello(payload: Any) -> Hello:
    """Validates a HELLO payload. A different protocol version raises FrameError naming both
    versions (checked first, so a future hello of another shape still gets that message)."""
    if type(payload) is not dict:
        raise DecodeError(f"hello: expected a map, got {_describe(payload)}")
    version = payload.get("version")
    if type(version) is not int:
        raise DecodeError(f"hello: field 'version': expected int, got {_describe(version)}")
    if version != PROTOCOL_VERSION:
        raise FrameError(
            f"peer speaks protocol version {version}, this side speaks version {PROTOCOL_VERSION}"
        )
    if "node_id" not in payload or "role" not in payload:
        raise DecodeError("hello: missing field 'node_id' or 'role'")
    role = payload["role"]
    if type(role) is not str or role not in _ROLES:
        raise DecodeError(
            f"hello: field 'role': expected 'node' or 'client', got {_describe(role)}"
        )
    node_id = payload["node_id"]
    if node_id is not None or role == "node":
        _node_id(node_id, "hello: field 'node_id'")
    address = payload.get("address")
    if address is not None:
        host, sep, port = address.rpartition(":") if type(address) is str else ("", "", "")
        if (
            not sep
            or not host
            or len(address) > MAX_ADDRESS_LEN
            or not port.isdigit()
            or not 0 < int(port) < 65536
        ):
            raise DecodeError(f"hello: field 'address': expected host:port, got {_describe(address)}")
    max_request = payload.get("max_request")
    if max_request is not None and (type(max_request) is not int or max_request <= 0):
        raise DecodeError(f"hello: field 'max_request': expected a positive int, got {_describe(max_request)}")
    cluster = payload.get("cluster")
    if cluster is not None and not valid_cluster_id(cluster):
        raise DecodeError(
            f"hello: field 'cluster': expected {CLUSTER_ID_LEN} lower-case hex digits, got {_describe(cluster)}")
    return Hello(version, node_id, role, address, max_request, cluster)


def make_error(message: str, kind: str | None = None) -> bytes:
    """A whole ERROR frame: the reason this side is about to close the connection, and
    optionally its kind (a protocol ErrorKind value: "FORBIDDEN" for a revoked certificate)."""
    doc = {"message": str(message)}
    if kind is not None:
        doc["kind"] = kind
    return encode_frame(FrameKind.ERROR, doc)


def parse_error(payload: Any) -> str:
    """The reason carried by an ERROR frame."""
    return check_map(payload, {"message": str})["message"]


def parse_error_kind(payload: Any) -> str | None:
    """The kind carried by an ERROR frame, or None (most carry none)."""
    try:
        return check_map(payload, {"message": str}, {"kind": str}).get("kind")
    except DecodeError:
        return None


# --- Raft codec -----------------------------------------------------------------------------
#
# Message on the wire (an 11-element array, fields in dataclass order):
#   [type, to, sender, term, log_term, index, entries, commit, reject, reject_hint, context]
# Entry: [term, index, type, data]; HardState: [term, vote (str or nil), commit].
# Decoding checks everything with one fast combined test; only a failure pays for the slow
# per-field diagnosis that names the bad field.


def encode_entry(e: Entry) -> list:
    return [e.term, e.index, int(e.type), e.data]


def decode_entry(obj: Any) -> Entry:
    if type(obj) is list and len(obj) == 4:
        term, index, etype, data = obj
        et = _ENTRY_TYPES.get(etype) if type(etype) is int else None
        if (
            et is not None
            and type(term) is int
            and 0 <= term < MAX_UINT
            and type(index) is int
            and 0 <= index < MAX_UINT
            and type(data) is bytes
        ):
            return Entry(term, index, et, data)
    _diagnose_entry(obj, "entry")
    raise DecodeError(f"malformed entry: {_describe(obj)}")  # pragma: no cover


def _diagnose_entry(obj: Any, what: str) -> None:
    _list(obj, what, 4)
    term, index, etype, data = obj
    _uint(term, f"{what} term")
    _uint(index, f"{what} index")
    if type(etype) is not int or etype not in _ENTRY_TYPES:
        raise DecodeError(f"{what} type: unknown EntryType {_describe(etype)}")
    _bytes(data, f"{what} data")


def encode_message(m: Message) -> list:
    # Plain ints (not IntEnum) so that decode_message(encode_message(m)) == m without msgpack.
    return [
        int(m.type),
        m.to,
        m.sender,
        m.term,
        m.log_term,
        m.index,
        [[e.term, e.index, int(e.type), e.data] for e in m.entries],
        m.commit,
        m.reject,
        m.reject_hint,
        m.context,
    ]


def decode_message(obj: Any) -> Message:
    """Validates every field of an encoded Message; raises DecodeError naming the bad one."""
    if type(obj) is list and len(obj) == 11:
        mtype, to, sender, term, log_term, index, entries, commit, reject, hint, context = obj
        mt = _MSG_TYPES.get(mtype) if type(mtype) is int else None
        if (
            mt is not None
            and type(to) is str
            and 0 < len(to) <= MAX_NODE_ID_LEN
            and type(sender) is str
            and 0 < len(sender) <= MAX_NODE_ID_LEN
            and type(term) is int
            and 0 <= term < MAX_UINT
            and type(log_term) is int
            and 0 <= log_term < MAX_UINT
            and type(index) is int
            and 0 <= index < MAX_UINT
            and type(entries) is list
            and type(commit) is int
            and 0 <= commit < MAX_UINT
            and type(reject) is bool
            and type(hint) is int
            and 0 <= hint < MAX_UINT
            and type(context) is bytes
        ):
            if entries:
                try:
                    ents = tuple([decode_entry(e) for e in entries])
                except DecodeError:
                    for i, e in enumerate(entries):  # name the culprit (rare path)
                        _diagnose_entry(e, f"message entries[{i}]")
                    raise
            else:
                ents = ()
            return Message(
                mt,
                to,
                sender,
                term,
                log_term,
                index,
                ents,
                commit,
                reject,
                hint,
                context,
            )
    _diagnose_message(obj)
    raise DecodeError(f"malformed message: {_describe(obj)}")  # pragma: no cover


def _diagnose_message(obj: Any) -> None:
    _list(obj, "message", 11)
    mtype, to, sender, term, log_term, index, entries, commit, reject, hint, context = obj
    if type(mtype) is not int or mtype not in _MSG_TYPES:
        raise DecodeError(f"message type: unknown MsgType {_describe(mtype)}")
    _node_id(to, "message to")
    _node_id(sender, "message sender")
    _uint(term, "message term")
    _uint(log_term, "message log_term")
    _uint(index, "message index")
    _list(entries, "message entries")
    _uint(commit, "message commit")
    if type(reject) is not bool:
        raise DecodeError(f"message reject: expected bool, got {_describe(reject)}")
    _uint(hint, "message reject_hint")
    _bytes(context, "message context")


def encode_raft_batch(
    msgs: list[Message] | tuple[Message, ...], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """A whole RAFT frame carrying msgs (in order)."""
    return encode_frame(FrameKind.RAFT, [encode_message(m) for m in msgs], max_frame_size)


def decode_raft_batch(payload: Any) -> list[Message]:
    """The Messages of a RAFT frame's payload; raises DecodeError (naming the message's
    position) on any malformed one."""
    if type(payload) is not list:
        raise DecodeError(f"raft batch: expected an array, got {_describe(payload)}")
    try:
        return [decode_message(m) for m in payload]
    except DecodeError as e:
        for i, m in enumerate(payload):  # locate the culprit for the message (rare path)
            try:
                decode_message(m)
            except DecodeError:
                raise DecodeError(f"raft batch message #{i}: {e}") from None
        raise  # pragma: no cover


def encode_hard_state(hs: HardState) -> list:
    return [hs.term, hs.vote, hs.commit]


def decode_hard_state(obj: Any) -> HardState:
    _list(obj, "hard state", 3)
    term, vote, commit = obj
    _uint(term, "hard state term")
    if vote is not None:
        _node_id(vote, "hard state vote")
    _uint(commit, "hard state commit")
    return HardState(term, vote, commit)


# --- snapshot chunks ------------------------------------------------------------------------

SNAPSHOT_DIGEST_SIZE = 32  # sha256


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """One piece of a snapshot file streamed to a follower (InstallSnapshot).

    The bytes data[0:] sit at `offset` in the snapshot taken at (index, term); crc is
    crc32(data). The last chunk of a transfer has no data, offset = the file's size and
    digest = sha256 of the whole file; every other chunk has digest None. Structure only is
    checked here; offsets, crc and digest are the receiver's to verify."""

    index: int
    term: int
    offset: int
    data: bytes
    crc: int
    digest: bytes | None = None

    @property
    def final(self) -> bool:
        return self.digest is not None


def encode_snapshot_chunk(
    c: SnapshotChunk, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """A whole SNAPSHOT frame."""
    return encode_frame(
        FrameKind.SNAPSHOT, [c.index, c.term, c.offset, c.data, c.crc, c.digest], max_frame_size
    )


def decode_snapshot_chunk(payload: Any) -> SnapshotChunk:
    """The SnapshotChunk of a SNAPSHOT frame's payload; raises DecodeError if malformed."""
    _list(payload, "snapshot chunk", 6)
    index, term, offset, data, crc, digest = payload
    _uint(index, "snapshot chunk index")
    _uint(term, "snapshot chunk term")
    _uint(offset, "snapshot chunk offset")
    _bytes(data, "snapshot chunk data")
    if type(crc) is not int or not 0 <= crc < 2**32:
        raise DecodeError(f"snapshot chunk crc: expected a uint32, got {_describe(crc)}")
    if digest is not None:
        _bytes(digest, "snapshot chunk digest")
        if len(digest) != SNAPSHOT_DIGEST_SIZE or data:
            raise DecodeError(
                "snapshot chunk: the final chunk has no data and a 32-byte sha256 digest"
            )
    if index == 0:
        raise DecodeError("snapshot chunk index: a snapshot covers at least entry 1")
    return SnapshotChunk(index, term, offset, data, crc, digest)
