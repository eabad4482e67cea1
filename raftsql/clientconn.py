"""One TLS connection to one node, speaking the client protocol (stdlib + msgpack only).

The DB-API layer above decides where to send what and how to retry; this layer only moves a
request and its response, and says precisely how a failure happened:

  NodeUnreachable   nothing was sent (connect/handshake failed, or the node had closed the
                    connection while it was idle): safe to resend anywhere
  ConnectionLost    the request may have been sent, and no response came: outcome unknown

Either has `forbidden` set when the node said why with an ERROR frame of kind FORBIDDEN: the
certificate is revoked, so no node will serve it.
"""

from __future__ import annotations

import itertools
import select
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from raftsql import wire


class NodeUnreachable(OSError):
    """Raised when a node cannot be connected to; no request was sent."""

    forbidden = False  # the node refused the certificate (revoked)
    # We refused the node's certificate (another CA, a name the DSN's host is not in, expired):
    # a setting to fix, not a node that is down.
    bad_certificate = False
    # The node refused ours (a TLS alert: not from the cluster's CA, expired): a setting too.
    certificate_refused = False


# TLS alerts a node sends when it does not accept the client's certificate.
_REFUSED_OURS = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                           "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                           "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_ACCESS_DENIED"})


def _tls_failure(what: str, e: BaseException) -> NodeUnreachable:
    """NodeUnreachable for a failed handshake or hello, saying whose certificate was refused."""
    reason = getattr(e, "reason", None)
    if isinstance(e, ssl.SSLError) and reason in _REFUSED_OURS:
        failed = NodeUnreachable(f"{what}: the node refused this client certificate ({e}): it "
                                 "must be issued by the cluster's CA (`raftsql certs client`)")
        failed.certificate_refused = True
        return failed
    hint = ""
    if isinstance(e, ssl.SSLEOFError) or "EOF occurred" in str(e):
        hint = (" (the node closed the connection during the TLS handshake: it may have refused "
                "this client certificate, for one not issued by the cluster's CA)")
    failed = NodeUnreachable(f"{what}: {e}{hint}")
    failed.bad_certificate = isinstance(e, ssl.SSLCertVerificationError)
    return failed


class ConnectionLost(OSError):
    """Raised when the connection failed after a request was (maybe) sent: outcome unknown."""

    forbidden = False  # the node closed it because the certificate was revoked


def _refused(cls: type[OSError], message: str, payload: object) -> OSError:
    """cls(message + the ERROR frame's reason), forbidden if its kind says so."""
    e = cls(f"{message}: {wire.parse_error(payload)}")
    e.forbidden = wire.parse_error_kind(payload) == "FORBIDDEN"  # type: ignore[attr-defined]
    return e


@dataclass
class DSN:
    hosts: list[tuple[str, int]]
    params: dict[str, str]

    @classmethod
    def parse(cls, dsn: str) -> DSN:
        """raftsql://host1:port1,host2:port2/?certs=DIR&consistency=linearizable&timeout=10"""
        parts = urlsplit(dsn)
        if parts.scheme != "raftsql":
            raise ValueError(f"DSN must start with raftsql://, got {dsn!r}")
        hosts = []
        for item in filter(None, parts.netloc.split(",")):
            host, sep, port = item.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"DSN host {item!r} must be host:port")
            hosts.append((host.strip("[]"), int(port)))
        if not hosts:
            raise ValueError("DSN names no hosts")
        params = {k: unquote(v[-1]) for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        return cls(hosts, params)


class NodeConnection:
    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float = 5.0):
        self.address = (host, port)
        # Streamed results still open on this connection (their cursors live on the node, per
        # connection), and whether the Client has moved on to another connection meanwhile:
        # then the last stream to finish closes this one (driver/_client.py, ResultStream).
        self.streams = 0
        self.detached = False
        self.closed = False
        self.forked = False  # closed in a child process that inherited it (driver/_client.py)
        self._ids = itertools.count(1)
        self._decoder = wire.FrameDecoder()
        self._pending: list[tuple[wire.FrameKind, Any]] = []
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise NodeUnreachable(f"cannot connect to {host}:{port}: {e}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = context.wrap_socket(raw, server_hostname=host)
            self._sock.sendall(wire.make_hello(None, "client"))
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise _tls_failure(f"TLS handshake with {host}:{port} failed", e) from None
        # The node's hello names the largest request it accepts: a bigger one is refused here,
        # with a clear error, instead of being sent and cut off.
        self.max_request = wire.DEFAULT_MAX_FRAME_SIZE
        try:
            self._sock.settimeout(timeout)
            kind, hello = self._next_frame()
            if kind == wire.FrameKind.ERROR:
                raise _refused(NodeUnreachable, f"{host}:{port} refused the connection", hello)
            if kind != wire.FrameKind.HELLO:
                raise NodeUnreachable(f"{host}:{port} sent {kind.name} instead of HELLO")
            limit = wire.parse_hello(hello).max_request
            if limit is not None:
                self.max_request = limit
        except NodeUnreachable:
            self.close()
            raise
        except (OSError, ssl.SSLError, wire.FrameError, ConnectionLost) as e:
            self.close()
            raise _tls_failure(f"no hello from {host}:{port}", e) from None

    def request(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait for its response (raises ConnectionLost on any failure
        after the first byte may have left)."""
        req_id = next(self._ids)
        # Encoding errors (a value msgpack cannot pack, a frame over the size limit) are raised
        # here, before anything is sent: they are the caller's, not the connection's.
        frame = wire.encode_frame(wire.FrameKind.REQUEST, dict(payload, id=req_id))
        if len(frame) - wire.HEADER_SIZE > self.max_request:
            raise wire.FrameError(
                f"request of {len(frame) - wire.HEADER_SIZE} bytes exceeds the node's limit of {self.max_request} "
                "bytes (its max_request_size): split a batch into smaller ones; a single value "
                "this large needs nodes started with a larger max_request_size"
            )
        self._closed_while_idle()
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(frame)
            while True:
                kind, resp = self._next_frame()
                if kind == wire.FrameKind.RESPONSE and isinstance(resp, dict) and resp.get("id") == req_id:
                    return resp
                if kind == wire.FrameKind.ERROR:
                    raise _refused(ConnectionLost, "node closed the connection", resp)
        except (OSError, ssl.SSLError, wire.FrameError) as e:
            self.close()
            if isinstance(e, ConnectionLost):
                raise
            raise ConnectionLost(f"connection to {self.address[0]}:{self.address[1]} lost: {e}") from None

    def _closed_while_idle(self) -> None:
        """Before sending on a connection that sat idle: if the node has closed it meanwhile
        (an idle timeout, its shutdown, a revoked certificate), say so as NodeUnreachable,
        since nothing was sent. A connection with nothing to read costs one poll."""
        if self._pending or self._sock.pending():
            return
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return
        if not readable:
            return
        try:
            self._sock.setblocking(False)
            try:
                data = self._sock.recv(65536)
            finally:
                self._sock.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # a TLS record that carried no data
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise NodeUnreachable(f"connection to {self.address[0]}:{self.address[1]} was closed "
                                  f"while idle: {e}") from None
        if not data:
            self.close()
            # No reason given: the node stopped or restarted (its idle timeout sends one).
            raise NodeUnreachable(f"{self.address[0]}:{self.address[1]} closed the connection "
                                  "(the node stopped or restarted)")
        try:
            frames = list(self._decoder.feed(data))
        except wire.FrameError as e:
            self.close()
            raise NodeUnreachable(f"{self.address[0]}:{self.address[1]} sent garbage: {e}") from None
        for kind, payload in frames:
            if kind == wire.FrameKind.ERROR:
                self.close()
                raise _refused(NodeUnreachable, f"{self.address[0]}:{self.address[1]} closed the "
                               "idle connection", payload)
            self._pending.append((kind, payload))

    def _next_frame(self) -> tuple[wire.FrameKind, Any]:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionLost("connection closed by the node")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def close(self) -> None:
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass
