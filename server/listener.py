"""The transport's inbound side (a mixin of Transport, on the same instance and lock): the
accept loop, the TLS handshake and HELLO of every connection, the client-connection cap and the
descriptor limit, and the reader of each peer's inbound stream (server/DESIGN.md,
"Connections")."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

from raftsql import wire
from raftsql.server import metrics
from raftsql.server.connection import ClientConn
from raftsql.server.sockets import (
    _EOF_ERRORS,
    FD_RESERVE,
    FOREIGN_CLUSTER,
    PEER_HEADROOM,
    RECV_CHUNK,
    REFUSAL_LOG_INTERVAL,
    FrameKind,
    _close,
    _Closed,
    _fmt,
    _recv_first_frame,
    _shutdown,
    _tune,
    _why,
    raise_fd_limit,
)
from raftsql.server.tls import PeerIdentity, peer_identity

if TYPE_CHECKING:
    from raftsql.server.snapshot import Receiver


class _Inbound:
    """An accepted connection as stop() sees it: the socket (or ClientConn) to shut down, and
    its certificate's name and serial once the handshake is done (close_revoked)."""

    __slots__ = ("lock", "target", "aborted", "client", "name", "serial")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: Any = None
        self.aborted = False
        self.client = False  # counted in Transport._clients
        self.name: str | None = None
        self.serial: str | None = None

    def set(self, target: Any) -> None:
        with self.lock:
            self.target = target
            if self.aborted:
                self._abort_target()

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            self._abort_target()

    def _abort_target(self) -> None:
        if isinstance(self.target, ClientConn):
            self.target.abort()
        else:
            _shutdown(self.target)


class Listener:
    """Inbound connections for Transport (which holds the state these methods use)."""

    def _set_limits(self) -> None:
        """Raise the fd limit; derive max_connections from it and clamp the client cap."""
        before, fd_limit = raise_fd_limit()
        if fd_limit != before:
            self.log.info(
                "%s: raised the open-file limit from %d to %d", self.node_id, before, fd_limit
            )
        if self.max_connections is None:
            self.max_connections = max(PEER_HEADROOM + 1, fd_limit - FD_RESERVE)
        self.client_cap = max(1, min(self.max_client_connections, self.max_connections - PEER_HEADROOM))
        if self.client_cap < self.max_client_connections:
            self.log.warning(
                "%s: only %d client connections fit the open-file limit of %d (%d asked for "
                "with max_client_connections): raise the hard limit (ulimit -Hn, LimitNOFILE=)",
                self.node_id,
                self.client_cap,
                fd_limit,
                self.max_client_connections,
            )

    @property
    def client_connections(self) -> int:
        """Client connections open now (past their hello)."""
        return self._clients

    def node_serials(self) -> set[str]:
        """The certificate serials of the peers connected to us now."""
        with self._lock:
            return {r.serial for r in self._inbound.values() if r.serial}

    def close_revoked(self, is_revoked: Any) -> int:
        """Close every connection whose certificate is_revoked(name, serial) says is revoked
        (a client gets an ERROR frame of kind FORBIDDEN first). Returns how many."""
        with self._lock:
            doomed = [r for r in self._conns if r.name is not None and is_revoked(r.name, r.serial)]
        for rec in doomed:
            why = f"certificate {rec.name!r} (serial {rec.serial}) was revoked"
            self.log.warning("%s: closing the connection of %s: it was revoked", self.node_id, rec.name)
            target = rec.target
            if isinstance(target, ClientConn):
                try:
                    target.send_raw(wire.make_error(why, "FORBIDDEN"), timeout=0)
                except (OSError, ssl.SSLError):
                    pass
            rec.abort()
            metrics.REFUSALS.inc("revoked")
        return len(doomed)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopped:
            try:
                raw, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopped:
                    return
                # EMFILE and friends: log the first of a run, breathe, keep serving.
                level = logging.DEBUG if self._accept_failing else logging.WARNING
                self._accept_failing = True
                self.log.log(level, "%s: accept failed: %s", self.node_id, e)
                time.sleep(0.05)
                continue
            self._accept_failing = False
            rec = _Inbound()
            rec.target = raw
            with self._lock:
                if self._stopped:
                    _close(raw)
                    return
                full = self.max_connections is not None and len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(rec)
            if full:
                # Before TLS nothing can be said to the peer; the descriptor goes at once.
                # (The client cap, checked after the hello, is what clients normally meet.)
                _close(raw)
                self._log_refusal(f"{len(self._conns)} connections open (limit {self.max_connections})")
                continue
            with self._lock:
                t = threading.Thread(
                    target=self._run_thread,
                    args=(self._serve_conn, raw, addr, rec),
                    name=f"{self.node_id}-conn-{_fmt(addr)}",
                    daemon=True,
                )
                self._threads.add(t)
            try:
                t.start()
            except RuntimeError as e:  # "can't start new thread": refuse this one, keep accepting
                _close(raw)
                with self._lock:
                    self._threads.discard(t)
                    self._conns.discard(rec)
                self._log_refusal(f"cannot start a connection thread ({e})")
                time.sleep(0.05)

    def _serve_conn(self, raw: socket.socket, addr: Any, rec: _Inbound) -> None:
        who = _fmt(addr)
        sock: ssl.SSLSocket | None = None
        try:
            _tune(raw)
            raw.settimeout(self.handshake_timeout)
            sock = self._server_ctx.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
            rec.set(sock)
            accepted = self._accept_hello(sock, rec, who)
            if accepted is None:
                return
            hello, who, identity = accepted
            if hello.role == "node":
                if hello.address is not None and self.on_peer_hello is not None:
                    self.on_peer_hello(hello.node_id, hello.address)
                self._serve_node(sock, hello.node_id, who, rec)
                return
            conn = ClientConn(
                sock,
                max_frame_size=self.max_frame_size,
                max_recv_size=self.max_request_size,
                hello=hello,
                address=addr,
                frame_timeout=self.frame_timeout,
                idle_timeout=self.client_idle_timeout,
                _on_violation=lambda c, why: self._client_violation(c, who, why),
                _on_idle=lambda c, why: self._client_violation(c, who, why, logging.INFO),
                _parker=self._parker,
                identity=identity,
            )
            rec.set(conn)
            try:
                self.on_client(conn)
            except Exception as e:  # noqa: BLE001 - a bug in the handler must not kill the node
                level = logging.DEBUG if rec.aborted or self._stopped else logging.WARNING
                self.log.log(
                    level, "%s: client handler for %s failed: %s", self.node_id, who, _why(e)
                )
            finally:
                conn.close()
                conn.release_slot()  # held since the wake-up that found the connection over
        except wire.FrameError as e:
            self._conn_log(rec, "closing the connection from %s: %s", who, e, sock=sock, error=e)
        except (OSError, ssl.SSLError) as e:
            self._conn_log(rec, "connection from %s failed: %s", who, _why(e))
        except Exception as e:  # noqa: BLE001 - a bug in a callback must not kill the node
            self.log.error("%s: connection from %s: unexpected %r", self.node_id, who, e)
        finally:
            _close(sock if sock is not None else raw)
            with self._lock:
                self._conns.discard(rec)
                if rec.client:
                    self._clients -= 1

    def _accept_hello(
        self, sock: ssl.SSLSocket, rec: _Inbound, who: str
    ) -> tuple[wire.Hello, str, PeerIdentity] | None:
        """TLS handshake, the peer's HELLO, checks, our HELLO; within handshake_timeout.
        Returns (hello, who, the certificate's identity) if accepted; else logs one line, sends
        ERROR if possible, None."""
        deadline = time.monotonic() + self.handshake_timeout
        try:
            sock.do_handshake()
        except (OSError, ssl.SSLError) as e:
            self._conn_log(rec, "TLS handshake with %s failed: %s", who, _why(e))
            return None
        identity = peer_identity(sock)
        role, name, serial = identity.role, identity.name, identity.serial
        who = f"{name or '?'} ({who})"
        if role is None:
            self._refuse(rec, sock, who, "the certificate has no raftsql role")
            return None
        if role == "client" and identity.client_role is None:
            self._refuse(rec, sock, who, "the certificate has conflicting client roles")
            return None
        # Identity first, then the deny list: a revocation applied in between is then either
        # seen here or finds this connection in close_revoked (both under the same order).
        with self._lock:
            rec.name, rec.serial = name, serial
        if self.is_revoked is not None and self.is_revoked(name, serial):
            metrics.REFUSALS.inc("revoked")
            self._refuse(rec, sock, who, f"certificate {name!r} (serial {serial}) is revoked",
                         kind="FORBIDDEN")
            return None
        try:
            kind, payload = _recv_first_frame(sock, deadline)
        except TimeoutError:
            self._conn_log(
                rec,
                "closing the connection from %s: no HELLO within %.1fs",
                who,
                self.handshake_timeout,
            )
            return None
        except _Closed as e:
            self._conn_log(rec, "connection from %s closed before its HELLO: %s", who, e)
            return None
        if kind is not FrameKind.HELLO:
            self._refuse(rec, sock, who, f"expected a HELLO frame first, got {kind.name}")
            return None
        hello = wire.parse_hello(payload)
        why = None
        if hello.role == "node":
            if role != "node":
                why = f"a {role} certificate cannot act as a node (Raft needs a node certificate)"
            elif hello.node_id != name:
                why = (
                    f"hello node_id {hello.node_id!r} does not match the certificate name {name!r}"
                )
            elif hello.node_id == self.node_id:
                why = f"node id {self.node_id!r} is this node's own id"
            else:
                foreign = self.foreign_cluster(name, hello.cluster)
                if foreign is not None:
                    self._log_foreign(name, f"refusing the connection from {who}: {foreign}")
                    self._conn_log(rec, "refusing the connection from %s: %s", who, foreign,
                                   sock=sock, error=foreign, kind=FOREIGN_CLUSTER, quiet=True)
                    return None
        if why is not None:
            self._refuse(rec, sock, who, why)
            return None
        if role != "node":  # a node certificate (a peer, an operator's tool) always gets in
            with self._lock:
                full = self._clients >= self.client_cap
                if not full:
                    self._clients += 1
                    rec.client = True
            if full:
                self._refuse_client(sock, who)
                return None
        limit = self.max_request_size if hello.role == "client" else None
        cluster = self.cluster_id() if hello.role == "node" else None
        sock.sendall(wire.make_hello(self.node_id, "node", max_request=limit, cluster=cluster))
        return hello, who, identity

    def _conn_log(
        self, rec: _Inbound, fmt: str, *args: Any, sock: Any = None, error: Any = None,
        kind: str | None = None, quiet: bool = False,
    ) -> None:
        """One warning line per failed connection (debug when we closed it ourselves, or
        `quiet`: logged already), then, if `error` is given, an ERROR frame telling the peer
        why. Logged first: the peer may see the connection end as soon as the frame is out."""
        level = logging.DEBUG if rec.aborted or self._stopped or quiet else logging.WARNING
        self.log.log(level, "%s: " + fmt, self.node_id, *args)
        if error is not None and sock is not None and not rec.aborted:
            try:  # best effort: the peer may well be gone
                sock.settimeout(0.2)
                sock.sendall(wire.make_error(str(error), kind))
            except Exception:  # noqa: BLE001, S110
                pass

    def _refuse(self, rec: _Inbound, sock: ssl.SSLSocket, who: str, why: str,
                kind: str | None = None) -> None:
        """Log one line and send one ERROR frame; the caller closes."""
        self._conn_log(rec, "refusing the connection from %s: %s", who, why, sock=sock, error=why,
                       kind=kind)

    def _refuse_client(self, sock: ssl.SSLSocket, who: str) -> None:
        """The client cap is reached: an ERROR frame naming the limit and how to raise it."""
        why = (
            f"too many client connections: this node allows {self.client_cap} "
            f"(max_client_connections; raise it with --max-client-connections, "
            f"$RAFTSQL_MAX_CLIENT_CONNECTIONS or max_client_connections in the config file)"
        )
        metrics.REFUSALS.inc("connection_limit")
        try:  # best effort: the client may well be gone
            sock.settimeout(0.2)
            sock.sendall(wire.make_error(why))
        except Exception:  # noqa: BLE001, S110
            pass
        self._log_refusal(f"{who}: {self.client_cap} client connections open (max_client_connections)")

    def _log_refusal(self, what: str) -> None:
        """One warning per REFUSAL_LOG_INTERVAL, counting the refusals in between: a client
        that keeps knocking must not flood the log (nor serialize threads on its handler)."""
        now = time.monotonic()
        with self._lock:
            self._refused_clients += 1
            if now - self._refusal_logged < REFUSAL_LOG_INTERVAL:
                return
            n, self._refused_clients = self._refused_clients, 0
            self._refusal_logged = now
        self.log.warning(
            "%s: refused %d connection(s) in the last %.0f s; latest: %s",
            self.node_id,
            n,
            REFUSAL_LOG_INTERVAL,
            what,
        )

    def _client_violation(
        self, conn: ClientConn, who: str, why: str, level: int = logging.WARNING
    ) -> None:
        self.log.log(level, "%s: closing the client connection from %s: %s", self.node_id, who, why)
        try:
            # Never wait for a client that does not read: this thread may hold a parker slot.
            conn.send_raw(wire.make_error(why), timeout=0)
        except (OSError, ssl.SSLError):
            pass
        conn.close()

    def _serve_node(self, sock: ssl.SSLSocket, peer_id: str, who: str, rec: _Inbound) -> None:
        """The reader loop of an authenticated peer: RAFT frames -> on_raft."""
        with self._lock:
            old = self._inbound.get(peer_id)
            self._inbound[peer_id] = rec
        if old is not None:
            # The peer redialled: its old connection is dead or half-open; do not keep both.
            old.abort()
        self.log.debug("%s: %s connected", self.node_id, who)
        sock.settimeout(None)
        decoder = wire.FrameDecoder(self.max_frame_size)
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        me = self.node_id
        on_raft = self.on_raft
        sink: Receiver | None = None
        try:
            while True:
                try:
                    n = sock.recv_into(buf)
                except _EOF_ERRORS as e:
                    if rec.aborted:
                        return
                    n = 0
                    self.log.debug("%s: %s: %s", me, who, _why(e))
                if n == 0:
                    if decoder.buffered:
                        raise wire.FrameError(
                            f"connection closed in the middle of a frame "
                            f"({decoder.buffered} bytes buffered)"
                        )
                    level = logging.DEBUG if rec.aborted or self._stopped else logging.INFO
                    self.log.log(level, "%s: %s disconnected", me, who)
                    return
                for kind, payload in decoder.feed(view[:n]):
                    if kind is FrameKind.SNAPSHOT and self.snapshot_sink is not None:
                        chunk = wire.decode_snapshot_chunk(payload)
                        if sink is None:
                            sink = self.snapshot_sink(peer_id)
                        sink.feed(chunk)
                        continue
                    if kind is not FrameKind.RAFT:
                        if kind is FrameKind.ERROR:
                            self.log.warning(
                                "%s: %s sent an error: %s", me, who, wire.parse_error(payload)
                            )
                            return
                        raise wire.FrameError(f"unexpected {kind.name} frame on a node connection")
                    msgs = wire.decode_raft_batch(payload)
                    good = [m for m in msgs if m.sender == peer_id and m.to == me]
                    if len(good) != len(msgs):
                        bad = next(m for m in msgs if m.sender != peer_id or m.to != me)
                        self.log.warning(
                            "%s: dropped %d message(s) from %s with a wrong sender/recipient "
                            "(e.g. %s from %r to %r)",
                            me,
                            len(msgs) - len(good),
                            who,
                            bad.type.name,
                            bad.sender,
                            bad.to,
                        )
                    p = self._peers.get(peer_id)
                    if p is not None:
                        p.last_received = time.monotonic()
                    if good:
                        on_raft(good)
        finally:
            view.release()
            if sink is not None:
                sink.abort()  # a transfer cut off with its connection restarts from scratch
            with self._lock:
                if self._inbound.get(peer_id) is rec:
                    del self._inbound[peer_id]
