"""A harness that runs real node processes on a private loopback address, for end-to-end and
fault tests (like hashicorp/raft's testing.go and rqlite's system_test helpers).

Each cluster binds 127.0.0.X (X chosen at random) on ports chosen at run time, keeps its data and
certificates in one directory, and kills every process it started by pid on close().
Certificates are laid out as `raftsql cluster up` lays them out (a `CertsTree` in DIR/certs):
`certs` is the client's directory (what `dsn` names: role write, no CA or node key in it),
`admin_certs` the admin's (what `admin_dsn` names: membership, backups, `hash`),
`node_certs(nid)` a node's --certs, `ca_dir` the CA; `client_certs(name, role)` makes more.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raftsql.server.fileperms import open_private_log, private_dir


def free_port(host: str, avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port free on host now, not one of `avoid` (ports already handed to other nodes: the
    kernel may give the same free port twice)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


class LocalCluster:
    def __init__(self, base_dir: str | os.PathLike, nodes: int = 3, *, host: str | None = None,
                 node_args: list[str] | None = None, env: dict[str, str] | None = None):
        from raftsql.server import certs as pki

        self.dir = Path(base_dir)
        self.host = host or f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
        self.ids = [f"n{i + 1}" for i in range(nodes)]
        self.ports: dict[str, int] = {}
        for nid in self.ids:
            self.ports[nid] = free_port(self.host, set(self.ports.values()))
        self.tree = pki.CertsTree(self.dir / "certs")
        self.tree.split()  # a directory made before the tree layout
        ca, client = self.tree.init(exist_ok=True)
        self.ca_dir = ca.cert_path.parent
        self.certs = client.cert_path.parent  # the client's directory: ?certs= in `dsn`
        self.admin_certs = self.tree.admin_dir  # role admin: ?certs= in `admin_dsn`
        for nid in self.ids:
            self.tree.node(nid, [self.host], exist_ok=True)
        self.node_args = node_args or []
        self.env = env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.bootstrap = list(self.ids)  # the first voters: every node's --peer list
        self.joining: set[str] = set()  # nodes started with --join instead of --peer

    def add_node(self, nid: str) -> None:
        """A new node id with its own port and certificate (not started); start() runs it with
        --join and the first nodes' DSN (a new id cannot use --peer: see server/DESIGN.md)."""
        if nid in self.ids:
            raise ValueError(f"{nid} exists")
        self.ports[nid] = free_port(self.host, set(self.ports.values()))
        self.tree.node(nid, [self.host], exist_ok=True)
        self.ids.append(nid)
        self.joining.add(nid)

    def admin(self, fn: str, *args, **kw):
        """Call raftsql.driver._admin.<fn>(admin_dsn, *args, **kw)."""
        from raftsql.driver import _admin

        return getattr(_admin, fn)(self.admin_dsn, *args, **kw)

    def client_certs(self, name: str, role: str = "write") -> Path:
        """A client certificate `name` with client role `role` (made once): its directory."""
        return self.tree.client(name, role=role, exist_ok=True).cert_path.parent

    # ---------------------------------------------------------------- addresses

    def address(self, nid: str) -> str:
        return f"{self.host}:{self.ports[nid]}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.certs)

    @property
    def admin_dsn(self) -> str:
        return self.dsn_for(self.admin_certs)

    def dsn_for(self, certs: str | os.PathLike) -> str:
        """Every node, with the client certificate in directory `certs`."""
        return "raftsql://" + ",".join(self.address(n) for n in self.ids) + f"/?certs={certs}"

    def data_dir(self, nid: str) -> Path:
        return self.dir / nid

    def node_certs(self, nid: str) -> Path:
        """Node nid's own certificate directory (its --certs): ca.crt, NID.crt, NID.key."""
        return self.tree.own_dir(nid)

    # ---------------------------------------------------------------- processes

    def peer_address(self, src: str, dst: str) -> str:
        """The address node src is told for peer dst (a fault harness puts a proxy here)."""
        return self.address(dst)

    def node_environment(self, nid: str) -> dict[str, str]:
        return {**os.environ, **self.env}

    def start(self, nid: str | None = None, extra_args: list[str] | None = None) -> None:
        """Start nid (or every node); extra_args go to this start's command line only."""
        for n in [nid] if nid else self.ids:
            if n in self.procs and self.procs[n].poll() is None:
                continue
            d = self.data_dir(n)
            private_dir(d)
            args = [sys.executable, "-m", "raftsql.cli", "node", "--id", n, "--data-dir", str(d),
                    "--listen", self.address(n), "--certs", str(self.node_certs(n))]
            if n in self.joining:
                join = "raftsql://" + ",".join(self.address(o) for o in self.bootstrap) + f"/?certs={self.certs}"
                args += ["--join", join]
            else:
                for o in self.bootstrap:
                    if o != n:
                        args += ["--peer", f"{o}={self.peer_address(n, o)}"]
            args += self.node_args + list(extra_args or ())
            with open_private_log(d / "node.log") as logf:
                logf.write(f"---- start {n} at {time.strftime('%H:%M:%S')}\n".encode())
                logf.flush()
                self.procs[n] = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                                 env=self.node_environment(n))

    def kill(self, nid: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.get(nid)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    tail = (self.dir / nid / "node.log").read_text(errors="replace").splitlines()[-80:]
                    raise AssertionError(f"{nid} did not exit within 15 s of signal {sig}; the end of "
                                         "its log:\n" + "\n".join(tail)) from None

    def pause(self, nid: str) -> None:
        self.kill(nid, signal.SIGSTOP)

    def resume(self, nid: str) -> None:
        self.kill(nid, signal.SIGCONT)

    def alive(self, nid: str) -> bool:
        p = self.procs.get(nid)
        return p is not None and p.poll() is None

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- talking to nodes

    def client(self, certs: str | os.PathLike | None = None, **kw):
        """A driver Client with the client certificate (or the one in directory `certs`)."""
        from raftsql.driver._client import Client

        return Client.from_dsn(self.dsn_for(certs or self.certs), **kw)

    def node_request(self, nid: str, req: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
        """One request to node nid, with the admin certificate (it may send any request)."""
        from raftsql.driver._admin import context_for
        from raftsql.driver._conn import DSN, NodeConnection

        ctx = context_for(DSN.parse(self.admin_dsn))
        conn = NodeConnection(self.host, self.ports[nid], ctx, timeout)
        try:
            return conn.request(req, timeout)
        finally:
            conn.close()

    def status(self, nid: str) -> dict[str, Any] | None:
        try:
            resp = self.node_request(nid, {"op": "status"}, 2.0)
        except OSError:
            return None
        return resp.get("result") if resp.get("ok") else None

    def wait_leader(self, timeout: float = 15.0, exclude: tuple[str, ...] = ()) -> str:
        """Wait until every live node (but `exclude`) agrees on one leader; return its id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = set()
            ok = True
            for nid in self.ids:
                if nid in exclude or not self.alive(nid):
                    continue
                st = self.status(nid)
                if st is None or st.get("leader") is None:
                    ok = False
                    break
                seen.add((st["leader"], st["term"]))
            if ok and len(seen) == 1:
                leader = next(iter(seen))[0]
                if leader not in exclude and self.alive(leader):
                    return leader
            time.sleep(0.05)
        raise TimeoutError(f"no agreed leader within {timeout}s: " + str({n: self.status(n) for n in self.ids if self.alive(n)}))

    def hashes(self, timeout: float = 20.0) -> dict[str, tuple[int, str]]:
        """Every live node's (applied index, content hash), once all have applied the same index."""
        deadline = time.monotonic() + timeout
        last: dict[str, tuple[int, str]] = {}
        while time.monotonic() < deadline:
            last = {}
            for nid in self.ids:
                if not self.alive(nid):
                    continue
                try:
                    r = self.node_request(nid, {"op": "hash"}, 5.0)["result"]
                    last[nid] = (r["index"], r["hash"])
                except (OSError, KeyError, TypeError):
                    pass
            if len(last) == sum(self.alive(n) for n in self.ids) and len({v[0] for v in last.values()}) == 1:
                return last
            time.sleep(0.1)
        raise TimeoutError(f"nodes did not converge: {last}")


@contextlib.contextmanager
def running(base_dir: str | os.PathLike, nodes: int = 3, **kw: Any) -> Iterator[LocalCluster]:
    """A started LocalCluster with a leader (kw: LocalCluster's), closed on the way out: the
    body of the test fixtures that need one cluster."""
    c = LocalCluster(base_dir, nodes, **kw)
    c.start()
    try:
        c.wait_leader()
        yield c
    finally:
        c.close()
