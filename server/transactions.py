"""Serializable transactions on the apply side (server/DESIGN.md, "Serializable transactions"):
the commit-time check that a transaction's read set was not modified after its snapshot, made
identically on every node. sqlite_raftsql_tables records the last index that wrote each table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apsw

from raftsql.command import Command, CommandKind
from raftsql.protocol import SERIALIZATION, TXN_TIMEOUT, Result, sql_error
from raftsql.server.sandbox import SCHEMA, Guard
from raftsql.server.sqlerrors import SQLITE_ABORT, SQLITE_BUSY_SNAPSHOT

# Idle transactions (no statement for this long, in leader time) cannot commit. Replicated
# behaviour: identical on every node (see DESIGN.md, "Serializable transactions").
DEFAULT_TXN_IDLE_TIMEOUT_MS = 60_000
_SQL_TABLE_GET = "SELECT modified_index FROM sqlite_raftsql_tables WHERE name=?"


def modified_after(
    conn: apsw.Connection, guard: Guard, tag: str, names: Iterable[str], read_index: int
) -> dict[str, Any] | None:
    """The serialization error if a table of `names` (or, when names is not empty, the
    schema) was modified by an entry after read_index, as seen by conn's snapshot."""
    names = set(names)
    if not names:
        return None
    outer, guard.internal = guard.internal, True
    try:
        for name in sorted(names | {SCHEMA}):
            row = conn.execute(tag + _SQL_TABLE_GET, (name,)).fetchone()
            if row is not None and row[0] > read_index:
                what = "the schema" if name == SCHEMA else f"table {name}"
                return sql_error(
                    SQLITE_BUSY_SNAPSHOT,
                    SERIALIZATION,
                    f"serialization failure: {what} was modified at log index {row[0]}, "
                    f"after this transaction's snapshot at index {read_index}; nothing "
                    "was applied: run the transaction again",
                )
    finally:
        guard.internal = outer
    return None


def txn_refusal(
    conn: apsw.Connection, guard: Guard, tag: str, index: int, cmd: Command, time_ms: int,
    idle_timeout_ms: int,
) -> Result | None:
    """For a TXN command (a transaction's commit): the error Result if it must not apply
    (idle too long, or its read set was modified after its snapshot), else None. Runs in
    the apply transaction, so every node decides the same; the session row stores it."""
    if cmd.kind is not CommandKind.TXN:
        return None
    if cmd.last_ms and time_ms - cmd.last_ms > idle_timeout_ms:
        return Result(
            index=index,
            error=sql_error(
                SQLITE_ABORT,
                TXN_TIMEOUT,
                f"the transaction was idle for more than {idle_timeout_ms} ms; "
                "nothing was applied: run it again",
            ),
        )
    conflict = modified_after(conn, guard, tag, cmd.read_set, cmd.read_index)
    return None if conflict is None else Result(index=index, error=conflict)
