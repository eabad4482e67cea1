"""Jepsen-style fault runs against a real cluster: proxies, nemeses, workloads, history.

A run starts a LocalCluster whose peer links go through fault-injecting proxies, runs
concurrent clients (threads, each with its own driver Client) that record every operation as
JSON lines, applies a nemesis schedule (kill -9, SIGSTOP, partitions, clock offsets, leadership
transfers, slow links), heals, reads the final state and checks the history with
raftsql/checker.py. See tests/faults/DESIGN.md for the reasons behind the choices.

    report = run(RunConfig(nodes=3, duration=15, nemeses=["kill", "partition-leader"]))
    assert report.ok, report.explain()

Nothing here needs root: partitions are proxies, not iptables, so no kernel state outlives the
harness. Node processes are killed by pid in finally blocks (only a kill -9 of the harness
itself leaves them running).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raftsql import checker
from raftsql.server.testing import LocalCluster

LIBFAKETIME_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)


def libfaketime() -> str | None:
    for p in LIBFAKETIME_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


# An LD_PRELOAD library that offsets the wall clock only (CLOCK_REALTIME, gettimeofday, time:
# what Python's time.time(), SQLite and OpenSSL read) by $RAFTSQL_CLOCK_OFFSET_MS, and leaves
# CLOCK_MONOTONIC alone. libfaketime 0.9.10 cannot do that for a Python 3.11 process: with the
# monotonic clock faked, every timed wait (Event.wait(t), Lock.acquire(timeout=t): glibc's
# sem_clockwait, which it does not wrap) sleeps until notified, because the absolute deadline
# is computed on the fake clock and waited for on the real one; with
# FAKETIME_DONT_FAKE_MONOTONIC=1 its clock_nanosleep wrapper fails every time.sleep() with
# EINVAL. See tests/faults/DESIGN.md.
CLOCK_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long offset_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);

__attribute__((constructor)) static void init(void) {
    const char *s = getenv("RAFTSQL_CLOCK_OFFSET_MS");
    offset_ns = s ? atoll(s) * 1000000LL : 0;
    real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
}

int clock_gettime(clockid_t c, struct timespec *ts) {
    if (!real_clock_gettime) init();
    int r = real_clock_gettime(c, ts);
    if (r == 0 && offset_ns && (c == CLOCK_REALTIME || c == CLOCK_REALTIME_COARSE || c == CLOCK_TAI)) {
        long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
        ts->tv_sec = ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return r;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"""


def build_clock_shim(directory: str | os.PathLike) -> str | None:
    """Compile CLOCK_SHIM_C into directory/clockshim.so (once); None without a C compiler."""
    out = Path(directory) / "clockshim.so"
    if out.exists():
        return str(out)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = Path(directory) / "clockshim.c"
    src.write_text(CLOCK_SHIM_C)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None
    return str(out)


def clock_offset_env(directory: str | os.PathLike, offset_s: int, mechanism: str | None = None) -> dict[str, str] | None:
    """Environment that runs a process with its wall clock offset_s seconds off.

    mechanism "shim" (the default: CLOCK_SHIM_C) or "libfaketime" (set
    RAFTSQL_FAULTS_CLOCK=libfaketime; see the comment above for why it misbehaves)."""
    mechanism = mechanism or os.environ.get("RAFTSQL_FAULTS_CLOCK", "shim")
    if mechanism == "libfaketime":
        lib = libfaketime()
        return {"LD_PRELOAD": lib, "FAKETIME": f"{offset_s:+d}s"} if lib else None
    lib = build_clock_shim(directory)
    return {"LD_PRELOAD": lib, "RAFTSQL_CLOCK_OFFSET_MS": str(offset_s * 1000)} if lib else None


# =========================================================================== the proxy network


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

    def add_link(self, src: str, dst: str, target_port: int) -> int:
        """Listen for src's connections to dst; returns the proxy's port."""
        link = _Link(src, dst, (self.host, target_port))

        async def start():
            link.server = await asyncio.start_server(
                lambda r, w: self._serve(link, r, w), self.host, 0, reuse_address=True)
            return link.server.sockets[0].getsockname()[1]

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


# =========================================================================== the cluster


@functools.cache
def _translating_client_class():
    from raftsql.driver._client import Client

    class TranslatingClient(Client):
        """A driver Client that maps a leader hint naming a peer-link proxy (a node's view of
        its peers' addresses) to that node's real address, so clients talk to nodes directly
        and are never cut off by a partition between nodes."""

        address_map: dict[str, str] = {}

        def _follow(self, hint, *args, **kw):
            if hint:
                hint = self.address_map.get(hint, hint)
            return super()._follow(hint, *args, **kw)

    return TranslatingClient


class NodeStuck(RuntimeError):
    """Raised when a node did not exit after SIGTERM (it was then killed)."""


class FaultCluster(LocalCluster):
    """LocalCluster whose nodes reach each other through a ProxyNet (each node's --peer entry
    for n points at the proxy of the link self -> n, on the same 127.0.X.Y host, so TLS
    hostname checks pass), with extra environment per node (a clock offset)."""

    def __init__(self, base_dir, nodes: int = 3, *, node_args: list[str] | None = None,
                 env: dict[str, str] | None = None, proxied: bool = True):
        super().__init__(base_dir, nodes, node_args=node_args, env=env)
        self.node_env: dict[str, dict[str, str]] = {n: {} for n in self.ids}
        self.paused: set[str] = set()
        self.net: ProxyNet | None = None
        self.address_map: dict[str, str] = {}
        if proxied:
            self.net = ProxyNet(self.host)
            try:
                for a in self.ids:
                    for b in self.ids:
                        if a != b:
                            self.net.add_link(a, b, self.ports[b])
                            self.address_map[self.net.address(a, b)] = self.address(b)
            except BaseException:
                self.net.close()
                raise

    def peer_address(self, src: str, dst: str) -> str:
        return self.net.address(src, dst) if self.net else self.address(dst)

    def node_environment(self, nid: str) -> dict[str, str]:
        return {**super().node_environment(nid), **self.node_env.get(nid, {})}

    def start(self, nid: str | None = None) -> None:
        super().start(nid)
        for n in [nid] if nid else self.ids:
            self.paused.discard(n)

    def pause(self, nid: str) -> None:
        super().pause(nid)
        self.paused.add(nid)

    def resume(self, nid: str) -> None:
        super().resume(nid)
        self.paused.discard(nid)

    def kill(self, nid: str, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Send sig; for SIGKILL and SIGTERM wait for the exit. Raises NodeStuck (after a
        SIGKILL) when a SIGTERM did not stop the node within timeout."""
        p = self.procs.get(nid)
        if p is None or p.poll() is not None:
            return
        if sig in (signal.SIGKILL, signal.SIGTERM) and nid in self.paused:
            # A stopped process would never run its SIGTERM handler.
            p.send_signal(signal.SIGCONT)
            self.paused.discard(nid)
        p.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(15)
                raise NodeStuck(f"{nid} did not exit within {timeout}s of signal {sig}; killed") from None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.net is not None:
                self.net.close()

    def usable(self) -> list[str]:
        """Nodes that are running and not paused."""
        return [n for n in self.ids if self.alive(n) and n not in self.paused]

    def client(self, **kw):
        from raftsql.driver._admin import context_for
        from raftsql.driver._conn import DSN

        cls = _translating_client_class()
        d = DSN.parse(self.dsn)
        c = cls(d.hosts, context_for(d), **kw)
        c.address_map = dict(self.address_map)
        return c

    def node_client(self, nid: str, **kw):
        """A client bound to one node (for stale reads on it, or reads from a cut-off node)."""
        from raftsql.driver._admin import context_for
        from raftsql.driver._conn import DSN

        cls = _translating_client_class()
        c = cls([(self.host, self.ports[nid])], context_for(DSN.parse(self.dsn)), **kw)
        c.address_map = dict(self.address_map)
        return c

    def status(self, nid: str, timeout: float = 1.0) -> dict[str, Any] | None:
        try:
            resp = self.node_request(nid, {"op": "status"}, timeout)
        except OSError:
            return None
        return resp.get("result") if resp.get("ok") else None

    def leader(self) -> str | None:
        """The leader with the highest term that a usable node reports, now (no waiting)."""
        best: tuple[int, str] | None = None
        for n in self.usable():
            st = self.status(n, 1.0)
            if st and st.get("leader") and (best is None or st["term"] > best[0]):
                best = (st["term"], st["leader"])
        return best[1] if best else None

    def heal_all(self) -> list[str]:
        """Undo every fault: links pass, paused nodes resume, clocks reset, dead nodes start."""
        done = []
        if self.net is not None and self.net.blocked():
            done.append(f"healed links {self.net.blocked()}")
        if self.net is not None:
            self.net.heal()
        for n in sorted(self.paused):
            self.resume(n)
            done.append(f"resumed {n}")
        for n in self.ids:
            if self.node_env.get(n):
                self.node_env[n] = {}
                if self.alive(n):
                    try:
                        self.kill(n, signal.SIGTERM)
                    except NodeStuck as e:
                        done.append(str(e))
                done.append(f"reset clock of {n}")
        for n in self.ids:
            if not self.alive(n):
                self.start(n)
                done.append(f"started {n}")
        return done


# =========================================================================== history


class History:
    """Jepsen-style event log: {"index", "time", "process", "type", "f", "key", "value", ...}.
    time is seconds since the run began, from the monotonic clock. An invocation is stamped
    before the request leaves and a completion after the response arrives, so each recorded
    interval contains the real one."""

    def __init__(self, path: str | os.PathLike | None = None):
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._t0 = time.monotonic_ns()
        self._f = open(path, "w", buffering=1) if path else None  # noqa: SIM115 - closed in close()

    def now(self) -> float:
        return (time.monotonic_ns() - self._t0) / 1e9

    def record(self, **ev: Any) -> dict[str, Any]:
        with self._lock:
            ev.setdefault("time", self.now())
            ev["index"] = len(self.events)
            self.events.append(ev)
            if self._f is not None:
                self._f.write(json.dumps(ev, default=repr) + "\n")
        return ev

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def load_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# =========================================================================== workloads


class Stop(Exception):
    """Raised inside a worker when the run is over."""


@dataclass
class Ctx:
    """What workloads and nemeses see of a run."""

    cluster: FaultCluster
    history: History
    rng: random.Random
    stop: threading.Event
    op_timeout: float
    errors: list[str] = field(default_factory=list)
    short_timeout: float | None = None

    def timeout_for(self, process: int) -> float:
        """Odd processes use the short timeout (when set): more operations end with an
        unknown outcome, which is where exactly-once and the checker earn their keep."""
        if self.short_timeout and process % 2 == 1:
            return self.short_timeout
        return self.op_timeout

    def log_error(self, what: str) -> None:
        self.errors.append(what)
        self.history.record(process="harness", type="error", f="error", value=what)


def classify(exc: BaseException) -> str:
    """Map a driver exception to a completion type: fail (definitely not applied) or info."""
    from raftsql.driver._client import BadRequest, OutcomeUnknown, Unavailable

    if isinstance(exc, Unavailable | BadRequest):
        return "fail"
    if isinstance(exc, OutcomeUnknown):
        return "info"
    return "info"  # anything unexpected: we do not know what happened


class Workload:
    name = "workload"
    threads = 1

    def setup(self, ctx: Ctx, client) -> None:
        """Create tables (called once, before the clients start)."""

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        """Run operations until ctx.stop is set."""

    def final(self, ctx: Ctx) -> None:
        """After healing: read what the checker needs."""

    def check(self, ctx: Ctx) -> dict[str, Any]:
        """{"valid": bool | None, "summary": str, ...}"""
        return {"valid": True, "summary": ""}

    # helpers

    def _retrying(self, ctx: Ctx, fn: Callable[[], Any], deadline_s: float = 60.0) -> Any:
        """Retry a read until it works (after healing, the cluster must recover)."""
        end = time.monotonic() + deadline_s
        last: BaseException | None = None
        while time.monotonic() < end:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - retried until the deadline
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"{self.name}: final read did not succeed within {deadline_s}s: {last!r}")


def _sql_error(result: dict[str, Any]) -> str | None:
    err = result.get("error")
    return None if err is None else f"{err.get('name')}: {err.get('message')}"


class RegisterWorkload(Workload):
    """Per-key registers: read, write, compare-and-set; checked for linearizability.

    Keys rotate (Jepsen's independent keys): a few keys are active at a time and each retires
    after ops_per_key operations, which bounds the search per key (unknown writes stay
    concurrent with everything after them)."""

    name = "register"

    def __init__(self, threads: int = 4, active_keys: int = 2, ops_per_key: int = 120, values: int = 5):
        self.threads = threads
        self.active_keys = active_keys
        self.ops_per_key = ops_per_key
        self.values = values
        self._lock = threading.Lock()
        self._next_key = 0
        self._active: list[str] = []
        self._counts: dict[str, int] = {}
        self.keys: list[str] = []

    def _key(self, rng: random.Random) -> str:
        with self._lock:
            while len(self._active) < self.active_keys:
                k = f"r{self._next_key}"
                self._next_key += 1
                self._active.append(k)
                self.keys.append(k)
                self._counts[k] = 0
            k = rng.choice(self._active)
            self._counts[k] += 1
            if self._counts[k] >= self.ops_per_key:
                self._active.remove(k)
            return k

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS reg (k TEXT PRIMARY KEY, v INTEGER)", [])])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        timeout = ctx.timeout_for(process)
        c = ctx.cluster.client(timeout=timeout)
        # Half the reads go to a random node through a client bound to it (as Jepsen binds
        # clients to nodes): follower reads take the ReadIndex path through the leader, and a
        # node cut off from the leader must not answer from its own state.
        readers = {n: ctx.cluster.node_client(n, timeout=min(timeout, 1.5)) for n in ctx.cluster.ids}
        try:
            while not ctx.stop.is_set():
                key = self._key(rng)
                x = rng.random()
                if x < 0.25:
                    self.op(ctx, c, process, "read", key, None)
                elif x < 0.5:
                    node = rng.choice(ctx.cluster.ids)
                    self.op(ctx, readers[node], process, "read", key, None, node=node)
                elif x < 0.75:
                    self.op(ctx, c, process, "write", key, rng.randrange(self.values))
                else:
                    self.op(ctx, c, process, "cas", key, [rng.randrange(self.values), rng.randrange(self.values)])
        finally:
            c.close()
            for r in readers.values():
                r.close()

    def op(self, ctx: Ctx, c, process: Any, f: str, key: str, value: Any, **extra: Any) -> dict[str, Any]:
        h = ctx.history
        h.record(process=process, type="invoke", workload=self.name, f=f, key=key, value=value, **extra)
        try:
            if f == "read":
                r = c.execute([("SELECT v FROM reg WHERE k=?", [key])])
            elif f == "write":
                r = c.execute([("INSERT OR REPLACE INTO reg (k, v) VALUES (?, ?)", [key, value])])
            else:
                r = c.execute([("UPDATE reg SET v=? WHERE k=? AND v=?", [value[1], key, value[0]])])
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            return h.record(process=process, type=classify(e), workload=self.name, f=f, key=key,
                            value=value, error=f"{type(e).__name__}: {e}", **extra)
        err = _sql_error(r)
        if err is not None:
            return h.record(process=process, type="fail", workload=self.name, f=f, key=key, value=value,
                            error=err, index=r.get("index"), **extra)
        if f == "read":
            out = r["rows"][0][0] if r["rows"] else None
        elif f == "cas":
            out = r["rowcount"] == 1
        else:
            out = value
        return h.record(process=process, type="ok", workload=self.name, f=f, key=key, value=out,
                        index=r.get("index"), dup=r.get("duplicate") or None, **extra)

    def final(self, ctx: Ctx) -> None:
        c = ctx.cluster.client(timeout=10)
        try:
            for key in self.keys:
                def read(key=key):
                    # Ops that fail are recorded too; only an "ok" one ends the retry loop.
                    ev = self.op(ctx, c, "final-register", "read", key, None)
                    if ev["type"] != "ok":
                        raise RuntimeError(ev.get("error"))
                    return ev

                self._retrying(ctx, read)
        finally:
            c.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name]
        ops, failed = checker.ops_from_events(events)
        t0 = time.monotonic()
        results = checker.check_registers(ops)
        elapsed = time.monotonic() - t0
        bad = [r for r in results.values() if r.valid is False]
        unknown = [r for r in results.values() if r.valid is None]
        counts = _count_types(events)
        summary = (f"register: {len(results)} keys, {counts} ; checked in {elapsed:.2f}s; "
                   f"{len(bad)} non-linearizable, {len(unknown)} inconclusive")
        return {
            "valid": False if bad else (None if unknown else True),
            "summary": summary,
            "explain": "\n".join([r.explain() for r in (bad + unknown)[:3]]
                                 + ([f"... and {len(bad) + len(unknown) - 3} more keys"] if len(bad) + len(unknown) > 3 else [])),
            "counts": counts,
            "keys": len(results),
            "check_s": round(elapsed, 3),
            "max_steps": max((r.steps for r in results.values()), default=0),
        }


def _count_types(events: list[dict[str, Any]]) -> dict[str, int]:
    out = {"ok": 0, "fail": 0, "info": 0}
    for e in events:
        if e.get("type") in out:
            out[e["type"]] += 1
    return out


class SetWorkload(Workload):
    """Concurrent unique inserts into a table without a UNIQUE constraint; after healing,
    every acknowledged insert is present exactly once (a duplicate apply would show)."""

    name = "set"

    def __init__(self, threads: int = 2, retry_unknown: bool = False):
        self.threads = threads
        self.retry_unknown = retry_unknown  # resend an unknown insert with its serial (jetcd)
        self.final_counts: dict[int, int] = {}

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS sset (id INTEGER PRIMARY KEY, v INTEGER)", [])])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        from raftsql.driver._client import OutcomeUnknown

        c = ctx.cluster.client(timeout=ctx.timeout_for(process))
        seq = 0
        try:
            while not ctx.stop.is_set():
                seq += 1
                v = process * 10_000_000 + seq
                serial = None
                while True:
                    ctx.history.record(process=process, type="invoke", workload=self.name, f="add", value=v,
                                       serial=serial)
                    try:
                        r = c.execute([("INSERT INTO sset (v) VALUES (?)", [v])], serial=serial)
                    except OutcomeUnknown as e:
                        ctx.history.record(process=process, type="info", workload=self.name, f="add", value=v,
                                           error=str(e), serial=e.serial)
                        if self.retry_unknown and not ctx.stop.is_set():
                            serial = e.serial
                            continue
                        break
                    except Exception as e:  # noqa: BLE001
                        ctx.history.record(process=process, type=classify(e), workload=self.name, f="add",
                                           value=v, error=f"{type(e).__name__}: {e}")
                        break
                    err = _sql_error(r)
                    ctx.history.record(process=process, type="fail" if err else "ok", workload=self.name,
                                       f="add", value=v, error=err, index=r.get("index"),
                                       dup=r.get("duplicate") or None)
                    break
        finally:
            c.close()

    def final(self, ctx: Ctx) -> None:
        c = ctx.cluster.client(timeout=15)
        try:
            def read():
                r = c.execute([("SELECT v, count(*) FROM sset GROUP BY v", [])])
                if r.get("error"):
                    raise RuntimeError(r["error"])
                return r

            r = self._retrying(ctx, read)
            self.final_counts = {row[0]: row[1] for row in r["rows"]}
            ctx.history.record(process="final-set", type="ok", workload="set-final", f="read-all",
                               value=len(self.final_counts), index=r.get("index"))
        finally:
            c.close()

    def outcome(self, ctx: Ctx) -> checker.SetResult:
        status: dict[int, str] = {}
        for e in ctx.history.events:
            if e.get("workload") != self.name or e.get("type") == "invoke":
                continue
            v, t = e["value"], e["type"]
            # Across resends of one value the strongest outcome wins: ok > info > fail.
            rank = {"fail": 0, "info": 1, "ok": 2}
            if v not in status or rank[t] > rank[status[v]]:
                status[v] = t
        ack = [v for v, t in status.items() if t == "ok"]
        unk = [v for v, t in status.items() if t == "info"]
        fail = [v for v, t in status.items() if t == "fail"]
        return checker.check_set(ack, unk, fail, self.final_counts)

    def check(self, ctx: Ctx) -> dict[str, Any]:
        res = self.outcome(ctx)
        return {"valid": res.valid, "summary": res.explain().splitlines()[0],
                "explain": "" if res.valid else res.explain(),
                "counts": {"ok": res.acknowledged, "info": res.unknown, "fail": res.failed},
                "recovered": res.recovered}


class ReadYourWritesWorkload(Workload):
    """Each process writes increasing values to its own key through the leader, then reads it
    with consistency="stale" and min_index = that write's index from a random node."""

    name = "ryw"

    def __init__(self, threads: int = 2):
        self.threads = threads

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS ryw (k TEXT PRIMARY KEY, v INTEGER)", [])])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        c = ctx.cluster.client(timeout=ctx.op_timeout)
        readers = {n: ctx.cluster.node_client(n, timeout=min(2.0, ctx.op_timeout)) for n in ctx.cluster.ids}
        key = f"c{process}"
        seq = 0
        last_index = 0
        h = ctx.history
        try:
            while not ctx.stop.is_set():
                seq += 1
                h.record(process=process, type="invoke", workload=self.name, f="write", key=key, value=seq)
                try:
                    r = c.execute([("INSERT OR REPLACE INTO ryw (k, v) VALUES (?, ?)", [key, seq])])
                except Exception as e:  # noqa: BLE001
                    h.record(process=process, type=classify(e), workload=self.name, f="write", key=key, value=seq,
                             error=f"{type(e).__name__}: {e}")
                    continue
                err = _sql_error(r)
                h.record(process=process, type="fail" if err else "ok", workload=self.name, f="write", key=key,
                         value=seq, index=r.get("index"), error=err)
                if err is None:
                    last_index = max(last_index, r["index"])
                for _ in range(2):
                    node = rng.choice(ctx.cluster.ids)
                    h.record(process=process, type="invoke", workload=self.name, f="read", key=key,
                             value=None, min_index=last_index, node=node)
                    try:
                        rr = readers[node].execute([("SELECT v FROM ryw WHERE k=?", [key])],
                                                   consistency="stale", min_index=last_index)
                    except Exception as e:  # noqa: BLE001
                        h.record(process=process, type=classify(e), workload=self.name, f="read", key=key,
                                 value=None, error=f"{type(e).__name__}: {e}", node=node)
                        continue
                    err = _sql_error(rr)
                    h.record(process=process, type="fail" if err else "ok", workload=self.name, f="read",
                             key=key, value=rr["rows"][0][0] if rr.get("rows") else None, error=err,
                             index=rr.get("index"), min_index=last_index, node=node)
        finally:
            c.close()
            for rc in readers.values():
                rc.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name and e.get("type") != "invoke"]
        res = checker.check_read_your_writes(events)
        counts = _count_types(events)
        return {"valid": res.valid, "summary": f"ryw: {counts}; " + res.explain().splitlines()[0],
                "explain": "" if res.valid else res.explain(), "counts": counts}


class BankWorkload(Workload):
    """Transfers between accounts in serializable interactive transactions, through the DB-API
    driver: BEGIN; read both balances; write both as absolute values (a read-then-write that
    would lose updates without the commit check); log the transfer; COMMIT. Other operations
    read every balance in one statement. Checked: every successful read sees the initial total;
    the log holds each transfer at most once (no UNIQUE constraint, so a double apply would
    show), every acknowledged transfer and no failed one; and the final balances are the
    initial ones plus exactly the logged transfers (a lost update would break that)."""

    name = "bank"

    def __init__(self, threads: int = 4, accounts: int = 8, balance: int = 100):
        self.threads = threads
        self.accounts = accounts
        self.balance = balance
        self.final_balances: list[int] = []
        self.final_log: list[tuple[int, int, int, int]] = []

    @property
    def total(self) -> int:
        return self.accounts * self.balance

    def setup(self, ctx: Ctx, client) -> None:
        for sql, params in [
            ("CREATE TABLE IF NOT EXISTS bank (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)", []),
            ("CREATE TABLE IF NOT EXISTS bank_log (tid INTEGER, src INTEGER, dst INTEGER, amount INTEGER)", []),
        ]:
            r = client.execute([(sql, params)])
            assert r.get("error") is None, r
        r = client.execute([("INSERT INTO bank (id, bal) VALUES (?, ?)", [i, self.balance])
                            for i in range(self.accounts)])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        from raftsql.driver import _connection

        conn = _connection.Connection(ctx.cluster.client(timeout=ctx.timeout_for(process)), autocommit=True)
        seq = 0
        try:
            while not ctx.stop.is_set():
                if rng.random() < 0.25:
                    self._read(ctx, conn, process)
                    continue
                seq += 1
                self._transfer(ctx, conn, process, process * 10_000_000 + seq, rng)
        finally:
            conn.close()

    def _read(self, ctx: Ctx, conn, process: int) -> None:
        h = ctx.history
        h.record(process=process, type="invoke", workload=self.name, f="read", value=None)
        try:
            rows = conn.execute("SELECT id, bal FROM bank ORDER BY id").fetchall()
        except Exception as e:  # noqa: BLE001 - a read that failed changed nothing
            h.record(process=process, type="fail", workload=self.name, f="read", value=None,
                     error=f"{type(e).__name__}: {e}")
            return
        h.record(process=process, type="ok", workload=self.name, f="read", value=[b for _, b in rows],
                 index=conn.last_index)

    def _transfer(self, ctx: Ctx, conn, process: int, tid: int, rng: random.Random) -> None:
        import raftsql.driver as db

        h = ctx.history
        src, dst = rng.sample(range(self.accounts), 2)
        h.record(process=process, type="invoke", workload=self.name, f="transfer", value=tid, src=src, dst=dst)
        stage = "body"
        try:
            conn.execute("BEGIN")
            a = conn.execute("SELECT bal FROM bank WHERE id = ?", (src,)).fetchone()[0]
            b = conn.execute("SELECT bal FROM bank WHERE id = ?", (dst,)).fetchone()[0]
            amount = rng.randint(1, max(1, min(a, 20)))
            if a < amount:  # an empty account: nothing to move
                conn.execute("ROLLBACK")
                h.record(process=process, type="fail", workload=self.name, f="transfer", value=tid, error="empty")
                return
            conn.execute("UPDATE bank SET bal = ? WHERE id = ?", (a - amount, src))
            conn.execute("UPDATE bank SET bal = ? WHERE id = ?", (b + amount, dst))
            conn.execute("INSERT INTO bank_log (tid, src, dst, amount) VALUES (?, ?, ?, ?)", (tid, src, dst, amount))
            stage = "commit"
            conn.execute("COMMIT")
        except db.OutcomeUnknown as e:
            self._resend(ctx, conn, process, tid, e)
            return
        except Exception as e:  # noqa: BLE001
            # SerializationError, TransactionAborted, Unavailable, an SQL error: nothing applied.
            kind = "fail" if isinstance(e, db.Error) and not isinstance(e, db.InterfaceError) else "info"
            h.record(process=process, type=kind, workload=self.name, f="transfer", value=tid, stage=stage,
                     error=f"{type(e).__name__}: {e}")
            conn.rollback()
            return
        h.record(process=process, type="ok", workload=self.name, f="transfer", value=tid, index=conn.last_index)

    def _resend(self, ctx: Ctx, conn, process: int, tid: int, error) -> None:
        """An unknown commit is resent with its serial (and its transaction check) until the
        cluster answers: the session table says whether the first attempt applied."""
        import raftsql.driver as db

        h = ctx.history
        h.record(process=process, type="info", workload=self.name, f="transfer", value=tid, error=str(error),
                 serial=error.serial)
        for _ in range(20):
            try:
                cur = conn.resend(error)
            except db.OutcomeUnknown as e:
                error = e
                continue
            except db.Error as e:  # the stored or a new outcome: not applied
                h.record(process=process, type="fail", workload=self.name, f="transfer", value=tid,
                         stage="resend", error=f"{type(e).__name__}: {e}")
                return
            h.record(process=process, type="ok", workload=self.name, f="transfer", value=tid, stage="resend",
                     dup=cur._result.get("duplicate") or None)
            return

    def final(self, ctx: Ctx) -> None:
        c = ctx.cluster.client(timeout=15)
        try:
            def read(sql):
                def go():
                    r = c.execute([(sql, [])])
                    if r.get("error"):
                        raise RuntimeError(r["error"])
                    return r["rows"]
                return go

            self.final_balances = [b for _, b in self._retrying(ctx, read("SELECT id, bal FROM bank ORDER BY id"))]
            self.final_log = [tuple(r) for r in self._retrying(ctx, read("SELECT tid, src, dst, amount FROM bank_log"))]
            ctx.history.record(process="final-bank", type="ok", workload="bank-final", f="read-all",
                               value={"balances": self.final_balances, "log": len(self.final_log)})
        finally:
            c.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name and e.get("type") != "invoke"]
        problems: list[str] = []
        reads = [e for e in events if e["f"] == "read" and e["type"] == "ok"]
        for e in reads:
            if sum(e["value"]) != self.total:
                problems.append(f"read at index {e.get('index')} saw total {sum(e['value'])} != {self.total}: {e['value']}")
        status: dict[int, str] = {}
        rank = {"fail": 0, "info": 1, "ok": 2}
        for e in events:
            if e["f"] == "transfer" and (e["value"] not in status or rank[e["type"]] > rank[status[e["value"]]]):
                status[e["value"]] = e["type"]
        counts: dict[int, int] = {}
        for tid, *_ in self.final_log:
            counts[tid] = counts.get(tid, 0) + 1
        res = checker.check_set([t for t, s in status.items() if s == "ok"],
                                [t for t, s in status.items() if s == "info"],
                                [t for t, s in status.items() if s == "fail"], counts)
        if not res.valid:
            problems.append(res.explain())
        expected = [self.balance] * self.accounts
        for _, src, dst, amount in self.final_log:
            expected[src] -= amount
            expected[dst] += amount
        if self.final_balances != expected:
            problems.append(f"final balances {self.final_balances} != initial + logged transfers {expected}")
        if sum(self.final_balances) != self.total:
            problems.append(f"final total {sum(self.final_balances)} != {self.total}")
        transfers = _count_types([e for e in events if e["f"] == "transfer"])
        conflicts = sum(1 for e in events if e["f"] == "transfer" and e["type"] == "fail"
                        and "SerializationError" in str(e.get("error")))
        summary = (f"bank: transfers {transfers}, {conflicts} serialization failures, {len(reads)} reads "
                   f"all totalling {self.total}, {len(self.final_log)} logged")
        return {"valid": not problems, "summary": summary if not problems else "bank: INVALID",
                "explain": "\n".join(problems), "counts": transfers, "reads": len(reads),
                "conflicts": conflicts}


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "register": RegisterWorkload,
    "set": SetWorkload,
    "ryw": ReadYourWritesWorkload,
    "bank": BankWorkload,
}


# =========================================================================== nemeses


class Nemesis:
    """start() applies a fault and returns a description; stop() heals that fault."""

    name = "nemesis"

    def start(self, ctx: Ctx) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        return {}


def _leader_soon(ctx: Ctx, timeout: float = 3.0) -> str | None:
    """The current leader, waiting a little if an election is under way."""
    end = time.monotonic() + timeout
    while True:
        ld = ctx.cluster.leader()
        if ld is not None or time.monotonic() > end or ctx.stop.is_set():
            return ld
        time.sleep(0.05)


def _target(ctx: Ctx, which: str, exclude: tuple[str, ...] = ()) -> str | None:
    usable = [n for n in ctx.cluster.usable() if n not in exclude]
    if not usable:
        return None
    if which == "leader":
        ld = _leader_soon(ctx)
        if ld in usable:
            return ld
    return ctx.rng.choice(usable)


def _majority_usable(ctx: Ctx, extra_down: str) -> bool:
    """Keep a majority running: a nemesis never takes down more than a minority at once."""
    cl = ctx.cluster
    down = len(cl.ids) - len(cl.usable()) + 1
    return down <= (len(cl.ids) - 1) // 2


class KillNemesis(Nemesis):
    """kill -9 a random node or the leader; stop() restarts it."""

    def __init__(self, target: str = "random"):
        self.target = target
        self.name = "kill" if target == "random" else "kill-leader"
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        n = _target(ctx, self.target)
        if n is None or not _majority_usable(ctx, n):
            return {"skipped": "no target"}
        ctx.cluster.kill(n, signal.SIGKILL)
        self.victim = n
        return {"killed": n}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is not None:
            ctx.cluster.start(n)
            return {"restarted": n}
        return {}


class PauseNemesis(Nemesis):
    """SIGSTOP a random node or the leader; stop() sends SIGCONT."""

    def __init__(self, target: str = "random"):
        self.target = target
        self.name = "pause" if target == "random" else "pause-leader"
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        n = _target(ctx, self.target)
        if n is None or not _majority_usable(ctx, n):
            return {"skipped": "no target"}
        ctx.cluster.pause(n)
        self.victim = n
        return {"paused": n}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is not None:
            ctx.cluster.resume(n)
            return {"resumed": n}
        return {}


class PartitionNemesis(Nemesis):
    """Network partitions through the link proxies.

    halves   a random minority / majority split
    leader   the leader alone / the rest
    bridge   two halves that cannot talk, and one node that talks to both (5 nodes: 2-1-2)
    one-way  one node (the leader half of the time) cannot send to the others, or cannot
             receive from them
    ring     (5 nodes) everyone sees only its two ring neighbours: overlapping majorities
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"partition-{kind}"

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl, rng = ctx.cluster, ctx.rng
        net = cl.net
        ids = list(cl.ids)
        rng.shuffle(ids)
        mode = "drop" if rng.random() < 0.25 else "blackhole"
        if self.kind == "halves":
            k = len(ids) // 2
            groups = [ids[:k], ids[k:]]
            net.partition(groups, mode)
            return {"groups": groups, "mode": mode}
        if self.kind == "leader":
            ld = _leader_soon(ctx) or ids[0]
            groups = [[ld], [n for n in cl.ids if n != ld]]
            net.partition(groups, mode)
            return {"groups": groups, "mode": mode}
        if self.kind == "bridge":
            bridge = ids[0]
            rest = ids[1:]
            a, b = rest[: len(rest) // 2], rest[len(rest) // 2:]
            for x in a:
                for y in b:
                    net.block(x, y, mode)
                    net.block(y, x, mode)
            return {"bridge": bridge, "sides": [a, b], "mode": mode}
        if self.kind == "one-way":
            x = (_leader_soon(ctx) if rng.random() < 0.5 else None) or ids[0]
            direction = rng.choice(["out", "in"])
            for y in cl.ids:
                if y != x:
                    if direction == "out":
                        net.block(x, y, mode)
                    else:
                        net.block(y, x, mode)
            return {"node": x, "cannot": "send" if direction == "out" else "receive", "mode": mode}
        if self.kind == "ring":
            n = len(ids)
            if n < 5:
                return {"skipped": "a ring needs 5 nodes (with 3, every node sees both others)"}
            near = {ids[i]: {ids[(i - 1) % n], ids[(i + 1) % n]} for i in range(n)}
            for a in cl.ids:
                for b in cl.ids:
                    if a != b and b not in near[a]:
                        net.block(a, b, mode)
            return {"ring": ids, "mode": mode}
        raise ValueError(self.kind)

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        ctx.cluster.net.heal()
        return {"healed": True}


class SlowNetworkNemesis(Nemesis):
    """Delay (with jitter) on every peer link, or on the links of one node."""

    name = "slow"

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl, rng = ctx.cluster, ctx.rng
        delay = rng.choice([0.02, 0.05, 0.1, 0.2])
        jitter = delay / 2
        node = rng.choice([None, *cl.ids])
        for (a, b) in cl.net.links:
            if node is None or node in (a, b):
                cl.net.set_delay(a, b, delay, jitter)
        return {"delay": delay, "jitter": jitter, "links": "all" if node is None else f"of {node}"}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        ctx.cluster.net.heal()
        return {"healed": True}


class ClockNemesis(Nemesis):
    """Restart one node (the leader half of the time) with its wall clock offset (LD_PRELOAD,
    see clock_offset_env; the monotonic clock, which drives Raft's ticks, is untouched). stop()
    restarts it with the true clock. Offsets stay within the certificates' 5-minute
    backdating: a node further behind would reject every peer certificate as not yet valid."""

    name = "clock"
    OFFSETS = (-240, -60, -5, 5, 60, 600, 3600)

    def __init__(self):
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        n = _target(ctx, "leader" if ctx.rng.random() < 0.5 else "random")
        if n is None or not _majority_usable(ctx, n):
            return {"skipped": "no target"}
        offset = ctx.rng.choice(self.OFFSETS)
        cl = ctx.cluster
        env = clock_offset_env(cl.dir, offset)
        if env is None:
            return {"skipped": "no C compiler for the clock shim, and no libfaketime"}
        cl.kill(n, signal.SIGTERM)
        cl.node_env[n] = env
        cl.start(n)
        self.victim = n
        return {"node": n, "offset_s": offset, "via": Path(env["LD_PRELOAD"]).name}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is None:
            return {}
        cl = ctx.cluster
        cl.node_env[n] = {}
        cl.kill(n, signal.SIGTERM)
        cl.start(n)
        return {"node": n, "offset_s": 0}


class TransferNemesis(Nemesis):
    """SIGTERM the leader (it hands leadership over, then exits); stop() restarts it."""

    name = "transfer"

    def __init__(self):
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl = ctx.cluster
        ld = _leader_soon(ctx)
        if ld is None or ld not in cl.usable() or not _majority_usable(ctx, ld):
            return {"skipped": "no leader"}
        t0 = time.monotonic()
        cl.kill(ld, signal.SIGTERM)
        self.victim = ld
        code = cl.procs[ld].returncode
        if code != 0:
            ctx.log_error(f"transfer: {ld} exited with status {code} after SIGTERM")
        return {"stopped": ld, "exit": code, "stop_s": round(time.monotonic() - t0, 3)}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is not None:
            ctx.cluster.start(n)
            return {"restarted": n}
        return {}


def _admin(cl: FaultCluster, op: str, node_id: str, timeout: float, **extra: Any) -> dict[str, Any]:
    """One membership request (server/admin.py) through a driver client that follows the
    leader's redirects; BadRequest/Unavailable from the driver when it cannot be done."""
    c = cl.client(timeout=timeout)
    try:
        req = {"op": op, "node_id": node_id, "timeout_ms": int(timeout * 500), **extra}
        return c._call(req, timeout, None)
    finally:
        c.close()


class MembershipNemesis(Nemesis):
    """start(): remove a member (a follower, or a third of the time the leader, which hands
    leadership over first), kill it and wipe its state. stop(): start it empty and bring it
    back as a new member: added as a learner, promoted once it has caught up from the log."""

    name = "membership"

    def __init__(self):
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl = ctx.cluster
        if len(cl.usable()) < len(cl.ids):
            return {"skipped": "a node is down"}
        n = _target(ctx, "leader" if ctx.rng.random() < 1 / 3 else "random")
        if n is None:
            return {"skipped": "no target"}
        from raftsql.driver._client import BadRequest

        try:
            index = _admin(cl, "cluster_remove", n, 30.0)["index"]
        except BadRequest as e:
            if "is not a member" not in str(e):
                raise
            index = None  # a retry after a lost response: the first attempt removed it
        cl.kill(n, signal.SIGKILL)
        self.victim = n
        d = cl.data_dir(n)
        for name in os.listdir(d):
            if name != "node.log":  # the log of its first life stays, for post-mortems
                p = d / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return {"removed": n, "index": index}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is None:
            return {}
        cl = ctx.cluster
        cl.start(n)  # empty, with the first voters' --peer list: it waits to be added
        add = _admin(cl, "cluster_add", n, 60.0, address=cl.address(n))
        promote = _admin(cl, "cluster_promote", n, 120.0)
        return {"added": n, "learner_at": add["index"], "voter_at": promote["index"]}


NEMESES: dict[str, Callable[[], Nemesis]] = {
    "kill": lambda: KillNemesis("random"),
    "kill-leader": lambda: KillNemesis("leader"),
    "pause": lambda: PauseNemesis("random"),
    "pause-leader": lambda: PauseNemesis("leader"),
    "partition-halves": lambda: PartitionNemesis("halves"),
    "partition-leader": lambda: PartitionNemesis("leader"),
    "partition-bridge": lambda: PartitionNemesis("bridge"),
    "partition-one-way": lambda: PartitionNemesis("one-way"),
    "partition-ring": lambda: PartitionNemesis("ring"),
    "slow": SlowNetworkNemesis,
    "clock": ClockNemesis,
    "transfer": TransferNemesis,
    "membership": MembershipNemesis,
}
# Names for groups of nemeses (the CLI's --nemesis accepts these too).
NEMESIS_GROUPS: dict[str, list[str]] = {
    "all": list(NEMESES),
    "none": [],
    "kills": ["kill", "kill-leader"],
    "pauses": ["pause", "pause-leader"],
    "partitions": ["partition-halves", "partition-leader", "partition-bridge", "partition-one-way", "partition-ring"],
}


def expand_nemeses(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n in NEMESIS_GROUPS:
            out += NEMESIS_GROUPS[n]
        elif n in NEMESES:
            out.append(n)
        else:
            raise ValueError(f"unknown nemesis {n!r} (known: {', '.join([*NEMESES, *NEMESIS_GROUPS])})")
    return list(dict.fromkeys(out))


class Schedule(threading.Thread):
    """Cycles through the nemeses (shuffled, so every one of them runs in a short run):
    quiet for quiet seconds, fault for hold seconds, heal, repeat until stopped."""

    def __init__(self, ctx: Ctx, nemeses: list[Nemesis], quiet: tuple[float, float], hold: tuple[float, float]):
        super().__init__(name="nemesis", daemon=True)
        self.ctx, self.nemeses, self.quiet, self.hold = ctx, nemeses, quiet, hold
        self.applied: list[str] = []  # nemeses applied and healed, in order

    def _event(self, f: str, nem: Nemesis, value: Any) -> None:
        self.ctx.history.record(process="nemesis", type="info", f=f, nemesis=nem.name, value=value)

    def run(self) -> None:
        ctx = self.ctx
        order = list(self.nemeses)
        ctx.rng.shuffle(order)
        i = 0
        while order and not ctx.stop.wait(ctx.rng.uniform(*self.quiet)):
            nem = order[i % len(order)]
            i += 1
            try:
                desc = nem.start(ctx)
            except Exception as e:  # noqa: BLE001 - a harness bug: keep going, report it
                ctx.log_error(f"nemesis {nem.name} start failed: {e!r}\n{traceback.format_exc()}")
                desc = {"error": repr(e)}
            self._event("start", nem, desc)
            ctx.stop.wait(ctx.rng.uniform(*self.hold))
            try:
                self._event("stop", nem, nem.stop(ctx))
            except Exception as e:  # noqa: BLE001
                ctx.log_error(f"nemesis {nem.name} stop failed: {e!r}\n{traceback.format_exc()}")
            if "skipped" not in desc and "error" not in desc:
                self.applied.append(nem.name)


# =========================================================================== a run


@dataclass
class RunConfig:
    nodes: int = 3
    duration: float = 15.0
    nemeses: list[str] = field(default_factory=lambda: ["all"])
    workloads: dict[str, int] = field(default_factory=lambda: {"register": 4, "set": 2, "ryw": 2})
    seed: int | None = None
    op_timeout: float = 3.0
    short_timeout: float | None = 0.75  # for every other register/set client (see Ctx.timeout_for)
    quiet: tuple[float, float] = (1.0, 2.0)
    hold: tuple[float, float] = (2.0, 4.0)
    env: dict[str, str] = field(default_factory=dict)  # for every node (e.g. RAFTSQL_TEST_BROKEN_READS)
    node_args: list[str] = field(default_factory=list)
    base_dir: str | None = None  # where run directories go (default: the system temp dir)
    keep: bool = False  # keep the run directory even when the run passes
    register_ops_per_key: int = 120
    min_faults: int = 0  # extend the run (up to 2x duration) until this many faults were applied


@dataclass
class RunReport:
    ok: bool
    seed: int
    config: dict[str, Any]
    dir: str | None
    nemeses_applied: list[str]
    workloads: dict[str, dict[str, Any]]
    errors: list[str]
    converged: bool
    hashes: dict[str, Any]
    timings: dict[str, float]
    history_events: int

    def explain(self) -> str:
        lines = [f"fault run seed={self.seed} nodes={self.config['nodes']} nemeses={self.nemeses_applied}: "
                 f"{'OK' if self.ok else 'FAILED'}"]
        for name, w in self.workloads.items():
            lines.append(f"  {w.get('summary', name)}")
            if w.get("valid") is not True and w.get("explain"):
                lines.append(w["explain"])
        if not self.converged:
            lines.append(f"  replicas did not converge: {self.hashes}")
        for e in self.errors:
            lines.append(f"  harness error: {e}")
        if self.dir:
            lines.append(f"  history, node logs and report kept in {self.dir}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(cfg: RunConfig) -> RunReport:
    """One run: cluster up, clients + nemesis for cfg.duration, heal, final reads, checks.
    The run directory (cluster data, node logs, history.jsonl, report.json) is removed when the
    run passes, and kept (and named in the report) when it fails."""
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    names = expand_nemeses(cfg.nemeses)
    run_dir = Path(tempfile.mkdtemp(prefix=f"raftsql-faults-{seed}-", dir=cfg.base_dir))
    history = History(run_dir / "history.jsonl")
    timings: dict[str, float] = {}
    errors: list[str] = []
    workloads: list[Workload] = []
    for wname, threads in cfg.workloads.items():
        if threads <= 0:
            continue
        if wname == "register":
            workloads.append(RegisterWorkload(threads=threads, ops_per_key=cfg.register_ops_per_key))
        elif wname == "set":
            workloads.append(SetWorkload(threads=threads))
        elif wname == "ryw":
            workloads.append(ReadYourWritesWorkload(threads=threads))
        elif wname == "bank":
            workloads.append(BankWorkload(threads=threads))
        else:
            raise ValueError(f"unknown workload {wname!r}")
    results: dict[str, dict[str, Any]] = {}
    hashes: dict[str, Any] = {}
    converged = False
    applied: list[str] = []
    cluster: FaultCluster | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    schedule: Schedule | None = None
    t_start = time.monotonic()
    try:
        cluster = FaultCluster(run_dir / "cluster", cfg.nodes, env=cfg.env, node_args=cfg.node_args)
        ctx = Ctx(cluster, history, rng, stop, cfg.op_timeout, errors, cfg.short_timeout)
        history.record(process="harness", type="info", f="config", value={**asdict(cfg), "seed": seed,
                                                                             "host": cluster.host})
        cluster.start()
        cluster.wait_leader(30)
        setup_client = cluster.client(timeout=20)
        try:
            for w in workloads:
                w.setup(ctx, setup_client)
        finally:
            setup_client.close()
        timings["setup_s"] = round(time.monotonic() - t_start, 2)

        process = 0
        for w in workloads:
            for _ in range(w.threads):
                wrng = random.Random(rng.randrange(2**32))

                def body(w=w, p=process, wrng=wrng):
                    try:
                        w.worker(ctx, p, wrng)
                    except Exception as e:  # noqa: BLE001
                        ctx.log_error(f"{w.name} worker {p} crashed: {e!r}\n{traceback.format_exc()}")

                t = threading.Thread(target=body, name=f"{w.name}-{process}", daemon=True)
                threads.append(t)
                process += 1
        schedule = Schedule(ctx, [NEMESES[n]() for n in names], cfg.quiet, cfg.hold)
        t_run = time.monotonic()
        for t in threads:
            t.start()
        schedule.start()
        stop.wait(cfg.duration)
        # A short run may end before every nemesis had its turn: extend it (up to twice the
        # duration) until min_faults faults were applied and healed.
        end = time.monotonic() + cfg.duration
        while len(schedule.applied) < cfg.min_faults and time.monotonic() < end and schedule.is_alive():
            time.sleep(0.1)
        stop.set()
        schedule.join(60)
        if schedule.is_alive():
            errors.append("nemesis schedule did not finish within 60s")
        for t in threads:
            t.join(cfg.op_timeout * 4 + 10)
            if t.is_alive():
                errors.append(f"worker {t.name} did not stop")
        applied = schedule.applied
        timings["run_s"] = round(time.monotonic() - t_run, 2)

        t_heal = time.monotonic()
        finals_done = False
        try:
            healed = cluster.heal_all()
            history.record(process="nemesis", type="info", f="heal", value=healed)
            cluster.wait_leader(30)
            for w in workloads:
                w.final(ctx)
            finals_done = True
            hashes = {n: list(v) for n, v in cluster.hashes(timeout=60).items()}
            converged = len({tuple(v) for v in hashes.values()}) == 1 and len(hashes) == cfg.nodes
        except (TimeoutError, RuntimeError) as e:
            errors.append(f"cluster did not recover after healing: {e!r}")
        timings["heal_s"] = round(time.monotonic() - t_heal, 2)

        t_check = time.monotonic()
        for w in workloads:
            if not finals_done and not isinstance(w, RegisterWorkload):
                results[w.name] = {"valid": None, "summary": f"{w.name}: not checked (no final read)"}
                continue
            try:
                results[w.name] = w.check(ctx)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{w.name} check crashed: {e!r}\n{traceback.format_exc()}")
        timings["check_s"] = round(time.monotonic() - t_check, 2)
    except Exception as e:  # noqa: BLE001 - reported, and the directory is kept
        errors.append(f"run failed: {e!r}\n{traceback.format_exc()}")
    finally:
        stop.set()
        if cluster is not None:
            try:
                cluster.close()
            except Exception as e:  # noqa: BLE001
                errors.append(f"cluster close failed: {e!r}")
        for t in threads:
            t.join(cfg.op_timeout + 5)
        history.close()
    timings["total_s"] = round(time.monotonic() - t_start, 2)
    ok = (not errors and converged and all(r.get("valid") is True for r in results.values())
          and len(results) == len(workloads))
    report = RunReport(
        ok=ok, seed=seed, config=asdict(cfg), dir=None if ok and not cfg.keep else str(run_dir),
        nemeses_applied=applied, workloads=results, errors=errors, converged=converged, hashes=hashes,
        timings=timings, history_events=len(history.events),
    )
    with contextlib.suppress(OSError):
        (run_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=repr))
    if ok and not cfg.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report
