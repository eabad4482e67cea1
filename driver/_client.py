"""Finds the leader, follows redirects and retries, keeping every write exactly-once.

Every request carries (client_id, serial). A request is resent with the SAME serial whatever
happened to the previous attempt, so the state machine's session table turns a resend of an
applied write into "return the stored result". Two failure classes are kept apart for the
caller, because they mean different things to an application:

  Unavailable     no attempt was applied (never sent, or refused before the log): safe to retry
  OutcomeUnknown  an attempt may have been applied and the deadline passed: resend only with
                  the same serial (call `resend(...)` with the serial the error carries)
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from typing import Any

from raftsql.driver._conn import DSN, ConnectionLost, NodeConnection, NodeUnreachable


class ClientError(Exception):
    """Base of the errors raised by Client."""


class Unavailable(ClientError):
    """Raised when no node could serve the request before the deadline; nothing was applied."""


class OutcomeUnknown(ClientError):
    """Raised when a write may or may not have been applied by the deadline. `serial` is the
    serial to resend it with (the same one), so it can still apply at most once."""

    def __init__(self, message: str, serial: int):
        super().__init__(message)
        self.serial = serial


class BadRequest(ClientError):
    """Raised when the node refused the request as malformed; resending will not help."""


class Client:
    """Thread-safe: requests are serialized (one in flight per Client)."""

    def __init__(self, hosts: list[tuple[str, int]], context, *, timeout: float = 10.0,
                 consistency: str = "linearizable", connect_timeout: float = 2.0):
        if not hosts:
            raise ValueError("no hosts")
        self.hosts = list(hosts)
        random.shuffle(self.hosts)  # spread connections across nodes
        self.context = context
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.consistency = consistency
        self.client_id = uuid.uuid4().hex
        self._serials = itertools.count(1)
        self._lock = threading.RLock()
        self._conn: NodeConnection | None = None
        self._leader: tuple[str, int] | None = None
        self._next_host = 0
        self.last_index = 0  # highest log index this client wrote or read (read-your-writes)

    @classmethod
    def from_dsn(cls, dsn: str, **kw) -> Client:
        from raftsql.driver._admin import context_for

        d = DSN.parse(dsn)
        if "timeout" in d.params and "timeout" not in kw:
            kw["timeout"] = float(d.params["timeout"])
        if "consistency" in d.params and "consistency" not in kw:
            kw["consistency"] = d.params["consistency"]
        return cls(d.hosts, context_for(d), **kw)

    # ------------------------------------------------------------------ public

    def execute(self, statements: list[tuple[str, Any]], *, consistency: str | None = None,
                min_index: int | None = None, timeout: float | None = None,
                serial: int | None = None) -> dict[str, Any]:
        """Run statements (one, or an atomic batch); returns the Result map. SQL errors come back
        inside it ("error"); transport/leadership trouble is retried until the deadline."""
        with self._lock:
            serial = serial if serial is not None else next(self._serials)
            consistency = consistency or self.consistency
            req = {
                "op": "execute",
                "statements": [[sql, list(p) if isinstance(p, tuple) else p] for sql, p in statements],
                "client_id": self.client_id,
                "serial": serial,
                "consistency": consistency,
            }
            if consistency == "stale":
                req["min_index"] = self.last_index if min_index is None else min_index
            result = self._call(req, timeout or self.timeout, serial)
            self.last_index = max(self.last_index, int(result.get("index") or 0))
            return result

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        with self._lock:
            return self._call({"op": "status"}, timeout, None)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ retry loop

    def _call(self, req: dict[str, Any], timeout: float, serial: int | None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        maybe_sent = False  # did an attempt reach a node that might have applied it?
        delay = 0.005
        last_error = "no attempt made"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                conn = self._connection(remaining)
            except NodeUnreachable as e:
                last_error = str(e)
                self._forget_node()
            else:
                req["timeout_ms"] = max(1, int(remaining * 1000))
                try:
                    resp = conn.request(req, remaining + 0.5)
                except ConnectionLost as e:
                    maybe_sent = True
                    last_error = str(e)
                    self._forget_node()
                else:
                    if resp.get("ok"):
                        return resp["result"]
                    err = resp.get("error") or {}
                    kind, msg = err.get("kind"), err.get("message", "")
                    last_error = f"{kind}: {msg}"
                    if kind == "BAD_REQUEST":
                        raise BadRequest(msg)
                    if kind == "NOT_LEADER":
                        hint = err.get("leader_addr")
                        self._follow(hint)
                        if hint:
                            continue  # redirect at once, no backoff
                    elif kind == "OUTCOME_UNKNOWN":
                        maybe_sent = True
                        self._forget_node()
                    # UNAVAILABLE / TIMEOUT / NOT_LEADER without hint: back off and retry
            sleep = min(delay * (0.5 + random.random()), max(0.0, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(delay * 2, 0.2)
        if maybe_sent and serial is not None:
            raise OutcomeUnknown(f"no result within {timeout:.1f}s; the write may have been applied "
                                 f"(resend with serial {serial}): {last_error}", serial)
        raise Unavailable(f"no node served the request within {timeout:.1f}s: {last_error}")

    def _connection(self, remaining: float) -> NodeConnection:
        if self._conn is not None:
            return self._conn
        if self._leader is not None:
            host, port = self._leader
        else:
            host, port = self.hosts[self._next_host % len(self.hosts)]
        self._conn = NodeConnection(host, port, self.context, min(self.connect_timeout, remaining))
        return self._conn

    def _forget_node(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._leader = None
        self._next_host += 1

    def _follow(self, hint: str | None) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if hint:
            host, _, port = hint.rpartition(":")
            self._leader = (host, int(port))
        else:
            self._leader = None
            self._next_host += 1
