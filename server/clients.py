"""Serves driver requests on a client connection: execute, fetch, status, ping, hash, admin.

The request and response types are in raftsql/protocol.py (shared with the driver). On the wire
(payloads of REQUEST/RESPONSE frames, msgpack maps with string keys):

  request  {"id": int, "op": "execute", "statements": [[sql, params], ...],
                (an item may also be [sql, [params, ...], 1]: executemany, one DML statement
                 run once per parameter set, prepared once; its result gives the summed
                 rowcount and no per-set results; not with "commit")
            "client_id": str, "serial": int, "consistency": "linearizable"|"leader"|"stale",
            "min_index": int, "timeout_ms": int,
            "durability": "quorum"|"leader",
                                    (optional, default "quorum": "leader" answers a write once
                                     the leader's disk holds it, the result then has
                                     "early_term" and no rows; server/DESIGN.md)
            "min_term": int,        (optional, with min_index: a read waits for min_index
                                     while that term lasts)
            "reads": true,          (optional: the result adds "reads", the tables read)
                                    (a read's result has "volatile": true when it called a
                                     function of random() or the clock, views included)
            "commit": {"last_ms": int, "checks": [check, ...], "controls": [[pos, op, depth]],
                       "txn": str | None}}
                                    (optional: the statements are every statement of a
                                     transaction, each with what the client saw (a check,
                                     raftsql/txncheck.py); the entry is a TXN command applied
                                     only if each does the same again, else the result's
                                     error is RAFTSQL_SERIALIZATION naming the statement.
                                     The older {"read_index", "reads", "last_ms"} form checks
                                     a table read set instead)
           {"id": int, "op": "execute", "statements": [[sql, params] | [sql, [params...], 1]],
            "txn": {"term": int | None, "id": str | None, "base": int, "client_id": str,
                    "last_ms": int | None}, "timeout_ms": int}
                (one statement of an open driver transaction, on the leader, against its
                 applied state plus the transaction's first `base` writes (held by the leader
                 under "id"); the result adds "readonly", "term", "time_ms" (the leader's
                 clock, for the idle timeout), "txn" (the id, once it has writes), "seed"
                 (a preview's random() seed: with time_ms, the env its check echoes) and
                 "lost" (the statement rolled the whole transaction back, as SQLite's ON
                 CONFLICT ROLLBACK does))
           {"id": int, "op": "fetch", "cursor": int, "max_bytes": int}
                (the next rows of a streamed read: {"rows", "bad_text", "more"}; see below)
           {"id": int, "op": "close_cursor", "cursor": int}
           {"id": int, "op": "status"}      {"id": int, "op": "ping"}
           {"id": int, "op": "hash"}        (applied index + hash of every table, for tests)
           {"id": int, "op": "cluster_add" | "cluster_promote" | "cluster_remove" |
            "cluster_join" | "backup_begin" | "backup_read" | "backup_end" | "restore_begin" |
            "restore_end" | "revoke" | "audit", ...}
                (membership changes, backups, restores, revocation: server/admin.py)
  response {"id": int, "ok": true, "result": {...}}   (Result.to_wire(), SQL errors inside)
           {"id": int, "ok": false, "error": {"kind", "message", "leader", "leader_addr"}}

A connection carries one request at a time (the driver serializes per connection).

Every request is checked against the connection's certificate (server/access.py): its role
(read, write, admin, or a node's) and the deny list. A refused request is answered FORBIDDEN;
a certificate revoked while its connection is open gets an ERROR frame of kind FORBIDDEN and
the connection is closed (at once when the revocation is applied here, else at its next
request).

Streamed reads: an execute may carry "chunk": N (bytes). A read then answers with about N bytes
of rows and, if more remain, "cursor": an id on this connection; "fetch" returns the next rows
("more": false on the last chunk, which closes it). Every row of one read comes from one SQLite
read transaction: the state at the result's "index". A cursor lives on its connection: closing
the connection closes it, at most MAX_CURSORS_PER_CONNECTION are open per connection and
MAX_CURSORS per node, and one left without a fetch for CURSOR_IDLE_S is closed (it holds back
the WAL checkpoint). Without "chunk" a read's whole result is sent at once, up to
MAX_RESULT_BYTES, and up to what is left of READ_BUDGET (which chunks share).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from raftsql import wire
from raftsql.protocol import (
    CloseCursor,
    ErrorKind,
    Execute,
    Fetch,
    RequestError,
    Simple,
    bad_request,
    error_response,
    ok_response,
    parse_request,
)
from raftsql.raft.types import Role
from raftsql.server import metrics
from raftsql.server.access import Principal
from raftsql.server.admin import AdminService
from raftsql.server.sqlerrors import MAX_RESULT_BYTES
from raftsql.sqltext import CANNOT_WRITE_KEYWORDS, READ_KEYWORDS, first_keyword

log = logging.getLogger("raftsql.clients")

# Streamed reads (see the module docstring).
MAX_CURSORS_PER_CONNECTION = 16
MAX_CURSORS = 256  # per node: each holds a reader connection and a read transaction
# One certificate may hold a quarter of them: one client with 16 connections of 16 unfinished
# results each used to make every other client's larger reads fail.
MAX_CURSORS_PER_CERTIFICATE = MAX_CURSORS // 4
CURSOR_IDLE_S = 60.0
MIN_CHUNK = 4 << 10
# Bytes of streamed-result chunks a node builds and sends at once, all clients together. A chunk
# is granted what is left of it (at least MIN_CHUNK) and holds it until its response is sent:
# 30 readers asking for 32 MiB chunks at once took a leader to 2.7 GB and cost an election.
READ_BUDGET = 256 << 20


class _Cursors:
    """The open streamed reads of one client connection. Used only by that connection's
    thread; the node-wide count is shared."""

    def __init__(self, service: ClientService, owner: str = ""):
        self._service = service
        self._owner = owner  # the connection's certificate
        self._open: dict[int, Any] = {}
        self._next_id = 1
        self.granted = 0  # read budget held by the response being built (ClientService._grant)

    def __bool__(self) -> bool:
        return bool(self._open)

    def add(self, cursor: Any) -> int:
        svc = self._service
        if len(self._open) >= MAX_CURSORS_PER_CONNECTION:
            cursor.close()
            raise RequestError(
                ErrorKind.TOO_MANY_CURSORS,
                f"too many unfinished result sets on this connection (at most "
                f"{MAX_CURSORS_PER_CONNECTION}): fetch them to the end or close their cursors",
            )
        with svc._cursor_lock:
            mine = svc._cursors_of.get(self._owner, 0)
            if mine >= MAX_CURSORS_PER_CERTIFICATE:
                cursor.close()
                raise RequestError(
                    ErrorKind.TOO_MANY_CURSORS,
                    f"this certificate holds {mine} unfinished result sets on this node (at most "
                    f"{MAX_CURSORS_PER_CERTIFICATE}): fetch them to the end or close their cursors",
                )
            if svc._cursor_count >= MAX_CURSORS:
                cursor.close()
                raise RequestError(
                    ErrorKind.TOO_MANY_CURSORS,
                    f"this node has {MAX_CURSORS} unfinished result sets open; fetch or close "
                    "some, or read smaller results",
                )
            svc._cursor_count += 1
            svc._cursors_of[self._owner] = mine + 1
        cid = self._next_id
        self._next_id += 1
        self._open[cid] = cursor
        return cid

    def get(self, cid: int) -> Any:
        cursor = self._open.get(cid)
        if cursor is None:
            raise bad_request(
                f"no open cursor {cid!r} on this connection (it was read to the end, closed, "
                f"or closed after {CURSOR_IDLE_S:g} s without a fetch)"
            )
        return cursor

    def close(self, cid: int) -> None:
        cursor = self._open.pop(cid, None)
        if cursor is not None:
            cursor.close()
            svc = self._service
            with svc._cursor_lock:
                svc._cursor_count -= 1
                left = svc._cursors_of.get(self._owner, 1) - 1
                if left > 0:
                    svc._cursors_of[self._owner] = left
                else:
                    svc._cursors_of.pop(self._owner, None)

    def expire(self) -> None:
        limit = time.monotonic() - CURSOR_IDLE_S
        for cid in [c for c, cur in self._open.items() if cur.last_used < limit]:
            log.info("closing cursor %d: no fetch for %.0f s", cid, CURSOR_IDLE_S)
            self.close(cid)

    def close_all(self) -> None:
        for cid in list(self._open):
            self.close(cid)


class ClientService:
    def __init__(self, node):
        self.node = node
        self.admin = AdminService(node)  # membership changes and backups (server/admin.py)
        self._cursor_lock = threading.Lock()
        self._cursor_count = 0
        self._cursors_of: dict[str, int] = {}  # certificate name -> its open cursors
        self._read_lock = threading.Lock()
        self._read_inflight = 0  # READ_BUDGET bytes granted to responses not sent yet

    def on_admin(self, sm: Any, entries: list) -> None:
        """The state machine applied audit records (or opened with its deny list): close the
        open connections of every certificate it now revokes."""
        transport = getattr(self.node, "transport", None)
        if transport is None or not sm.records.revoked:
            return
        if not entries or any(e.op == "revoke" for e in entries):
            transport.close_revoked(sm.records.is_revoked)

    def _revoked(self, who: Principal, conn) -> bool:
        """Is the connection's certificate revoked now (the deny list of the current database:
        one a snapshot brought, or one applied while its connection was opening)? If so, tell
        the client and close."""
        if not self.node.sm.records.is_revoked(who.name, who.serial):
            return False
        metrics.REFUSALS.inc("revoked")
        log.warning("closing the connection of %s: its certificate is revoked", who.who)
        try:
            conn.send(wire.FrameKind.ERROR, {"message": f"certificate {who.name!r} (serial "
                                             f"{who.serial}) was revoked", "kind": "FORBIDDEN"})
        except OSError:
            pass
        return True

    def serve(self, conn) -> None:
        """Run one client connection's request loop (in the transport's connection thread)."""
        first = True
        who = Principal.of(conn)
        cursors = _Cursors(self, who.name or "")
        try:
            while True:
                try:
                    # With streamed reads open, wake up now and then to close idle ones.
                    frame = conn.recv(CURSOR_IDLE_S / 4 if cursors else None)
                except TimeoutError:
                    cursors.expire()
                    continue
                if frame is None:
                    return
                kind, payload = frame
                trace = self.node.trace
                if trace is not None:
                    trace.request_received()
                if kind != wire.FrameKind.REQUEST:
                    conn.send(wire.FrameKind.ERROR, {"message": f"unexpected {kind.name} frame on a client connection"})
                    return
                if self._revoked(who, conn):
                    return
                resp = self.handle(payload, conn, cursors, who)
                if first:
                    # The first answer on a connection names the cluster's members, so a driver
                    # can still find the cluster after every node in its DSN was removed.
                    first = False
                    resp["members"] = self.node.member_addresses()
                try:
                    conn.send(wire.FrameKind.RESPONSE, resp)
                finally:
                    del resp
                    self._release(cursors)
                if trace is not None:
                    trace.replied()
                if cursors:
                    cursors.expire()
        except (OSError, wire.FrameError) as e:
            log.info("client %s: connection closed: %s", getattr(conn, "peer_name", "?"), e)
        finally:
            self._release(cursors)
            cursors.close_all()
            self.admin.close_conn(conn)
            conn.close()

    def handle(self, payload: Any, conn: Any = None, cursors: _Cursors | None = None,
               who: Principal | None = None) -> dict[str, Any]:
        """One request from `conn`, checked against `who` (its certificate; by default read
        from conn: no connection, no privileges)."""
        req_id = payload.get("id") if isinstance(payload, dict) else None
        who = who if who is not None else Principal.of(conn)
        try:
            req_id, req = parse_request(payload)
            if isinstance(req, Simple):
                who.check(req.op)
                return ok_response(req_id, self._simple(req.op))
            if isinstance(req, dict):
                who.check(req["op"])
                return ok_response(req_id, self.admin.handle(req["op"], req, conn, who))
            who.check(req.OP)
            if isinstance(req, Execute):
                run = self._execute_txn if req.txn is not None else self._execute
                return ok_response(req_id, run(req, cursors, who))
            if isinstance(req, Fetch):
                return ok_response(req_id, self._fetch(req, cursors))
            if isinstance(req, CloseCursor):
                if cursors is not None:
                    cursors.close(req.cursor)
                return ok_response(req_id, {})
            raise bad_request(f"unknown request {req!r}")
        except RequestError as e:
            err = e
            if e.kind == ErrorKind.FORBIDDEN:
                metrics.REFUSALS.inc("permission")
                log.debug("refused a request of %s: %s", who.who, e.message)
        except RecursionError:
            err = bad_request("the request is nested too deeply")
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the connection
            log.exception("request failed")
            err = RequestError(ErrorKind.UNAVAILABLE, f"internal error: {type(e).__name__}: {e}")
        return error_response(req_id, err)

    def _simple(self, op: str) -> dict[str, Any]:
        if op == "trace":
            trace = self.node.trace
            if trace is None:
                raise bad_request("this node does not trace (start it with trace = true or RAFTSQL_TRACE=1)")
            return {"node": self.node.cfg.id, "records": trace.records()}
        if op == "status":
            st = self.node.status()
            st["revoked"] = self.node.sm.records.revocations()
            st["metrics"] = metrics.figures(self.node, st)
            return st
        if op == "hash":
            # Tests compare nodes by this; the hash and index are read under the apply lock.
            index, digest = self.node.content_hash()
            return {"index": index, "hash": digest}
        return {"node": self.node.cfg.id}  # ping

    # -- execute ----------------------------------------------------------------------------

    def _chunk(self, req: Execute, cursors: _Cursors | None) -> int | None:
        if req.chunk is None or cursors is None:
            return None
        if not self._is_read(req):
            # A write: its rows (RETURNING) are bounded by apply's result budget, not streamed.
            return self._chunk_size(req.chunk)
        return self._grant(req.chunk, cursors)

    def _whole(self, req: Execute, cursors: _Cursors | None) -> int:
        """The bytes of rows a read answered whole (no "chunk") may build: MAX_RESULT_BYTES as
        far as READ_BUDGET has room, at least MIN_CHUNK; held like a chunk's grant, so that
        reads answered whole cannot take the memory streamed chunks are kept from."""
        if req.chunk is not None or cursors is None or not self._is_read(req):
            return MAX_RESULT_BYTES
        return self._grant(MAX_RESULT_BYTES, cursors, whole=True)

    @staticmethod
    def _is_read(req: Execute) -> bool:
        return len(req.statements) == 1 and first_keyword(req.statements[0][0]) in READ_KEYWORDS

    def _chunk_size(self, want: int) -> int:
        """What a client asked for one chunk, within [MIN_CHUNK, half a frame]."""
        return max(MIN_CHUNK, min(want, self.node.cfg.max_frame_size // 2))

    def _grant(self, want: int, cursors: _Cursors, whole: bool = False) -> int:
        """The size of one chunk of a streamed result: what the client asked (within the frame
        limit), as far as the node's READ_BUDGET has room, at least MIN_CHUNK; held by the
        connection until its response is sent (_release). whole: `want` is a whole result's
        limit, taken as it is."""
        if not whole:
            want = self._chunk_size(want)
        with self._read_lock:
            grant = max(MIN_CHUNK, min(want, READ_BUDGET - self._read_inflight))
            self._read_inflight += grant
        cursors.granted += grant
        return grant

    def _release(self, cursors: _Cursors) -> None:
        if cursors.granted:
            with self._read_lock:
                self._read_inflight -= cursors.granted
            cursors.granted = 0

    @staticmethod
    def _streamed(result: Any, out: dict[str, Any], cursors: _Cursors | None) -> dict[str, Any]:
        if result.stream is not None and cursors is not None:
            out["cursor"] = cursors.add(result.stream)
        return out

    def _fetch(self, req: Fetch, cursors: _Cursors | None) -> dict[str, Any]:
        if cursors is None:
            raise bad_request("fetch needs a connection")
        cursor = cursors.get(req.cursor)
        rows, done = cursor.fetch(self._grant(req.max_bytes, cursors))
        if done:
            cursors.close(req.cursor)
        if rows is None:
            return {"rows": [], "more": False, "error": cursor.error, "index": cursor.index}
        out: dict[str, Any] = {"rows": rows, "more": not done, "error": None, "index": cursor.index}
        if cursor.bad_text:
            out["bad_text"] = cursor.bad_text
        return out

    def _in_log(self, index: int, what: str) -> int:
        """An index a client saw applied somewhere cannot be past the end of the leader's log
        (every committed entry is in it: Leader Completeness). Checked on a leader only."""
        node = self.node
        with node._lock:
            is_leader = node.core.role == Role.LEADER
            last = node.core.log.last_index()
        if is_leader and index > last:
            raise bad_request(f"{what} {index} is past the end of the log ({last})")
        return index

    @staticmethod
    def _timeout_s(req: Execute) -> float | None:
        return None if req.timeout_ms is None else req.timeout_ms / 1000.0

    def _execute_txn(self, req: Execute, cursors: _Cursors | None, who: Principal) -> dict[str, Any]:
        refuse = who.refuse_write(req.statements)
        result, readonly, term, time_ms, txn_id, lost, seed = self.node.execute_in_transaction(
            req.statements[0], req.txn, timeout_s=self._timeout_s(req),
            chunk=self._chunk(req, cursors), whole=self._whole(req, cursors),
            refuse_write=refuse, owner=who.name or "")
        out = self._streamed(result, result.to_wire(), cursors)
        out["readonly"] = readonly
        out["term"] = term
        out["time_ms"] = time_ms
        out["txn"] = txn_id
        if seed is not None:
            out["seed"] = seed  # with time_ms: the statement's env (raftsql/txncheck.py)
        if lost:
            out["lost"] = True
        return out

    def _execute(self, req: Execute, cursors: _Cursors | None, who: Principal) -> dict[str, Any]:
        commit = None
        if req.commit is not None and req.commit.checks is not None:
            if len(req.commit.checks) != len(req.statements):
                raise bad_request(f"commit: {len(req.commit.checks)} checks for "
                                  f"{len(req.statements)} statements")
            refuse = who.refuse_write(req.statements)
            if refuse is not None and not all(first_keyword(sql) in CANNOT_WRITE_KEYWORDS
                                              for sql, _ in req.statements):
                raise refuse  # a commit of anything but plain reads would write
            result = self.node.commit_transaction(
                req.statements, req.commit, client_id=req.client_id, serial=req.serial,
                timeout_s=self._timeout_s(req))
            return result.to_wire()
        if req.commit is not None:
            c = req.commit
            commit = (self._in_log(c.read_index, "commit.read_index"), c.reads, c.last_ms)
        reads: set[str] | None = set() if req.reads else None
        result = self.node.execute(
            req.statements,
            client_id=req.client_id,
            serial=req.serial,
            consistency=req.consistency,
            min_index=req.min_index,
            timeout_s=self._timeout_s(req),
            reads=reads,
            commit=commit,
            chunk=self._chunk(req, cursors),
            whole=self._whole(req, cursors),
            refuse_write=who.refuse_write(req.statements),
            durability=req.durability,
            min_term=req.min_term,
        )
        out = self._streamed(result, result.to_wire(), cursors)
        if reads is not None:
            out["reads"] = sorted(reads)
        return out
