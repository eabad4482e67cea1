"""Shared pieces of the benchmark scripts: clusters, baselines, statistics, reports."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine spent busy (all cores) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of the children it has reaped (nodes, etcd, workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _RunLoad:
    """What else the machine was doing during a run: load average samples, and the CPU time
    spent by processes other than this benchmark and its (reaped) children."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._try(_cpu_busy_s)
        self.own0 = _own_cpu_s()
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _try(fn):
        try:
            return fn()
        except (OSError, ValueError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def finish(self) -> dict:
        wall = time.monotonic() - self.t0
        out = {"load_1min_max": round(max(self.samples), 2),
               "load_1min_mean": round(sum(self.samples) / len(self.samples), 2),
               "load_after": [round(x, 2) for x in os.getloadavg()], "wall_s": round(wall, 1)}
        busy1 = self._try(_cpu_busy_s)
        if self.busy0 is not None and busy1 is not None and wall > 0:
            other = (busy1 - self.busy0) - (_own_cpu_s() - self.own0)
            out["other_processes_cores"] = round(max(0.0, other) / wall, 2)
        return out


_RUN: _RunLoad | None = None


def machine() -> dict:
    """The machine, and the start of load accounting for this run (finished by write_report)."""
    global _RUN
    import apsw

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        mem_gib = None
    _RUN = _RunLoad()
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "kernel": platform.release(),
        "load_before": os.getloadavg()[0],
        "load_before_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_line(m: dict) -> str:
    """One line describing the machine and how busy it was, for tables and the README."""
    line = (f"{m.get('cpus')} cores, {m.get('cpu')}, {m.get('memory_gib')} GiB, Linux {m.get('kernel')}, "
            f"Python {m.get('python')}, SQLite {m.get('sqlite')}; {m.get('date')}. "
            f"Load average (1 min) before the run {m.get('load_before', 0):.2f}")
    d = m.get("during")
    if d:
        line += (f", during it mean {d['load_1min_mean']:.2f} / max {d['load_1min_max']:.2f} "
                 f"(the benchmark's own processes included)")
        if "other_processes_cores" in d:
            line += (f"; other processes on the machine used {d['other_processes_cores']:.2f} "
                     f"of {m.get('cpus')} cores on average")
    return line + f"; run took {d['wall_s']:.0f} s." if d else line + "."


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
    m = doc.setdefault("machine", {})
    if _RUN is not None and "during" not in m:
        m["during"] = _RUN.finish()
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    head = f"# {name}\n\nMachine: {machine_line(m)}\n\nCommand: `{doc.get('command')}`\n\n"
    (RESULTS / f"{name}.md").write_text(head + table_md + "\n")
    click.echo(f"Machine: {machine_line(m)}")
    click.echo(f"Wrote {RESULTS / name}.json and .md")


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- raftsql


def raftsql_cluster(base: Path, nodes: int):
    from raftsql.testing.cluster import LocalCluster

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


def ensure_etcd() -> str:
    """Path to Debian's etcd, installing etcd-server if missing; RuntimeError saying why not."""
    path = shutil.which("etcd")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("etcd is not installed and cannot be installed here "
                           "(installing Debian's etcd-server needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    click.echo("etcd not found: installing Debian's etcd-server ...", err=True)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server"], capture_output=True, env=env)
    if r.returncode != 0:  # a stale or missing package list: refresh it once and retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server"], capture_output=True, env=env)
    path = shutil.which("etcd")
    if path is None:
        tail = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"etcd is not installed and `apt-get install etcd-server` failed: {tail[0]}")
    return path


class EtcdCluster:
    """N etcd members on loopback, each with its own data dir; heartbeat/election in ms."""

    def __init__(self, base: Path, members: int = 3, heartbeat_ms: int = 100, election_ms: int = 1000):
        self.bin = ensure_etcd()
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
            self.base.mkdir(parents=True, exist_ok=True)
            log = open(self.base / f"{n}.log", "ab")  # noqa: SIM115 - owned by the child
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
            if all(p.poll() is not None for p in self.procs.values()):
                break  # every member exited (bad flags, ports taken): no point waiting
            time.sleep(0.1)
        raise TimeoutError(f"etcd did not elect a leader within {timeout:.0f} s; {self.log_tails()}")

    def log_tails(self) -> str:
        tails = []
        for n in self.names:
            try:
                lines = (self.base / f"{n}.log").read_text(errors="replace").strip().splitlines()
            except OSError:
                lines = []
            code = self.procs[n].poll() if n in self.procs else None
            tails.append(f"{n} (exit {code}): {lines[-1][:200] if lines else 'empty log'}")
        return "; ".join(tails)

    def wait_leader(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ld = self.leader()
            if ld is not None:
                return ld
            time.sleep(0.05)
        raise TimeoutError(f"etcd has no leader after {timeout:.0f} s; {self.log_tails()}")

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


def start_etcd(base: Path, members: int = 3, heartbeat_ms: int = 100, election_ms: int = 1000,
               attempts: int = 3) -> EtcdCluster:
    """A running etcd cluster with a leader. A failed start (most often a port that another
    process took between free_port() and etcd's bind, on a busy machine) is retried on fresh
    ports; RuntimeError if etcd is missing, TimeoutError with the members' last log lines if
    every attempt failed."""
    for attempt in range(attempts):
        ec = EtcdCluster(Path(base) / f"try{attempt}", members, heartbeat_ms, election_ms)
        ec.start()
        try:
            ec.wait_ready()
            return ec
        except TimeoutError as e:
            ec.close()
            if attempt == attempts - 1:
                raise
            click.echo(f"etcd start failed, retrying on fresh ports: {e}", err=True)
    raise AssertionError("unreachable")


class EtcdClient:
    """Puts through etcd's HTTP/JSON gateway over one keep-alive connection."""

    def __init__(self, cluster: EtcdCluster, name: str | None = None):
        self.cluster = cluster
        self.names = [name] if name else list(cluster.names)
        self.i = 0
        self.conn = None

    def put(self, key: str, value: str, timeout: float = 2.0) -> None:
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, timeout)

    def get(self, key: str, serializable: bool = False, timeout: float = 2.0) -> bytes:
        """Range read of one key: linearizable (etcd's default) or serializable (local, may be stale)."""
        body = {"key": _b64(key)}
        if serializable:
            body["serializable"] = True
        return self._post("/v3/kv/range", body, timeout)

    def _post(self, path: str, body: dict, timeout: float) -> bytes:
        if self.conn is None:
            n = self.names[self.i % len(self.names)]
            self.conn = http.client.HTTPConnection("127.0.0.1", self.cluster.client_ports[n], timeout=timeout)
        try:
            self.conn.request("POST", path, body=json.dumps(body))
            resp = self.conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise OSError(f"etcd {path} failed: {resp.status} {data[:200]!r}")
            return data
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            self.i += 1
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def wait_bar(label: str, until: float) -> None:
    """A progress bar on stderr that fills until time.time() reaches `until` (clients run elsewhere)."""
    total = max(0.0, until - time.time())
    steps = max(1, int(total * 10))
    with click.progressbar(length=steps, label=label, file=sys.stderr) as bar:
        done = 0
        while time.time() < until:
            time.sleep(0.1)
            now = min(steps, int((total - max(0.0, until - time.time())) * 10))
            bar.update(now - done)
            done = now


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def timed_threads(threads: int, start_at: float, seconds: float, make, *, clock=time.time,
                  while_running=None) -> tuple[list[float], int]:
    """Run `threads` threads; thread k gets (op, close) = make(k), waits until start_at (on
    `clock`), then calls op(0), op(1), ... until start_at + seconds, timing every call that
    succeeds. while_running() (e.g. a progress bar) runs in the caller meanwhile. Returns the
    latencies (s) of all threads and the number of failed calls."""
    lats: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def run(k: int) -> None:
        op, close = make(k)
        mine: list[float] = []
        while clock() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        i = 0
        while clock() < end:
            t0 = time.perf_counter()
            try:
                op(i)
                mine.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted, reported
                with lock:
                    errors[0] += 1
            i += 1
        close()
        with lock:
            lats.extend(mine)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    if while_running is not None:
        while_running()
    for t in ts:
        t.join()
    return lats, errors[0]


@contextlib.contextmanager
def etcd3(prefix: str):
    """A running 3-member etcd in a fresh temp dir, closed and removed on exit. Yields
    (cluster, None), or (None, "skipped: why") / (None, "failed: why") if it cannot start."""
    base = tmpdir(prefix)
    try:
        try:
            ec = start_etcd(base, 3)
        except RuntimeError as e:
            yield None, f"skipped: {e}"
            return
        except TimeoutError as e:
            yield None, f"failed: {e}"
            return
        try:
            yield ec, None
        finally:
            ec.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
