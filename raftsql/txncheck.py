"""What a transaction's client observed, as its commit entry carries it: one check per statement.

A transaction commits by replaying its statements in the log (server/DESIGN.md, "Serializable
transactions"): every node re-runs them at the commit entry's position and compares each
statement's outcome with what the client saw when it ran the statement. Equal everywhere: the
transaction applies, as if it had run alone at that position. Different anywhere it matters:
nothing applies and the commit fails with a serialization error. The driver builds the checks
from the results it received; the node recomputes them while applying. Both use this module, so
the digest is the same function on both sides.

Only the standard library and msgpack: the driver ships this module.

A check is one of
  None                                      not checked (the statement just runs)
  (OK, rowcount, nrows, complete, digest, lastrowid, env)
      the statement succeeded; rowcount (None: not checked) and lastrowid (None: not checked)
      must be equal; digest is DIGEST_SIZE bytes over the column names and the first nrows
      rows; complete: the client saw the end of the result (so there must be no row after
      them); otherwise rows after the first nrows were never seen and are not compared.
      env: None, or (seed, now_ms), the randomness and clock the leader ran the statement
      with; the commit runs it with the same ones, so random() and 'now' give again what the
      client saw (now_ms is clamped to the commit entry's time window; see server/DESIGN.md).
      A check of six items (no env) is accepted.
  (FAILED, name)
      the statement failed with the SQL error `name` (e.g. SQLITE_CONSTRAINT_UNIQUE); it must
      fail the same way again, and its statement-level effects are rolled back, as they were.

A control is (position, op, depth): before statement `position` (len(statements): after the
last), the savepoint at stack depth `depth` is opened (SAVEPOINT), released (RELEASE: it and
every savepoint above it) or rolled back to (ROLLBACK_TO: it stays open). It replays the
application's SAVEPOINT / RELEASE / ROLLBACK TO at the same place among its statements.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

OK = 0
FAILED = 1
DIGEST_SIZE = 16

SAVEPOINT = 1
RELEASE = 2
ROLLBACK_TO = 3
CONTROL_OPS = (SAVEPOINT, RELEASE, ROLLBACK_TO)
MAX_SAVEPOINT_DEPTH = 1000


_local = threading.local()


def _packer() -> Any:
    pack = getattr(_local, "pack", None)
    if pack is None:
        pack = _local.pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    return pack


class RowDigest:
    """A running digest of a result: its column names, then its rows in order. The values are
    those on the wire (None, int, float, str, bytes), so the driver can digest what it received
    and a node what it computed, and get the same bytes. One thread at a time."""

    __slots__ = ("_h", "rows")

    def __init__(self, columns: Sequence[str]):
        self._h = hashlib.blake2b(_packer()(list(columns)), digest_size=DIGEST_SIZE)
        self.rows = 0

    def add(self, row: Sequence[Any]) -> None:
        self._h.update(_packer()(row))
        self.rows += 1

    def add_all(self, rows: Iterable[Sequence[Any]]) -> None:
        update, pack = self._h.update, _packer()
        n = 0
        for row in rows:
            update(pack(row))
            n += 1
        self.rows += n

    def digest(self) -> bytes:
        return self._h.digest()


EMPTY_DIGEST = RowDigest(()).digest()  # no columns, no rows: what a plain write returns


def ok_check(rowcount: int | None, digest: RowDigest | None, complete: bool,
             lastrowid: int | None, env: tuple[int, int] | None = None) -> tuple:
    """The check of a statement that succeeded; digest None: no columns and no rows."""
    env = None if env is None else (env[0], env[1])
    if digest is None:
        return (OK, rowcount, 0, bool(complete), EMPTY_DIGEST, lastrowid, env)
    return (OK, rowcount, digest.rows, bool(complete), digest.digest(), lastrowid, env)


# random(), randomblob(), 'now', CURRENT_TIMESTAMP and the date functions (which read the clock
# when called without a time value).
_NONDETERMINISTIC = re.compile(
    r"random|\bnow\b|current_(?:time|date|timestamp)"
    r"|\b(?:date|time|datetime|julianday|unixepoch|strftime|timediff)\s*\(", re.IGNORECASE)


# The SQL functions that may read randomness or the clock, as SQLite's authorizer names them
# (SQLITE_FUNCTION) while it prepares a statement, views included: a reader connection notes
# them, so a transaction's read that used one through a view is run again as a preview.
VOLATILE_FUNCTIONS = frozenset({
    "random", "randomblob", "date", "time", "datetime", "julianday", "unixepoch", "strftime",
    "timediff", "current_date", "current_time", "current_timestamp",
})


def may_be_nondeterministic(sql: str) -> bool:
    """Whether a statement's text may use randomness or the clock. A transaction runs such a
    statement on the leader's apply connection, whose randomness and clock come back to the
    client and travel in the statement's check (env), so its commit reproduces them; a read
    elsewhere could not be reproduced. A text test, so a view that calls random() is not seen
    here: the reader notes it at prepare instead (Result.volatile, VOLATILE_FUNCTIONS)."""
    return _NONDETERMINISTIC.search(sql) is not None


def failed_check(name: str) -> tuple:
    return (FAILED, name)


def normalize_check(i: int, check: Any) -> tuple | None:
    """A check as a tuple, validated; raises ValueError naming statement i otherwise."""
    if check is None:
        return None
    if type(check) not in (tuple, list) or not check or type(check[0]) is not int:
        raise ValueError(f"check {i} must be an array starting with its kind")
    if check[0] == OK:
        if len(check) not in (6, 7):
            raise ValueError(f"check {i} must be [0, rowcount, nrows, complete, digest, lastrowid, env]")
        _, rowcount, nrows, complete, digest, lastrowid = check[:6]
        env = check[6] if len(check) == 7 else None
        if env is not None:
            if (type(env) not in (tuple, list) or len(env) != 2 or type(env[0]) is not int
                    or type(env[1]) is not int or not 0 <= env[0] < 1 << 63 or env[1] < 0):
                raise ValueError(f"check {i}: env must be nil or [seed, now_ms], non-negative ints")
            env = (env[0], env[1])
        if rowcount is not None and type(rowcount) is not int:
            raise ValueError(f"check {i}: rowcount must be an int or nil")
        if type(nrows) is not int or nrows < 0:
            raise ValueError(f"check {i}: nrows must be a non-negative int")
        if type(complete) is not bool:
            raise ValueError(f"check {i}: complete must be a bool")
        if type(digest) is not bytes or len(digest) != DIGEST_SIZE:
            raise ValueError(f"check {i}: digest must be {DIGEST_SIZE} bytes")
        if lastrowid is not None and type(lastrowid) is not int:
            raise ValueError(f"check {i}: lastrowid must be an int or nil")
        return (OK, rowcount, nrows, complete, digest, lastrowid, env)
    if check[0] == FAILED:
        if len(check) != 2 or type(check[1]) is not str or not check[1]:
            raise ValueError(f"check {i} must be [1, error name]")
        return (FAILED, check[1])
    raise ValueError(f"check {i}: unknown kind {check[0]}")


def normalize_controls(controls: Any, statements: int) -> tuple[tuple[int, int, int], ...]:
    """Controls as tuples, validated: positions in order and within the statements, and every
    RELEASE / ROLLBACK TO naming a savepoint that is open at that point (so replaying them can
    never fail). Raises ValueError otherwise."""
    if type(controls) not in (tuple, list):
        raise ValueError("controls must be an array")
    out = []
    depth = 0
    last = 0
    for n, c in enumerate(controls):
        if type(c) not in (tuple, list) or len(c) != 3 or not all(type(x) is int for x in c):
            raise ValueError(f"control {n} must be [position, op, depth]")
        pos, op, d = c
        if not last <= pos <= statements:
            raise ValueError(f"control {n}: position {pos} out of order or past the statements")
        if op == SAVEPOINT:
            if d != depth or depth >= MAX_SAVEPOINT_DEPTH:
                raise ValueError(f"control {n}: a savepoint opens at depth {depth}, not {d}")
            depth += 1
        elif op == RELEASE:
            if not 0 <= d < depth:
                raise ValueError(f"control {n}: no savepoint open at depth {d}")
            depth = d
        elif op == ROLLBACK_TO:
            if not 0 <= d < depth:
                raise ValueError(f"control {n}: no savepoint open at depth {d}")
            depth = d + 1
        else:
            raise ValueError(f"control {n}: unknown op {op}")
        last = pos
        out.append((pos, op, d))
    return tuple(out)


def describe(check: tuple | None) -> str:
    """What a check expects, for error messages."""
    if check is None:
        return "anything"
    if check[0] == FAILED:
        return f"to fail with {check[1]}"
    _, rowcount, nrows, complete, _, lastrowid = check[:6]
    parts = [f"{nrows}{'' if complete else '+'} row(s)"]
    if rowcount is not None and rowcount >= 0:
        parts.append(f"{rowcount} change(s)")
    if lastrowid is not None:
        parts.append(f"lastrowid {lastrowid}")
    return "success with " + ", ".join(parts)
