"""Serves driver requests on a client connection: execute, status, ping.

Protocol (payloads of wire REQUEST/RESPONSE frames, msgpack maps with string keys):

  request  {"id": int, "op": "execute", "statements": [[sql, params], ...],
            "client_id": str, "serial": int, "consistency": "linearizable"|"leader"|"stale",
            "min_index": int, "timeout_ms": int}
           {"id": int, "op": "execute", "statements": [[sql, params]],
            "txn": {"writes": [[sql, params], ...], "term": int | None}}
                (one statement of an open driver transaction; the result adds "readonly"
                 and "term"; commit is a normal execute of the writes as one batch)
           {"id": int, "op": "status"}      {"id": int, "op": "ping"}
           {"id": int, "op": "hash"}        (applied index + hash of every table, for tests)
  response {"id": int, "ok": true, "result": {...}}   (Result.to_wire(), SQL errors inside)
           {"id": int, "ok": false, "error": {"kind", "message", "leader", "leader_addr"}}

A connection carries one request at a time (the driver serializes per connection).
"""

from __future__ import annotations

import logging
from typing import Any

from raftsql import wire
from raftsql.server.node import RequestError

log = logging.getLogger("raftsql.clients")

_CONSISTENCY = {"linearizable", "leader", "stale"}


class ClientService:
    def __init__(self, node):
        self.node = node

    def serve(self, conn) -> None:
        """Run one client connection's request loop (in the transport's connection thread)."""
        try:
            while True:
                frame = conn.recv()
                if frame is None:
                    return
                kind, payload = frame
                if kind != wire.FrameKind.REQUEST:
                    conn.send(wire.FrameKind.ERROR, {"message": f"unexpected {kind.name} frame on a client connection"})
                    return
                conn.send(wire.FrameKind.RESPONSE, self.handle(payload))
        except (OSError, wire.FrameError) as e:
            log.info("client %s: connection closed: %s", getattr(conn, "peer_name", "?"), e)
        finally:
            conn.close()

    def handle(self, payload: Any) -> dict[str, Any]:
        req_id = payload.get("id") if isinstance(payload, dict) else None
        try:
            req = wire.check_map(payload, {"id": int, "op": str})
            op = req["op"]
            if op == "execute":
                if "txn" in req:
                    return {"id": req_id, "ok": True, "result": self._execute_txn(req)}
                result = self._execute(req)
                return {"id": req_id, "ok": True, "result": result.to_wire()}
            if op == "status":
                return {"id": req_id, "ok": True, "result": self.node.status()}
            if op == "hash":
                # Tests compare nodes by this; the hash and index are read under the apply lock.
                index, digest = self.node.content_hash()
                return {"id": req_id, "ok": True, "result": {"index": index, "hash": digest}}
            if op == "ping":
                return {"id": req_id, "ok": True, "result": {"node": self.node.cfg.id}}
            raise RequestError("BAD_REQUEST", f"unknown op {op!r}")
        except wire.FrameError as e:
            err = RequestError("BAD_REQUEST", str(e))
        except RequestError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the connection
            log.exception("request failed")
            err = RequestError("UNAVAILABLE", f"internal error: {type(e).__name__}: {e}")
        return {"id": req_id, "ok": False, "error": err.to_wire()}

    def _execute_txn(self, req: dict[str, Any]) -> dict[str, Any]:
        body = wire.check_map(req, {"statements": list, "txn": dict})
        statements = self._statements(body["statements"])
        if len(statements) != 1:
            raise RequestError("BAD_REQUEST", "a transaction statement is sent one at a time")
        txn = wire.check_map(body["txn"], {"writes": list}, {"term": (int, type(None))})
        writes = self._statements(txn["writes"])
        result, readonly, term = self.node.execute_in_transaction(statements[0], writes, txn.get("term"))
        out = result.to_wire()
        out["readonly"] = readonly
        out["term"] = term
        return out

    @staticmethod
    def _statements(items: list) -> list[tuple[str, Any]]:
        statements = []
        for i, st in enumerate(items):
            if not (isinstance(st, list) and len(st) == 2 and isinstance(st[0], str)):
                raise RequestError("BAD_REQUEST", f"statement {i} must be [sql, params]")
            sql, params = st
            if params is None:
                params = ()
            if not isinstance(params, list | dict):
                raise RequestError("BAD_REQUEST", f"statement {i}: params must be a list or a map")
            statements.append((sql, tuple(params) if isinstance(params, list) else params))
        return statements

    def _execute(self, req: dict[str, Any]):
        body = wire.check_map(
            req,
            {"statements": list},
            {
                "client_id": str,
                "serial": int,
                "consistency": str,
                "min_index": int,
                "timeout_ms": int,
            },
        )
        statements = self._statements(body["statements"])
        consistency = body.get("consistency", "linearizable")
        if consistency not in _CONSISTENCY:
            raise RequestError("BAD_REQUEST", f"unknown consistency {consistency!r}")
        timeout_ms = body.get("timeout_ms")
        return self.node.execute(
            statements,
            client_id=body.get("client_id", ""),
            serial=body.get("serial", 0),
            consistency=consistency,
            min_index=max(0, body.get("min_index", 0)),
            timeout_s=timeout_ms / 1000.0 if timeout_ms else None,
        )
