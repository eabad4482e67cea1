"""FaultCluster: a LocalCluster whose peer links go through a ProxyNet, with per-node
environment (a clock offset), pause tracking and heal_all(); clients talk to nodes directly,
translating leader hints that name a proxy."""

from __future__ import annotations

import functools
import signal
import subprocess
from typing import Any

from raftsql.testing.cluster import LocalCluster
from raftsql.testing.proxy import ProxyNet


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
                            self.net.add_link(a, b, self.ports[b], frozenset(self.ports.values()))
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

    def client(self, certs=None, **kw):
        from raftsql.driver._admin import context_for
        from raftsql.driver._conn import DSN

        cls = _translating_client_class()
        d = DSN.parse(self.dsn_for(certs or self.certs))
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
