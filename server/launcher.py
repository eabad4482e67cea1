"""`raftsql cluster up`: N node processes on loopback, certificates made if missing.

D/cluster.json records {"dsn", "nodes": [{"id", "address", "pid", "data_dir"}]}; started again
with the same D, the same ids, ports and data are reused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def plan(data_dir: Path, nodes: int, base_port: int | None, host: str = "127.0.0.1") -> list[dict]:
    """The node list: reused from cluster.json when present, else fresh ids and ports."""
    cj = data_dir / "cluster.json"
    if cj.exists():
        old = json.loads(cj.read_text())
        prev = [{"id": n["id"], "address": n["address"], "data_dir": n["data_dir"]} for n in old["nodes"]]
        if len(prev) != nodes:
            raise ValueError(f"{cj} describes {len(prev)} nodes; start it with --nodes {len(prev)} or use another --data-dir")
        return prev
    port = base_port or 4001
    out = []
    for i in range(nodes):
        while not (_port_free(host, port)):
            if base_port is not None:
                raise ValueError(f"port {port} on {host} is in use; choose another --base-port")
            port += 1
        out.append({"id": f"n{i + 1}", "address": f"{host}:{port}", "data_dir": str(data_dir / f"n{i + 1}")})
        port += 1
    return out


def make_certs(certs: Path, nodes: list[dict]) -> None:
    from raftsql.server import tls

    tls.make_ca(certs, exist_ok=True)
    tls.make_client_cert(certs, "client", exist_ok=True)
    for n in nodes:
        tls.make_node_cert(certs, n["id"], [n["address"].rpartition(":")[0]], exist_ok=True)


def dsn_for(nodes: list[dict], certs: Path) -> str:
    return "raftsql://" + ",".join(n["address"] for n in nodes) + f"/?certs={certs.resolve()}"


def start(data_dir: Path, nodes: list[dict], certs: Path, extra_args: list[str] | None = None) -> list[subprocess.Popen]:
    procs = []
    for n in nodes:
        Path(n["data_dir"]).mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "raftsql.cli", "node", "--id", n["id"], "--data-dir", n["data_dir"],
                "--listen", n["address"], "--certs", str(certs)]
        for o in nodes:
            if o["id"] != n["id"]:
                args += ["--peer", f"{o['id']}={o['address']}"]
        args += extra_args or []
        logf = open(Path(n["data_dir"]) / "node.log", "ab")  # noqa: SIM115 - owned by the child
        procs.append(subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True))
        logf.close()
    return procs


def write_cluster_json(data_dir: Path, nodes: list[dict], procs: list[subprocess.Popen], dsn: str) -> None:
    doc = {
        "dsn": dsn,
        "nodes": [{**n, "pid": p.pid} for n, p in zip(nodes, procs, strict=True)],
    }
    tmp = data_dir / "cluster.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, data_dir / "cluster.json")


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
