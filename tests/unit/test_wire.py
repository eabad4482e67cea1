"""raftsql.wire: framing, hello, Raft codec and map validation, against exact round trips and
hostile input (random bytes, random msgpack values, single-field mutations of valid messages)."""

from __future__ import annotations

import struct
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftsql import wire
from raftsql.raft.types import Entry, EntryType, HardState, Message, MsgType

FrameKind = wire.FrameKind
ERRORS = (wire.FrameError, wire.DecodeError)

# --- strategies -----------------------------------------------------------------------------

u63 = st.integers(min_value=0, max_value=2**63 - 1)
node_ids = st.text(min_size=1, max_size=64)
entries = st.builds(
    Entry,
    term=u63,
    index=u63,
    type=st.sampled_from(EntryType),
    data=st.binary(max_size=64),
)
messages = st.builds(
    Message,
    type=st.sampled_from(MsgType),
    to=node_ids,
    sender=node_ids,
    term=u63,
    log_term=u63,
    index=u63,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=u63,
    reject=st.booleans(),
    reject_hint=u63,
    context=st.binary(max_size=16),
)
# Cheaper to generate, for the tests that only need a valid starting point.
cheap_messages = st.builds(
    Message,
    type=st.sampled_from(MsgType),
    to=st.sampled_from(["n1", "n2", "x" * 64]),
    sender=st.sampled_from(["n1", "é"]),
    term=u63,
    log_term=st.just(0),
    index=st.integers(0, 100),
    entries=st.tuples(st.builds(Entry, term=u63, index=u63, data=st.sampled_from([b"", b"x"]))),
    reject=st.booleans(),
)
# Anything msgpack can carry (str keys only, as strict_map_key on the receiving side requires),
# weighted towards the edges the validators care about.
msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.sampled_from([-1, 0, 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.sampled_from(["", "n1", "x" * 64, "x" * 65])
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in points + [len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


def feed_all(decoder: wire.FrameDecoder, chunks) -> list:
    frames = []
    for c in chunks:
        frames.extend(decoder.feed(c))
    return frames


def packed(obj) -> bytes:
    """Type-exact comparison key (True and 1 differ once packed)."""
    return msgpack.packb(obj, use_bin_type=True)


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def frame_of(obj) -> bytes:
    return raw_frame(packed(obj))


def consume(kind: FrameKind, payload) -> None:
    """What a server/driver does with a decoded frame, plus every other parser for good measure."""
    for parse in (
        wire.decode_raft_batch,
        wire.parse_hello,
        wire.parse_error,
        lambda p: wire.check_map(p, {"op": str, "n": int}, {"x": (bytes, type(None))}),
        wire.decode_message,
        wire.decode_entry,
        wire.decode_hard_state,
        wire.decode_snapshot_chunk,
    ):
        try:
            parse(payload)
        except ERRORS:
            pass


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(messages, max_size=6), data=st.data())
def test_raft_batch_round_trip_through_split_stream(msgs, data):
    frame = wire.encode_raft_batch(msgs)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(frame)), max_size=8))
    frames = feed_all(wire.FrameDecoder(), split(frame, cuts))
    assert len(frames) == 1
    kind, payload = frames[0]
    assert kind is FrameKind.RAFT
    out = wire.decode_raft_batch(payload)
    assert out == msgs
    for got in out:
        assert type(got.type) is MsgType and type(got.entries) is tuple
        assert all(type(e.type) is EntryType for e in got.entries)


@pytest.mark.parametrize("mtype", list(MsgType))
def test_every_msg_type_round_trips(mtype):
    m = Message(
        mtype,
        "n2",
        "n1",
        term=7,
        log_term=6,
        index=2**63 - 1,
        entries=(Entry(6, 5), Entry(7, 6, EntryType.CONF_CHANGE, b"\x00\xff")),
        commit=4,
        reject=True,
        reject_hint=3,
        context=b"ctx",
    )
    enc = wire.encode_message(m)
    assert wire.decode_message(enc) == m  # without msgpack: plain ints, not enums
    assert wire.decode_message(msgpack.unpackb(packed(enc))) == m
    (frame,) = wire.FrameDecoder().feed(wire.encode_raft_batch([m]))
    assert wire.decode_raft_batch(frame[1]) == [m]


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(messages, min_size=1, max_size=3), data=st.data())
def test_mixed_frame_kinds_in_one_stream(msgs, data):
    stream = (
        wire.make_hello("n1", "node")
        + wire.encode_raft_batch(msgs)
        + wire.encode_frame(FrameKind.REQUEST, {"op": "execute", "serial": 3, "sql": ["x"]})
        + wire.encode_frame(FrameKind.RESPONSE, {"ok": True, "rows": [[1, b"b", None]]})
        + wire.make_error("bye")
    )
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10))
    frames = feed_all(wire.FrameDecoder(), split(stream, cuts))
    assert [k for k, _ in frames] == [
        FrameKind.HELLO,
        FrameKind.RAFT,
        FrameKind.REQUEST,
        FrameKind.RESPONSE,
        FrameKind.ERROR,
    ]
    assert wire.parse_hello(frames[0][1]) == wire.Hello(wire.PROTOCOL_VERSION, "n1", "node")
    assert wire.decode_raft_batch(frames[1][1]) == msgs
    req = wire.check_map(frames[2][1], {"op": str, "serial": int, "sql": list})
    assert req == {"op": "execute", "serial": 3, "sql": ["x"]}
    assert frames[3][1] == {"ok": True, "rows": [[1, b"b", None]]}
    assert wire.parse_error(frames[4][1]) == "bye"


@given(st.lists(entries, max_size=3), st.builds(HardState, u63, st.none() | node_ids, u63))
def test_entry_and_hard_state_helpers_round_trip(ents, hs):
    for e in ents:
        assert wire.decode_entry(msgpack.unpackb(packed(wire.encode_entry(e)))) == e
    assert wire.decode_hard_state(msgpack.unpackb(packed(wire.encode_hard_state(hs)))) == hs


def test_empty_batch_and_memoryview_and_bytearray_input():
    frame = wire.encode_raft_batch([])
    d = wire.FrameDecoder()
    assert d.feed(memoryview(frame)) == [(FrameKind.RAFT, [])]
    assert d.feed(bytearray(frame[:3])) == []
    assert d.buffered == 3
    assert d.feed(memoryview(frame)[3:]) == [(FrameKind.RAFT, [])]
    assert d.buffered == 0
    assert d.feed(b"") == []


def test_big_frame_in_small_chunks_is_linear():
    m = Message(MsgType.APPEND, "n2", "n1", 1, entries=(Entry(1, 1, data=b"x" * (8 << 20)),))
    frame = wire.encode_raft_batch([m])
    d = wire.FrameDecoder()
    start = time.perf_counter()
    frames = []
    for i in range(0, len(frame), 4096):
        frames.extend(d.feed(frame[i : i + 4096]))
    assert time.perf_counter() - start < 2.0  # O(n**2) copying would take far longer
    assert [wire.decode_raft_batch(p) for _, p in frames] == [[m]]


def test_many_frames_with_trailing_partials_compact_the_buffer():
    m = Message(MsgType.HEARTBEAT, "n2", "n1", 3, commit=2, context=b"r" * 8)
    frame = wire.encode_raft_batch([m] * 20)
    stream = frame * 400
    d = wire.FrameDecoder()
    got = feed_all(d, split(stream, list(range(7, len(stream), 70_001))))
    assert len(got) == 400 and all(wire.decode_raft_batch(p) == [m] * 20 for _, p in got)
    assert d.buffered == 0


# --- framing errors -------------------------------------------------------------------------


def test_oversize_detected_from_header_alone():
    d = wire.FrameDecoder()
    with pytest.raises(
        wire.FrameError, match="frame of 70000000 bytes exceeds the 67108864-byte limit"
    ):
        d.feed(struct.pack(">I", 70_000_000))


def test_oversize_with_custom_limit_and_byte_by_byte():
    d = wire.FrameDecoder(max_frame_size=100)
    header = struct.pack(">I", 101)
    for b in header[:3]:
        assert d.feed(bytes([b])) == []
    with pytest.raises(wire.FrameError, match="101 bytes exceeds the 100-byte limit"):
        d.feed(header[3:])


def test_decoder_is_closed_after_an_error():
    d = wire.FrameDecoder()
    with pytest.raises(wire.FrameError):
        d.feed(raw_frame(b"\xc1"))  # 0xc1 is never used in msgpack
    with pytest.raises(wire.FrameError, match="closed after an earlier error"):
        d.feed(wire.make_hello("n1", "node"))


def test_encode_frame_refuses_what_the_peer_would_reject():
    with pytest.raises(wire.FrameError, match="exceeds the 100-byte limit"):
        wire.encode_frame(FrameKind.REQUEST, {"sql": "x" * 200}, max_frame_size=100)
    big = Message(MsgType.APPEND, "n2", "n1", 1, entries=(Entry(1, 1, data=b"x" * 200),))
    with pytest.raises(wire.FrameError):
        wire.encode_raft_batch([big], max_frame_size=100)


def test_bad_max_frame_size():
    for bad in (0, -1, 2**32, 1.5, True):
        with pytest.raises(ValueError):
            wire.FrameDecoder(max_frame_size=bad)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"", "not valid msgpack"),  # zero-length frame
        (packed([2, [1, 2]])[:-1], "not valid msgpack"),  # truncated msgpack
        (b"\x92\x02", "not valid msgpack"),  # array header promising two elements, one present
        (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # array32 of 4G elements: bounded, no alloc
        (b"\xc6\xff\xff\xff\xff", "not valid msgpack"),  # bin32 of 4G bytes
        (packed([2, []]) + b"\x00", "not valid msgpack"),  # trailing bytes after the body
        (b"\xc1", "not valid msgpack"),
        (b"\x92\x03\xa3\xed\xb3\xbf", "not valid msgpack"),  # UTF-8-encoded lone surrogate
        (b"\x92\x03\xa2\xff\xfe", "not valid msgpack"),  # invalid UTF-8 in a str
        (b"\x92\x03\x81\x01\x02", "not valid msgpack"),  # int map key (strict_map_key)
        (b"\x92\x03\xd4\x05\x00", "not valid msgpack"),  # fixext ext type 5
        (b"\x92\x03\xd6\xff\x00\x00\x00\x01", "not valid msgpack"),  # msgpack Timestamp ext
        (b"\x92\x03\xc7\x00\x05", "ext type 5 is not allowed"),  # empty ext reaches ext_hook
        (b"\x92\x03\xc7\x00\xff", "not valid msgpack"),  # empty Timestamp ext
        (b"\x92\x03" + b"\x91" * 5000 + b"\xc0", "not valid msgpack"),  # nesting too deep
        (packed({"kind": 2}), "2-element array"),
        (packed([2]), "2-element array"),
        (packed([2, [], None]), "2-element array"),
        (packed(None), "2-element array"),
        (packed([0, None]), "unknown frame kind 0"),
        (packed([7, None]), "unknown frame kind 7"),
        (packed([-1, None]), "unknown frame kind -1"),
        (packed([2**64 - 1, None]), "unknown frame kind"),
        (packed(["2", None]), "unknown frame kind '2'"),
        (packed([2.0, None]), "unknown frame kind 2.0"),
        (packed([True, None]), "unknown frame kind True"),
        (packed([None, None]), "unknown frame kind None"),
    ],
)
def test_malformed_frames(body, match):
    d = wire.FrameDecoder()
    with pytest.raises(wire.FrameError, match=match):
        d.feed(raw_frame(body))


def test_truncated_stream_just_waits():
    frame = wire.encode_raft_batch([Message(MsgType.VOTE, "n2", "n1", 3)])
    d = wire.FrameDecoder()
    assert d.feed(frame[:-1]) == []
    assert d.buffered == len(frame) - 1


# --- hello / error --------------------------------------------------------------------------


def hello_payload(frame: bytes):
    ((kind, payload),) = wire.FrameDecoder().feed(frame)
    assert kind is FrameKind.HELLO
    return payload


def test_hello_round_trip():
    assert wire.parse_hello(hello_payload(wire.make_hello("n3", "node"))) == wire.Hello(
        1, "n3", "node"
    )
    assert wire.parse_hello(hello_payload(wire.make_hello(None, "client"))) == wire.Hello(
        1, None, "client"
    )
    assert wire.parse_hello(hello_payload(wire.make_hello("c-9", "client"))).node_id == "c-9"
    with_addr = wire.parse_hello(hello_payload(wire.make_hello("n4", "node", "10.0.0.4:4001")))
    assert with_addr == wire.Hello(1, "n4", "node", "10.0.0.4:4001")
    to_client = wire.parse_hello(hello_payload(wire.make_hello("n1", "node", max_request=4096)))
    assert to_client.max_request == 4096
    for bad in (0, -1, True, "4096", 1.5):
        payload = {"version": 1, "node_id": "n1", "role": "node", "max_request": bad}
        with pytest.raises(wire.DecodeError, match="max_request"):
            wire.parse_hello(payload)


def test_hello_carries_the_cluster_id():
    cid = "0123456789abcdef" * 2
    hello = wire.parse_hello(hello_payload(wire.make_hello("n2", "node", cluster=cid)))
    assert hello.cluster == cid
    assert wire.parse_hello(hello_payload(wire.make_hello("n2", "node"))).cluster is None
    for bad in (cid.upper(), cid[:-1], cid + "0", "g" * 32, 7, b"0" * 32, ["x"]):
        with pytest.raises(wire.DecodeError, match="'cluster'"):
            wire.parse_hello({"version": 1, "node_id": "n1", "role": "node", "cluster": bad})
        if isinstance(bad, str):
            with pytest.raises(ValueError, match="cluster"):
                wire.make_hello("n1", "node", cluster=bad)


def test_hello_version_mismatch_names_both_versions():
    payload = {"version": 2, "shape": "something new"}
    with pytest.raises(wire.FrameError, match=r"version 2.*version 1"):
        wire.parse_hello(payload)


@pytest.mark.parametrize(
    "payload, match",
    [
        (None, "expected a map"),
        ([1, "n1", "node"], "expected a map"),
        ({}, "'version'"),
        ({"version": True, "node_id": "n1", "role": "node"}, "'version'"),
        ({"version": "1", "node_id": "n1", "role": "node"}, "'version'"),
        ({"version": 1.0, "node_id": "n1", "role": "node"}, "'version'"),
        ({"version": 1, "role": "node"}, "missing"),
        ({"version": 1, "node_id": "n1"}, "missing"),
        ({"version": 1, "node_id": "n1", "role": "admin"}, "'role'"),
        ({"version": 1, "node_id": "n1", "role": b"node"}, "'role'"),
        ({"version": 1, "node_id": "n1", "role": ["node"]}, "'role'"),
        ({"version": 1, "node_id": None, "role": "node"}, "node_id"),
        ({"version": 1, "node_id": "", "role": "node"}, "node_id"),
        ({"version": 1, "node_id": "x" * 65, "role": "client"}, "node_id"),
        ({"version": 1, "node_id": 7, "role": "node"}, "node_id"),
        ({"version": 1, "node_id": b"n1", "role": "node"}, "node_id"),
        ({"version": 1, "node_id": "n1", "role": "node", "address": 7}, "'address'"),
        ({"version": 1, "node_id": "n1", "role": "node", "address": "nowhere"}, "'address'"),
        ({"version": 1, "node_id": "n1", "role": "node", "address": "h:99999"}, "'address'"),
        ({"version": 1, "node_id": "n1", "role": "node", "address": ":80"}, "'address'"),
        ({"version": 1, "node_id": "n1", "role": "node", "address": "h" * 300 + ":1"}, "'address'"),
    ],
)
def test_bad_hello(payload, match):
    with pytest.raises(wire.DecodeError, match=match):
        wire.parse_hello(payload)


def test_make_hello_validates_its_arguments():
    with pytest.raises(ValueError):
        wire.make_hello("n1", "admin")
    with pytest.raises(ValueError):
        wire.make_hello(None, "node")
    with pytest.raises(ValueError):
        wire.make_hello("x" * 65, "node")


def test_error_frame():
    ((kind, payload),) = wire.FrameDecoder().feed(wire.make_error("protocol version mismatch"))
    assert kind is FrameKind.ERROR
    assert wire.parse_error(payload) == "protocol version mismatch"
    with pytest.raises(wire.DecodeError):
        wire.parse_error({"msg": "x"})


# --- Raft codec errors ----------------------------------------------------------------------

GOOD = wire.encode_message(
    Message(MsgType.APPEND, "n2", "n1", 5, 4, 10, (Entry(5, 11, data=b"d"),), 9, False, 0, b"")
)
FIELDS = "type to sender term log_term index entries commit reject reject_hint context".split()


def with_field(name, value):
    obj = list(GOOD)
    obj[FIELDS.index(name)] = value
    return obj


INT_FIELDS = ["term", "log_term", "index", "commit", "reject_hint"]
BAD_INTS = [-1, 2**63, 2**64 - 1, True, False, 1.0, "1", b"1", None, [1]]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
def test_bad_int_fields(field, value):
    with pytest.raises(wire.DecodeError, match=f"message {field}"):
        wire.decode_message(with_field(field, value))


@pytest.mark.parametrize(
    "field, value",
    [
        ("type", 0),
        ("type", 13),
        ("type", -1),
        ("type", True),
        ("type", 1.0),
        ("type", "APPEND"),
        ("type", None),
        ("to", ""),
        ("to", "x" * 65),
        ("to", 2),
        ("to", b"n2"),
        ("to", None),
        ("to", ["n2"]),
        ("sender", ""),
        ("sender", 1),
        ("sender", b"n1"),
        ("reject", 0),
        ("reject", 1),
        ("reject", None),
        ("reject", "false"),
        ("context", "ctx"),
        ("context", None),
        ("context", 0),
        ("context", [b"c"]),
        ("entries", None),
        ("entries", b""),
        ("entries", {}),
        ("entries", "abc"),
        ("entries", 3),
    ],
)
def test_bad_fields(field, value):
    with pytest.raises(wire.DecodeError, match=f"message {field}"):
        wire.decode_message(with_field(field, value))


@pytest.mark.parametrize(
    "entry, match",
    [
        (None, "expected an array"),
        ({"term": 1}, "expected an array"),
        ([1, 2, 0], "4 elements"),
        ([1, 2, 0, b"", 5], "4 elements"),
        ([-1, 2, 0, b""], "term: "),
        ([1, 2**63, 0, b""], "index: "),
        ([True, 2, 0, b""], "term: "),
        ([1, 2, 2, b""], "type: "),
        ([1, 2, -1, b""], "type: "),
        ([1, 2, False, b""], "type: "),
        ([1, 2, 0, "data"], "data: "),
        ([1, 2, 0, None], "data: "),
    ],
)
def test_bad_entries(entry, match):
    with pytest.raises(wire.DecodeError, match=rf"^message entries\[1\].*{match}"):
        wire.decode_message(with_field("entries", [[5, 11, 0, b"ok"], entry]))
    with pytest.raises(wire.DecodeError, match=rf"^entry.*{match}"):
        wire.decode_entry(entry)


@pytest.mark.parametrize(
    "obj", [None, {}, "m", b"m", 7, GOOD[:-1], GOOD + [b""], tuple(GOOD)], ids=repr
)
def test_bad_message_shapes(obj):
    with pytest.raises(wire.DecodeError, match="message"):
        wire.decode_message(obj)


def test_raft_batch_errors_name_the_position():
    with pytest.raises(wire.DecodeError, match="expected an array"):
        wire.decode_raft_batch({"0": GOOD})
    with pytest.raises(wire.DecodeError, match=r"raft batch message #2: message term"):
        wire.decode_raft_batch([GOOD, GOOD, with_field("term", -5), GOOD])


@pytest.mark.parametrize(
    "obj, match",
    [
        (None, "expected an array"),
        ([1, None], "3 elements"),
        ([-1, None, 0], "term"),
        ([1, "", 0], "vote"),
        ([1, 5, 0], "vote"),
        ([1, "n1", 2**63], "commit"),
        ([1, "n1", False], "commit"),
    ],
)
def test_bad_hard_state(obj, match):
    with pytest.raises(wire.DecodeError, match=match):
        wire.decode_hard_state(obj)


# --- check_map ------------------------------------------------------------------------------


def test_check_map():
    payload = {"op": "query", "n": 3, "flag": True, "blob": None, "extra": [1]}
    assert wire.check_map(payload, {"op": str, "n": int}, {"blob": (bytes, type(None))}) is payload
    assert wire.check_map(payload, {"flag": bool, "n": (int, float)})
    with pytest.raises(wire.DecodeError, match="missing field 'sql'"):
        wire.check_map(payload, {"sql": str})
    with pytest.raises(wire.DecodeError, match=r"field 'op': expected int, got str"):
        wire.check_map(payload, {"op": int})
    with pytest.raises(wire.DecodeError, match="field 'flag': expected int"):
        wire.check_map(payload, {"flag": int})  # bool is not an int here
    with pytest.raises(wire.DecodeError, match="field 'blob': expected bytes, got NoneType"):
        wire.check_map(payload, {}, {"blob": bytes})
    with pytest.raises(wire.DecodeError, match="expected bytes or nil"):
        wire.check_map({"b": 1}, {"b": (bytes, type(None))})
    with pytest.raises(wire.DecodeError, match="expected a map"):
        wire.check_map([("op", "x")], {})
    with pytest.raises(wire.DecodeError, match="keys must be str"):
        wire.check_map({b"op": "x"}, {})


# --- hostile input --------------------------------------------------------------------------


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=4))
def test_random_bytes_never_raise_other_errors(data, cuts):
    d = wire.FrameDecoder(max_frame_size=256)
    try:
        for kind, payload in feed_all(d, split(data, cuts)):
            consume(kind, payload)
    except ERRORS:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_random_bodies_never_raise_other_errors(body):
    # A correct length prefix, so the bytes reach msgpack and the frame checks.
    d = wire.FrameDecoder()
    try:
        for kind, payload in d.feed(raw_frame(body)):
            consume(kind, payload)
    except ERRORS:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=6), msgpack_values)
def test_random_msgpack_payloads_never_raise_other_errors(kind, payload):
    ((k, p),) = wire.FrameDecoder().feed(frame_of([kind, payload]))
    consume(k, p)


def is_uint(v) -> bool:
    return type(v) is int and 0 <= v < 2**63


def is_valid_entry(v) -> bool:
    return (
        type(v) is list
        and len(v) == 4
        and is_uint(v[0])
        and is_uint(v[1])
        and type(v[2]) is int
        and v[2] in (0, 1)
        and type(v[3]) is bytes
    )


# An independent statement of what each position may hold: 0-10 message fields, 11-14 the
# fields of the first entry.
FIELD_ORACLE = {
    0: lambda v: type(v) is int and 1 <= v <= 12,
    1: lambda v: type(v) is str and 1 <= len(v) <= 64,
    2: lambda v: type(v) is str and 1 <= len(v) <= 64,
    3: is_uint,
    4: is_uint,
    5: is_uint,
    6: lambda v: type(v) is list and all(is_valid_entry(e) for e in v),
    7: is_uint,
    8: lambda v: type(v) is bool,
    9: is_uint,
    10: lambda v: type(v) is bytes,
    11: is_uint,
    12: is_uint,
    13: lambda v: type(v) is int and v in (0, 1),
    14: lambda v: type(v) is bytes,
}


@settings(max_examples=400, deadline=None)
@given(
    cheap_messages,
    st.integers(min_value=0, max_value=14),
    # Mostly scalars (one_of flattens: each scalar kind is its own branch), some entry-like lists.
    st.one_of(
        msgpack_scalars,
        st.lists(st.lists(msgpack_scalars, min_size=4, max_size=4), max_size=2),
        msgpack_values,
    ),
)
def test_mutated_messages_are_rejected_exactly_when_invalid(m, position, value):
    """Replacing one field (or one field of the first entry) with an arbitrary msgpack value is
    accepted exactly when the value is valid for that field, and what is accepted encodes back
    to the same bytes."""
    check_mutation(m, position, value)


# fmt: off
EDGE_VALUES = [
    None, True, False, -1, 0, 1, 2, 12, 13, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.0, 1.0,
    "", "n1", "x" * 64, "x" * 65, b"", b"x", [], [[1, 1, 0, b""]], [[1, 1, 2, b""]], [None], {},
    {"a": 1},
]
# fmt: on


def test_mutated_messages_with_edge_values():
    m = Message(MsgType.APPEND, "n2", "n1", 3, 2, 9, (Entry(3, 10, data=b"d"),), 8, False, 0, b"c")
    for position in FIELD_ORACLE:
        for value in EDGE_VALUES:
            check_mutation(m, position, value)


def check_mutation(m: Message, position: int, value) -> None:
    obj = msgpack.unpackb(packed(wire.encode_message(m)))
    if position < 11:
        obj[position] = value
    else:
        obj[6][0][position - 11] = value
    frame = frame_of([FrameKind.RAFT, [obj]])
    ((_, payload),) = wire.FrameDecoder().feed(frame)
    valid = FIELD_ORACLE[position](msgpack.unpackb(packed(value)))
    try:
        (decoded,) = wire.decode_raft_batch(payload)
    except wire.DecodeError as e:
        assert not valid, f"valid value rejected: {e}"
        return
    assert valid, f"invalid value {value!r} accepted at position {position}"
    assert packed(wire.encode_message(decoded)) == packed(obj)


# --- snapshot chunks ------------------------------------------------------------------------


@given(
    index=st.integers(min_value=1, max_value=2**63 - 1),
    term=u63,
    offset=u63,
    data=st.binary(max_size=300),
    final=st.booleans(),
)
def test_snapshot_chunk_round_trip(index, term, offset, data, final):
    import hashlib
    import zlib

    digest = hashlib.sha256(data).digest() if final else None
    c = wire.SnapshotChunk(index, term, offset, b"" if final else data, zlib.crc32(data), digest)
    ((kind, payload),) = wire.FrameDecoder().feed(wire.encode_snapshot_chunk(c))
    assert kind is FrameKind.SNAPSHOT
    got = wire.decode_snapshot_chunk(payload)
    assert got == c and got.final == final


GOOD_CHUNK = [7, 2, 0, b"abc", 891568578, None]


@pytest.mark.parametrize(
    "position, value, match",
    [
        (0, 0, "at least entry 1"),
        (0, -1, "index"),
        (1, "2", "term"),
        (2, 2**63, "offset"),
        (3, "abc", "data"),
        (4, 2**32, "crc"),
        (4, True, "crc"),
        (5, b"x" * 31, "final chunk"),
        (5, "y" * 32, "digest"),
    ],
)
def test_bad_snapshot_chunks(position, value, match):
    payload = list(GOOD_CHUNK)
    payload[position] = value
    with pytest.raises(wire.DecodeError, match=match):
        wire.decode_snapshot_chunk(payload)


def test_bad_snapshot_chunk_shapes():
    assert wire.decode_snapshot_chunk(list(GOOD_CHUNK)).data == b"abc"
    for bad in (None, {}, GOOD_CHUNK[:5], [*GOOD_CHUNK, 1]):
        with pytest.raises(wire.DecodeError):
            wire.decode_snapshot_chunk(bad)
    with pytest.raises(wire.DecodeError, match="final chunk"):  # a final chunk carries no data
        wire.decode_snapshot_chunk([7, 2, 3, b"abc", 0, b"d" * 32])


# ------------------------------------------------------------------ big frames, piece by piece

_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=5)
    | st.binary(max_size=5) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=4), inner, max_size=20),
    max_leaves=200,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_json_like)
def test_a_big_frame_decodes_piece_by_piece_to_what_unpackb_gives(obj):
    # Padding pushes the frame past INCREMENTAL_BYTES; the object rides next to it.
    payload = {"pad": b"\0" * wire.INCREMENTAL_BYTES, "obj": obj, "rows": [[i, "x"] for i in range(40)]}
    frame = wire.encode_frame(wire.FrameKind.REQUEST, payload, max_frame_size=64 << 20)
    [(kind, got)] = wire.FrameDecoder(64 << 20).feed(frame)
    assert kind == wire.FrameKind.REQUEST
    assert got == msgpack.unpackb(frame[wire.HEADER_SIZE:], raw=False)[1]


def test_a_big_frame_keeps_the_limits_and_errors_of_a_small_one():
    pad = b"\0" * wire.INCREMENTAL_BYTES
    cases = {
        "int is not allowed for map key": msgpack.packb([1, {1: 2, "pad": pad}]),
        "extra data": msgpack.packb([1, {"pad": pad}]) + b"\x01",
        # An array header claiming 2**32-1 elements in a frame of a few hundred KB.
        "exceeds max_array_len": b"\x92\x01\xdd\xff\xff\xff\xff" + pad,
        "exceeds max_map_len": b"\x92\x01\xdf\x7f\xff\xff\xff" + pad,
    }
    for message, body in cases.items():
        with pytest.raises(wire.FrameError, match=message):
            wire.FrameDecoder(64 << 20).feed(struct.pack(">I", len(body)) + body)


def test_gc_paused_nests_and_restores_the_collector():
    import gc

    assert gc.isenabled()
    with wire.gc_paused():
        with wire.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with wire.gc_paused():
            pass
        assert not gc.isenabled()  # it was off: left off
    finally:
        gc.enable()
