"""One client connection accepted by the node (ClientConn): frames in and out over TLS, with
the frame and idle timeouts, parked by the Parker while idle (server/transport.py's listener
hands it to the client service)."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from raftsql import wire
from raftsql.server.parker import _Parker
from raftsql.server.sockets import (
    _EOF_ERRORS,
    CONNECT_TIMEOUT,
    HOT_POLL,
    RECV_CHUNK,
    SEND_TIMEOUT,
    FrameKind,
    _close,
    _shutdown,
    _tune,
    _why,
)
from raftsql.server.tls import PeerIdentity, peer_identity

# After a protocol violation's ERROR, how long and how much of the peer's input is read and
# thrown away before the socket closes (see ClientConn._linger).
LINGER_S = 1.0
LINGER_BYTES = 4 << 20


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
        identity: PeerIdentity | None = None,
    ):
        who = identity or peer_identity(sock)
        self.role: str | None = who.role
        self.peer_name: str | None = who.name
        # What the certificate allows (read, write, admin; server/access.py) and its serial.
        self.client_role: str | None = who.client_role
        self.peer_serial: str | None = who.serial
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
        self._linger()
        self.close()
        return None

    def _linger(self) -> None:
        """After the ERROR answer: end our side (the peer reads the ERROR, then end of stream)
        and read what the peer still sends, for up to LINGER_S or LINGER_BYTES, before closing.
        Closing a socket with unread bytes makes the kernel reset the connection, and a reset
        destroys the ERROR in the peer's receive buffer before it is read: a client still
        sending an oversized frame would see only "connection reset", not why."""
        sock = self._sock
        try:
            socket.socket.shutdown(sock, socket.SHUT_WR)
            fd = sock.fileno()
        except (OSError, ValueError):
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        end = time.monotonic() + LINGER_S
        got = 0
        while got < LINGER_BYTES:
            left = end - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return
            try:  # raw bytes below TLS: they are thrown away unread
                data = socket.socket.recv(sock, 65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            got += len(data)

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
