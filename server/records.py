"""What the state machine records besides the users' statements, in raftsql's own tables and in
the same SQLite transaction as the entry's applied index, so every node holds the same records
at the same index and snapshots carry them (server/DESIGN.md, "Who may do what"):

- membership changes: the member's advertised address (`sqlite_raftsql_members`, the replicated
  address book; server/membership.py);
- the audit trail (`sqlite_raftsql_audit`): every membership change, backup, restore and
  revocation, with the name and serial of the certificate that asked for it and the leader's
  time of the entry;
- the revoked certificates (`sqlite_raftsql_revoked`), each by name ("name:CN") or by serial
  ("serial:HEX");
- the cluster's id (`sqlite_raftsql_cluster`): the first leader names the cluster with an
  ADMIN record of op "cluster"; the first such record applied wins, later ones change nothing
  (server/DESIGN.md, "The cluster's id").

Every node logs each audit record it applies on the `raftsql.audit` logger, once the SQLite
transaction holding it has committed (a restart does not re-apply it, so it is logged once per
node; a node that got it inside a snapshot has it in the table only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raftsql.protocol import Result
from raftsql.wire import valid_cluster_id

log = logging.getLogger("raftsql.audit")

REVOKE_OP = "revoke"
CLUSTER_OP = "cluster"
TARGET_PREFIXES = ("name:", "serial:")


@dataclass(frozen=True)
class MemberChange:
    """A committed membership change as the state machine records it: the member's advertised
    address (None: leave it as is), or its removal. Kept in `sqlite_raftsql_members`, so the
    address book travels inside snapshots and every node holds the same one at the same index.
    `audit`: who asked for it ({"op", "by", "by_serial"}), from the change's context; None for
    a change whose context names no one (made before the audit trail existed)."""

    node_id: str
    address: str | None = None
    removed: bool = False
    audit: dict[str, Any] | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One applied audit record."""

    index: int
    time_ms: int
    op: str
    by: str | None
    by_serial: str | None
    detail: dict[str, Any]

    def line(self) -> str:
        detail = " ".join(f"{k}={v}" for k, v in sorted(self.detail.items()))
        return (f"audit: index={self.index} op={self.op} by={self.by or '?'} "
                f"serial={self.by_serial or '?'}" + (f" {detail}" if detail else ""))


def valid_target(target: Any) -> bool:
    """A revocation target: "name:CN" or "serial:HEX" (lower-case hex, no leading zeros)."""
    if not isinstance(target, str) or not target.startswith(TARGET_PREFIXES):
        return False
    kind, _, value = target.partition(":")
    if kind == "serial":
        return bool(value) and all(c in "0123456789abcdef" for c in value) and value[0] != "0"
    return 0 < len(value) <= 64


class Records:
    """Writes the tables above for the StateMachine (on its write connection, inside the
    entry's transaction, through its `internal` runner) and keeps `revoked`, the in-memory copy
    of the deny list. `revoked` is replaced, never changed in place, so other threads read it
    without a lock."""

    _SQL_MEMBER_PUT = (
        "INSERT INTO sqlite_raftsql_members(node_id, address) VALUES(?,?) "
        "ON CONFLICT(node_id) DO UPDATE SET address=excluded.address"
    )
    _SQL_MEMBER_DEL = "DELETE FROM sqlite_raftsql_members WHERE node_id=?"
    _SQL_AUDIT = (
        "INSERT OR REPLACE INTO sqlite_raftsql_audit(entry_index, time_ms, operation, by_name, "
        "by_serial, detail) VALUES(?,?,?,?,?,?)"
    )
    _SQL_REVOKE = (
        "INSERT OR IGNORE INTO sqlite_raftsql_revoked(target, entry_index, time_ms, by_name, "
        "by_serial) VALUES(?,?,?,?,?)"
    )
    _SQL_CLUSTER = (
        "INSERT OR IGNORE INTO sqlite_raftsql_cluster(id, cluster_id, entry_index, time_ms) "
        "VALUES(1,?,?,?)"
    )

    def __init__(self, internal: Callable[..., list[tuple]]):
        # The state machine's write connection: only ever used from the thread that holds the
        # state machine's lock (open, apply). Other threads read `revoked` and `revocations`.
        self._internal = internal
        self.pending: list[AuditEntry] = []  # applied in the open transaction
        self.revoked: frozenset[str] = frozenset()
        self._revocations: tuple[dict[str, Any], ...] = ()
        # The cluster's id once an entry named it (read by the transport's threads).
        self.cluster_id: str | None = None
        self.reload()
        self._reload_cluster()

    def _reload_cluster(self) -> None:
        rows = self._internal("SELECT cluster_id FROM sqlite_raftsql_cluster")
        self.cluster_id = rows[0][0] if rows else None

    def reload(self) -> None:
        rows = self._internal(
            "SELECT target, entry_index, time_ms, by_name, by_serial FROM sqlite_raftsql_revoked "
            "ORDER BY entry_index, target")
        self._revocations = tuple({"target": t, "index": i, "time_ms": ms, "by": b, "by_serial": s}
                                  for t, i, ms, b, s in rows)
        self.revoked = frozenset(r["target"] for r in self._revocations)

    def is_revoked(self, name: str | None, serial: str | None) -> bool:
        revoked = self.revoked
        return bool(revoked) and (f"name:{name}" in revoked or f"serial:{serial}" in revoked)

    def revocations(self) -> list[dict[str, Any]]:
        """The deny list with who revoked each entry and when (any thread)."""
        return [dict(r) for r in self._revocations]

    # -- apply (inside the entry's transaction) ----------------------------------------------

    def member(self, index: int, time_ms: int, change: MemberChange) -> None:
        if change.removed:
            self._internal(self._SQL_MEMBER_DEL, (change.node_id,))
        elif change.address is not None:
            self._internal(self._SQL_MEMBER_PUT, (change.node_id, change.address))
        if change.audit is not None:
            detail: dict[str, Any] = {"node_id": change.node_id}
            if change.address is not None:
                detail["address"] = change.address
            self._audit(index, time_ms, str(change.audit.get("op") or "membership"),
                        change.audit.get("by"), change.audit.get("by_serial"), detail)

    def admin(self, index: int, time_ms: int, record: dict[str, Any]) -> Result:
        """Apply an ADMIN command's record (raftsql/command.py): a revocation adds its target
        to the deny list (rowcount 1, or 0 if it was there already); every record joins the
        audit trail."""
        op = record["op"]
        by, by_serial = _text(record.get("by")), _text(record.get("by_serial"))
        detail = {k: v for k, v in record.items() if k not in ("op", "by", "by_serial")}
        rowcount = 0
        if op == REVOKE_OP and valid_target(record.get("target")):
            self._internal(self._SQL_REVOKE, (record["target"], index, time_ms, by, by_serial))
            rowcount = int(self._internal("SELECT changes()")[0][0])
        elif op == CLUSTER_OP:
            # Only the first naming counts: a second leader may have proposed one before it
            # applied the first. One that changed nothing leaves no audit record.
            if valid_cluster_id(record.get("cluster_id")):
                self._internal(self._SQL_CLUSTER, (record["cluster_id"], index, time_ms))
                rowcount = int(self._internal("SELECT changes()")[0][0])
            if not rowcount:
                return Result(index=index, rowcount=0)
        self._audit(index, time_ms, op, by, by_serial, detail)
        return Result(index=index, rowcount=rowcount)

    def _audit(self, index: int, time_ms: int, op: str, by: Any, by_serial: Any,
               detail: dict[str, Any]) -> None:
        by, by_serial = _text(by), _text(by_serial)
        self._internal(self._SQL_AUDIT, (index, time_ms, op, by, by_serial,
                                         json.dumps(detail, sort_keys=True)))
        self.pending.append(AuditEntry(index, time_ms, op, by, by_serial, detail))

    def committed(self) -> list[AuditEntry]:
        """The transaction holding `pending` committed: log them, refresh the deny list, and
        return them (for the state machine's on_admin callback)."""
        done, self.pending = self.pending, []
        for e in done:
            log.info("%s", e.line())
        if any(e.op == REVOKE_OP for e in done):
            self.reload()
        if any(e.op == CLUSTER_OP for e in done):
            self._reload_cluster()
        return done


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
