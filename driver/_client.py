"""Finds the leader, follows redirects and retries, keeping every write exactly-once.

Every request carries (client_id, serial). A request is resent with the SAME serial whatever
happened to the previous attempt, so the state machine's session table turns a resend of an
applied write into "return the stored result" (duplicate=True). Two failure classes are kept
apart for the caller, because they mean different things to an application:

  Unavailable     no attempt was applied (never sent, or refused before the log): safe to retry
  OutcomeUnknown  an attempt may have been applied and the deadline passed: resend only with
                  the same serial (execute(..., serial=error.serial))

Transaction statements (execute_in_transaction) are previews that change nothing, so they are
simply retried; but they are pinned to the leader (and term) of the transaction's first
statement: once the term is known, a NOT_LEADER, TXN_ABORTED or an unreachable leader raises
TxnAborted instead of following the leader elsewhere.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import uuid
import weakref
from typing import Any

from raftsql.command import Many
from raftsql.driver._conn import DSN, ConnectionLost, NodeConnection, NodeUnreachable
from raftsql.protocol import CloseCursor, Commit, ErrorKind, Execute, Fetch, TxnState

Statement = tuple[str, Any]


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


class Forbidden(ClientError):
    """Raised when the certificate may not do this (its role), or is revoked: the request was
    not applied, and resending it will not help."""


class TxnAborted(ClientError):
    """Raised when a transaction's leader changed or became unreachable: nothing was applied."""


class TooManyCursors(ClientError):
    """This connection holds as many unfinished streamed results as a node allows; waiting
    does not free one (only fetching them to the end or closing their cursors does)."""


class BadCertificate(ClientError):
    """Every node's TLS certificate failed verification against the DSN (host name, CA):
    retrying will not help."""


class StreamLost(ClientError):
    """Raised when the rest of a streamed result cannot be fetched (its connection was lost,
    or the node closed the cursor): the rows already read stay valid; run the query again."""


# A read asks for rows in chunks of about this many bytes: a result of any size then costs the
# driver (and the node) about one chunk of memory plus its largest row (server/clients.py).
FETCH_BYTES = 1 << 20


class ResultStream:
    """The rest of a read's rows, still on the node that served it (one SQLite read
    transaction there: every chunk is from the snapshot at the result's index). Fetched on
    demand, through the Client's lock, on the connection that opened it."""

    def __init__(self, client: Client, conn: NodeConnection, cursor_id: int, index: int):
        self._client = client
        self._conn = conn
        self._id = cursor_id
        self.index = index
        self.done = False
        self.interrupted: str | None = None  # what cut a fetch short (see fetch)
        conn.streams += 1

    def fetch(self) -> tuple[list[list[Any]], list[list[int]], dict[str, Any] | None]:
        """The next chunk: (rows, bad_text positions in it, error map or None)."""
        if self.done:
            return [], [], None
        client = self._client
        with client._lock:
            if self.interrupted is not None:
                # The node sent the chunk that fetch asked for; it arrived after the caller had
                # gone (a KeyboardInterrupt, an exception from a signal handler) and was skipped
                # as a stale response. Going on would silently leave those rows out.
                self.close()
                raise StreamLost(f"a fetch of this result was interrupted ({self.interrupted}), "
                                 "so rows of it were lost; run the query again")
            conn = self._conn
            if conn.closed:
                self._finish()
                if conn.forked:
                    raise StreamLost("the rest of this result is held by the process that opened "
                                     "it, before fork(); run the query again in this process")
                raise StreamLost(
                    f"the connection to {conn.address[0]}:{conn.address[1]} that held the rest "
                    "of this result was closed; run the query again"
                )
            try:
                resp = conn.request(Fetch(self._id, FETCH_BYTES).to_wire(), client.timeout + 0.5)
            except (ConnectionLost, NodeUnreachable) as e:
                self._finish()
                raise StreamLost(f"the rest of the result was lost: {e}; run the query again") from None
            except BaseException as e:
                self.interrupted = type(e).__name__
                raise
            if not resp.get("ok"):
                self._finish()
                err = resp.get("error") or {}
                raise StreamLost(f"the node could not continue the result: {err.get('message')}")
            r = resp["result"]
            if not r.get("more"):
                self._finish()
            return r.get("rows") or [], r.get("bad_text") or [], r.get("error")

    def abandon(self) -> None:
        """Its cursor was garbage-collected with rows left: the Client closes it on the node
        before its next request (not from here: the collector may run in the middle of a
        request on this very connection)."""
        if not self.done:
            self._client._abandoned.append(self)

    def close(self) -> None:
        """Give up the rest of the rows (the node closes its cursor)."""
        if self.done:
            return
        client = self._client
        with client._lock:
            if not self._conn.closed and not self._conn.detached:
                try:
                    self._conn.request(CloseCursor(self._id).to_wire(), 2.0)
                except (ConnectionLost, OSError):
                    pass
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        conn = self._conn
        conn.streams -= 1
        if conn.streams <= 0 and conn.detached:
            conn.close()
            self._client._detached.discard(conn)


# Clients and Connections of this process: in a child made by fork(), each one's _forked()
# runs (a Client gets its own identity; see Client._forked). Clients first: they were added
# first, and a WeakSet keeps no order, so the two kinds are kept apart.
_FORK_AWARE: tuple[weakref.WeakSet, weakref.WeakSet] = (weakref.WeakSet(), weakref.WeakSet())


def after_fork(obj: Any, tier: int = 0) -> None:
    """Call obj._forked() in a child process that inherits obj (tier 0 before tier 1)."""
    _FORK_AWARE[tier].add(obj)


def _after_fork_in_child() -> None:
    for tier in _FORK_AWARE:
        for obj in list(tier):
            obj._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ManyParams(tuple):
    """The parameter sets of one executemany() statement: sent as [sql, [params, ...], 1], one
    statement prepared once on every node (not one statement per set)."""

    __slots__ = ()


class Client:
    """Thread-safe: requests are serialized (one in flight per Client, on one TLS connection)."""

    # Backoff between attempts: exponential from BACKOFF_MIN, capped, with +-50% jitter.
    BACKOFF_MIN = 0.01
    BACKOFF_MAX = 0.25
    # At most this many members learned from the cluster are kept (see _learn_members).
    MAX_HOSTS = 32

    def __init__(self, hosts: list[tuple[str, int]], context, *, timeout: float = 10.0,
                 consistency: str = "linearizable", connect_timeout: float = 2.0,
                 discover: bool = True):
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
        self.discover = discover
        self._learned: list[tuple[str, int]] = []  # members named by the cluster (fallback)
        self._unreachable = 0  # connections refused in a row
        self.last_index = 0  # highest log index this client wrote or read (read-your-writes)
        # (index, term) of the last write answered at durability "leader" not yet seen applied
        self.early_write: tuple[int, int] | None = None
        self.served_by: tuple[str, int] | None = None  # the node that answered the last request
        # Connections given up for requests but kept for the streamed results still open on
        # them (closed when the last one finishes, or with the client).
        self._detached: set[NodeConnection] = set()
        # Streamed results whose cursors were garbage-collected unfinished (ResultStream.abandon):
        # closed on the node before the next request, so they do not count against its limit.
        self._abandoned: list[ResultStream] = []
        self.forks = 0  # times this client was inherited by a child process (fork)
        after_fork(self)

    def _forked(self) -> None:
        """In a child process made by fork(), which inherited this client: a new client id
        and serials, and none of the parent's sockets. The parent goes on with its own id and
        serial counter; had the child kept them, the nodes would take the child's write with
        serial n for a resend of the parent's write n and answer it with the parent's stored
        result, applying nothing. The parent's TLS sessions cannot be shared either: the
        child only closes its copies of the descriptors (no shutdown, which would cut the
        parent's connection too). Streamed results opened before the fork are lost to the
        child (StreamLost)."""
        self._lock = threading.RLock()  # another thread may have held it at the fork
        self.client_id = uuid.uuid4().hex
        self._serials = itertools.count(1)
        for conn in [self._conn, *self._detached]:
            if conn is not None:
                conn.forked = True
                conn.close()
        self._conn = None
        self._detached = set()
        self._abandoned = []
        self.early_write = None
        self.forks += 1

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

    @property
    def leader(self) -> str | None:
        """The cached leader's "host:port" (None until a redirect named one)."""
        ld = self._leader
        return f"{ld[0]}:{ld[1]}" if ld else None

    def next_serial(self) -> int:
        with self._lock:
            return next(self._serials)

    def execute(self, statements: list[Statement], *, consistency: str | None = None,
                min_index: int | None = None, timeout: float | None = None,
                serial: int | None = None, idempotent: bool = False, reads: bool = False,
                commit: dict[str, Any] | None = None, stream: bool = False,
                durability: str = "quorum") -> dict[str, Any]:
        """Run statements (one, or an atomic batch); returns the Result map. SQL errors come back
        inside it ("error"); transport/leadership trouble is retried until the deadline.
        idempotent=True says the caller knows this is a read: a lost response then raises
        Unavailable, never OutcomeUnknown. reads=True: a transaction's read; the result's
        "reads" lists the tables it read. commit: {"last_ms", "checks", "controls", "txn"}
        makes the statements a transaction's commit: applied only if each statement does what
        its check says the client saw (raftsql/txncheck.py).
        stream=True: a read's rows come in chunks; if more remain, result["stream"] is the
        ResultStream that fetches them."""
        with self._lock:
            serial = serial if serial is not None else next(self._serials)
            consistency = consistency or self.consistency
            # Our last write answered at durability "leader" may not be committed yet: reads
            # wait for it while its leader's term lasts (read-your-writes).
            early_index, early_term = self.early_write or (0, 0)
            req = Execute(
                statements=[(sql, Many(tuple(p)) if type(p) is ManyParams else p)
                            for sql, p in statements],
                client_id=self.client_id,
                serial=serial,
                consistency=consistency,
                min_index=max(self.last_index, min_index or 0, early_index),
                min_term=early_term,
                durability=durability,
                reads=reads,
                commit=None if commit is None else Commit(
                    last_ms=commit["last_ms"], checks=tuple(commit["checks"]),
                    controls=tuple(commit["controls"]), txn=commit.get("txn")),
                chunk=FETCH_BYTES if stream else None,
            ).to_wire()
            result = self._call(req, timeout or self.timeout, None if idempotent else serial)
            index = int(result.get("index") or 0)
            if result.get("early_term"):
                self.early_write = (index, int(result["early_term"]))
            else:
                self.last_index = max(self.last_index, index)
                if index >= early_index:
                    self.early_write = None
            self._attach_stream(result)
            return result

    def _attach_stream(self, result: dict[str, Any]) -> None:
        cid = result.pop("cursor", None)
        if cid is not None and self._conn is not None:
            result["stream"] = ResultStream(self, self._conn, cid, int(result.get("index") or 0))

    def execute_in_transaction(self, statement: Statement, term: int | None, *,
                               leader: str | None = None, txn_id: str | None = None,
                               base: int = 0, last_ms: int | None = None,
                               timeout: float | None = None,
                               stream: bool = False) -> tuple[dict[str, Any], str]:
        """One statement of an open transaction, run on the leader against its applied state
        plus the transaction's first `base` writes, which the leader holds under `txn_id`
        (nothing is applied). Returns (result, "host:port" that served it). With `term` set
        (not the transaction's first leader request), the request goes only to `leader`, and
        a leadership change raises TxnAborted. last_ms: the leader time of the transaction's
        last statement (server/clients.py)."""
        with self._lock:
            if self.early_write is not None and term is None:
                # A transaction's statements run on the leader's applied state: first let our
                # last write answered at durability "leader" be applied (or its term end).
                self.execute([("SELECT 1", ())], consistency="linearizable", idempotent=True,
                             timeout=timeout)
                self.early_write = None
            sql, params = statement
            req = Execute(
                statements=[(sql, Many(tuple(params)) if type(params) is ManyParams else params)],
                txn=TxnState(term=term, id=txn_id, base=base, client_id=self.client_id,
                             last_ms=last_ms),
                chunk=FETCH_BYTES if stream else None,
            ).to_wire()
            if term is not None and leader is not None:
                pinned = _parse_addr(leader)
                if self._leader != pinned:
                    self._drop_conn()
                    self._leader = pinned
            result = self._call(req, timeout or self.timeout, None, pinned_term=term)
            self.last_index = max(self.last_index, int(result.get("index") or 0))
            self._attach_stream(result)
            host, port = self.served_by
            self._leader = (host, port)  # only a leader serves transaction statements: cache it
            return result, f"{host}:{port}"

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        with self._lock:
            return self._call({"op": "status"}, timeout, None)

    def close(self) -> None:
        with self._lock:
            self._drop_conn()
            for conn in list(self._detached):
                conn.close()
            self._detached.clear()

    # ------------------------------------------------------------------ retry loop

    def _call(self, req: dict[str, Any], timeout: float, serial: int | None,
              pinned_term: int | None = None) -> dict[str, Any]:
        """Send req until a node serves it or `timeout` passes. serial: the write's serial, or
        None for a request that cannot apply anything (reads, previews, status)."""
        deadline = time.monotonic() + timeout
        self._close_abandoned()
        # How long a node may wait on our behalf (commit, read index) before answering: half the
        # budget, so one leader that lost its quorum cannot use it all.
        attempt_wait = max(2.0, timeout / 2)
        maybe_sent = False  # did an attempt reach a node that might have applied it?
        delay = self.BACKOFF_MIN
        redirects = 0
        last_error = "no attempt made"
        pinned = pinned_term is not None
        bad_certificates: set[tuple[str, int]] = set()  # nodes whose certificate we refused
        refused_ours: set[tuple[str, int]] = set()  # nodes that refused our certificate
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                conn = self._connection(remaining)
            except NodeUnreachable as e:
                if e.forbidden:
                    self._forget_node()
                    raise self._refused(str(e), maybe_sent, serial) from None
                if e.bad_certificate:
                    bad_certificates.add(self._target())
                    if not maybe_sent and bad_certificates >= set(self.hosts):
                        raise BadCertificate(
                            f"{e}. Every node's certificate was refused: the DSN must name each "
                            "node by a host name or address its certificate holds (`raftsql certs "
                            "node --host`), with certs= pointing at the cluster's CA") from None
                if e.certificate_refused:
                    refused_ours.add(self._target())
                    if not maybe_sent and refused_ours >= set(self.hosts):
                        raise BadCertificate(f"{e}. Every node refused it") from None
                self._unreachable += 1
                if pinned:
                    self._forget_node()
                    raise TxnAborted(f"the transaction's leader is unreachable: {e}") from None
                last_error = str(e)
                self._forget_node()
            else:
                if req["op"] == "execute":
                    req["timeout_ms"] = max(1, int(min(remaining, attempt_wait) * 1000))
                try:
                    resp = conn.request(req, remaining + 0.5)
                except NodeUnreachable as e:
                    # The node had closed this idle connection: nothing was sent. Reconnect.
                    self._drop_conn()
                    if e.forbidden:
                        raise self._refused(str(e), maybe_sent, serial) from None
                    last_error = str(e)
                except ConnectionLost as e:
                    maybe_sent = True
                    if time.monotonic() < deadline or last_error == "no attempt made":
                        # (At the deadline, the read timed out on our side: the node's own
                        # answer to the attempt before, say why a promote waits, says more.)
                        last_error = str(e)
                    if e.forbidden:
                        self._forget_node()
                        raise self._refused(str(e), maybe_sent, serial) from None
                    if pinned:
                        self._drop_conn()  # the same leader, reconnected; the term decides
                    else:
                        self._forget_node()
                else:
                    self._unreachable = 0
                    if "members" in resp and self.discover:
                        self._learn_members(resp)
                    if resp.get("ok"):
                        result = resp["result"]
                        try:
                            lagging = self._answered_by_lagging_node(conn, req, result, remaining)
                        except ConnectionLost as e:
                            maybe_sent, lagging, last_error = True, True, str(e)
                            self._forget_node()
                        if not lagging:
                            self.served_by = conn.address
                            return result
                        if self._conn is not None:
                            last_error = f"{conn.address[0]}:{conn.address[1]} is behind: {result['error']}"
                        redirects += 1
                        if self._leader and self._conn is None and redirects <= 2 * len(self.hosts) + 2:
                            continue  # redirected to the leader: at once
                    else:
                        err = resp.get("error") or {}
                        kind, msg = err.get("kind"), err.get("message", "")
                        last_error = f"{kind}: {msg}"
                        if kind == ErrorKind.BAD_REQUEST:
                            raise BadRequest(msg)
                        if kind == ErrorKind.TOO_MANY_CURSORS and conn.streams > 0:
                            # Ours: only this program can free them, so do not wait for it.
                            raise TooManyCursors(f"{msg} (this connection has {conn.streams} "
                                                 "unfinished results)")
                        if kind == ErrorKind.FORBIDDEN:
                            raise self._refused(msg, maybe_sent, serial)
                        if kind == ErrorKind.TXN_ABORTED or (kind == ErrorKind.NOT_LEADER and pinned):
                            self._follow(err.get("leader_addr"))
                            raise TxnAborted(msg)
                        if kind == ErrorKind.NOT_LEADER:
                            hint = err.get("leader_addr")
                            self._follow(hint)
                            redirects += 1
                            if hint and redirects <= 2 * len(self.hosts) + 2:
                                continue  # redirect at once, no backoff
                        elif kind == ErrorKind.OUTCOME_UNKNOWN:
                            maybe_sent = True
                            hint = err.get("leader_addr")
                            if hint and not pinned and redirects <= 2 * len(self.hosts) + 2:
                                # Leadership moved on (e.g. a graceful stop): resend with the
                                # same serial to the new leader at once.
                                self._follow(hint)
                                redirects += 1
                                continue
                            self._forget_node()
                        # UNAVAILABLE / TIMEOUT / NOT_LEADER without a hint: back off, retry
            sleep = min(delay * (0.5 + random.random()), max(0.0, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(delay * 2, self.BACKOFF_MAX)
        if maybe_sent and serial is not None:
            raise OutcomeUnknown(f"no result within {timeout:.1f}s; the write may have been applied "
                                 f"(resend with serial {serial}): {last_error}", serial)
        raise Unavailable(f"no node served the request within {timeout:.1f}s: {last_error}")

    @staticmethod
    def _refused(message: str, maybe_sent: bool, serial: int | None) -> ClientError:
        """Forbidden; but OutcomeUnknown for a write an earlier attempt may have applied."""
        if maybe_sent and serial is not None:
            return OutcomeUnknown(f"{message}; an earlier attempt of this write may have been "
                                  f"applied (serial {serial})", serial)
        return Forbidden(message)

    @staticmethod
    def _answered_by_lagging_node(conn: NodeConnection, req: dict[str, Any],
                                  result: dict[str, Any], remaining: float) -> bool:
        """A stale read's SQL error is believed only from a node that has applied min_index (a
        node that has not may not know a table created a moment ago); the node waits for
        min_index before it validates, so this only guards against an older node. Other SQL
        errors need no check: a follower answers NOT_LEADER instead of an error from its own
        possibly older state (server/node.py, Node.execute)."""
        if not result.get("error") or req.get("op") != "execute" or "txn" in req:
            return False
        if req.get("consistency") == "stale":
            return int(result.get("index") or 0) < req.get("min_index", 0)
        return False

    def _target(self) -> tuple[str, int]:
        """The node _connection() dials next."""
        if self._leader is not None:
            return self._leader
        if self._learned and self._unreachable >= len(self.hosts):
            return self._learned[self._next_host % len(self._learned)]
        return self.hosts[self._next_host % len(self.hosts)]

    def _connection(self, remaining: float) -> NodeConnection:
        if self._conn is not None:
            return self._conn
        host, port = self._target()
        self._conn = NodeConnection(host, port, self.context, min(self.connect_timeout, remaining))
        return self._conn

    def _learn_members(self, resp: dict[str, Any]) -> None:
        """Remember the members a node named (in the first answer on each connection), so the
        client still finds the cluster after every node in its DSN was removed. They are a
        fallback, tried only once every DSN host refused a connection in a row (a DSN that
        names a proxy or load balancer keeps being used while it answers). Malformed entries
        are ignored."""
        members = resp.get("members")
        if not isinstance(members, list):
            return
        for addr in members:
            if isinstance(addr, str) and len(self._learned) < self.MAX_HOSTS:
                try:
                    hp = _parse_addr(addr)
                except ValueError:
                    continue
                if hp not in self.hosts and hp not in self._learned:
                    self._learned.append(hp)

    def _close_abandoned(self) -> None:
        """Close the streams whose cursors were collected (see ResultStream.abandon); under
        the lock, between requests."""
        while self._abandoned:
            stream = self._abandoned.pop()
            try:
                stream.close()
            except ClientError:
                pass

    def _drop_conn(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn.streams > 0 and not conn.closed:
                # Streamed results are still open on it: keep it for them alone.
                conn.detached = True
                self._detached.add(conn)
            else:
                conn.close()

    def _forget_node(self) -> None:
        self._drop_conn()
        self._leader = None
        self._next_host += 1

    def _follow(self, hint: str | None) -> None:
        self._drop_conn()
        if hint:
            self._leader = _parse_addr(hint)
        else:
            self._leader = None
            self._next_host += 1


def _parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)
