"""Shared pieces of the benchmark scripts: clusters, baselines, statistics, reports."""

from __future__ import annotations

import base64
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def machine() -> dict:
    import apsw

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "kernel": platform.release(),
        "load_before": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def summary_ms(samples: list[float]) -> dict:
    return {
        "n": len(samples),
        "p50_ms": round(pct(samples, 50) * 1000, 3),
        "p95_ms": round(pct(samples, 95) * 1000, 3),
        "p99_ms": round(pct(samples, 99) * 1000, 3),
        "max_ms": round(max(samples) * 1000, 3) if samples else None,
    }


def write_report(name: str, doc: dict, table_md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    m = doc.get("machine", {})
    head = (f"# {name}\n\nMachine: {m.get('cpus')} cores, {m.get('cpu')}, Python {m.get('python')}, "
            f"SQLite {m.get('sqlite')}, load before run {m.get('load_before'):.2f}; {m.get('date')}\n\n"
            f"Command: `{doc.get('command')}`\n\n")
    (RESULTS / f"{name}.md").write_text(head + table_md + "\n")


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- raftsql


def raftsql_cluster(base: Path, nodes: int):
    from raftsql.server.testing import LocalCluster

    c = LocalCluster(base, nodes)
    c.start()
    c.wait_leader(30)
    return c


def driver_connect(dsn: str, **kw):
    import raftsql.driver as driver

    if hasattr(driver, "connect"):
        return driver.connect(dsn, autocommit=True, **kw)
    raise RuntimeError("raftsql.driver.connect is not available")


# ----------------------------------------------------------------------------- etcd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_etcd() -> str | None:
    """Path to Debian's etcd, installing etcd-server if missing; None (and why) if impossible."""
    path = shutil.which("etcd")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("etcd")
    return path


class EtcdCluster:
    """N etcd members on loopback, each with its own data dir; heartbeat/election in ms."""

    def __init__(self, base: Path, members: int = 3, heartbeat_ms: int = 100, election_ms: int = 1000):
        self.bin = ensure_etcd()
        if self.bin is None:
            raise RuntimeError("etcd is not installed and could not be installed (needs root and apt-get)")
        self.base = Path(base)
        self.names = [f"e{i + 1}" for i in range(members)]
        self.client_ports = {n: free_port() for n in self.names}
        self.peer_ports = {n: free_port() for n in self.names}
        initial = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        self.procs: dict[str, subprocess.Popen] = {}
        self.args = {}
        for n in self.names:
            self.args[n] = [self.bin, "--name", n, "--data-dir", str(self.base / n),
                            "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[n]}",
                            "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[n]}",
                            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[n]}",
                            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[n]}",
                            "--initial-cluster", initial, "--initial-cluster-state", "new",
                            "--heartbeat-interval", str(heartbeat_ms), "--election-timeout", str(election_ms),
                            "--log-level", "error"]

    def start(self, name: str | None = None) -> None:
        for n in [name] if name else self.names:
            log = open(self.base / f"{n}.log", "ab")  # noqa: SIM115 - owned by the child
            self.base.mkdir(parents=True, exist_ok=True)
            self.procs[n] = subprocess.Popen(self.args[n], stdout=log, stderr=subprocess.STDOUT)
            log.close()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.leader() is not None:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("etcd did not elect a leader")

    def status(self, name: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.client_ports[name], timeout=1)
        conn.request("POST", "/v3/maintenance/status", body="{}")
        return json.loads(conn.getresponse().read())

    def leader(self) -> str | None:
        for n in self.names:
            if self.procs.get(n) is None or self.procs[n].poll() is not None:
                continue
            try:
                st = self.status(n)
            except (OSError, ValueError):
                continue
            lid = st.get("leader")
            mid = st.get("header", {}).get("member_id")
            if lid and lid == mid:
                return n
        return None

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait()


class EtcdClient:
    """Puts through etcd's HTTP/JSON gateway over one keep-alive connection."""

    def __init__(self, cluster: EtcdCluster, name: str | None = None):
        self.cluster = cluster
        self.names = [name] if name else list(cluster.names)
        self.i = 0
        self.conn = None

    def put(self, key: str, value: str, timeout: float = 2.0) -> None:
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "value": base64.b64encode(value.encode()).decode()})
        if self.conn is None:
            n = self.names[self.i % len(self.names)]
            self.conn = http.client.HTTPConnection("127.0.0.1", self.cluster.client_ports[n], timeout=timeout)
        try:
            self.conn.request("POST", "/v3/kv/put", body=body)
            resp = self.conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise OSError(f"etcd put failed: {resp.status} {data[:200]!r}")
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            self.i += 1
            raise


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
