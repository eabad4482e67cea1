"""`raftsql cluster up`: N node processes on loopback, certificates made if missing.

D/cluster.json records {"dsn", "admin_dsn", "nodes": [{"id", "address", "pid", "data_dir"}]};
started again with the same D, the same ids, ports and data are reused.

Certificates live in D/certs (a `CertsTree`): D/certs/ca holds the CA and its key, D/certs/client
is what the printed DSN names (ca.crt and a client pair of role write), D/certs/admin what the
admin DSN names (role admin: membership, backup, restore, revocation), D/certs/nN is node nN's
--certs.
A D/certs from before that layout (ca.key beside every key) is split into it on the next start.

A node that exits is reported with the command that restarts it; the others keep running.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raftsql.server.fileperms import open_private_log, private_dir


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _running_pids(doc: dict) -> list[int]:
    """The pids cluster.json names that are still raftsql node processes."""
    alive = []
    for n in doc.get("nodes", []):
        pid = n.get("pid") if isinstance(n, dict) else None
        if not isinstance(pid, int) or pid <= 0:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"raftsql" in cmdline and b"node" in cmdline:
            alive.append(pid)
    return alive


def plan(data_dir: Path, nodes: int, base_port: int | None, host: str = "127.0.0.1") -> list[dict]:
    """The node list: reused from cluster.json when present, else fresh ids and ports.
    ValueError (a one-line message) for a cluster.json that is damaged or whose nodes still
    run, and for a --host that cannot be listened on."""
    cj = data_dir / "cluster.json"
    if cj.exists():
        try:
            old = json.loads(cj.read_text())
            prev = [{"id": str(n["id"]), "address": str(n["address"]), "data_dir": str(n["data_dir"])}
                    for n in old["nodes"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{cj} is damaged ({type(e).__name__}: {e}); move it away to start a "
                             "new cluster in this --data-dir, or fix it") from None
        running = _running_pids(old)
        if running:
            raise ValueError(f"the cluster in {data_dir} is running already (pids "
                             f"{', '.join(map(str, running))}): stop it first")
        if len(prev) != nodes:
            raise ValueError(f"{cj} describes {len(prev)} nodes; start it with --nodes {len(prev)} or use another --data-dir")
        return prev
    if not host or ":" in host:
        raise ValueError(f"--host {host!r}: give one IPv4 address or host name, without a port")
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except (OSError, OverflowError) as e:
            raise ValueError(f"cannot listen on --host {host}: {e}") from None
    port = base_port or 4001
    out = []
    for i in range(nodes):
        while not (_port_free(host, port)):
            if base_port is not None:
                raise ValueError(f"port {port} on {host} is in use; choose another --base-port")
            port += 1
            if port > 65535:
                raise ValueError(f"no free port on {host} from {base_port or 4001} up")
        out.append({"id": f"n{i + 1}", "address": f"{host}:{port}", "data_dir": str(data_dir / f"n{i + 1}")})
        port += 1
    return out


def make_certs(certs: Path, nodes: list[dict]) -> tuple[Path, dict[str, Path], list[str]]:
    """Make (or keep) the CA, the client's directory and one directory per node under `certs`.

    Returns (the client's directory, {node id: its --certs directory}, what was moved out of an
    old flat `certs`)."""
    from raftsql.server import certs as pki

    tree = pki.CertsTree(certs)
    moved = tree.split()
    _, client = tree.init(exist_ok=True)
    node_dirs = {}
    for n in nodes:
        issued = tree.node(n["id"], [n["address"].rpartition(":")[0]], exist_ok=True)
        node_dirs[n["id"]] = issued.cert_path.parent
    return client.cert_path.parent, node_dirs, moved


def admin_dir(certs: Path) -> Path | None:
    """The admin client's directory made by make_certs (None for a flat, unsplit layout)."""
    from raftsql.server import certs as pki

    d = pki.CertsTree(certs).admin_dir
    return d if (d / "client.crt").exists() else None


def dsn_for(nodes: list[dict], client_certs: Path) -> str:
    return "raftsql://" + ",".join(n["address"] for n in nodes) + f"/?certs={client_certs.resolve()}"


def node_command(n: dict, nodes: list[dict], node_certs: Path, extra_args: list[str] | None = None) -> list[str]:
    """The argv that runs node `n` (absolute paths, so it works from any directory)."""
    args = [sys.executable, "-m", "raftsql.cli", "node", "--id", n["id"],
            "--data-dir", str(Path(n["data_dir"]).resolve()), "--listen", n["address"],
            "--certs", str(node_certs.resolve())]
    for o in nodes:
        if o["id"] != n["id"]:
            args += ["--peer", f"{o['id']}={o['address']}"]
    return args + (extra_args or [])


def start_node(n: dict, nodes: list[dict], node_certs: Path, extra_args: list[str] | None = None) -> subprocess.Popen:
    d = Path(n["data_dir"])
    private_dir(d)
    # The node makes its own files private (server/fileperms.py); node.log is opened here.
    with open_private_log(d / "node.log") as logf:
        return subprocess.Popen(node_command(n, nodes, node_certs, extra_args), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start(data_dir: Path, nodes: list[dict], node_certs: dict[str, Path],
          extra_args: list[str] | None = None, interrupted: Any = None) -> list[subprocess.Popen]:
    """Start every node, in order. interrupted (a threading.Event): once set, no further node
    starts and those already started are stopped (a SIGTERM while they start), as they are if
    starting one raises. Returns the processes started, all of them unless interrupted."""
    procs: list[subprocess.Popen] = []
    try:
        for n in nodes:
            if interrupted is not None and interrupted.is_set():
                break
            procs.append(start_node(n, nodes, node_certs[n["id"]], extra_args))
    except BaseException:
        stop(procs)
        raise
    if interrupted is not None and interrupted.is_set():
        stop(procs)
    return procs


def write_cluster_json(data_dir: Path, nodes: list[dict], procs: list[subprocess.Popen], dsn: str,
                       admin_dsn: str | None = None) -> None:
    doc = {
        "dsn": dsn,
        "admin_dsn": admin_dsn,
        "nodes": [{**n, "pid": p.pid} for n, p in zip(nodes, procs, strict=True)],
    }
    tmp = data_dir / "cluster.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, data_dir / "cluster.json")


def describe_exit(returncode: int) -> str:
    """'killed by signal SIGKILL (9)' or 'exit status 1'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by signal {name} ({-returncode})"
    return f"exit status {returncode}"


def exit_report(n: dict, proc: subprocess.Popen, nodes: list[dict], node_certs: Path,
                extra_args: list[str] | None = None, others_running: bool = True) -> str:
    """What `cluster up` prints when node `n` has exited: who, how, and how to restart it."""
    return (
        f"node {n['id']} (pid {proc.pid}) exited: {describe_exit(proc.returncode)}; "
        f"its log: {Path(n['data_dir']) / 'node.log'}\n"
        + ("the other nodes keep running. " if others_running else "")
        + f"To restart {n['id']}, run in another terminal (Ctrl-C there stops it):\n"
        f"  {shlex.join(node_command(n, nodes, node_certs, extra_args))}"
    )


def stop(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
