"""The client protocol shared by the node (server/clients.py) and the driver: what travels in
REQUEST and RESPONSE frames (raftsql/wire.py frames them).

Only the standard library and msgpack may be imported here: the driver ships this module.

- `ErrorKind`: why a request was not served ({"ok": false, "error": {"kind", ...}}), and what a
  client may do about it.
- SQL error names: `Result.error` is {"code": SQLite's extended result code, "name", "message"}
  plus "statement" (its position in a batch) and "set" (executemany); the names are SQLite's
  (SQLITE_CONSTRAINT_UNIQUE) or raftsql's own, listed here.
- `Result`: the outcome of one execute (a write, or a read's first chunk).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from raftsql import txncheck, wire
from raftsql.command import MANY_FLAG, Many
from raftsql.wire import gc_paused


class ErrorKind(enum.StrEnum):
    """Why a request was not served. A str: it travels as its value ("NOT_LEADER")."""

    NOT_LEADER = "NOT_LEADER"  # not applied; resend anywhere (a leader hint where known)
    UNAVAILABLE = "UNAVAILABLE"  # not applied; resend later (transfer, shutdown, no quorum)
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"  # proposed, no result: resend only with the same serial
    TIMEOUT = "TIMEOUT"  # a read did not complete in time (reads are always safe to resend)
    TXN_ABORTED = "TXN_ABORTED"  # the leader changed during a transaction: nothing applied
    BAD_REQUEST = "BAD_REQUEST"  # the request itself is malformed: resending will not help
    TOO_MANY_CURSORS = "TOO_MANY_CURSORS"  # too many unfinished streamed results: close some
    # Not applied: the certificate's role does not allow the operation, or the certificate is
    # revoked (also the "kind" of the ERROR frame that refuses or closes its connection).
    FORBIDDEN = "FORBIDDEN"


# raftsql's own SQL error names (the code is the closest SQLite result code; the driver maps
# names to DB-API exceptions in driver/_exceptions.py).
STALE_SERIAL = "RAFTSQL_STALE_SERIAL"  # an older serial than the client's latest: a driver bug
MAX_ROWID = "RAFTSQL_MAX_ROWID"  # storing rowid 2^63-1 (or a sequence at it)
STEP_LIMIT = "RAFTSQL_STEP_LIMIT"  # a write exceeded the VM step budget
TIMEOUT = "RAFTSQL_TIMEOUT"  # a read exceeded query_timeout_s, or at_index was not reached
MULTIPLE_STATEMENTS = "RAFTSQL_MULTIPLE_STATEMENTS"  # more than one statement in one string
NOT_READONLY = "RAFTSQL_NOT_READONLY"  # a write where only reads are served
BINDINGS = "RAFTSQL_BINDINGS"  # wrong number or names of parameters
PROGRAMMING = "RAFTSQL_PROGRAMMING"  # a value or text SQLite cannot take (e.g. NUL in the SQL)
SERIALIZATION = "RAFTSQL_SERIALIZATION"  # a transaction's read set changed: nothing applied
TXN_TIMEOUT = "RAFTSQL_TXN_TIMEOUT"  # a transaction was idle too long: nothing applied
RESULT_TOO_BIG = "RAFTSQL_RESULT_TOO_BIG"  # a result over its limit: nothing applied

RAFTSQL_ERROR_NAMES = frozenset(
    {
        STALE_SERIAL, MAX_ROWID, STEP_LIMIT, TIMEOUT, MULTIPLE_STATEMENTS, NOT_READONLY,
        BINDINGS, PROGRAMMING, SERIALIZATION, TXN_TIMEOUT, RESULT_TOO_BIG,
    }
)


# An error message is cut past this many characters. SQLite's RAISE() takes any expression (3.47+):
# a trigger's 99,999,999-character message made the session row that stores the entry's result
# longer than SQLite allows, and that failure of raftsql's own statement stopped every node, at
# each restart again.
MAX_ERROR_MESSAGE = 64 << 10


def sql_error(code: int, name: str, message: str) -> dict[str, Any]:
    """An SQL error value, as Result.error carries it (the message cut at MAX_ERROR_MESSAGE)."""
    if len(message) > MAX_ERROR_MESSAGE:
        message = (f"{message[:MAX_ERROR_MESSAGE]}... (the message is cut here: "
                   f"{len(message)} characters)")
    return {"code": code, "name": name, "message": message}


@dataclass
class Result:
    """The outcome of one write (a log entry) or one read, sent to the client as a plain map.

    For a write of one statement the fields describe that statement and results is None. For a
    write of several statements (an atomic batch) the top-level fields describe the last
    statement (like a DB-API cursor after the last execute) and results holds one Result per
    statement, in order (their index/error/duplicate/results are left at defaults). If any
    statement fails, nothing of the batch is kept: error is set (its "statement" key says which
    one failed), columns/rows are empty, rowcount is -1 and results is None.
    """

    columns: list[str] = field(default_factory=list)
    decltypes: list[str | None] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    rowcount: int = -1  # changes() for INSERT/UPDATE/DELETE/REPLACE, -1 otherwise (as sqlite3)
    lastrowid: int | None = None  # last_insert_rowid(), reset to 0 at the start of every entry
    index: int = 0  # the entry's log index (writes) or the applied index the read saw (reads)
    error: dict[str, Any] | None = None  # {code: extended result code, name, message[, statement]}
    duplicate: bool = False  # a retried (client_id, serial): the stored result, not re-executed
    results: list[Result] | None = None
    # Reads only: [row, column] of TEXT values that are not valid UTF-8, sent as bytes (the
    # driver applies its text_factory, as sqlite3 does); None when there are none.
    bad_text: list[list[int]] | None = None
    # Writes at durability "leader" answered before their quorum: the entry's term (with index,
    # where it sits in the leader's log); 0 for every other result. Such a result carries no
    # rows, rowcount -1 and lastrowid None: the entry is not applied yet.
    early_term: int = 0
    # Reads only: the statement called a function that may read randomness or the clock
    # (txncheck.VOLATILE_FUNCTIONS, views included), which a commit check cannot reproduce.
    volatile: bool = False
    # Reads only, on the node, never sent: what streams the rest of the rows (a ReadCursor).
    stream: Any = field(default=None, repr=False, compare=False)

    def to_wire(self) -> dict[str, Any]:
        out = {
            "columns": self.columns,
            "decltypes": self.decltypes,
            "rows": self.rows,
            "rowcount": self.rowcount,
            "lastrowid": self.lastrowid,
            "index": self.index,
            "error": self.error,
            "duplicate": self.duplicate,
            "results": None if self.results is None else [r.to_wire() for r in self.results],
        }
        if self.bad_text:
            out["bad_text"] = self.bad_text
        if self.early_term:
            out["early_term"] = self.early_term
        if self.volatile:
            out["volatile"] = True
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Result:
        """Inverse of to_wire(); missing keys take their defaults. Raises ValueError on a shape
        that is not a Result."""
        if not isinstance(m, dict):
            raise ValueError(f"a Result must be a map, not {type(m).__name__}")
        try:
            results = m.get("results")
            return cls(
                columns=list(m.get("columns") or []),
                decltypes=list(m.get("decltypes") or []),
                rows=[list(r) for r in m.get("rows") or []],
                rowcount=int(m.get("rowcount", -1)),
                lastrowid=m.get("lastrowid"),
                index=int(m.get("index", 0)),
                error=dict(m["error"]) if m.get("error") is not None else None,
                duplicate=bool(m.get("duplicate", False)),
                results=None if results is None else [cls.from_wire(r) for r in results],
                bad_text=m.get("bad_text"),
                early_term=int(m.get("early_term", 0)),
                volatile=bool(m.get("volatile", False)),
            )
        except (TypeError, KeyError) as e:
            raise ValueError(f"malformed Result map: {e}") from None

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Result:
        return cls.from_wire(msgpack.unpackb(data, raw=False))


# ---------------------------------------------------------------------------------------------
# Errors that refuse a request


class RequestError(Exception):
    """Raised when a request is not served (a node raises it; the driver reads it back from
    the wire). `kind` says what the client may do (ErrorKind); `leader` and `leader_addr`
    name the leader where known (NOT_LEADER)."""

    def __init__(self, kind: ErrorKind, message: str, leader: str | None = None,
                 leader_addr: str | None = None):
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.message = message
        self.leader = leader
        self.leader_addr = leader_addr

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "message": self.message, "leader": self.leader,
                "leader_addr": self.leader_addr}


def bad_request(message: str) -> RequestError:
    return RequestError(ErrorKind.BAD_REQUEST, message)


# ---------------------------------------------------------------------------------------------
# Requests. Each has an `op`, to_wire() (what the driver sends, without the frame's "id" and
# "timeout_ms" bookkeeping) and from_wire() (what the node accepts: anything else is refused
# with BAD_REQUEST, never trusted). Statements travel as [sql, params] (params a list or a map)
# or, for executemany, [sql, [params, ...], MANY_FLAG].

CONSISTENCY = ("linearizable", "leader", "stale")
# When a write is answered: once a majority holds it and it is applied ("quorum"), or once the
# leader's own disk holds it ("leader": it may be lost with the leader, within the leader's
# max_unreplicated_writes; server/DESIGN.md, "Leader durability").
DURABILITY = ("quorum", "leader")
Statement = tuple[str, Any]
_MAX_INDEX = 1 << 63


def _check(payload: Any, required: dict, optional: dict | None = None) -> dict[str, Any]:
    # The codec's validator (same rules as every frame).
    try:
        return wire.check_map(payload, required, optional)
    except wire.FrameError as e:
        raise bad_request(str(e)) from None


def _index(value: int, what: str) -> int:
    if value < 0 or value >= _MAX_INDEX:
        raise bad_request(f"{what} must be a log index, got {value}")
    return value


def _durability(value: Any) -> str:
    if value not in DURABILITY:
        raise bad_request(f"unknown durability {value!r} (one of: {', '.join(DURABILITY)})")
    return value


def _consistency(value: Any) -> str:
    if value not in CONSISTENCY:
        raise bad_request(f"unknown consistency {value!r}")
    return value


def encode_params(p: Any) -> Any:
    if p is None:
        return []
    if isinstance(p, tuple):
        return list(p)
    return p


def encode_statements(statements: list[Statement]) -> list[list]:
    """The wire form; a params value that is a Many (raftsql.command) is an executemany."""
    out = []
    for sql, p in statements:
        if type(p) is Many:
            out.append([sql, [encode_params(x) for x in p.sets], MANY_FLAG])
        else:
            out.append([sql, encode_params(p)])
    return out


_SETS_CHUNK = 20_000  # executemany parameter sets converted per slice (decode_statements)


def decode_statements(items: Any, *, many: bool = False) -> list[Statement]:
    """[sql, params] items; with many=True also [sql, [params, ...], MANY_FLAG]."""
    if type(items) is not list:
        raise bad_request("statements must be a list")
    statements: list[Statement] = []
    for i, st in enumerate(items):
        if (
            many
            and isinstance(st, list)
            and len(st) == 3
            and isinstance(st[0], str)
            and type(st[2]) is int
            and st[2] == MANY_FLAG
        ):
            sets = st[1]
            if not isinstance(sets, list) or not sets:
                raise bad_request(f"statement {i}: a many statement needs a list of params")
            kinds = set(map(type, sets))  # C speed: a batch is usually all lists
            if not kinds <= {list, dict}:
                raise bad_request(f"statement {i}: params must be a list or a map")
            if kinds != {list}:
                out = tuple(tuple(p) if type(p) is list else p for p in sets)
            elif len(sets) <= _SETS_CHUNK:
                out = tuple(map(tuple, sets))
            else:
                # A million sets: in slices, so no single C call holds the GIL for long, and
                # without cyclic collection while the lists and their tuples are all alive.
                with gc_paused():
                    parts: list[tuple] = []
                    for k in range(0, len(sets), _SETS_CHUNK):
                        parts.extend(map(tuple, sets[k:k + _SETS_CHUNK]))
                    out = tuple(parts)
                    del parts
            statements.append((st[0], Many(out)))
            continue
        if not (isinstance(st, list) and len(st) == 2 and isinstance(st[0], str)):
            raise bad_request(f"statement {i} must be [sql, params]")
        sql, params = st
        if params is None:
            params = ()
        if not isinstance(params, list | dict):
            raise bad_request(f"statement {i}: params must be a list or a map")
        statements.append((sql, tuple(params) if isinstance(params, list) else params))
    return statements


def _tables(items: Any) -> set[str]:
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise bad_request("reads must be a list of table names")
    return set(items)


def _timeout_ms(payload: dict[str, Any]) -> int | None:
    """timeout_ms, if given, must be positive: a deadline already passed would report a write
    that applies as OUTCOME_UNKNOWN."""
    t = payload.get("timeout_ms")
    if t is None:
        return None
    if type(t) is not int or t <= 0:
        raise bad_request(f"timeout_ms must be a positive number of milliseconds, got {t!r}")
    return t


@dataclass
class Commit:
    """A transaction's commit. Checked (the driver's form): `checks` holds, per statement of
    the transaction, what the client saw (raftsql/txncheck.py), and `controls` its savepoint
    operations; the entry applies only if every statement does the same again at the entry's
    place in the log. `txn`: the leader's preview state of the transaction, dropped now. The
    older form, a table read set checked against read_index, is still accepted."""

    read_index: int = 0
    reads: tuple[str, ...] = ()
    last_ms: int = 0
    checks: tuple | None = None
    controls: tuple = ()
    txn: str | None = None

    def to_wire(self) -> dict[str, Any]:
        if self.checks is None:
            return {"read_index": self.read_index, "reads": list(self.reads),
                    "last_ms": self.last_ms}
        out: dict[str, Any] = {"last_ms": self.last_ms, "checks": list(self.checks),
                               "controls": list(self.controls)}
        if self.txn is not None:
            out["txn"] = self.txn
        return out

    @classmethod
    def from_wire(cls, m: Any) -> Commit:
        if isinstance(m, dict) and "checks" in m:
            c = _check(m, {"last_ms": int, "checks": list, "controls": list},
                       {"txn": (str, type(None))})
            try:
                checks = tuple(txncheck.normalize_check(i, x) for i, x in enumerate(c["checks"]))
            except ValueError as e:
                raise bad_request(f"commit: {e}") from None
            return cls(last_ms=max(0, c["last_ms"]), checks=checks,
                       controls=tuple(tuple(x) if isinstance(x, list) else x for x in c["controls"]),
                       txn=c.get("txn"))
        c = _check(m, {"read_index": int, "reads": list, "last_ms": int})
        return cls(_index(max(0, c["read_index"]), "commit.read_index"),
                   tuple(sorted(_tables(c["reads"]))), max(0, c["last_ms"]))


_NIL = type(None)
_TXN_FIELDS = {"term": (int, _NIL), "id": (str, _NIL), "base": int, "client_id": str,
               "last_ms": (int, _NIL), "writes": list}
_TXN_STATEMENT = {"statements": list, "txn": dict}
_CHUNK_FIELD = {"chunk": int}
_STATEMENTS = {"statements": list}
_EXECUTE_FIELDS = {"client_id": str, "serial": int, "consistency": str, "min_index": int,
                   "min_term": int, "durability": str, "timeout_ms": int, "reads": bool,
                   "commit": dict, "chunk": int}
_REQUEST = {"id": int, "op": str}


@dataclass
class TxnState:
    """One statement of an open transaction, run on its leader: the term it is pinned to, the
    leader's preview state for it (`id`, None until its first write), how many writes the
    client has (`base`: fewer than the leader's after a rollback to a savepoint or a resend),
    the client (a client runs one transaction at a time) and its last statement's time."""

    term: int | None = None
    id: str | None = None
    base: int = 0
    client_id: str = ""
    last_ms: int | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"term": self.term, "base": self.base, "client_id": self.client_id}
        if self.id is not None:
            out["id"] = self.id
        if self.last_ms is not None:
            out["last_ms"] = self.last_ms
        return out

    @classmethod
    def from_wire(cls, m: Any) -> TxnState:
        t = _check(m, {}, _TXN_FIELDS)
        if t.get("writes"):
            raise bad_request("this driver sends a transaction's earlier writes with every "
                              "statement, which this node no longer reads: use the driver of "
                              "the node's version")
        base = t.get("base", 0)
        if base < 0:
            raise bad_request(f"txn.base must not be negative, got {base}")
        return cls(term=t.get("term"), id=t.get("id"), base=base,
                   client_id=t.get("client_id", ""), last_ms=t.get("last_ms"))


@dataclass
class Execute:
    """Run statements: one, or an atomic batch. SQLite decides whether a single statement
    only reads. `txn`: one statement of an open transaction (a preview on the leader);
    `commit`: the statements are a transaction's writes; `reads`: a transaction's read before
    its first write (the result lists the tables read); `chunk`: a read streams, about this
    many bytes per chunk (the result carries a cursor id if more remain)."""

    OP = "execute"
    statements: list[Statement]
    client_id: str = ""
    serial: int = 0
    consistency: str = "linearizable"
    min_index: int = 0
    # With min_index: the term of the client's last write answered at durability "leader"; a
    # read waits for min_index to be applied while that term lasts (read-your-writes).
    min_term: int = 0
    durability: str = "quorum"
    timeout_ms: int | None = None
    reads: bool = False
    commit: Commit | None = None
    chunk: int | None = None
    txn: TxnState | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.OP, "statements": encode_statements(self.statements)}
        if self.txn is not None:
            out["txn"] = self.txn.to_wire()
        else:
            out.update(client_id=self.client_id, serial=self.serial, consistency=self.consistency)
            if self.consistency == "stale" or self.min_term:
                out["min_index"] = self.min_index
            if self.min_term:
                out["min_term"] = self.min_term
            if self.durability != "quorum":
                out["durability"] = self.durability
            if self.reads:
                out["reads"] = True
            if self.commit is not None:
                out["commit"] = self.commit.to_wire()
        if self.timeout_ms is not None:
            out["timeout_ms"] = self.timeout_ms
        if self.chunk is not None:
            out["chunk"] = self.chunk
        return out

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Execute:
        if "txn" in m:
            body = _check(m, _TXN_STATEMENT, _CHUNK_FIELD)
            statements = decode_statements(body["statements"], many=True)
            if len(statements) != 1:
                raise bad_request("a transaction statement is sent one at a time")
            return cls(statements, timeout_ms=_timeout_ms(m), chunk=_chunk(body),
                       txn=TxnState.from_wire(body["txn"]))
        body = _check(m, _STATEMENTS, _EXECUTE_FIELDS)
        commit = Commit.from_wire(body["commit"]) if "commit" in body else None
        return cls(
            statements=decode_statements(
                body["statements"], many=commit is None or commit.checks is not None),
            client_id=body.get("client_id", ""),
            serial=body.get("serial", 0),
            consistency=_consistency(body.get("consistency", "linearizable")),
            min_index=_index(max(0, body.get("min_index", 0)), "min_index"),
            min_term=_index(max(0, body.get("min_term", 0)), "min_term"),
            durability=_durability(body.get("durability", "quorum")),
            timeout_ms=_timeout_ms(body),
            reads=bool(body.get("reads")),
            commit=commit,
            chunk=_chunk(body),
        )


def _chunk(body: dict[str, Any]) -> int | None:
    chunk = body.get("chunk")
    if chunk is not None and (type(chunk) is not int or chunk <= 0):
        raise bad_request(f"chunk must be a positive number of bytes, got {chunk!r}")
    return chunk


@dataclass
class Fetch:
    """The next rows of a streamed read (its cursor, on this connection)."""

    OP = "fetch"
    cursor: int
    max_bytes: int = 1 << 20

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "cursor": self.cursor, "max_bytes": self.max_bytes}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> Fetch:
        b = _check(m, {"cursor": int}, {"max_bytes": int})
        max_bytes = b.get("max_bytes", 1 << 20)
        if max_bytes <= 0:
            raise bad_request(f"max_bytes must be positive, got {max_bytes}")
        return cls(b["cursor"], max_bytes)


@dataclass
class CloseCursor:
    """Give up the rest of a streamed read."""

    OP = "close_cursor"
    cursor: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "cursor": self.cursor}

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> CloseCursor:
        return cls(_check(m, {"cursor": int})["cursor"])


@dataclass
class Simple:
    """A request with no fields: status, ping, hash (applied index and content hash)."""

    op: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op}


SIMPLE_OPS = ("status", "ping", "hash", "trace")
# Membership changes, backups, restores and revocation (server/admin.py parses their fields;
# server/access.py says which certificate may send each).
ADMIN_OPS = ("cluster_add", "cluster_promote", "cluster_remove", "cluster_join",
             "backup_begin", "backup_read", "backup_end", "restore_begin", "restore_end",
             "revoke", "audit")


def parse_request(payload: Any) -> tuple[int | None, Any]:
    """(the request id, the request) from a REQUEST frame's payload; raises RequestError
    (BAD_REQUEST). Admin requests come back as their checked map (server/admin.py)."""
    req_id = payload.get("id") if isinstance(payload, dict) else None
    req = _check(payload, _REQUEST)
    op = req["op"]
    if op == Execute.OP:
        return req_id, Execute.from_wire(req)
    if op == Fetch.OP:
        return req_id, Fetch.from_wire(req)
    if op == CloseCursor.OP:
        return req_id, CloseCursor.from_wire(req)
    if op in SIMPLE_OPS:
        return req_id, Simple(op)
    if op in ADMIN_OPS:
        return req_id, req
    raise bad_request(f"unknown op {op!r}")


def ok_response(req_id: int | None, result: Any) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def error_response(req_id: int | None, error: RequestError) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": error.to_wire()}
