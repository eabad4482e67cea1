"""Fault-injecting TCP proxies on the peer links: a ProxyNet holds one proxy per directed link
(src dials dst through it) and blocks, blackholes, delays or heals links on command. Partitions
are proxies, not iptables, so they need no root and no kernel state outlives the harness."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from typing import Any


class _Link:
    """One directed peer link: `src` dials `dst` through this proxy. The transport's stream
    model (server/transport.py) makes a dialled connection carry src's messages only, so
    blocking this link is a one-way partition src -/-> dst."""

    def __init__(self, src: str, dst: str, target: tuple[str, int]):
        self.src, self.dst, self.target = src, dst, target
        self.port = 0
        self.mode = "pass"  # pass | drop (reset, refuse) | blackhole (accept, discard)
        self.delay = 0.0
        self.jitter = 0.0
        self.conns: set[_Conn] = set()
        self.server: asyncio.base_events.Server | None = None
        self.bytes = 0


class _Conn:
    __slots__ = ("down", "up", "poisoned")

    def __init__(self, down: asyncio.StreamWriter):
        self.down = down
        self.up: asyncio.StreamWriter | None = None
        # Bytes were discarded: the TLS stream is broken, so the connection is reset on heal
        # (the node then redials, like after a real network failure).
        self.poisoned = False

    def abort(self) -> None:
        for w in (self.down, self.up):
            if w is not None:
                w.transport.abort()


class ProxyNet:
    """Fault-injecting TCP proxies, one per directed peer link, on one asyncio loop in a
    daemon thread. Thread-safe: every control call runs on the loop and waits for it."""

    def __init__(self, host: str):
        self.host = host
        self.links: dict[tuple[str, str], _Link] = {}
        self.loop = asyncio.new_event_loop()
        self._rng = random.Random()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faults-proxy", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        async def wrapper():
            r = fn()
            if asyncio.iscoroutine(r):
                r = await r
            return r

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def add_link(self, src: str, dst: str, target_port: int, avoid: frozenset[int] = frozenset()) -> int:
        """Listen for src's connections to dst; returns the proxy's port. `avoid`: ports the
        cluster's nodes will bind (chosen earlier, free for now): the kernel may hand one of
        them out again, and the node would then fail with "address already in use"."""
        link = _Link(src, dst, (self.host, target_port))

        async def start():
            for _ in range(50):
                server = await asyncio.start_server(
                    lambda r, w: self._serve(link, r, w), self.host, 0, reuse_address=True)
                port = server.sockets[0].getsockname()[1]
                if port not in avoid:
                    link.server = server
                    return port
                server.close()
                await server.wait_closed()
            raise OSError(f"no free port on {self.host} outside the nodes' ports")

        link.port = self._run(start)
        self.links[(src, dst)] = link
        return link.port

    def address(self, src: str, dst: str) -> str:
        return f"{self.host}:{self.links[(src, dst)].port}"

    # ------------------------------------------------------------------ faults

    def block(self, src: str, dst: str, mode: str = "blackhole") -> None:
        """Stop src's messages to dst. blackhole: connections stay up and bytes vanish (a
        packet-dropping firewall); drop: connections are reset and new ones refused."""
        if mode not in ("blackhole", "drop"):
            raise ValueError(mode)
        link = self.links[(src, dst)]

        def apply():
            link.mode = mode
            if mode == "drop":
                for c in list(link.conns):
                    c.abort()

        self._run(apply)

    def set_delay(self, src: str, dst: str, delay: float, jitter: float = 0.0) -> None:
        link = self.links[(src, dst)]

        def apply():
            link.delay, link.jitter = delay, jitter

        self._run(apply)

    def heal(self) -> None:
        """Every link passes again with no delay; connections that lost bytes are reset."""

        def apply():
            for link in self.links.values():
                link.mode, link.delay, link.jitter = "pass", 0.0, 0.0
                for c in list(link.conns):
                    if c.poisoned:
                        c.abort()

        self._run(apply)

    def blocked(self) -> list[tuple[str, str]]:
        return sorted(k for k, v in self.links.items() if v.mode != "pass")

    def partition(self, groups: list[list[str]], mode: str = "blackhole") -> None:
        """Block every link between nodes of different groups (both directions)."""
        where = {n: i for i, g in enumerate(groups) for n in g}
        for (a, b) in self.links:
            if a in where and b in where and where[a] != where[b]:
                self.block(a, b, mode)

    # ------------------------------------------------------------------ proxying

    async def _serve(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        link.conns.add(conn)
        try:
            if link.mode == "drop":
                return
            if link.mode == "blackhole":
                conn.poisoned = True
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*link.target), 5.0)
            except (TimeoutError, OSError):
                return
            conn.up = up_writer
            await asyncio.gather(self._pump(link, conn, reader, up_writer, True),
                                 self._pump(link, conn, up_reader, writer, False))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            link.conns.discard(conn)
            conn.abort()

    async def _pump(self, link: _Link, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, forward: bool) -> None:
        last_due = 0.0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if conn.poisoned or link.mode != "pass":
                    conn.poisoned = True
                    continue
                if forward:
                    link.bytes += len(data)
                now = self.loop.time()
                delay = link.delay + (self._rng.random() * link.jitter if link.jitter else 0.0)
                if delay > 0 or last_due > now:
                    # Delayed bytes keep their order: due times strictly increase.
                    due = max(now + delay, last_due + 1e-6)
                    last_due = due
                    self.loop.call_at(due, self._late_write, conn, writer, data)
                else:
                    writer.write(data)
                    await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            conn.abort()

    @staticmethod
    def _late_write(conn: _Conn, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not conn.poisoned and not writer.is_closing():
            writer.write(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown():
            for link in self.links.values():
                if link.server is not None:
                    link.server.close()
                for c in list(link.conns):
                    c.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._run(shutdown, timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()
