"""Who may do what on the client protocol (server/DESIGN.md, "Who may do what").

Every request is checked on the node that receives it, against the certificate of the
connection it came on (verified by TLS; never against anything the request says):

    client role read    reads (execute of one read-only statement), fetch, status, ping, trace
    client role write   ... and writes: execute that writes, transactions, executemany, scripts
    client role admin   ... and membership changes, backup, restore, hash, revoke
    node certificate    status, ping, cluster_join (its own id only), audit (a node forwarding
                        an audit record to the leader); never SQL

A client certificate made before client roles existed counts as write (server/certs.py). A
refusal is a RequestError of kind FORBIDDEN whose message names the certificate, its role and
the operation; nothing was applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raftsql.protocol import ErrorKind, RequestError

READ, WRITE, ADMIN = "read", "write", "admin"
_LEVEL = {READ: 1, WRITE: 2, ADMIN: 3}

# The client role each request needs (execute needs WRITE only when it would write).
NEEDS: dict[str, str] = {
    "execute": READ, "fetch": READ, "close_cursor": READ, "status": READ, "ping": READ,
    "trace": READ,
    "hash": ADMIN, "cluster_add": ADMIN, "cluster_promote": ADMIN, "cluster_remove": ADMIN,
    "backup_begin": ADMIN, "backup_read": ADMIN, "backup_end": ADMIN, "restore_begin": ADMIN,
    "restore_end": ADMIN, "revoke": ADMIN,
}
# What a node certificate may ask on the client protocol.
NODE_OPS = frozenset({"status", "ping", "cluster_join", "audit"})
_NODE_ONLY_OPS = NODE_OPS - NEEDS.keys()  # only a node's own certificate may send these

# How an operation is named in a refusal.
_NAMES = {
    "hash": "hash", "cluster_add": "cluster add", "cluster_promote": "cluster promote",
    "cluster_remove": "cluster remove", "cluster_join": "cluster join",
    "backup_begin": "backup", "backup_read": "backup", "backup_end": "backup",
    "restore_begin": "restore", "restore_end": "restore", "revoke": "revoke",
    "audit": "audit",
}


@dataclass(frozen=True)
class Principal:
    """The certificate behind a connection: kind "client" (with its client role) or "node",
    its name (CN) and serial (lower-case hex). kind None: no usable certificate (refused)."""

    kind: str | None
    role: str | None
    name: str | None
    serial: str | None

    @classmethod
    def of(cls, conn: Any) -> Principal:
        if conn is None:
            return cls(None, None, None, None)
        kind = getattr(conn, "role", None)
        role = getattr(conn, "client_role", None) if kind == "client" else None
        return cls(kind, role, getattr(conn, "peer_name", None), getattr(conn, "peer_serial", None))

    @property
    def who(self) -> str:
        if self.kind == "node":
            return f"node certificate {self.name!r}"
        return f"client {self.name!r} (role {self.role or 'none'})"

    def audit(self) -> dict[str, Any]:
        """Who asked, as an audit record names it (server/records.py)."""
        return {"by": self.name, "by_serial": self.serial}

    def may(self, needed: str) -> bool:
        return self.kind == "client" and _LEVEL.get(self.role or "", 0) >= _LEVEL[needed]

    def check(self, op: str) -> None:
        """Raise FORBIDDEN unless this certificate may send request `op` at all (an execute
        is checked again, by may_write, if it turns out to write)."""
        if self.kind == "node":
            if op not in NODE_OPS:
                raise forbidden(f"{self.who} may not run {_NAMES.get(op, op)}: node "
                                "certificates are for Raft traffic; use an admin client certificate")
            return
        if op in _NODE_ONLY_OPS:
            raise forbidden(f"{self.who} may not run {_NAMES.get(op, op)}: only a node's own "
                            "certificate may")
        # The parser has refused unknown ops already; a known op missing from NEEDS is one
        # added to the protocol without a decision here: admins only until it gets one.
        needed = NEEDS.get(op, ADMIN)
        if not self.may(needed):
            raise forbidden(f"{self.who} may not run {_NAMES.get(op, op)}: it needs the {needed} "
                            "role")

    def refuse_write(self, statements: list[tuple[str, Any]]) -> RequestError | None:
        """None if this certificate may write; else the FORBIDDEN error for these statements
        (a write: the node raises it before anything reaches the log)."""
        if self.may(WRITE):
            return None
        sql = statements[0][0] if statements else ""
        text = " ".join(sql.split())
        if len(text) > 80:
            text = text[:77] + "..."
        more = f" (and {len(statements) - 1} more)" if len(statements) > 1 else ""
        return forbidden(f"{self.who} may not write: {text!r}{more} needs the write role; "
                         "nothing was applied")


def forbidden(message: str) -> RequestError:
    return RequestError(ErrorKind.FORBIDDEN, f"permission denied: {message}")
