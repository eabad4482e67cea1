"""Sockets and frames for the transport: limits and timeouts, small socket helpers, and the
first-frame reader used during a handshake (server/transport.py, server/listener.py)."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from typing import Any

from raftsql import wire
from raftsql.raft.types import Message

FrameKind = wire.FrameKind

# Frame limit until the hello is accepted: msgpack can expand hostile input ~64x in memory.
HELLO_MAX_FRAME_SIZE = 64 * 1024
# A sender writes at most this much per RAFT frame (more is split over several frames).
BATCH_MAX_MESSAGES = 512
BATCH_MAX_BYTES = 1 << 20
# Transport.send writes batches up to this many bytes of entries on the socket itself; larger
# ones go to the peer's sender thread (encrypting megabytes would hold up the Raft driver).
DIRECT_MAX_BYTES = 64 << 10
BACKOFF_MIN = 0.02
BACKOFF_MAX = 1.0
# A peer of another cluster is refused at every redial; its refusal is logged this often.
FOREIGN_LOG_INTERVAL = 60.0
# The kind of the ERROR frame that refuses a node of another cluster.
FOREIGN_CLUSTER = "FOREIGN_CLUSTER"
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0  # a peer that does not read for this long is treated as dead
IDLE_CHECK = 1.0  # an idle sender checks this often whether its peer closed the connection
RECV_CHUNK = 65536  # > one TLS record (16 KiB)
SNAPSHOT_CHUNK = 256 << 10  # file bytes per SNAPSHOT frame
# Connections (server/DESIGN.md, "Connections"). Client connections are capped after the hello
# (only then is the role known); node certificates are never counted. Every inbound socket,
# handshakes included, is capped FD_RESERVE below the descriptor limit, and clients a further
# PEER_HEADROOM below that, so peers and handshakes always find descriptors.
MAX_CLIENT_CONNECTIONS = 1024
FD_RESERVE = 256  # log segments, SQLite files, snapshots, backups, peer sockets, stdio
PEER_HEADROOM = 64
FRAME_TIMEOUT = 30.0  # from a client frame's first byte to its last
WAKE_SLOTS = 4  # client connection threads the parker lets run at once after a wake-up
# A client connection that just had a frame first polls by itself for this long, before it
# parks (a driver's next request usually comes within a few hundred µs; the parker's hand-off
# costs one more thread wake-up). At most WAKE_SLOTS threads poll like this at once, so at most
# that many more can wake up outside the gate.
HOT_POLL = 0.002
REFUSAL_LOG_INTERVAL = 10.0  # at most one "client connection refused" warning per interval

_HEADER = struct.Struct(">I")
_EOF_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)


class _Closed(Exception):
    """Raised internally when the other side closed the connection (EOF, reset)."""


class _Refused(Exception):
    """Raised internally when the listener refused our hello with an ERROR frame (or we
    refused its answer). quiet: already logged (a peer of another cluster)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class _Stopped(Exception):
    """Raised internally when stop() interrupts a dial."""


# --------------------------------------------------------------------------- socket helpers


def _tune(sock: socket.socket) -> None:
    """No Nagle (every frame is latency-critical) and TCP keepalive, so a peer that vanished
    without a FIN/RST is noticed by a reader blocked forever on it."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    except OSError:
        pass


def _shutdown(sock: socket.socket | None) -> None:
    """Wake every thread blocked on `sock` (accept, recv, send, poll), from any thread.

    socket.socket.shutdown, not SSLSocket.shutdown: the latter also drops the SSL object under
    the feet of a thread that is using it. The fd is closed only by the thread that owns it."""
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        pass


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (a node holds one descriptor
    per connection; the common soft default of 1024 is no limit for a server). Returns
    (soft limit before, soft limit now)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    target = hard
    if target == resource.RLIM_INFINITY:
        try:  # Linux refuses a soft limit above fs.nr_open
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    for want in (target, 10240):  # macOS: no more than OPEN_MAX (10240) for an unlimited hard
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return soft, want
        except (ValueError, OSError):
            continue
    return soft, soft


def _recv_exact(sock: ssl.SSLSocket, n: int, deadline: float) -> bytes:
    """Exactly n bytes (SSL_read never returns more than asked, so nothing past them is
    consumed). Raises TimeoutError at the deadline, _Closed on EOF."""
    out = bytearray()
    while len(out) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(out))
        except _EOF_ERRORS as e:
            raise _Closed(str(e) or type(e).__name__) from None
        if not chunk:
            raise _Closed("connection closed")
        out += chunk
    return bytes(out)


def _recv_first_frame(sock: ssl.SSLSocket, deadline: float) -> tuple[FrameKind, Any]:
    """The first frame of a connection, read exactly (no bytes of later frames consumed, so
    they go to a decoder with the full frame limit) under the small hello limit."""
    header = _recv_exact(sock, wire.HEADER_SIZE, deadline)
    (n,) = _HEADER.unpack(header)
    if n > HELLO_MAX_FRAME_SIZE:
        raise wire.FrameError(
            f"first frame of {n} bytes exceeds the {HELLO_MAX_FRAME_SIZE}-byte limit before HELLO"
        )
    try:
        body = _recv_exact(sock, n, deadline)
    except _Closed:
        raise wire.FrameError("connection closed in the middle of the first frame") from None
    (frame,) = wire.FrameDecoder(HELLO_MAX_FRAME_SIZE).feed(header + body)
    return frame


def _entries_size(m: Message) -> int:
    n = 64
    for e in m.entries:
        n += len(e.data) + 16
    return n


# --------------------------------------------------------------------------- ClientConn


def _fmt(addr: Any) -> str:
    try:
        host, port = addr[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    except (TypeError, ValueError):
        return str(addr)


def _why(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _strerror(err: int) -> str:
    return os.strerror(err)
