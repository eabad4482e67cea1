"""Administrative requests on the client protocol: membership changes, online backups,
restores and revocation, and the audit records they leave in the log.

Dispatched from server/clients.py (raftsql.protocol.ADMIN_OPS), which has already checked the
certificate's role (server/access.py: admin, or a node certificate for cluster_join and
audit); the reasons are in server/DESIGN.md, "Membership", "Backup and restore" and "Who may do
what".

  {"op": "cluster_add",     "node_id": str, "address": "host:port"}   -> learner
  {"op": "cluster_promote", "node_id": str, "max_lag": int}           -> voter, once caught up
  {"op": "cluster_remove",  "node_id": str}                           (the leader: transfer first)
  {"op": "cluster_join",    "node_id": str, "address": "host:port"}   (node certificate only)
  {"op": "backup_begin", "linearizable": bool} -> {"token", "size", "sha256", "index", "node"}
  {"op": "backup_read", "token": str, "offset": int, "length": int} -> {"data": bytes}
  {"op": "backup_end", "token": str}
  {"op": "restore_begin", "source": str} / {"op": "restore_end", "tables": int, "rows": int}
                                          -> {"index"}   (the leader: an audit record)
  {"op": "revoke", "target": "name:CN" | "serial:HEX"} -> {"index", "already"}   (the leader)
  {"op": "audit", "record": {...}}        (node certificate only: a backup's audit record,
                                           forwarded by the node that serves the backup)

Every request may carry "timeout_ms" (capped by the node's request_timeout_s). Membership
changes, restores and revocations run on the leader (others answer NOT_LEADER with a hint, like
writes); refusals that resending cannot fix are BAD_REQUEST, "not now" (another change
pending, learner still catching up) is UNAVAILABLE, which the driver retries until its deadline.

Audit: a membership change carries who asked in its CONF_CHANGE context; a backup, a restore
and a revocation are ADMIN entries (raftsql/command.py). Either way the record is a log entry,
so every node applies it and logs it (server/records.py). A backup may be served by a follower:
it asks the leader to log the record (the audit request, with its node certificate) before it
copies anything, so no backup leaves a node unrecorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import apsw

from raftsql.clientconn import ConnectionLost, NodeConnection, NodeUnreachable
from raftsql.protocol import ErrorKind, RequestError
from raftsql.raft.types import ConfChange, ConfChangeType
from raftsql.server.access import Principal
from raftsql.server.config import valid_node_id
from raftsql.server.membership import change_context, parse_addr
from raftsql.server.records import REVOKE_OP, valid_target
from raftsql.server.tls import node_client_context

if TYPE_CHECKING:
    from raftsql.server.node import Node

log = logging.getLogger("raftsql.admin")

BACKUP_DIR = "backups"
BACKUP_CHUNK_MAX = 1 << 20  # bytes per backup_read response
PROMOTE_MAX_LAG = 100  # a learner is promoted once its match index is this close to the leader's


class AdminService:
    """Handles OPS for ClientService. Backups in progress are kept per connection and their
    temporary files removed when it closes."""

    def __init__(self, node: Node):
        self.node = node
        self._lock = threading.Lock()
        self._backups: dict[int, dict[str, str]] = {}  # id(conn) -> {token: path}
        self._backup_dir = os.path.join(node.cfg.data_dir, BACKUP_DIR)
        # Leftovers of a previous process (it died during a backup).
        shutil.rmtree(self._backup_dir, ignore_errors=True)

    # -- dispatch -----------------------------------------------------------------------

    def handle(self, op: str, req: dict[str, Any], conn, who: Principal) -> dict[str, Any]:
        deadline = self._deadline(req)
        audit = dict(who.audit(), op=op)  # who asked: into the change's log entry
        if op == "cluster_add":
            nid, addr = self._node_id(req), self._address(req)
            return self._add(nid, addr, deadline, audit)
        if op == "cluster_join":
            nid, addr = self._node_id(req), self._address(req)
            role, name = getattr(conn, "role", None), getattr(conn, "peer_name", None)
            if role != "node" or name != nid:
                raise RequestError(ErrorKind.BAD_REQUEST, f"only node {nid}'s own certificate may join it "
                                   f"(this connection uses a {role} certificate named {name!r})")
            return self._join(nid, addr, deadline, audit)
        if op == "cluster_promote":
            max_lag = req.get("max_lag", PROMOTE_MAX_LAG)
            if not isinstance(max_lag, int) or isinstance(max_lag, bool) or max_lag < 0:
                raise RequestError(ErrorKind.BAD_REQUEST, "max_lag must be a non-negative integer")
            return self._promote(self._node_id(req), max_lag, deadline, audit)
        if op == "cluster_remove":
            return self._remove(self._node_id(req), deadline, audit)
        if op == "backup_begin":
            return self._backup_begin(conn, bool(req.get("linearizable", True)), deadline, who)
        if op == "backup_read":
            return self._backup_read(conn, req)
        if op == "backup_end":
            return self._backup_end(conn, req)
        if op in ("restore_begin", "restore_end"):
            return self._restore(op, req, deadline, audit)
        if op == "revoke":
            return self._revoke(req, deadline, who)
        if op == "audit":
            return self._forwarded_audit(req, deadline, who)
        raise RequestError(ErrorKind.BAD_REQUEST, f"unknown op {op!r}")

    def close_conn(self, conn) -> None:
        with self._lock:
            paths = self._backups.pop(id(conn), {})
        for p in paths.values():
            with contextlib.suppress(OSError):
                os.unlink(p)

    def _deadline(self, req: dict[str, Any]) -> float:
        limit = self.node.cfg.request_timeout_s
        t = req.get("timeout_ms")
        if isinstance(t, int) and not isinstance(t, bool) and t > 0:
            limit = min(limit, t / 1000.0)
        return time.monotonic() + limit

    @staticmethod
    def _node_id(req: dict[str, Any]) -> str:
        nid = req.get("node_id")
        if not isinstance(nid, str) or not valid_node_id(nid):
            raise RequestError(ErrorKind.BAD_REQUEST, f"node_id {nid!r} is not a valid node id")
        return nid

    @staticmethod
    def _address(req: dict[str, Any]) -> str:
        addr = req.get("address")
        try:
            if not isinstance(addr, str):
                raise ValueError(f"{addr!r} is not host:port")
            parse_addr(addr)
        except ValueError as e:
            raise RequestError(ErrorKind.BAD_REQUEST, f"address: {e}") from None
        return addr

    # -- membership ---------------------------------------------------------------------

    def _leader_view(self) -> tuple[set[str], set[str]]:
        """(voters, learners) as the leader sees them; NOT_LEADER elsewhere."""
        return self.node.leader_view()

    def _members(self) -> dict[str, str | None]:
        voters, learners = self.node.configuration()
        return self.node.membership.members(voters | learners)

    def _add(self, nid: str, addr: str, deadline: float, audit: dict[str, Any]) -> dict[str, Any]:
        voters, learners = self._leader_view()
        if nid in voters:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is already a voter")
        if nid in learners:
            known = self.node.membership.book.get(nid)
            if known == addr:
                return {"node_id": nid, "role": "learner", "index": None, "already": True, "members": self._members()}
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is already a learner at {known}; remove it first to change its address")
        taken = sorted(other for other, known in self._members().items()
                       if known and other != nid and _same_address(known, addr))
        if taken:
            # Its peers would dial the other member there (and refuse its certificate).
            raise RequestError(ErrorKind.BAD_REQUEST, f"{addr} is the address of member "
                               f"{taken[0]}: each member needs its own (host:port)")
        cc = ConfChange(ConfChangeType.ADD_LEARNER, nid, change_context(addr, audit))
        index = self.node.propose_conf_change(cc, deadline)
        return {"node_id": nid, "role": "learner", "index": index, "members": self._members()}

    def _join(self, nid: str, addr: str, deadline: float, audit: dict[str, Any]) -> dict[str, Any]:
        voters, learners = self._leader_view()
        if nid in voters:
            # A voter that lost its data must not come back as the same voter: it would vote
            # without the entries it once acknowledged.
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is already a voter: remove it first (`raftsql cluster remove`), then join it with an empty data directory")
        out = self._add(nid, addr, deadline, audit)
        out["bootstrap_voters"] = list(self.node.cfg.voters())
        return out

    def _promote(self, nid: str, max_lag: int, deadline: float, audit: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        while True:
            voters, learners = self._leader_view()
            if nid in voters:
                return {"node_id": nid, "role": "voter", "index": None, "already": True, "members": self._members()}
            if nid not in learners:
                raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is not a learner; add it first (`raftsql cluster add` or `raftsql node --join`)")
            match, last, replicating = node.follower_progress(nid)
            if replicating and match >= last - max_lag:
                break
            if time.monotonic() >= deadline:
                raise RequestError(ErrorKind.UNAVAILABLE, f"{nid} has not caught up yet (match index {match}, "
                                   f"leader's last index {last}); try again")
            time.sleep(0.05)
        cc = ConfChange(ConfChangeType.PROMOTE, nid, change_context(None, audit))
        index = node.propose_conf_change(cc, deadline)
        return {"node_id": nid, "role": "voter", "index": index, "members": self._members()}

    def _remove(self, nid: str, deadline: float, audit: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        voters, learners = self._leader_view()
        if nid not in voters | learners:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is not a member (members: {', '.join(sorted(voters | learners))})")
        if voters == {nid}:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is the last voter: a cluster cannot remove its last voter")
        if nid == node.cfg.id:
            # Removing the leader: hand leadership to the most up-to-date voter first, then
            # answer NOT_LEADER so that the driver resends the removal to the new leader.
            leader = node.hand_over_leadership(deadline)
            raise RequestError(ErrorKind.NOT_LEADER, f"{node.cfg.id} handed leadership over before its removal",
                               leader, node.membership.address_of(leader))
        cc = ConfChange(ConfChangeType.REMOVE, nid, change_context(None, audit))
        index = node.propose_conf_change(cc, deadline)
        return {"node_id": nid, "role": None, "index": index, "members": self._members()}

    # -- backups ------------------------------------------------------------------------

    def _backup_begin(self, conn, linearizable: bool, deadline: float, who: Principal) -> dict[str, Any]:
        node = self.node
        # The record first: a backup that cannot be recorded is not taken.
        self._record({"op": "backup", **who.audit(), "node": node.cfg.id,
                      "linearizable": int(linearizable)}, deadline)
        if linearizable:
            # Every write acknowledged before the backup began is in it.
            node.wait_read_index(deadline)
        os.makedirs(self._backup_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="backup-", suffix=".db", dir=self._backup_dir)
        os.close(fd)
        token = secrets.token_hex(16)
        with self._lock:
            self._backups.setdefault(id(conn), {})[token] = path
        try:
            index = copy_database(node.database_path(), path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            size = os.path.getsize(path)
        except BaseException:
            self._drop(conn, token)
            raise
        log.info("%s: backup at index %d, %d bytes", node.cfg.id, index, size)
        return {"token": token, "size": size, "sha256": h.hexdigest(), "index": index, "node": node.cfg.id,
                "chunk_max": BACKUP_CHUNK_MAX}

    def _backup_path(self, conn, req: dict[str, Any]) -> tuple[str, str]:
        token = req.get("token")
        with self._lock:
            path = self._backups.get(id(conn), {}).get(token) if isinstance(token, str) else None
        if path is None:
            raise RequestError(ErrorKind.BAD_REQUEST, "unknown backup token (backups belong to the connection that began them)")
        return token, path

    def _backup_read(self, conn, req: dict[str, Any]) -> dict[str, Any]:
        _, path = self._backup_path(conn, req)
        offset, length = req.get("offset"), req.get("length", BACKUP_CHUNK_MAX)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and 0 < length):
            raise RequestError(ErrorKind.BAD_REQUEST, "offset and length must be non-negative integers")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(min(length, BACKUP_CHUNK_MAX))
        return {"offset": offset, "data": data}

    def _backup_end(self, conn, req: dict[str, Any]) -> dict[str, Any]:
        token, _ = self._backup_path(conn, req)
        self._drop(conn, token)
        return {"ended": True}

    def _drop(self, conn, token: str) -> None:
        with self._lock:
            path = self._backups.get(id(conn), {}).pop(token, None)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- audit records, restores, revocation ------------------------------------------------

    def _record(self, record: dict[str, Any], deadline: float) -> int:
        """Put an audit record in the log and wait until it is applied here; its index. On a
        follower, the leader proposes it (the audit request, sent with this node's own
        certificate): UNAVAILABLE if no leader can be reached."""
        node = self.node
        try:
            return node.propose_admin(record, deadline).index
        except RequestError as e:
            if e.kind != ErrorKind.NOT_LEADER:
                raise
            leader_addr = e.leader_addr
        if not leader_addr:
            raise RequestError(ErrorKind.UNAVAILABLE, "no leader is known to record the audit "
                               "entry; try again")
        host, port = parse_addr(leader_addr)
        remaining = max(0.5, deadline - time.monotonic())
        try:
            ctx = node_client_context(node.cfg.certs_dir, node.cfg.id)
            conn = NodeConnection(host, port, ctx, min(5.0, remaining))
            try:
                resp = conn.request({"op": "audit", "record": record,
                                     "timeout_ms": max(1, int(remaining * 1000))}, remaining + 0.5)
            finally:
                conn.close()
        except (NodeUnreachable, ConnectionLost, OSError) as e:
            raise RequestError(ErrorKind.UNAVAILABLE, f"the leader could not record the audit "
                               f"entry: {e}") from None
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise RequestError(ErrorKind.UNAVAILABLE, f"the leader did not record the audit entry: "
                               f"{err.get('kind')}: {err.get('message')}")
        index = int(resp["result"]["index"])
        if not node.sm.wait_applied(index, max(0.0, deadline - time.monotonic())):
            raise RequestError(ErrorKind.UNAVAILABLE, f"audit entry {index} not applied here in time")
        return index

    def _forwarded_audit(self, req: dict[str, Any], deadline: float, who: Principal) -> dict[str, Any]:
        """A member node asks the leader to log a backup's audit record (see _record)."""
        record = req.get("record")
        if not isinstance(record, dict) or record.get("op") != "backup":
            raise RequestError(ErrorKind.BAD_REQUEST, "audit takes a backup's record")
        voters, learners = self._leader_view()
        if who.name not in voters | learners or record.get("node") != who.name:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{who.name} is not a member that serves "
                               "this backup")
        return {"index": self.node.propose_admin(record, deadline).index}

    def _restore(self, op: str, req: dict[str, Any], deadline: float,
                 audit: dict[str, Any]) -> dict[str, Any]:
        """The start and end of `raftsql restore` (the rows themselves are ordinary writes):
        admins only, and recorded."""
        record = dict(audit)
        for key, kind in (("source", str), ("tables", int), ("rows", int)):
            value = req.get(key)
            if isinstance(value, kind) and not isinstance(value, bool):
                record[key] = value[:1000] if isinstance(value, str) else value
        return {"index": self.node.propose_admin(record, deadline).index}

    def _revoke(self, req: dict[str, Any], deadline: float, who: Principal) -> dict[str, Any]:
        target = req.get("target")
        if not valid_target(target):
            raise RequestError(ErrorKind.BAD_REQUEST, f"target {target!r} is not name:NAME or "
                               "serial:HEX (lower-case hex, no leading zeros)")
        voters, learners = self._leader_view()
        kind, _, value = target.partition(":")
        if kind == "name" and value in voters | learners:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{value} is a member of the cluster: "
                               f"remove it first (raftsql cluster remove DSN {value})")
        if kind == "serial" and value in self.node.transport.node_serials():
            raise RequestError(ErrorKind.BAD_REQUEST, f"serial {value} is the certificate of a "
                               "connected node: remove that node first")
        if target in self.node.sm.records.revoked:
            return {"target": target, "index": None, "already": True}
        result = self.node.propose_admin({"op": REVOKE_OP, **who.audit(), "target": target}, deadline)
        return {"target": target, "index": result.index, "already": result.rowcount == 0}


def copy_database(src_path: str, dst_path: str) -> int:
    """A consistent copy of the SQLite database at src_path, for a user: SQLite's online backup
    from a read-only connection, in one step (one read transaction, so no write that commits
    meanwhile can tear it). raftsql's per-client sessions and transaction bookkeeping are
    emptied and the file vacuumed (they are no user's data); `sqlite_raftsql_meta` is kept, so the
    file records the log index it holds. Returns that index."""
    src = apsw.Connection(src_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        dst = apsw.Connection(dst_path)
        try:
            with dst.backup("main", src, "main") as b:
                while not b.done:
                    b.step(-1)
        finally:
            dst.close()
    finally:
        src.close()
    dst = apsw.Connection(dst_path)
    try:
        index = dst.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchall()[0][0]
        dst.execute("PRAGMA journal_mode=DELETE").fetchall()
        # SQLite never lets a sqlite_* table be dropped: empty them (they stay hidden).
        internal = [r[0] for r in dst.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name LIKE 'sqlite\\_raftsql\\_%' "
            "ESCAPE '\\' AND name != 'sqlite_raftsql_meta'")]
        for name in internal:
            dst.execute(f'DELETE FROM "{name}"')
        dst.execute("VACUUM")
    finally:
        dst.close()
    return int(index)


def _same_address(a: str, b: str) -> bool:
    """host:port of two members name the same place (host names compare case-insensitively)."""
    try:
        (ha, pa), (hb, pb) = parse_addr(a), parse_addr(b)
    except ValueError:
        return False
    return pa == pb and ha.lower().strip("[]") == hb.lower().strip("[]")
