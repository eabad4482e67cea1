"""The log-entry envelope: exact round trips, strict rejection of anything malformed."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftsql.command import (
    INT64_MAX,
    INT64_MIN,
    MAX_CLIENT_ID_CHARS,
    Command,
    CommandError,
    CommandKind,
)

values = st.one_of(
    st.none(),
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
params = st.one_of(
    st.lists(values, max_size=4).map(tuple),
    st.dictionaries(st.text(max_size=8), values, max_size=4),
)
statements = st.lists(st.tuples(st.text(max_size=40), params), max_size=4).map(tuple)


@st.composite
def commands(draw):
    client_id = draw(st.text(max_size=MAX_CLIENT_ID_CHARS))
    serial = draw(st.integers(0, INT64_MAX)) if client_id else 0
    return Command(
        client_id=client_id,
        serial=serial,
        statements=draw(statements),
        leader_time_ms=draw(st.integers(0, INT64_MAX)),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def _types(cmd):
    return [
        (type(sql), type(p), [type(v) for v in (p.values() if isinstance(p, dict) else p)])
        for sql, p in cmd.statements
    ]


@given(commands())
@settings(max_examples=300, deadline=None)
def test_round_trip_is_exact(cmd):
    back = Command.decode(cmd.encode())
    assert back == cmd
    assert _types(back) == _types(cmd)  # ints stay ints, floats floats, tuples tuples
    assert back.encode() == cmd.encode()


def test_lists_are_normalised_so_equality_holds_after_decode():
    a = Command(statements=[["INSERT INTO t VALUES(?, ?)", [1, 2.0]]])
    b = Command(statements=(("INSERT INTO t VALUES(?, ?)", (1, 2.0)),))
    assert a == b
    assert Command.decode(a.encode()) == b
    assert Command(statements=[("SELECT 1", None)]).statements == (("SELECT 1", ()),)
    assert Command(statements=[("x", (bytearray(b"ab"),))]).statements == (("x", (b"ab",)),)
    one, two = Command.decode(a.encode()).statements[0][1]
    assert type(one) is int and type(two) is float


def test_stamped_sets_time_and_seed():
    cmd = Command(client_id="c", serial=3, statements=[("SELECT 1", ())])
    s = cmd.stamped(1_700_000_000_000, 42)
    assert (s.leader_time_ms, s.seed, s.serial, s.kind) == (
        1_700_000_000_000,
        42,
        3,
        CommandKind.WRITE,
    )
    assert Command.decode(s.encode()) == s


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(statements=[("x", (2**63,))]), "64 bits"),
        (dict(statements=[("x", (INT64_MIN - 1,))]), "64 bits"),
        (dict(statements=[("x", (True,))]), "unsupported parameter type bool"),
        (dict(statements=[("x", ([1],))]), "unsupported parameter type list"),
        (dict(statements=[("x", {1: 2})]), "names must be str"),
        (dict(statements=[("x", 5)]), "params must be"),
        (dict(statements=[(b"x", ())]), "sql must be str"),
        (dict(statements=[("x",)]), "(sql, params) pair"),
        (dict(statements="SELECT 1"), "statements must be"),
        (dict(client_id="x" * (MAX_CLIENT_ID_CHARS + 1)), "limit is 128"),
        (dict(serial=5), "needs a client_id"),
        (dict(client_id="c", serial=-1), "out of range"),
        (dict(client_id="c", serial=True), "must be an int"),
        (dict(seed=2**63), "out of range"),
        (dict(leader_time_ms=-1), "out of range"),
        (dict(leader_time_ms=1.5), "must be an int"),
        (dict(kind=9), "unknown command kind"),
        (dict(version=2), "unsupported command version"),
    ],
)
def test_construction_rejects(kwargs, fragment):
    with pytest.raises(CommandError) as info:
        Command(**kwargs)
    assert fragment in str(info.value)


def _raw(*fields):
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD = [1, 1, "c", 1, [["SELECT ?", [1]]], 5, 6]


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (_raw(*GOOD) + b"\x00", "not valid msgpack"),  # trailing data
        (msgpack.packb({"a": 1}), "must be a msgpack array"),
        (_raw(*GOOD[:6]), "has 6 fields"),
        (_raw(2, *GOOD[1:]), "unsupported command version"),
        (_raw(True, *GOOD[1:]), "unsupported command version"),
        (_raw(1, 99, *GOOD[2:]), "unknown command kind"),
        (_raw(1, "1", *GOOD[2:]), "kind must be an int"),
        (_raw(1, 1, b"c", *GOOD[3:]), "client_id must be str"),
        (_raw(1, 1, "c", 1.0, *GOOD[4:]), "serial must be an int"),
        (_raw(1, 1, "", 1, *GOOD[4:]), "needs a client_id"),
        (_raw(1, 1, "c", 1, {"a": 1}, 5, 6), "statements must be an array"),
        (_raw(1, 1, "c", 1, [["x"]], 5, 6), "[sql, params] array"),
        (_raw(1, 1, "c", 1, [["x", 3]], 5, 6), "params must be an array or a map"),
        (_raw(1, 1, "c", 1, [[b"x", []]], 5, 6), "sql must be str"),
        (_raw(1, 1, "c", 1, [["x", [2**64 - 1]]], 5, 6), "64 bits"),
        (_raw(1, 1, "c", 1, [["x", [False]]], 5, 6), "bool"),
        (_raw(1, 1, "c", 1, [["x", [[1]]]], 5, 6), "unsupported parameter type tuple"),  # a nested array (decoded as a tuple)
        (_raw(1, 1, "c", 1, [["x", [msgpack.ExtType(5, b"z")]]], 5, 6), "ExtType"),
        (msgpack.packb([1, 1, "c", 1, [["x", {1: 2}]], 5, 6]), "not valid msgpack"),
        (_raw(*GOOD[:5], -5, 6), "leader_time_ms"),
        (_raw(*GOOD[:6], 2**63), "seed"),
        (_raw(*GOOD[:6], None), "seed must be an int"),
        (b"\xa1\xff", "not valid msgpack"),  # invalid UTF-8
        (bytes([0x91]) * 5000 + b"\x00", "not valid msgpack"),  # nesting too deep
    ],
)
def test_decode_rejects_malformed(data, fragment):
    with pytest.raises(CommandError) as info:
        Command.decode(data)
    assert fragment in str(info.value)


def test_decode_rejects_non_bytes():
    with pytest.raises(CommandError, match="must be bytes"):
        Command.decode("text")  # type: ignore[arg-type]


def test_encode_failure_is_a_command_error():
    with pytest.raises(CommandError, match="cannot encode"):
        Command(statements=[("\ud800", ())]).encode()


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_random_bytes_decode_or_raise_command_error_only(data):
    try:
        cmd = Command.decode(data)
    except CommandError:
        return
    assert isinstance(cmd, Command)


@given(commands(), st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_encodings_decode_or_raise_command_error_only(cmd, data):
    raw = bytearray(cmd.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            Command.decode(candidate)
        except CommandError:
            pass
