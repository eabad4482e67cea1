"""Serves driver requests on a client connection: execute, status, ping.

Protocol (payloads of wire REQUEST/RESPONSE frames, msgpack maps with string keys):

  request  {"id": int, "op": "execute", "statements": [[sql, params], ...],
                (an item may also be [sql, [params, ...], 1]: executemany, one DML statement
                 run once per parameter set, prepared once; its result gives the summed
                 rowcount and no per-set results; not with "commit")
            "client_id": str, "serial": int, "consistency": "linearizable"|"leader"|"stale",
            "min_index": int, "timeout_ms": int,
            "reads": true,          (optional: a transaction's read before its first write;
                                     the result adds "reads", the tables it read)
            "commit": {"read_index": int, "reads": [table, ...], "last_ms": int}}
                                    (optional: the statements are a transaction's writes; the
                                     entry is a TXN command, applied only if nothing in
                                     "reads" changed after read_index, else the result's
                                     error is RAFTSQL_SERIALIZATION)
           {"id": int, "op": "execute", "statements": [[sql, params]],
            "txn": {"writes": [[sql, params], ...], "term": int | None,
                    "start_index": int | None, "reads": [table, ...], "last_ms": int | None,
                    "consistency": str}, "timeout_ms": int}
                (one statement of an open driver transaction, on the leader; the result adds
                 "readonly", "term", "reads" (the transaction's read set including this
                 statement's), "start_index" (the snapshot: the given one, or this
                 statement's index) and "time_ms" (the leader's clock, for the idle timeout))
           {"id": int, "op": "fetch", "cursor": int, "max_bytes": int}
                (the next rows of a streamed read: {"rows", "bad_text", "more"}; see below)
           {"id": int, "op": "close_cursor", "cursor": int}
           {"id": int, "op": "status"}      {"id": int, "op": "ping"}
           {"id": int, "op": "hash"}        (applied index + hash of every table, for tests)
           {"id": int, "op": "cluster_add" | "cluster_promote" | "cluster_remove" |
            "cluster_join" | "backup_begin" | "backup_read" | "backup_end", ...}
                (membership changes and backups: server/admin.py)
  response {"id": int, "ok": true, "result": {...}}   (Result.to_wire(), SQL errors inside)
           {"id": int, "ok": false, "error": {"kind", "message", "leader", "leader_addr"}}

A connection carries one request at a time (the driver serializes per connection).

Streamed reads: an execute may carry "chunk": N (bytes). A read then answers with about N bytes
of rows and, if more remain, "cursor": an id on this connection; "fetch" returns the next rows
("more": false on the last chunk, which closes it). Every row of one read comes from one SQLite
read transaction: the state at the result's "index". A cursor lives on its connection: closing
the connection closes it, at most MAX_CURSORS_PER_CONNECTION are open per connection and
MAX_CURSORS per node, and one left without a fetch for CURSOR_IDLE_S is closed (it holds back
the WAL checkpoint). Without "chunk" a read's whole result is sent at once, up to
statemachine.MAX_RESULT_BYTES.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from raftsql import wire
from raftsql.command import MANY_FLAG, Many
from raftsql.raft.types import Role
from raftsql.server.admin import OPS as ADMIN_OPS
from raftsql.server.admin import AdminService
from raftsql.server.node import RequestError

log = logging.getLogger("raftsql.clients")

_CONSISTENCY = {"linearizable", "leader", "stale"}

# Streamed reads (see the module docstring).
MAX_CURSORS_PER_CONNECTION = 16
MAX_CURSORS = 256  # per node: each holds a reader connection and a read transaction
CURSOR_IDLE_S = 60.0
MIN_CHUNK = 4 << 10


class _Cursors:
    """The open streamed reads of one client connection. Used only by that connection's
    thread; the node-wide count is shared."""

    def __init__(self, service: ClientService):
        self._service = service
        self._open: dict[int, Any] = {}
        self._next_id = 1

    def __bool__(self) -> bool:
        return bool(self._open)

    def add(self, cursor: Any) -> int:
        svc = self._service
        if len(self._open) >= MAX_CURSORS_PER_CONNECTION:
            cursor.close()
            raise RequestError(
                "TOO_MANY_CURSORS",
                f"too many unfinished result sets on this connection (at most "
                f"{MAX_CURSORS_PER_CONNECTION}): fetch them to the end or close their cursors",
            )
        with svc._cursor_lock:
            if svc._cursor_count >= MAX_CURSORS:
                cursor.close()
                raise RequestError(
                    "TOO_MANY_CURSORS",
                    f"this node has {MAX_CURSORS} unfinished result sets open; fetch or close "
                    "some, or read smaller results",
                )
            svc._cursor_count += 1
        cid = self._next_id
        self._next_id += 1
        self._open[cid] = cursor
        return cid

    def get(self, cid: Any) -> Any:
        cursor = self._open.get(cid) if type(cid) is int else None
        if cursor is None:
            raise RequestError(
                "BAD_REQUEST",
                f"no open cursor {cid!r} on this connection (it was read to the end, closed, "
                f"or closed after {CURSOR_IDLE_S:g} s without a fetch)",
            )
        return cursor

    def close(self, cid: int) -> None:
        cursor = self._open.pop(cid, None)
        if cursor is not None:
            cursor.close()
            with self._service._cursor_lock:
                self._service._cursor_count -= 1

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

    def serve(self, conn) -> None:
        """Run one client connection's request loop (in the transport's connection thread)."""
        first = True
        cursors = _Cursors(self)
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
                if kind != wire.FrameKind.REQUEST:
                    conn.send(wire.FrameKind.ERROR, {"message": f"unexpected {kind.name} frame on a client connection"})
                    return
                resp = self.handle(payload, conn, cursors)
                if first:
                    # The first answer on a connection names the cluster's members, so a driver
                    # can still find the cluster after every node in its DSN was removed.
                    first = False
                    resp["members"] = self._member_addresses()
                conn.send(wire.FrameKind.RESPONSE, resp)
                if cursors:
                    cursors.expire()
        except (OSError, wire.FrameError) as e:
            log.info("client %s: connection closed: %s", getattr(conn, "peer_name", "?"), e)
        finally:
            cursors.close_all()
            self.admin.close_conn(conn)
            conn.close()

    def _member_addresses(self) -> list[str]:
        node = self.node
        with node._lock:
            members = set(node.core.voters) | set(node.core.learners)
        return sorted(a for nid, a in node.addresses.items() if nid in members and a)

    def handle(self, payload: Any, conn: Any = None, cursors: _Cursors | None = None) -> dict[str, Any]:
        req_id = payload.get("id") if isinstance(payload, dict) else None
        try:
            req = wire.check_map(payload, {"id": int, "op": str})
            op = req["op"]
            if op == "execute":
                if "txn" in req:
                    out = self._execute_txn(req, cursors)
                else:
                    out = self._execute(req, cursors)
                return {"id": req_id, "ok": True, "result": out}
            if op == "fetch":
                return {"id": req_id, "ok": True, "result": self._fetch(req, cursors)}
            if op == "close_cursor":
                body = wire.check_map(req, {"cursor": int})
                if cursors is not None:
                    cursors.close(body["cursor"])
                return {"id": req_id, "ok": True, "result": {}}
            if op == "status":
                return {"id": req_id, "ok": True, "result": self.node.status()}
            if op == "hash":
                # Tests compare nodes by this; the hash and index are read under the apply lock.
                index, digest = self.node.content_hash()
                return {"id": req_id, "ok": True, "result": {"index": index, "hash": digest}}
            if op in ADMIN_OPS:
                return {"id": req_id, "ok": True, "result": self.admin.handle(op, req, conn)}
            if op == "ping":
                return {"id": req_id, "ok": True, "result": {"node": self.node.cfg.id}}
            raise RequestError("BAD_REQUEST", f"unknown op {op!r}")
        except wire.FrameError as e:
            err = RequestError("BAD_REQUEST", str(e))
        except RequestError as e:
            err = e
        except RecursionError:
            err = RequestError("BAD_REQUEST", "the request is nested too deeply")
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the connection
            log.exception("request failed")
            err = RequestError("UNAVAILABLE", f"internal error: {type(e).__name__}: {e}")
        return {"id": req_id, "ok": False, "error": err.to_wire()}

    def _chunk(self, req: dict[str, Any], cursors: _Cursors | None) -> int | None:
        chunk = req.get("chunk")
        if chunk is None or cursors is None:
            return None
        if type(chunk) is not int or chunk <= 0:
            raise RequestError("BAD_REQUEST", f"chunk must be a positive number of bytes, got {chunk!r}")
        return max(MIN_CHUNK, min(chunk, self.node.cfg.max_frame_size // 2))

    def _streamed(self, result: Any, out: dict[str, Any], cursors: _Cursors | None) -> dict[str, Any]:
        if result.stream is not None and cursors is not None:
            out["cursor"] = cursors.add(result.stream)
        return out

    def _fetch(self, req: dict[str, Any], cursors: _Cursors | None) -> dict[str, Any]:
        body = wire.check_map(req, {"cursor": int}, {"max_bytes": int})
        if cursors is None:
            raise RequestError("BAD_REQUEST", "fetch needs a connection")
        cid = body["cursor"]
        cursor = cursors.get(cid)
        max_bytes = body.get("max_bytes", 1 << 20)
        if max_bytes <= 0:
            raise RequestError("BAD_REQUEST", f"max_bytes must be positive, got {max_bytes}")
        max_bytes = max(MIN_CHUNK, min(max_bytes, self.node.cfg.max_frame_size // 2))
        rows, done = cursor.fetch(max_bytes)
        if done:
            cursors.close(cid)
        if rows is None:
            return {"rows": [], "more": False, "error": cursor.error, "index": cursor.index}
        out: dict[str, Any] = {"rows": rows, "more": not done, "error": None, "index": cursor.index}
        if cursor.bad_text:
            out["bad_text"] = cursor.bad_text
        return out

    def _execute_txn(self, req: dict[str, Any], cursors: _Cursors | None = None) -> dict[str, Any]:
        body = wire.check_map(req, {"statements": list, "txn": dict})
        statements = self._statements(body["statements"])
        if len(statements) != 1:
            raise RequestError("BAD_REQUEST", "a transaction statement is sent one at a time")
        txn = wire.check_map(
            body["txn"],
            {"writes": list},
            {
                "term": (int, type(None)),
                "start_index": (int, type(None)),
                "reads": list,
                "last_ms": (int, type(None)),
                "consistency": str,
            },
        )
        writes = self._statements(txn["writes"])
        reads = self._tables(txn.get("reads", []))
        consistency = txn.get("consistency", "linearizable")
        if consistency not in _CONSISTENCY:
            raise RequestError("BAD_REQUEST", f"unknown consistency {consistency!r}")
        start_index = txn.get("start_index")
        if start_index is not None:
            start_index = self._index(start_index, "txn.start_index", applied=True)
        result, readonly, term, time_ms = self.node.execute_in_transaction(
            statements[0], writes, txn.get("term"), consistency, start_index=start_index,
            reads=reads, last_ms=txn.get("last_ms"), timeout_s=self._timeout(req),
            chunk=self._chunk(req, cursors))
        out = self._streamed(result, result.to_wire(), cursors)
        out["readonly"] = readonly
        out["term"] = term
        out["reads"] = sorted(reads)
        out["start_index"] = result.index if start_index is None else start_index
        out["time_ms"] = time_ms
        return out

    def _index(self, value: int, what: str, *, applied: bool = False) -> int:
        """A log index from a client: not negative, and (applied=True, checked on a leader)
        not past the end of the leader's log: the snapshot a client saw was applied somewhere,
        and every committed entry is in the leader's log (Leader Completeness)."""
        if value < 0 or value >= 1 << 63:
            raise RequestError("BAD_REQUEST", f"{what} must be a log index, got {value}")
        if applied:
            node = self.node
            with node._lock:
                is_leader = node.core.role == Role.LEADER
                last = node.core.log.last_index()
            if is_leader and value > last:
                raise RequestError(
                    "BAD_REQUEST", f"{what} {value} is past the end of the log ({last})"
                )
        return value

    @staticmethod
    def _timeout(req: dict[str, Any]) -> float | None:
        """timeout_ms, if given, must be positive: a deadline already passed would report a
        write that applies as OUTCOME_UNKNOWN. None: the node's request_timeout_s."""
        timeout_ms = req.get("timeout_ms")
        if timeout_ms is None:
            return None
        if type(timeout_ms) is not int or timeout_ms <= 0:
            raise RequestError(
                "BAD_REQUEST", f"timeout_ms must be a positive number of milliseconds, got {timeout_ms!r}"
            )
        return timeout_ms / 1000.0

    @staticmethod
    def _tables(items: Any) -> set[str]:
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise RequestError("BAD_REQUEST", "reads must be a list of table names")
        return set(items)

    @staticmethod
    def _statements(items: list, *, many: bool = False) -> list[tuple[str, Any]]:
        """[sql, params] items; with many=True also [sql, [params, ...], 1] (executemany)."""
        statements = []
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
                    raise RequestError(
                        "BAD_REQUEST", f"statement {i}: a many statement needs a list of params"
                    )
                kinds = set(map(type, sets))  # C speed: a batch is usually all lists
                if not kinds <= {list, dict}:
                    raise RequestError(
                        "BAD_REQUEST", f"statement {i}: params must be a list or a map"
                    )
                if kinds == {list}:
                    out = tuple(map(tuple, sets))
                else:
                    out = tuple(tuple(p) if type(p) is list else p for p in sets)
                statements.append((st[0], Many(out)))
                continue
            if not (isinstance(st, list) and len(st) == 2 and isinstance(st[0], str)):
                raise RequestError("BAD_REQUEST", f"statement {i} must be [sql, params]")
            sql, params = st
            if params is None:
                params = ()
            if not isinstance(params, list | dict):
                raise RequestError("BAD_REQUEST", f"statement {i}: params must be a list or a map")
            statements.append((sql, tuple(params) if isinstance(params, list) else params))
        return statements

    def _execute(self, req: dict[str, Any], cursors: _Cursors | None = None):
        body = wire.check_map(
            req,
            {"statements": list},
            {
                "client_id": str,
                "serial": int,
                "consistency": str,
                "min_index": int,
                "timeout_ms": int,
                "reads": bool,
                "commit": dict,
                "chunk": int,
            },
        )
        statements = self._statements(body["statements"], many="commit" not in body)
        consistency = body.get("consistency", "linearizable")
        if consistency not in _CONSISTENCY:
            raise RequestError("BAD_REQUEST", f"unknown consistency {consistency!r}")
        timeout_s = self._timeout(body)
        commit = None
        if "commit" in body:
            c = wire.check_map(body["commit"], {"read_index": int, "reads": list, "last_ms": int})
            commit = (
                self._index(max(0, c["read_index"]), "commit.read_index", applied=True),
                tuple(sorted(self._tables(c["reads"]))),
                max(0, c["last_ms"]),
            )
        reads: set[str] | None = set() if body.get("reads") else None
        result = self.node.execute(
            statements,
            client_id=body.get("client_id", ""),
            serial=body.get("serial", 0),
            consistency=consistency,
            min_index=self._index(max(0, body.get("min_index", 0)), "min_index"),
            timeout_s=timeout_s,
            reads=reads,
            commit=commit,
            chunk=self._chunk(body, cursors),
        )
        out = self._streamed(result, result.to_wire(), cursors)
        if reads is not None:
            out["reads"] = sorted(reads)
        return out
