"""Peer connections over mutual TLS: one listener for nodes and clients, one outbound stream per
peer with a bounded queue, reconnect with jittered backoff.

Connection model (etcd's "stream" model): a node dials every peer and only *writes* on that
connection; the peer's own outbound connection carries its messages back. So every socket has a
single direction of traffic after the hello exchange, and each one is touched by exactly one
thread (apart from shutdown() by stop(), which is a plain syscall and safe from any thread).

    send(msgs) --> per-peer deque (bounded, drop when full) --> sender thread --> RAFT frames
    listener --> accept thread --> one thread per connection:
        TLS handshake + HELLO (one deadline for both, small frame limit)
        node cert + node hello  -> reader loop: RAFT frames -> on_raft(msgs),
                                   SNAPSHOT frames -> this connection's snapshot sink
        otherwise (client)      -> counted against max_client_connections (ERROR past it),
                                   then on_client(ClientConn) in the same thread

Client connection threads wait through one parker thread (epoll), which wakes at most a few of
them at a time: a thousand threads woken at once (say, by a thousand connections closing)
would queue the Raft threads behind them for the GIL and cause an election (server/DESIGN.md,
"Connections"). A client frame must arrive whole within frame_timeout of its first byte;
client_idle_timeout (optional) closes a client connection silent between requests.

Handshake on every connection: the dialler sends HELLO; the listener answers with its own HELLO
(accepted) or an ERROR frame (refused) and closes. The outbound side waits for that answer, so a
peer is "connected" only once it has verified our certificate (with TLS 1.3 the server checks
the client certificate after the client's handshake has returned) and accepted our hello.

Privilege rule: only a connection whose *certificate* has role "node", whose hello says role
"node" and whose hello node_id equals the certificate's CN can deliver Raft messages, and only
messages with sender == that node id and to == our id. Everything else from the socket is
hostile until validated (raftsql/wire.py).

Snapshots (InstallSnapshot) travel on the same outbound stream as the Raft messages to that
peer: send_snapshot() hands the sender thread an open file, which it writes as SNAPSHOT frames of
CHUNK_SIZE bytes, each followed by whatever Raft messages queued up meanwhile (heartbeats keep
flowing, so the follower does not start an election during a long transfer); then a final chunk
with the file's sha256, then the SNAPSHOT message itself in a RAFT frame. One stream, one order:
the message can only arrive after every byte it refers to. The outcome goes to on_done(ok)
(the node reports it to the core); a broken connection fails the transfer, which is then
restarted from the beginning.

Threads call on_raft concurrently (one reader per inbound peer connection) and on_client from
each client connection's thread: both callbacks must be thread-safe, and on_client must return
soon after its connection is closed (recv() returns None, send() raises OSError).
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raftsql import wire
from raftsql.raft.types import Message
from raftsql.server.tls import node_client_context, peer_name, peer_role, server_context

if TYPE_CHECKING:
    from raftsql.server.snapshot import Receiver

__all__ = ["ClientConn", "Transport"]

FrameKind = wire.FrameKind

# Frame limit until the hello is accepted: msgpack can expand hostile input ~64x in memory.
HELLO_MAX_FRAME_SIZE = 64 * 1024
# A sender writes at most this much per RAFT frame (more is split over several frames).
BATCH_MAX_MESSAGES = 512
BATCH_MAX_BYTES = 1 << 20
BACKOFF_MIN = 0.02
BACKOFF_MAX = 1.0
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
    """Raised internally when the listener refused our hello with an ERROR frame."""


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


class _Parked:
    """One thread parked in _Parker.wait: woken once, by readiness, its deadline or stop."""

    __slots__ = ("fd", "deadline", "event", "ready", "slot", "done")

    def __init__(self, fd: int, deadline: float | None):
        self.fd = fd
        self.deadline = deadline
        self.event = threading.Event()
        self.ready = False  # the socket was reported ready (else: deadline or stop)
        self.slot = False  # the waker took a slot for this thread; ClientConn gives it back
        self.done = False  # no longer registered (guarded by the parker's lock)

    def __lt__(self, other: _Parked) -> bool:  # heap order among equal deadlines
        return id(self) < id(other)


class _Parker:
    """Watches every waiting client connection from one thread (epoll) and lets at most
    `slots` of the parked threads run at once.

    Why (server/DESIGN.md, "Connections"): with one thread per connection, 1,000 idle
    connections closed at once wake 1,000 threads that all want the GIL; CPython hands the
    GIL to any of them, so the ticker and the Ready loop wait hundreds of ms for their turn
    and the followers start an election. Here a closed (or readable, or timed-out)
    connection's thread is only woken once a slot is free, so the Raft threads never queue
    behind more than `slots` connection threads. The woken thread gives its slot back when it
    has a frame, parks again, or (on EOF) when its connection is torn down.
    """

    def __init__(self, slots: int, log: logging.Logger, name: str):
        self._ep = select.epoll()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(slots)
        self._parked: dict[int, _Parked] = {}
        self._deadlines: list[tuple[float, _Parked]] = []  # a heap, with stale entries
        self._next_wake = float("inf")  # when the parker thread's poll returns at the latest
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._stopped = False
        self._log = log
        self._name = name
        self._slow_slots = 0  # wakes made without a slot because none came free in time
        self._hot = 0  # threads in a hot poll (see HOT_POLL)
        self._hot_max = slots

    @property
    def stopped(self) -> bool:
        return self._stopped

    def wait(self, fd: int, events: int, deadline: float | None) -> _Parked | None:
        """Block until fd has `events` (select.POLLIN / POLLOUT; a hang-up counts), the
        deadline passes, or stop(). Returns the record (its .slot may be set: the caller
        must release it), or None if the parker cannot take it (stopped, or another thread
        already waits on this fd): the caller polls by itself then."""
        p = _Parked(fd, deadline)
        mask = select.EPOLLRDHUP | (select.EPOLLIN if events & select.POLLIN else 0)
        if events & select.POLLOUT:
            mask |= select.EPOLLOUT
        with self._lock:
            if self._stopped:
                return None
            try:
                self._ep.register(fd, mask)
            except (OSError, ValueError):  # closed, or another thread waits on it: poll
                return None
            self._parked[fd] = p
            poke = False
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, p))
                if deadline < self._next_wake:
                    self._next_wake = deadline
                    poke = True
        if poke:
            self._poke()
        # The parker wakes us; the timeout is only a backstop should it ever fail to.
        backstop = None if deadline is None else max(0.0, deadline - time.monotonic()) + 1.0
        if not p.event.wait(backstop):
            with self._lock:
                self._forget(p)
        return p

    def release(self) -> None:
        self._slots.release()

    def begin_hot(self) -> bool:
        """May the caller poll by itself for HOT_POLL? (then end_hot() afterwards)"""
        with self._lock:
            if self._hot >= self._hot_max or self._stopped:
                return False
            self._hot += 1
            return True

    def end_hot(self) -> None:
        with self._lock:
            self._hot -= 1

    def _forget(self, p: _Parked) -> None:
        """Unregister p (with the lock held); idempotent."""
        if p.done:
            return
        p.done = True
        if self._parked.get(p.fd) is p:
            del self._parked[p.fd]
            try:
                self._ep.unregister(p.fd)
            except (OSError, ValueError):
                pass

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the parker is woken anyway

    def run(self) -> None:
        """The parker thread (until stop())."""
        while True:
            with self._lock:
                if self._stopped:
                    break
                nxt = self._next_wake
            timeout = -1.0 if nxt == float("inf") else max(0.0, nxt - time.monotonic())
            try:
                events = self._ep.poll(timeout)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                break  # closed by stop()
            now = time.monotonic()
            woken: list[_Parked] = []
            with self._lock:
                if self._stopped:
                    break
                for fd, _ in events:
                    if fd == self._wake_r:
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    p = self._parked.get(fd)
                    if p is not None:
                        p.ready = True
                        self._forget(p)
                        woken.append(p)
                heap = self._deadlines
                while heap and heap[0][0] <= now:
                    _, p = heapq.heappop(heap)
                    if not p.done:
                        self._forget(p)
                        woken.append(p)
                if len(heap) > 64 and len(heap) > 2 * len(self._parked):
                    self._deadlines = heap = [e for e in heap if not e[1].done]
                    heapq.heapify(heap)
                self._next_wake = heap[0][0] if heap else float("inf")
            for p in woken:
                p.slot = self._take_slot()
                p.event.set()
        self._wake_all()

    def _take_slot(self) -> bool:
        """The admission gate. A slot not freed within a second (a handler stuck in its
        teardown) must not stop every other connection: then wake without one."""
        give_up = time.monotonic() + 1.0
        while not self._stopped:
            if self._slots.acquire(timeout=0.1):
                return True
            if time.monotonic() > give_up:
                self._slow_slots += 1
                if self._slow_slots == 1:
                    self._log.warning(
                        "%s: client connection threads are slow to give back their slots",
                        self._name,
                    )
                return False
        return False

    def stop(self) -> None:
        """Wake every parked thread (without slots); later waits return None at once."""
        with self._lock:
            self._stopped = True
        self._poke()
        self._wake_all()

    def _wake_all(self) -> None:
        with self._lock:
            parked = list(self._parked.values())
            for p in parked:
                self._forget(p)
        for p in parked:
            p.event.set()

    def close(self) -> None:
        """After the parker thread has exited."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._ep.close()


def _entries_size(m: Message) -> int:
    n = 64
    for e in m.entries:
        n += len(e.data) + 16
    return n


# --------------------------------------------------------------------------- ClientConn


class ClientConn:
    """A framed TLS connection: recv() whole frames, send() whole frames from any thread.

    The listener hands one to `on_client` for every client connection (after the hellos were
    exchanged: `hello` is the client's). Tests and tools open one with `ClientConn.connect`.

    Every SSL call on the socket is made under one lock and never blocks while holding it on a
    read (the socket is non-blocking; waits happen in poll() outside the lock), so one thread
    can sit in recv() while others send(): OpenSSL objects must not be used concurrently.
    """

    def __init__(
        self,
        sock: ssl.SSLSocket,
        *,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        hello: wire.Hello | None = None,
        address: Any = None,
        send_timeout: float = SEND_TIMEOUT,
        _on_violation: Callable[[ClientConn, str], None] | None = None,
        max_recv_size: int | None = None,
        frame_timeout: float | None = None,
        idle_timeout: float | None = None,
        _parker: _Parker | None = None,
        _on_idle: Callable[[ClientConn, str], None] | None = None,
    ):
        self.role: str | None = peer_role(sock)
        self.peer_name: str | None = peer_name(sock)
        self.hello = hello
        self.address = address
        self.max_frame_size = max_frame_size
        self.send_timeout = send_timeout
        self._sock = sock
        # Frames we accept may be smaller than those we send (a node's limit on requests).
        self._decoder = wire.FrameDecoder(max_recv_size or max_frame_size)
        self._frames: deque[tuple[FrameKind, Any]] = deque()
        self._buf = bytearray(RECV_CHUNK)
        self._lock = threading.Lock()  # serializes every SSL call and the close
        self._closed = False
        self._waiting = 0  # threads polling the fd outside the lock; the last one closes it
        # Server side: a RAFT or second HELLO frame is answered with ERROR and closes the
        # connection (a non-node certificate can never deliver Raft messages).
        self._on_violation = _on_violation
        # Server side: a frame must arrive whole within frame_timeout of its first byte (a
        # client that stops in the middle of one holds a thread and a descriptor for nothing);
        # with idle_timeout, a connection with no request for that long is closed (_on_idle).
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self._on_idle = _on_idle
        self._frame_start: float | None = None  # when the first byte of a partial frame came
        # Server side: waits go through the transport's parker, which admits few woken
        # threads at a time; _slot is set while this thread holds one of its slots.
        self._parker = _parker
        self._slot = False
        sock.setblocking(False)

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        timeout: float = CONNECT_TIMEOUT,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
    ) -> ClientConn:
        """Dial `address` and complete the TLS handshake (no hello is sent: send one)."""
        raw = socket.create_connection(address, timeout=timeout)
        try:
            _tune(raw)
            sock = context.wrap_socket(raw, server_hostname=server_hostname or address[0])
        except BaseException:
            raw.close()
            raise
        return cls(sock, max_frame_size=max_frame_size, address=address)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- receiving

    def recv(self, timeout: float | None = None) -> tuple[FrameKind, Any] | None:
        """The next frame, or None once the connection is over (EOF, reset, closed here).

        Raises TimeoutError if no whole frame arrived within `timeout` seconds, FrameError on
        malformed input (the connection is then unusable: close it), ssl.SSLError on a TLS
        alert (e.g. our certificate was rejected).

        On a connection accepted by the Transport, protocol violations (a malformed frame, a
        RAFT or second HELLO frame, a TLS error, a frame not complete within frame_timeout)
        never raise: the transport logs one line, sends an ERROR frame and closes, and recv()
        returns None. So does the idle timeout (at info level)."""
        entered = time.monotonic()
        deadline = None if timeout is None else entered + timeout
        readable = False  # the last wait ended because the socket was readable
        first_wait = True
        try:
            while True:
                frame = self._next_buffered()
                if frame is not None:
                    return frame
                error: str | None = None
                was_readable, readable = readable, False
                with self._lock:
                    if self._closed:
                        return None
                    try:
                        n = self._sock.recv_into(self._buf)
                    except ssl.SSLWantReadError:
                        n = -1
                    except ssl.SSLWantWriteError:
                        n = -2
                    except _EOF_ERRORS:
                        n = 0
                    except OSError as e:
                        if self._closed:
                            return None
                        if self._on_violation is None:
                            raise
                        n, error = -3, f"TLS error: {_why(e)}"  # e.g. a corrupted record
                    if n == 0:
                        if not self._decoder.buffered:
                            self._close_locked()
                            return None
                        error = (
                            f"connection closed in the middle of a frame "
                            f"({self._decoder.buffered} bytes buffered)"
                        )
                    elif n > 0:
                        try:
                            with memoryview(self._buf) as view, view[:n] as chunk:
                                self._frames.extend(self._decoder.feed(chunk))
                        except wire.FrameError as e:
                            error = str(e)
                        if self._decoder.buffered:
                            if self._frame_start is None:
                                self._frame_start = time.monotonic()
                        else:
                            self._frame_start = None
                    elif n == -1 and was_readable and self._frame_start is None:
                        # Readable, yet no application byte: part of a TLS record came. It
                        # is the start of a frame as far as the frame timeout is concerned.
                        self._frame_start = time.monotonic()
                    if error is None and n < 0:
                        self._waiting += 1
                if error is not None:
                    if self._on_violation is None:
                        raise wire.FrameError(error)
                    return self._violation(error)
                if n > 0:
                    continue
                try:
                    now = time.monotonic()
                    until = deadline
                    if self.frame_timeout is not None and self._frame_start is not None:
                        limit = self._frame_start + self.frame_timeout
                        if now >= limit:
                            return self._violation(self._stalled_why())
                        until = limit if until is None else min(until, limit)
                    elif self.idle_timeout is not None and self._on_idle is not None:
                        limit = entered + self.idle_timeout
                        if now >= limit:
                            self._on_idle(
                                self,
                                f"no request for {self.idle_timeout:g} s "
                                "(the node's client_idle_timeout_s)",
                            )
                            self.close()
                            return None
                        until = limit if until is None else min(until, limit)
                    if deadline is not None and now >= deadline:
                        raise TimeoutError("no frame within the timeout")
                    readable = self._wait(
                        select.POLLOUT if n == -2 else select.POLLIN, until, hot=first_wait
                    )
                    first_wait = False
                finally:
                    with self._lock:
                        self._waiting -= 1
                        if self._closed and not self._waiting:
                            _close(self._sock)
        finally:
            if self._slot and not self._closed:
                # A frame (or a timeout) for the caller: the wake-up is over. On a close the
                # slot is kept until the transport has torn the connection down.
                self.release_slot()

    def _next_buffered(self) -> tuple[FrameKind, Any] | None:
        """A frame already decoded, after the client-connection checks (a RAFT, HELLO or
        SNAPSHOT frame ends the connection: None is returned with _closed set)."""
        if not self._frames:
            return None
        frame = self._frames.popleft()
        if self._on_violation is not None and frame[0] in (
            FrameKind.RAFT,
            FrameKind.HELLO,
            FrameKind.SNAPSHOT,
        ):
            self._violation(f"{frame[0].name} frames are not accepted on a client connection")
            return None
        return frame

    def _stalled_why(self) -> str:
        buffered = self._decoder.buffered
        got = f"{buffered} byte(s) of it arrived" if buffered else "only part of a TLS record arrived"
        return (
            f"a frame was not complete {self.frame_timeout:g} s after its first byte ({got}; "
            "the node's frame_timeout_s)"
        )

    def release_slot(self) -> None:
        """Give back the parker slot this connection's thread holds, if any."""
        if self._slot:
            self._slot = False
            if self._parker is not None:
                self._parker.release()

    def _violation(self, why: str) -> None:
        """Server side: answer a protocol violation with ERROR, log one line, close."""
        assert self._on_violation is not None
        self._on_violation(self, why)
        self.close()
        return None

    def _wait(self, events: int, until: float | None, hot: bool = False) -> bool:
        """recv()'s wait: until the socket has `events` or the monotonic time `until`; True
        if it did. A concurrent close() shuts the socket down first, which wakes us. Through
        the parker, the thread comes back holding a slot (self._slot) most of the time; `hot`
        (the first wait after a frame) polls by itself for HOT_POLL first, if allowed."""
        self.release_slot()  # parked threads hold no slot
        parker = self._parker
        if hot and parker is not None and parker.begin_hot():
            try:
                limit = time.monotonic() + HOT_POLL
                if self._poll(events, limit if until is None else min(until, limit)):
                    return True
            finally:
                parker.end_hot()
            if until is not None and time.monotonic() >= until:
                return False
        ready, self._slot = self._park(events, until)
        return ready

    def _park(self, events: int, until: float | None) -> tuple[bool, bool]:
        """(the socket became ready, a parker slot was taken for the caller)."""
        parker = self._parker
        if parker is not None and not parker.stopped:
            try:
                fd = self._sock.fileno()
            except (ValueError, OSError):
                fd = -1
            if fd < 0:
                return True, False
            parked = parker.wait(fd, events, until)
            if parked is not None:
                return parked.ready, parked.slot
        return self._poll(events, until), False

    def _poll(self, events: int, until: float | None) -> bool:
        try:
            poller = select.poll()
            poller.register(self._sock, events)
        except (ValueError, OSError):  # already closed (fileno -1)
            return True
        timeout = None if until is None else max(0.0, until - time.monotonic())
        return bool(poller.poll(None if timeout is None else int(timeout * 1000) + 1))

    # -- sending

    def send(self, kind: FrameKind, payload: Any) -> None:
        """Send one frame; thread-safe. Raises OSError if the connection is closed or the peer
        does not read for send_timeout seconds (the connection is then closed)."""
        self.send_raw(wire.encode_frame(kind, payload, self.max_frame_size))

    def send_raw(self, data: bytes, timeout: float | None = None) -> None:
        """Send bytes as they are (tests use it to send hostile input); `timeout` overrides
        send_timeout (0: only what fits in the socket buffer now)."""
        deadline = time.monotonic() + (self.send_timeout if timeout is None else timeout)
        held = [False]  # a parker slot taken by this call's last wait (any thread may send)
        try:
            self._send_locked(data, deadline, held)
        finally:
            if held[0] and self._parker is not None:
                self._parker.release()

    def _send_locked(self, data: bytes, deadline: float, held: list[bool]) -> None:
        with self._lock:
            if self._closed:
                raise ConnectionError("connection is closed")
            view = memoryview(data)
            off, total = 0, len(view)
            while off < total:
                # A retried SSL_write must be given the same buffer: keep the chunk bounds.
                chunk = view[off : off + 262144]
                try:
                    off += self._sock.send(chunk)
                    continue
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except OSError:
                    self._close_locked()
                    raise
                if deadline - time.monotonic() <= 0 or self._closed:
                    self._close_locked()
                    raise TimeoutError("peer did not read within the send timeout")
                if held[0] and self._parker is not None:
                    held[0] = False
                    self._parker.release()
                held[0] = self._park(events, deadline)[1]

    # -- closing

    def close(self) -> None:
        """Close the connection (idempotent, any thread): a recv() in progress returns None."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            _shutdown(self._sock)  # wakes a thread polling outside the lock
        if not self._waiting:
            _close(self._sock)  # idempotent; else the last waiter closes it

    def abort(self) -> None:
        """Like close() but never waits for the lock (a send may hold it while blocked): shuts
        the socket down so that every thread using it returns soon and closes it."""
        self._closed = True
        _shutdown(self._sock)

    def __repr__(self) -> str:
        return f"<ClientConn {self.peer_name or '?'} role={self.role} closed={self._closed}>"


# --------------------------------------------------------------------------- Transport


class _Inbound:
    """An accepted connection as stop() sees it: the socket (or ClientConn) to shut down."""

    __slots__ = ("lock", "target", "aborted", "client")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: Any = None
        self.aborted = False
        self.client = False  # counted in Transport._clients

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


class _SnapshotJob:
    """A snapshot file on its way to one peer; finish() reports the outcome exactly once."""

    __slots__ = ("msg", "file", "size", "digest", "on_done", "_done")

    def __init__(self, msg: Message, file: Any, size: int, digest: bytes, on_done: Callable[[bool], None]):
        self.msg = msg
        self.file = file
        self.size = size
        self.digest = digest
        self.on_done = on_done
        self._done = False

    def finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.file.close()
        except OSError:
            pass
        self.on_done(ok)


class _Peer:
    """One outbound peer: its queue, its sender thread and the status peer_status() reports."""

    def __init__(self, node_id: str, address: tuple[str, int]):
        self.id = node_id
        self.address = address
        # Invariant: only the sender thread pops; any thread appends (deque ops are atomic).
        self.queue: deque[Message] = deque()
        self.wake = threading.Event()  # set after an append, and by stop
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.sock: socket.socket | None = None  # the current socket, for stop()
        self.sock_lock = threading.Lock()
        self.connected = False
        self.last_sent: float | None = None
        self.last_received: float | None = None
        self.dropped = 0
        self.drop_lock = threading.Lock()
        self.failures = 0  # consecutive failed connections (for log levels and backoff)
        self.snapshot: _SnapshotJob | None = None  # set by send_snapshot, cleared by the sender
        self.snapshot_lock = threading.Lock()

    def take_snapshot_job(self, job: _SnapshotJob | None = None) -> _SnapshotJob | None:
        """Clear the job slot (only if it still holds `job`, when given); return what it held."""
        with self.snapshot_lock:
            cur = self.snapshot
            if cur is not None and (job is None or cur is job):
                self.snapshot = None
                return cur
            return None

    def count_drop(self, n: int) -> None:
        if n:
            with self.drop_lock:
                self.dropped += n

    def set_sock(self, sock: socket.socket | None) -> None:
        with self.sock_lock:
            self.sock = sock
            if sock is not None and self.stopped.is_set():
                _shutdown(sock)

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        with self.sock_lock:
            _shutdown(self.sock)


class Transport:
    """Raft messages between nodes over mutual TLS, and the listener for client connections.

    send() never blocks: each message goes on the bounded queue of its `to` peer and is dropped
    (and counted) when that queue is full or the peer is unknown; Raft retransmits.
    """

    def __init__(
        self,
        node_id: str,
        listen: tuple[str, int],
        peers: dict[str, tuple[str, int]],
        certs_dir: str,
        on_raft: Callable[[list[Message]], None],
        on_client: Callable[[ClientConn], None],
        *,
        max_frame_size: int = wire.DEFAULT_MAX_FRAME_SIZE,
        queue_size: int = 4096,
        logger: logging.Logger | None = None,
        handshake_timeout: float = 5.0,
        max_client_connections: int = MAX_CLIENT_CONNECTIONS,
        frame_timeout: float | None = FRAME_TIMEOUT,
        client_idle_timeout: float | None = None,
        max_connections: int | None = None,
        wake_slots: int = WAKE_SLOTS,
        snapshot_sink: Callable[[str], Receiver] | None = None,
        corrupt_snapshot_transfers: int = 0,
        snapshot_chunk_delay: float = 0.0,
        advertise: str | None = None,
        on_peer_hello: Callable[[str, str], None] | None = None,
        max_request_size: int = wire.DEFAULT_MAX_REQUEST_SIZE,
    ):
        self.node_id = node_id
        # The largest REQUEST frame a client may send (told to it in our hello).
        self.max_request_size = min(max_request_size, max_frame_size)
        # Sent in our hello when we dial a peer; a peer's address from its hello goes to
        # on_peer_hello(node_id, address) (the node adds it if it has none for that peer).
        self.advertise = advertise
        self.on_peer_hello = on_peer_hello
        self.listen = listen
        self.certs_dir = certs_dir
        self.on_raft = on_raft
        self.on_client = on_client
        self.max_frame_size = max_frame_size
        self.queue_size = queue_size
        self.log = logger or logging.getLogger("raftsql.transport")
        self.handshake_timeout = handshake_timeout
        # Client connections past the hello (certificates of role node are not counted).
        self.max_client_connections = max_client_connections
        self.frame_timeout = frame_timeout
        self.client_idle_timeout = client_idle_timeout
        # Every inbound socket, handshakes and peers included; None: from the fd limit at
        # start(). The client cap in force is then at most max_connections - PEER_HEADROOM.
        self.max_connections = max_connections
        self.client_cap = max_client_connections
        self._clients = 0
        self._refused_clients = 0  # refusals not yet logged (REFUSAL_LOG_INTERVAL)
        self._refusal_logged = float("-inf")
        self._accept_failing = False
        self._wake_slots = wake_slots
        self._parker: _Parker | None = None  # made by start()
        # Makes a sink for one inbound connection's SNAPSHOT frames (None: they are refused).
        self.snapshot_sink = snapshot_sink
        # Test hook: flip a byte in one chunk of the first N transfers (after its crc).
        self._corrupt_snapshots = corrupt_snapshot_transfers
        # Test hook: pause this long after each chunk, so a test can interrupt a transfer.
        self._snapshot_chunk_delay = snapshot_chunk_delay
        # Load the certificates now so that a configuration error surfaces at construction.
        self._server_ctx = server_context(certs_dir, node_id)
        self._client_ctx = node_client_context(certs_dir, node_id)
        self._lock = threading.Lock()
        # Copy-on-write: send() reads self._peers without the lock.
        self._peers: dict[str, _Peer] = {}
        for pid, addr in peers.items():
            self._check_peer(pid)
            self._peers[pid] = _Peer(pid, tuple(addr))
        self._inbound: dict[str, _Inbound] = {}  # node id -> its current reader connection
        self._conns: set[_Inbound] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._unknown_dropped = 0
        self._rng = random.Random()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._lock:
            if self._started:
                raise RuntimeError("transport already started")
            self._started = True
        self._set_limits()
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # A burst of connects (a pool starting, or a hostile client) must not overflow the
        # backlog: a dropped SYN costs a peer's redial a 1 s retransmission (capped by somaxconn).
        listener = socket.create_server((host, port), family=family, backlog=1024)
        listener.settimeout(1.0)  # backstop; stop() wakes accept() with shutdown()
        self._listener = listener
        self._parker = _Parker(self._wake_slots, self.log, self.node_id)
        self._spawn(self._parker.run, f"{self.node_id}-parker")
        self._accept_thread = self._spawn(self._accept_loop, f"{self.node_id}-accept")
        with self._lock:
            for p in self._peers.values():
                self._start_sender(p)
        self.log.debug("%s: transport listening on %s:%s", self.node_id, *self.bound_address)

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

    def stop(self) -> None:
        """Close the listener and every connection and join every thread (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            peers = list(self._peers.values())
            conns = list(self._conns)
        _shutdown(self._listener)
        for p in peers:
            p.stop()
        for c in conns:
            c.abort()
        if self._parker is not None:
            self._parker.stop()  # parked connection threads go without waiting for a slot
        deadline = time.monotonic() + 5.0
        if self._accept_thread is not None:
            self._join(self._accept_thread, deadline)
        _close(self._listener)
        # No thread can be added now: the accept thread is gone and _stopped blocks the rest.
        with self._lock:
            threads = list(self._threads)
            conns = list(self._conns)
        for c in conns:  # accepted between the first snapshot and the accept thread's exit
            c.abort()
        for t in threads:
            self._join(t, deadline)
        leftover = [t.name for t in threads if t.is_alive() and t is not threading.current_thread()]
        if leftover:
            self.log.warning("%s: threads still running after stop: %s", self.node_id, leftover)
        elif self._parker is not None:
            self._parker.close()

    def _join(self, t: threading.Thread, deadline: float) -> None:
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=self._run_thread, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()
        return t

    def _run_thread(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except Exception as e:  # noqa: BLE001 - last resort: a thread must not die loudly
            self.log.error("%s: %s crashed: %r", self.node_id, threading.current_thread().name, e)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @property
    def bound_address(self) -> tuple[str, int]:
        """The listener's actual (host, port), e.g. after binding port 0."""
        if self._listener is None:
            raise RuntimeError("transport not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    # ----------------------------------------------------------------- membership

    def _check_peer(self, node_id: str) -> None:
        if node_id == self.node_id:
            raise ValueError(f"{node_id} cannot be its own peer")

    def add_peer(self, node_id: str, address: tuple[str, int]) -> None:
        """Start sending to `node_id` at `address` (replaces a different address)."""
        self._check_peer(node_id)
        address = tuple(address)
        with self._lock:
            if self._stopped:
                return
            old = self._peers.get(node_id)
            if old is not None and old.address == address:
                return
            p = _Peer(node_id, address)
            peers = dict(self._peers)
            peers[node_id] = p
            self._peers = peers
            if self._started:
                self._start_sender(p)
        if old is not None:
            self._stop_peer(old)

    def remove_peer(self, node_id: str) -> None:
        """Stop sending to `node_id` (its queue is discarded). Its inbound connection, if any,
        stays open: the Raft core decides what to do with messages from non-members."""
        with self._lock:
            p = self._peers.get(node_id)
            if p is None:
                return
            peers = dict(self._peers)
            del peers[node_id]
            self._peers = peers
        self._stop_peer(p)

    def _stop_peer(self, p: _Peer) -> None:
        p.stop()
        if p.thread is not None:
            self._join(p.thread, time.monotonic() + 2.0)

    def _start_sender(self, p: _Peer) -> None:
        # Called with self._lock held, so _spawn's own locking is done inline here.
        t = threading.Thread(
            target=self._run_thread,
            args=(self._sender_loop, p),
            name=f"{self.node_id}-send-{p.id}",
            daemon=True,
        )
        p.thread = t
        self._threads.add(t)
        t.start()

    # ----------------------------------------------------------------- status

    def peer_status(self) -> dict[str, dict[str, Any]]:
        return {
            pid: {
                "connected": p.connected,
                "last_sent": p.last_sent,
                "last_received": p.last_received,
                "dropped": p.dropped,
            }
            for pid, p in self._peers.items()
        }

    # ----------------------------------------------------------------- outbound

    def send(self, msgs: list[Message]) -> None:
        """Queue each message for its `to` peer; never blocks. A full queue drops (and counts)
        the message. The bound is approximate under concurrent senders (check, then append)."""
        peers = self._peers
        limit = self.queue_size
        woken: list[_Peer] = []
        for m in msgs:
            p = peers.get(m.to)
            if p is None:
                self._unknown_dropped += 1
                self.log.debug(
                    "%s: dropping %s to unknown peer %s", self.node_id, m.type.name, m.to
                )
                continue
            if len(p.queue) >= limit:
                p.count_drop(1)
                continue
            p.queue.append(m)
            if not woken or woken[-1] is not p:
                woken.append(p)
        for p in woken:
            # The sender clears `wake` *before* checking the queue, so this cannot be missed.
            if not p.wake.is_set():
                p.wake.set()

    def send_snapshot(
        self,
        msg: Message,
        file: Any,
        size: int,
        digest: bytes,
        on_done: Callable[[bool], None],
    ) -> None:
        """Stream the snapshot file (open, positioned at 0; closed by the transport) to msg.to,
        then deliver msg (a SNAPSHOT message). on_done(ok) is called once, from another thread
        or before returning: ok means every byte and the message were written to the socket. A
        second snapshot at the same index while one is on its way is ignored (its file is
        closed, its on_done never called); another index replaces it (the old one fails)."""
        p = self._peers.get(msg.to)
        job = _SnapshotJob(msg, file, size, digest, on_done)
        if p is None or self._stopped:
            job.finish(False)
            return
        with p.snapshot_lock:
            old = p.snapshot
            if old is not None and old.msg.index == msg.index:
                file.close()
                return
            p.snapshot = job
        if old is not None:
            old.finish(False)
        p.wake.set()

    def _sender_loop(self, p: _Peer) -> None:
        backoff = BACKOFF_MIN
        carry: list[Message] = []  # a batch that was never written (the peer closed first)
        while not p.stopped.is_set():
            try:
                sock = self._dial(p)
            except Exception as e:  # noqa: BLE001 - any dial failure: log, back off, retry
                sock = None
                self._log_failure(p, f"cannot connect to {p.id} at {_fmt(p.address)}: {_why(e)}")
            if sock is None:
                if p.stopped.is_set():
                    break
                # Messages queued when a dial fails are dropped: they are stale by the time the
                # peer is back, and Raft retransmits; this also bounds the backlog of a down
                # peer to what arrives between two attempts (<= BACKOFF_MAX).
                p.count_drop(len(carry) + self._drain(p))
                carry = []
                job = p.take_snapshot_job()
                if job is not None:
                    job.finish(False)
                delay = backoff * (0.5 + self._rng.random())
                backoff = min(backoff * 2, BACKOFF_MAX)
                p.stopped.wait(delay)
                continue
            backoff = BACKOFF_MIN
            if p.failures:
                self.log.info("%s: connected to %s at %s", self.node_id, p.id, _fmt(p.address))
            p.failures = 0
            p.connected = True
            try:
                carry = self._pump(p, sock, carry)
            except Exception as e:  # noqa: BLE001
                if not p.stopped.is_set():
                    self._log_failure(p, f"connection to {p.id} lost: {_why(e)}")
            finally:
                p.connected = False
                p.set_sock(None)
                _close(sock)
        p.count_drop(len(carry) + self._drain(p))
        job = p.take_snapshot_job()
        if job is not None:
            job.finish(False)

    def _log_failure(self, p: _Peer, line: str) -> None:
        # First failure at warning, repeats at debug: a down peer must not flood the log.
        level = logging.WARNING if p.failures == 0 else logging.DEBUG
        p.failures += 1
        self.log.log(level, "%s: %s", self.node_id, line)

    @staticmethod
    def _drain(p: _Peer) -> int:
        n = 0
        q = p.queue
        while q:
            try:
                q.popleft()
            except IndexError:
                break
            n += 1
        return n

    def _dial(self, p: _Peer) -> ssl.SSLSocket | None:
        """A connection to p on which p accepted our hello, or None if stopped meanwhile."""
        host, port = p.address
        family, stype, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[
            0
        ]
        raw = socket.socket(family, stype, proto)
        try:
            p.set_sock(raw)
            # Non-blocking connect polled in slices, so stop() is noticed within 100 ms.
            raw.setblocking(False)
            err = raw.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
                raise OSError(err, _strerror(err))
            deadline = time.monotonic() + CONNECT_TIMEOUT
            poller = select.poll()
            poller.register(raw, select.POLLOUT)
            while not poller.poll(100):
                if p.stopped.is_set():
                    raise _Stopped
                if time.monotonic() > deadline:
                    raise TimeoutError("connect timed out")
            if p.stopped.is_set():
                raise _Stopped
            err = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, _strerror(err))
            _tune(raw)
            raw.settimeout(self.handshake_timeout)
            deadline = time.monotonic() + self.handshake_timeout
            sock = self._client_ctx.wrap_socket(
                raw, server_hostname=host, do_handshake_on_connect=False
            )
        except _Stopped:
            _close(raw)
            return None
        except BaseException:
            _close(raw)
            raise
        try:
            p.set_sock(sock)
            sock.do_handshake()
            name = peer_name(sock)
            if peer_role(sock) != "node" or name != p.id:
                raise _Refused(
                    f"its certificate is {name!r} (role {peer_role(sock)}), expected node {p.id!r}"
                )
            sock.sendall(wire.make_hello(self.node_id, "node", self.advertise))
            kind, payload = _recv_first_frame(sock, deadline)
            if kind is FrameKind.ERROR:
                raise _Refused(f"refused our hello: {wire.parse_error(payload)}")
            if kind is not FrameKind.HELLO:
                raise wire.FrameError(f"expected HELLO, got {kind.name}")
            hello = wire.parse_hello(payload)
            if hello.role != "node" or hello.node_id != p.id:
                raise _Refused(
                    f"it says it is {hello.role} {hello.node_id!r}, expected node {p.id!r}"
                )
            sock.settimeout(SEND_TIMEOUT)
            return sock
        except BaseException:
            p.set_sock(None)
            _close(sock)
            if p.stopped.is_set():
                return None
            raise

    def _pump(self, p: _Peer, sock: ssl.SSLSocket, carry: list[Message]) -> list[Message]:
        """Write batches until stopped (returns []) or until the peer closes before a write
        (returns the unwritten batch). Raises on a failed write (the batch is lost)."""
        # The peer never writes on this connection after its hello: readable means it closed
        # (or sent an ERROR). Checking before each write saves the batch from a dead socket.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        q = p.queue
        while True:
            if carry:
                batch, carry = carry, []
            else:
                batch = []
                while not q and p.snapshot is None:
                    p.wake.clear()
                    if p.stopped.is_set():
                        return []
                    if q or p.snapshot is not None:
                        break
                    if not p.wake.wait(IDLE_CHECK) and poller.poll(0):
                        why = self._peer_closed(sock)
                        if why is not None:
                            raise _Closed(why)
                if p.stopped.is_set():
                    return []
                if p.snapshot is not None:
                    self._stream_snapshot(p, sock)
                    continue
                size = 0
                while q and len(batch) < BATCH_MAX_MESSAGES and size < BATCH_MAX_BYTES:
                    m = q.popleft()
                    batch.append(m)
                    if m.entries:
                        size += _entries_size(m)
            if poller.poll(0):
                why = self._peer_closed(sock)
                if why is not None:
                    self.log.debug("%s: %s closed the connection: %s", self.node_id, p.id, why)
                    return batch
            self._write_batch(p, sock, batch)
            p.last_sent = time.monotonic()

    def _stream_snapshot(self, p: _Peer, sock: ssl.SSLSocket) -> None:
        """Write p's snapshot job: chunks with the Raft messages queued meanwhile between them,
        the final chunk, then the SNAPSHOT message. Raises (after failing the job) if a write
        fails; the connection is then redialled and the core sends the snapshot again."""
        job = p.snapshot
        if job is None:
            return
        m = job.msg
        q = p.queue
        corrupt = False
        if self._corrupt_snapshots > 0:
            self._corrupt_snapshots -= 1
            corrupt = True
        self.log.info("%s: sending snapshot at %d (%d bytes) to %s", self.node_id, m.index, job.size, p.id)
        ok = False
        try:
            offset = 0
            n = 0
            while offset < job.size:
                if p.stopped.is_set() or p.snapshot is not job:
                    return  # stopped (failed below), or replaced (the replacer failed it)
                data = job.file.read(SNAPSHOT_CHUNK)
                if not data:
                    raise OSError(f"snapshot file ended at {offset} of {job.size} bytes")
                crc = zlib.crc32(data)
                if corrupt and n == (1 if job.size > SNAPSHOT_CHUNK else 0):
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                chunk = wire.SnapshotChunk(m.index, m.log_term, offset, data, crc)
                sock.sendall(wire.encode_snapshot_chunk(chunk, self.max_frame_size))
                offset += len(data)
                n += 1
                p.last_sent = time.monotonic()
                batch: list[Message] = []
                while q and len(batch) < BATCH_MAX_MESSAGES:
                    batch.append(q.popleft())
                if batch:
                    self._write_batch(p, sock, batch)
                if self._snapshot_chunk_delay:
                    p.stopped.wait(self._snapshot_chunk_delay)
            final = wire.SnapshotChunk(m.index, m.log_term, offset, b"", 0, job.digest)
            sock.sendall(wire.encode_snapshot_chunk(final, self.max_frame_size))
            self._write_batch(p, sock, [m])
            p.last_sent = time.monotonic()
            ok = True
            self.log.info("%s: sent snapshot at %d to %s", self.node_id, m.index, p.id)
        finally:
            if p.take_snapshot_job(job) is not None or ok:
                job.finish(ok)

    def _write_batch(self, p: _Peer, sock: ssl.SSLSocket, batch: list[Message]) -> None:
        try:
            frame = wire.encode_raft_batch(batch, self.max_frame_size)
        except wire.FrameError:
            if len(batch) == 1:
                p.count_drop(1)
                self.log.warning(
                    "%s: dropping a %s to %s larger than max_frame_size (%d bytes)",
                    self.node_id,
                    batch[0].type.name,
                    p.id,
                    self.max_frame_size,
                )
                return
            half = len(batch) // 2
            self._write_batch(p, sock, batch[:half])
            self._write_batch(p, sock, batch[half:])
            return
        except (TypeError, ValueError, OverflowError) as e:  # a bug upstream: do not kill us
            p.count_drop(len(batch))
            self.log.error("%s: cannot encode a batch for %s: %r", self.node_id, p.id, e)
            return
        sock.sendall(frame)

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> str | None:
        """Why the peer closed this write-only connection (it was found readable), or None if
        it is still open (only TLS protocol records arrived, e.g. a session ticket)."""
        try:
            sock.settimeout(0)
            try:
                data = sock.recv(HELLO_MAX_FRAME_SIZE)
            finally:
                sock.settimeout(SEND_TIMEOUT)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except Exception as e:  # noqa: BLE001
            return _why(e)
        if not data:
            return "connection closed"
        try:
            for kind, payload in wire.FrameDecoder(HELLO_MAX_FRAME_SIZE).feed(data):
                if kind is FrameKind.ERROR:
                    return f"peer error: {wire.parse_error(payload)}"
        except wire.FrameError:
            pass
        return "unexpected data from the peer"

    # ----------------------------------------------------------------- inbound

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
            hello, who = accepted
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
    ) -> tuple[wire.Hello, str] | None:
        """TLS handshake, the peer's HELLO, checks, our HELLO; within handshake_timeout.
        Returns (hello, who) if accepted; else logs one line, sends ERROR if possible, None."""
        deadline = time.monotonic() + self.handshake_timeout
        try:
            sock.do_handshake()
        except (OSError, ssl.SSLError) as e:
            self._conn_log(rec, "TLS handshake with %s failed: %s", who, _why(e))
            return None
        role, name = peer_role(sock), peer_name(sock)
        who = f"{name or '?'} ({who})"
        if role is None:
            self._refuse(rec, sock, who, "the certificate has no raftsql role")
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
        sock.sendall(wire.make_hello(self.node_id, "node", max_request=limit))
        return hello, who

    def _conn_log(
        self, rec: _Inbound, fmt: str, *args: Any, sock: Any = None, error: Any = None
    ) -> None:
        """One warning line per failed connection (debug when we closed it ourselves), then,
        if `error` is given, an ERROR frame telling the peer why. Logged first: the peer may
        see the connection end as soon as the frame is out."""
        level = logging.DEBUG if rec.aborted or self._stopped else logging.WARNING
        self.log.log(level, "%s: " + fmt, self.node_id, *args)
        if error is not None and sock is not None and not rec.aborted:
            try:  # best effort: the peer may well be gone
                sock.settimeout(0.2)
                sock.sendall(wire.make_error(str(error)))
            except Exception:  # noqa: BLE001, S110
                pass

    def _refuse(self, rec: _Inbound, sock: ssl.SSLSocket, who: str, why: str) -> None:
        """Log one line and send one ERROR frame; the caller closes."""
        self._conn_log(rec, "refusing the connection from %s: %s", who, why, sock=sock, error=why)

    def _refuse_client(self, sock: ssl.SSLSocket, who: str) -> None:
        """The client cap is reached: an ERROR frame naming the limit and how to raise it."""
        why = (
            f"too many client connections: this node allows {self.client_cap} "
            f"(max_client_connections; raise it with --max-client-connections, "
            f"$RAFTSQL_MAX_CLIENT_CONNECTIONS or max_client_connections in the config file)"
        )
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
