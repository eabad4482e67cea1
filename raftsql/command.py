"""The versioned log-entry envelope: what one Raft entry asks every state machine to do.

A Command is built by the leader from a client request, stamped with the leader's wall time and
a random seed (so that 'now', random() and randomblob() give the same answer on every node), then
encoded into the entry's data. Every node decodes it when the entry commits.

Pure: stdlib + msgpack only. Encoding is a msgpack array, positional, so the field order below is
the wire format; never reorder, only append under a new version.

    [1, kind WRITE, client_id, serial, [[sql, params], ...], leader_time_ms, seed]
    [2, kind TXN,   client_id, serial, [[sql, params], ...], leader_time_ms, seed,
        [read_index, [table, ...], last_ms]]
    [3, kind WRITE, client_id, serial, [[sql, params] | [sql, [params, ...], 1], ...],
        leader_time_ms, seed]
    [4, kind ADMIN, client_id, serial, [], leader_time_ms, seed, {key: value, ...}]
    [5, kind TXN,   client_id, serial, [[sql, params] | [sql, [params, ...], 1], ...],
        leader_time_ms, seed, [last_ms, [check, ...], [[position, op, depth], ...]]]

Version 2 appends one field, the transaction check of a TXN command (the commit of an
interactive transaction, see server/DESIGN.md "Serializable transactions"): apply runs the
statements only if no table of the read set was modified after read_index, and the transaction
was not idle for too long (last_ms: leader time of its last statement). WRITE commands are still
written as version 1, so their bytes are what they always were.

Version 3 is a WRITE whose statement list holds at least one "many" statement (executemany):
[sql, [params, ...], 1] runs one DML statement once per parameter set, prepared once. A 1,000-row
batch then carries its SQL text once and applies in a few milliseconds instead of preparing
1,000 statements. In Python such a statement is (sql, Many((params, ...))). WRITE commands
without one are still version 1.

Version 5 is a TXN whose commit is checked statement by statement (raftsql/txncheck.py): the
statements are every statement the transaction ran (reads and failed ones included, "many"
statements allowed), each with the outcome the client saw, and the savepoint controls between
them. Apply replays them at the entry's position and applies the writes only if every outcome
is the same again. Version 2 is still decoded and applied (entries from before version 5).

params is an array (positional ? / ?NNN placeholders) or a map str -> value (named :x @x $x).
Values are None, int (signed 64-bit), float, str or bytes: exactly what SQLite can bind.

Version 4 is an ADMIN command: no statements, and a record of what an administrator did (a
revocation, a backup, a restore), who did it (the client certificate's name and serial) and its
details, as a map of str keys to str, int or nil values. Applying it stores the record in
raftsql's own tables (server/audit.py), so every node, and every snapshot, has it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Union

import msgpack

from raftsql import txncheck

VERSION = 1  # WRITE commands
TXN_VERSION = 2  # TXN commands: VERSION's fields plus the transaction check
MANY_VERSION = 3  # WRITE commands with at least one "many" statement (executemany)
ADMIN_VERSION = 4  # ADMIN commands: an administrator's record, no statements
CHECKED_VERSION = 5  # TXN commands checked statement by statement (raftsql/txncheck.py)
_VERSIONS = (VERSION, TXN_VERSION, MANY_VERSION, ADMIN_VERSION, CHECKED_VERSION)
MAX_RECORD_KEYS = 32
MAX_RECORD_TEXT = 4096  # characters per str value of an ADMIN record
MANY_FLAG = 1  # the third element of a "many" statement on the wire
MAX_CLIENT_ID_CHARS = 128
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
SEED_MAX = INT64_MAX

Value = Union[None, int, float, str, bytes]  # noqa: UP007 - a runtime alias, readable either way
Params = Union[tuple[Value, ...], dict[str, Value]]  # noqa: UP007


@dataclass(frozen=True)
class Many:
    """The parameter sets of a "many" statement: (sql, Many(...)) runs sql once per set, like
    executemany(). Holds at least one set; each is validated like a statement's params."""

    sets: tuple[Params, ...]


Statement = tuple[str, Union[Params, Many]]  # noqa: UP007


class CommandError(ValueError):
    """Raised when a Command is malformed: on construction, on encode, or when decoding bytes."""


class CommandKind(IntEnum):
    """What the entry asks for. The numbers are on the wire: never renumber."""

    WRITE = 1  # the statements run atomically, in one SQLite transaction
    TXN = 2  # like WRITE, but only if the transaction check passes (a transaction's commit)
    ADMIN = 3  # no statements: an administrator's record (revocation, backup, restore)


_VERSION_OF_KIND = {CommandKind.WRITE: VERSION, CommandKind.TXN: TXN_VERSION,
                    CommandKind.ADMIN: ADMIN_VERSION}


def _check_record(record: Any) -> dict[str, Any]:
    if type(record) is not dict:
        raise CommandError(f"an ADMIN record must be a map, not {type(record).__name__}")
    if len(record) > MAX_RECORD_KEYS:
        raise CommandError(f"an ADMIN record has at most {MAX_RECORD_KEYS} keys")
    for k, v in record.items():
        if type(k) is not str:
            raise CommandError(f"ADMIN record keys must be str, not {type(k).__name__}")
        if type(v) is str:
            if len(v) > MAX_RECORD_TEXT:
                raise CommandError(f"ADMIN record value {k!r} is over {MAX_RECORD_TEXT} characters")
        elif type(v) is int:
            _check_int(f"ADMIN record value {k!r}", v, INT64_MIN, INT64_MAX)
        elif v is not None:
            raise CommandError(f"ADMIN record value {k!r} must be str, int or nil, not {type(v).__name__}")
    if type(record.get("op")) is not str or not record["op"]:
        raise CommandError("an ADMIN record needs an 'op' (str)")
    return record


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    # bool is an int subclass; True on the wire would not round-trip as 1.
    if type(value) is not int:
        raise CommandError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise CommandError(f"{name} {value} is out of range [{lo}, {hi}]")
    return value


_SCALARS = frozenset({type(None), float, str, bytes})


def _check_value(where: str, value: Any) -> Value:
    t = type(value)
    if t in _SCALARS:
        return value
    if t is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise CommandError(f"{where}: integer {value} does not fit SQLite's signed 64 bits")
        return value
    if t is bytearray or t is memoryview:
        return bytes(value)
    raise CommandError(
        f"{where}: unsupported parameter type {t.__name__} (use None, int, float, str or bytes)"
    )


def plain_values(values: Iterable[Any]) -> bool:
    """Fast path: every value is already a valid, normalised SQLite value (exact None, str,
    float, bytes, or int in signed 64 bits). Also the driver's test for values it may send
    without adapting them."""
    for v in values:
        t = type(v)
        if t in _SCALARS or (t is int and INT64_MIN <= v <= INT64_MAX):
            continue
        return False
    return True


def _check_many(i: int, many: Many) -> Many:
    sets = many.sets
    if type(sets) is not tuple and type(sets) is not list:
        raise CommandError(f"statement {i}: a Many holds a tuple or list of parameter sets")
    if not sets:
        raise CommandError(f"statement {i}: a Many needs at least one parameter set")
    out = []
    same = type(sets) is tuple
    for p in sets:
        if type(p) is tuple and plain_values(p):  # the common case, without a call per set
            out.append(p)
            continue
        same = False
        out.append(_check_params(i, p))
    return many if same else Many(tuple(out))


def _check_params(i: int, params: Any) -> Params:
    t = type(params)
    if t is tuple or t is list:
        if plain_values(params):
            return params if t is tuple else tuple(params)
        return tuple(
            _check_value(f"statement {i} parameter {n + 1}", v) for n, v in enumerate(params)
        )
    if t is dict:
        if plain_values(params.values()) and all(type(k) is str for k in params):
            return params
        out: dict[str, Value] = {}
        for k, v in params.items():
            if type(k) is not str:
                raise CommandError(
                    f"statement {i}: parameter names must be str, not {type(k).__name__}"
                )
            out[k] = _check_value(f"statement {i} parameter {k!r}", v)
        return out
    if params is None:
        return ()
    raise CommandError(f"statement {i}: params must be a tuple, list or dict, not {t.__name__}")


def _check_statements(statements: Any) -> tuple[Statement, ...]:
    if type(statements) is not tuple and type(statements) is not list:
        raise CommandError(f"statements must be a tuple or list, not {type(statements).__name__}")
    out = []
    for i, item in enumerate(statements):
        t = type(item)
        if (t is not tuple and t is not list) or len(item) != 2:
            raise CommandError(f"statement {i} must be a (sql, params) pair")
        sql, params = item
        if type(sql) is not str:
            raise CommandError(f"statement {i}: sql must be str, not {type(sql).__name__}")
        if type(params) is Many:
            out.append((sql, _check_many(i, params)))
        else:
            out.append((sql, _check_params(i, params)))
    return tuple(out)


def _has_many(statements: tuple[Statement, ...]) -> bool:
    return any(type(p) is Many for _, p in statements)


_KINDS = {int(k): k for k in CommandKind}


@dataclass(frozen=True, kw_only=True)
class Command:
    """One log entry's instructions. Construction validates and normalises (lists become tuples,
    None params become ()), so a decoded Command compares equal to the one that was encoded.

    Invariant: serial > 0 implies client_id != "" (dedup needs both; (client_id "", serial 0) or
    serial 0 alone means "do not deduplicate").
    Invariant: version == 1 for WRITE, 3 for WRITE with a Many statement, 2 for a TXN with a
    table check, 4 for a TXN with statement checks (`checks` not None; None picks the version);
    a version 2 TXN holds no Many statement; read_index, read_set and last_ms are used by TXN
    only and must keep their defaults for WRITE; read_index and read_set belong to version 2,
    checks and controls to version 5 (one check per statement, controls as txncheck says).
    read_set is normalised to a sorted tuple of distinct names (apply checks it in that order,
    so the error names the same table on every node)."""

    version: int | None = None
    kind: CommandKind = CommandKind.WRITE
    client_id: str = ""
    serial: int = 0
    statements: tuple[Statement, ...] = ()
    leader_time_ms: int = 0  # unix ms, stamped by the leader
    seed: int = 0  # 0..2**63-1, stamped by the leader
    # TXN only: the applied index of the transaction's snapshot, the tables it read, and the
    # leader time (unix ms) of its last statement.
    read_index: int = 0
    read_set: tuple[str, ...] = ()
    last_ms: int = 0
    # ADMIN only: what was done, by whom (see the module docstring).
    record: dict[str, Any] | None = None
    # TXN version 5 only: per statement, what the client saw (raftsql/txncheck.py), and the
    # savepoint controls between the statements.
    checks: tuple[tuple | None, ...] | None = None
    controls: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.version is not None and (type(self.version) is not int
                                         or self.version not in _VERSIONS):
            raise CommandError(f"unsupported command version {self.version!r} (expected {VERSION})")
        kind = self.kind
        if type(kind) is not CommandKind:
            if type(kind) is not int:
                raise CommandError(f"kind must be a CommandKind, not {type(kind).__name__}")
            if kind not in _KINDS:
                raise CommandError(f"unknown command kind {kind}")
            object.__setattr__(self, "kind", _KINDS[kind])
        object.__setattr__(self, "statements", _check_statements(self.statements))
        expected = _VERSION_OF_KIND[self.kind]
        if self.checks is not None:
            if self.kind is not CommandKind.TXN:
                raise CommandError("statement checks belong to TXN commands")
            expected = CHECKED_VERSION
            self._normalize_checks()
        elif self.controls:
            raise CommandError("controls belong to TXN commands with statement checks")
        if _has_many(self.statements) and expected != CHECKED_VERSION:
            if self.kind is not CommandKind.WRITE:
                raise CommandError("a many statement (executemany) belongs to a WRITE command "
                                   "or a checked TXN")
            expected = MANY_VERSION
        if self.version is None:
            object.__setattr__(self, "version", expected)
        elif self.version != expected:
            raise CommandError(
                f"unsupported command version {self.version} for kind {self.kind.name} "
                f"(expected {expected})"
            )
        if type(self.client_id) is not str:
            raise CommandError(f"client_id must be str, not {type(self.client_id).__name__}")
        if len(self.client_id) > MAX_CLIENT_ID_CHARS:
            raise CommandError(
                f"client_id is {len(self.client_id)} characters; the limit is {MAX_CLIENT_ID_CHARS}"
            )
        _check_int("serial", self.serial, 0, INT64_MAX)
        if self.serial and not self.client_id:
            raise CommandError("a serial needs a client_id (use serial 0 for anonymous writes)")
        _check_int("leader_time_ms", self.leader_time_ms, 0, INT64_MAX)
        _check_int("seed", self.seed, 0, SEED_MAX)
        _check_int("read_index", self.read_index, 0, INT64_MAX)
        _check_int("last_ms", self.last_ms, 0, INT64_MAX)
        rs = self.read_set
        if type(rs) is not tuple and type(rs) is not list:
            raise CommandError(f"read_set must be a tuple or list, not {type(rs).__name__}")
        for name in rs:
            if type(name) is not str:
                raise CommandError(f"read_set names must be str, not {type(name).__name__}")
        object.__setattr__(self, "read_set", tuple(sorted(set(rs))))
        if self.kind is not CommandKind.TXN and (self.read_index or self.read_set or self.last_ms):
            raise CommandError("read_index, read_set and last_ms belong to TXN commands")
        if self.kind is CommandKind.ADMIN:
            _check_record(self.record)
            if self.statements:
                raise CommandError("an ADMIN command has no statements")
        elif self.record is not None:
            raise CommandError("a record belongs to ADMIN commands")
        if self.checks is not None and (self.read_index or self.read_set):
            raise CommandError("read_index and read_set belong to version 2 TXN commands")

    def _normalize_checks(self) -> None:
        checks = self.checks
        if type(checks) is not tuple and type(checks) is not list:
            raise CommandError(f"checks must be a tuple or list, not {type(checks).__name__}")
        if len(checks) != len(self.statements):
            raise CommandError(f"{len(checks)} checks for {len(self.statements)} statements")
        try:
            norm = tuple(txncheck.normalize_check(i, c) for i, c in enumerate(checks))
            controls = txncheck.normalize_controls(self.controls, len(self.statements))
        except ValueError as e:
            raise CommandError(str(e)) from None
        object.__setattr__(self, "checks", norm)
        object.__setattr__(self, "controls", controls)

    @property
    def dedup(self) -> bool:
        """True if the state machine deduplicates this command by (client_id, serial)."""
        return self.serial > 0

    def stamped(self, leader_time_ms: int, seed: int) -> Command:
        """A copy carrying the leader's time and seed (what the leader proposes)."""
        return dataclasses.replace(self, leader_time_ms=leader_time_ms, seed=seed)

    def encode(self) -> bytes:
        fields = [
            self.version,
            int(self.kind),
            self.client_id,
            self.serial,
            # tuples pack as arrays, dicts as maps
            [(q, p.sets, MANY_FLAG) if type(p) is Many else (q, p) for q, p in self.statements]
            if self.version in (MANY_VERSION, CHECKED_VERSION)
            else self.statements,
            self.leader_time_ms,
            self.seed,
        ]
        if self.version == TXN_VERSION:
            fields.append([self.read_index, self.read_set, self.last_ms])
        elif self.version == ADMIN_VERSION:
            fields.append(self.record)
        elif self.version == CHECKED_VERSION:
            fields.append([self.last_ms, self.checks, self.controls])
        try:
            return msgpack.packb(fields, use_bin_type=True)
        except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate in a str
            raise CommandError(f"cannot encode command: {e}") from None

    @classmethod
    def decode(cls, data: bytes) -> Command:
        """Parse an entry's data. Raises CommandError (and nothing else) on any malformed input."""
        if type(data) not in (bytes, bytearray, memoryview):
            raise CommandError(f"command data must be bytes, not {type(data).__name__}")
        try:
            # Arrays as tuples: params arrive in the form Command keeps (no copy per set).
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=False)
        except Exception as e:  # noqa: BLE001 - any unpack failure is one clear error
            raise CommandError(f"command is not valid msgpack: {type(e).__name__}: {e}") from None
        if type(fields) is not tuple:
            raise CommandError(f"command must be a msgpack array, not {type(fields).__name__}")
        version = fields[0] if fields else None
        if type(version) is not int or version not in _VERSIONS:
            raise CommandError(f"unsupported command version {version!r} (expected {VERSION})")
        kind = fields[1] if len(fields) > 1 else None
        if type(kind) is not int:
            raise CommandError(f"kind must be an int, not {type(kind).__name__}")
        if kind in _KINDS and _VERSION_OF_KIND[_KINDS[kind]] != version and not (
            version == MANY_VERSION and kind == CommandKind.WRITE
        ) and not (version == CHECKED_VERSION and kind == CommandKind.TXN):
            raise CommandError(f"unsupported command version {version} for kind {kind}")
        want = 8 if version in (TXN_VERSION, ADMIN_VERSION, CHECKED_VERSION) else 7
        if len(fields) != want:
            raise CommandError(f"command array has {len(fields)} fields, expected {want}")
        client_id, serial, statements, leader_time_ms, seed = fields[2:7]
        txn: dict[str, Any] = {}
        if version == ADMIN_VERSION:
            txn = {"record": fields[7]}
        elif version == TXN_VERSION:
            check = fields[7]
            if type(check) is not tuple or len(check) != 3 or type(check[1]) is not tuple:
                raise CommandError("the transaction check must be [read_index, [table, ...], last_ms]")
            txn = {"read_index": check[0], "read_set": check[1], "last_ms": check[2]}
        elif version == CHECKED_VERSION:
            check = fields[7]
            if (type(check) is not tuple or len(check) != 3 or type(check[1]) is not tuple
                    or type(check[2]) is not tuple):
                raise CommandError(
                    "the transaction check must be [last_ms, [check, ...], [control, ...]]")
            txn = {"last_ms": check[0], "checks": check[1], "controls": check[2]}
        if type(statements) is not tuple:
            raise CommandError("statements must be an array")
        many = 0
        many_allowed = version in (MANY_VERSION, CHECKED_VERSION)
        if many_allowed:
            statements = list(statements)
        for i, item in enumerate(statements):
            # Positional params arrive as arrays; a map stays a dict. Reject other shapes here
            # so the error names the wire problem rather than a constructor argument.
            if many_allowed and type(item) is tuple and len(item) == 3:
                if item[2] != MANY_FLAG or type(item[2]) is not int or type(item[1]) is not tuple:
                    raise CommandError(f"statement {i} must be a [sql, [params, ...], 1] array")
                for params in item[1]:
                    if type(params) is not tuple and type(params) is not dict:
                        raise CommandError(f"statement {i}: params must be an array or a map")
                statements[i] = (item[0], Many(item[1]))
                many += 1
                continue
            if type(item) is not tuple or len(item) != 2:
                raise CommandError(f"statement {i} must be a [sql, params] array")
            if type(item[1]) is not tuple and type(item[1]) is not dict:
                raise CommandError(f"statement {i}: params must be an array or a map")
        if version == MANY_VERSION and not many:
            raise CommandError("a version 3 command needs at least one many statement")
        try:
            return cls(
                version=version,
                kind=kind,
                client_id=client_id,
                serial=serial,
                statements=statements,
                leader_time_ms=leader_time_ms,
                seed=seed,
                **txn,
            )
        except CommandError:
            raise
        except Exception as e:  # noqa: BLE001 - defensive: decode raises only CommandError
            raise CommandError(f"malformed command: {type(e).__name__}: {e}") from None
