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
hostile until validated (raftsql/wire.py). A revoked certificate (is_revoked) is refused at its
hello, and close_revoked() closes the connections it already has.

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
import logging
import random
import select
import socket
import ssl
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raftsql import wire
from raftsql.raft.types import Message
from raftsql.server import metrics
from raftsql.server.connection import ClientConn
from raftsql.server.listener import Listener, _Inbound
from raftsql.server.parker import _Parker
from raftsql.server.sockets import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    BATCH_MAX_BYTES,
    BATCH_MAX_MESSAGES,
    CONNECT_TIMEOUT,
    DIRECT_MAX_BYTES,
    FOREIGN_CLUSTER,
    FOREIGN_LOG_INTERVAL,
    FRAME_TIMEOUT,
    HELLO_MAX_FRAME_SIZE,
    IDLE_CHECK,
    MAX_CLIENT_CONNECTIONS,
    SEND_TIMEOUT,
    SNAPSHOT_CHUNK,
    WAKE_SLOTS,
    FrameKind,
    _close,
    _Closed,
    _entries_size,
    _fmt,
    _recv_first_frame,
    _Refused,
    _shutdown,
    _Stopped,
    _strerror,
    _tune,
    _why,
)
from raftsql.server.tls import node_client_context, peer_name, peer_role, server_context

if TYPE_CHECKING:
    from raftsql.server.snapshot import Receiver

__all__ = ["ClientConn", "Transport"]


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
        # Direct writes (Transport.send): whoever holds write_lock may write on `live`, the
        # connected socket (non-blocking; None while not connected). A write that would block
        # leaves its whole frame in `pending`: TLS must retry exactly that write, and the
        # sender thread does, before anything else. Nothing is written directly while the
        # queue, `pending` or a snapshot job holds something older: one stream, one order.
        self.write_lock = threading.Lock()
        self.live: ssl.SSLSocket | None = None
        self.pending: bytes | None = None
        self.broken: str | None = None  # a direct write failed: the sender redials

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


class Transport(Listener):
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
        is_revoked: Callable[[str | None, str | None], bool] | None = None,
        cluster_id: Callable[[], str | None] | None = None,
    ):
        self.node_id = node_id
        # cluster_id(): the id of the cluster whose data this node holds, None until an
        # applied entry named it. Sent in every hello between nodes; a peer that names
        # another one is refused, both ways (server/DESIGN.md, "The cluster's id").
        self.cluster_id = cluster_id or (lambda: None)
        self._foreign_logged: dict[str, float] = {}  # peer -> when its refusal was last logged
        # is_revoked(name, serial): a revoked certificate is refused at its hello.
        self.is_revoked = is_revoked
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
        """Send each message to its `to` peer; never blocks. While a peer's stream is idle (no
        queued messages, no half-written frame, no snapshot on its way) the messages are
        written on its socket right here, by the calling thread: no thread wake-up on the
        write path. Otherwise, or if a write would block, they go on the peer's bounded queue
        and its sender thread writes them; a full queue drops (and counts) the message. The
        bound is approximate under concurrent senders (check, then append)."""
        peers = self._peers
        by_peer: dict[str, list[Message]] = {}
        for m in msgs:
            batch = by_peer.get(m.to)
            if batch is None:
                by_peer[m.to] = [m]
            else:
                batch.append(m)
        for to, batch in by_peer.items():
            p = peers.get(to)
            if p is None:
                self._unknown_dropped += len(batch)
                self.log.debug("%s: dropping %d messages to unknown peer %s", self.node_id, len(batch), to)
                continue
            if not self._write_direct(p, batch):
                self._enqueue(p, batch)

    def _write_direct(self, p: _Peer, batch: list[Message]) -> bool:
        """Write batch on p's socket now if its stream is idle and the write lock free; False
        if it must go through the queue instead. A write the socket cannot take at once stays
        in p.pending for the sender thread (True: it is in the stream)."""
        if p.live is None or p.queue or p.snapshot is not None or p.pending is not None:
            return False
        size = 0
        for m in batch:
            if m.entries:
                size += _entries_size(m)
        if size > DIRECT_MAX_BYTES or len(batch) > BATCH_MAX_MESSAGES:
            return False  # encrypting megabytes is the sender thread's job, not the caller's
        if not p.write_lock.acquire(blocking=False):
            return False
        try:
            sock = p.live
            if sock is None or p.queue or p.snapshot is not None or p.pending is not None:
                return False
            try:
                frame = wire.encode_raft_batch(batch, self.max_frame_size)
            except (wire.FrameError, TypeError, ValueError, OverflowError):
                return False  # the sender thread splits it or reports it
            try:
                sock.send(frame)
            except (ssl.SSLWantWriteError, BlockingIOError):
                p.pending = frame  # TLS: the same write is retried, whole, by the sender
                p.wake.set()
            except OSError as e:
                # The sender finds out (and redials); Raft retransmits what is lost.
                p.broken = _why(e)
                p.live = None
                p.wake.set()
            p.last_sent = time.monotonic()
            return True
        finally:
            p.write_lock.release()

    def _enqueue(self, p: _Peer, batch: list[Message]) -> None:
        limit = self.queue_size
        q = p.queue
        for m in batch:
            if len(q) >= limit:
                p.count_drop(1)
                continue
            q.append(m)
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
                if isinstance(e, _Refused) and e.quiet:
                    p.failures += 1
                else:
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

    def foreign_cluster(self, peer: str | None, theirs: str | None) -> str | None:
        """Why a peer whose hello names cluster `theirs` must be refused, or None. A side
        that has not applied the naming entry yet (a new cluster, a node joining) names none
        and is let in: it can only learn the id from the cluster it joins."""
        ours = self.cluster_id()
        if ours is None or theirs is None or ours == theirs:
            return None
        return (f"{peer} holds the data of cluster {theirs}, and {self.node_id} that of cluster "
                f"{ours}: they are nodes of two different clusters (a data directory copied "
                f"or mounted from another cluster, or a peer address that points into another "
                f"cluster). Refused, so that neither can overwrite the other's log")

    def _log_foreign(self, peer: str | None, line: str) -> None:
        """A refusal between clusters, at ERROR level once a minute per peer (the peer
        redials every second)."""
        metrics.FOREIGN_PEERS.inc()
        now = time.monotonic()
        key = peer or "?"
        if now - self._foreign_logged.get(key, float("-inf")) >= FOREIGN_LOG_INTERVAL:
            self._foreign_logged[key] = now
            self.log.error("%s: %s", self.node_id, line)

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
            sock.sendall(wire.make_hello(self.node_id, "node", self.advertise,
                                         cluster=self.cluster_id()))
            kind, payload = _recv_first_frame(sock, deadline)
            if kind is FrameKind.ERROR:
                message = wire.parse_error(payload)
                if wire.parse_error_kind(payload) == FOREIGN_CLUSTER:
                    self._log_foreign(p.id, f"{p.id} at {_fmt(p.address)} refused us: {message}")
                    raise _Refused(f"refused our hello: {message}", quiet=True)
                raise _Refused(f"refused our hello: {message}")
            if kind is not FrameKind.HELLO:
                raise wire.FrameError(f"expected HELLO, got {kind.name}")
            hello = wire.parse_hello(payload)
            if hello.role != "node" or hello.node_id != p.id:
                raise _Refused(
                    f"it says it is {hello.role} {hello.node_id!r}, expected node {p.id!r}"
                )
            foreign = self.foreign_cluster(p.id, hello.cluster)
            if foreign is not None:
                self._log_foreign(p.id, f"not connecting to {p.id} at {_fmt(p.address)}: {foreign}")
                raise _Refused(foreign, quiet=True)
            sock.settimeout(0)  # non-blocking from here: see _Peer.write_lock
            return sock
        except BaseException:
            p.set_sock(None)
            _close(sock)
            if p.stopped.is_set():
                return None
            raise

    def _pump(self, p: _Peer, sock: ssl.SSLSocket, carry: list[Message]) -> list[Message]:
        """Write batches until stopped (returns []) or until the peer closes before a write
        (returns the unwritten batch). Raises on a failed write (the batch is lost). While
        this runs, other threads may write on the socket directly (send()); p.write_lock
        orders the two."""
        # The peer never writes on this connection after its hello: readable means it closed
        # (or sent an ERROR). Checking before each write saves the batch from a dead socket.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        q = p.queue
        if not carry:
            p.live = sock  # direct writes may start
        try:
            while True:
                if not carry:
                    while not q and p.snapshot is None and p.pending is None:
                        p.wake.clear()
                        if p.stopped.is_set():
                            return []
                        if p.broken is not None:
                            raise _Closed(p.broken)
                        if q or p.snapshot is not None or p.pending is not None:
                            break
                        if not p.wake.wait(IDLE_CHECK) and poller.poll(0):
                            with p.write_lock:
                                why = self._peer_closed(sock)
                            if why is not None:
                                raise _Closed(why)
                    if p.stopped.is_set():
                        return []
                    if p.broken is not None:
                        raise _Closed(p.broken)
                if p.snapshot is not None and not carry and p.pending is None:
                    self._stream_snapshot(p, sock)
                    continue
                with p.write_lock:
                    if p.pending is not None:
                        frame, p.pending = p.pending, None
                        self._write_frame(p, sock, frame)
                    if carry:
                        batch, carry = carry, []
                    else:
                        batch = []
                        size = 0
                        while q and len(batch) < BATCH_MAX_MESSAGES and size < BATCH_MAX_BYTES:
                            m = q.popleft()
                            batch.append(m)
                            if m.entries:
                                size += _entries_size(m)
                    if batch:
                        if poller.poll(0):
                            why = self._peer_closed(sock)
                            if why is not None:
                                self.log.debug("%s: %s closed the connection: %s", self.node_id, p.id, why)
                                return batch
                        self._write_batch(p, sock, batch)
                    p.live = sock  # after a carried batch is written, direct writes may resume
                p.last_sent = time.monotonic()
        finally:
            p.live = None
            with p.write_lock:  # no direct write is under way on the socket we close
                p.pending = None
                p.broken = None

    def _write_frame(self, p: _Peer, sock: ssl.SSLSocket, frame: bytes) -> None:
        """Write a whole frame on the non-blocking socket (caller holds p.write_lock). A peer
        that takes nothing for SEND_TIMEOUT is treated as dead."""
        deadline = time.monotonic() + SEND_TIMEOUT
        poller = None
        while True:
            try:
                sock.send(frame)
                return
            except (ssl.SSLWantWriteError, BlockingIOError):
                pass
            except ssl.SSLWantReadError:
                pass  # TLS 1.3 may want a read mid-write (a key update): wait, retry
            if p.stopped.is_set():
                raise _Stopped
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{p.id} took nothing for {SEND_TIMEOUT:g} s")
            if poller is None:
                poller = select.poll()
                poller.register(sock, select.POLLOUT | select.POLLIN)
            poller.poll(min(remaining, 0.1) * 1000)

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
                with p.write_lock:
                    self._write_frame(p, sock, wire.encode_snapshot_chunk(chunk, self.max_frame_size))
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
            with p.write_lock:
                self._write_frame(p, sock, wire.encode_snapshot_chunk(final, self.max_frame_size))
                self._write_batch(p, sock, [m])
            p.last_sent = time.monotonic()
            ok = True
            self.log.info("%s: sent snapshot at %d to %s", self.node_id, m.index, p.id)
        finally:
            if p.take_snapshot_job(job) is not None or ok:
                job.finish(ok)

    def _write_batch(self, p: _Peer, sock: ssl.SSLSocket, batch: list[Message]) -> None:
        """Encode and write a batch (caller holds p.write_lock); one too large for a frame is
        split, a single message too large for one is dropped."""
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
        self._write_frame(p, sock, frame)

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> str | None:
        """Why the peer closed this write-only connection (it was found readable), or None if
        it is still open (only TLS protocol records arrived, e.g. a session ticket). The
        caller holds the peer's write lock (a TLS read must not run beside a TLS write)."""
        try:
            data = sock.recv(HELLO_MAX_FRAME_SIZE)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
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

