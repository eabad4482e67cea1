"""CPU time per write: leader, each follower and the client, from /proc, on a 3-node cluster,
next to a 3-member etcd measured the same way in the same run.

    python benchmarks/cpu.py --quick     # 300 sequential writes, 16 clients x 40 (CI)
    python benchmarks/cpu.py             # 3,000 sequential writes; 16 and 64 clients x 100

For each phase (one client writing N single-row INSERTs one after another through the driver;
then C clients at once), the script reads utime+stime of every node process from
/proc/<pid>/stat before and after the phase, with the clients already connected and warmed up,
and divides by the writes completed. The clients run in worker processes (threads within each,
as in throughput.py), which report their own process CPU over the same writes. An idle phase
(no client) gives each node's background CPU per second (ticks, heartbeats), which the per-write
figures include for the phase's duration.

Per thread: every thread of the leader and of one follower, named from
/proc/<pid>/task/<tid>/comm (a node names its threads: ready, apply, ticker, send-n2,
conn-<remote port>, ...) and timed from /proc/<pid>/task/<tid>/schedstat (ns; its stat where the
kernel keeps no schedstat). A connection thread is charged to whoever dialed it: the remote
port is matched against the local ports of each node's sockets (/proc/<pid>/fd and
/proc/net/tcp), so "conn from n2" is a peer's stream and "conn from clients" the client
connections. Threads that ended during a phase are in the process total only; that, and the
process total's rounding to clock ticks (10 ms at 100 Hz), is the row "ended, or tick
rounding", which is why phases last some seconds.

Writes benchmarks/results/cpu[-quick].{json,md}.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import sys
import threading
import time
from types import SimpleNamespace

import click
from _common import (
    EtcdClient,
    driver_connect,
    etcd3,
    machine,
    md_table,
    raftsql_cluster,
    tmpdir,
    write_report,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKER_PROCESSES = 4  # clients are spread over at most this many processes

# ----------------------------------------------------------------------------- /proc readers


def _stat_cpu_s(path: str) -> float:
    """utime + stime (seconds) from a /proc/.../stat file."""
    with open(path) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()  # the fields after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # stat fields 14 and 15


def process_cpu_s(pid: int) -> float:
    return _stat_cpu_s(f"/proc/{pid}/stat")


def _task_cpu_s(pid: int, tid: int) -> float:
    """A thread's CPU seconds: its run time in ns from schedstat where the kernel keeps it (a
    per-thread figure in clock ticks loses up to a tick per thread, and a phase has dozens of
    client connection threads), else utime + stime from its stat."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (comm, cpu seconds)} for every live thread of pid."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            out[tid] = (comm, _task_cpu_s(pid, tid))
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _tcp_local_ports() -> dict[int, int]:
    """{socket inode: local port} for every TCP socket in this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    out[int(parts[9])] = int(parts[1].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    return out


def port_owners(pids: dict[str, int]) -> dict[int, str]:
    """{local TCP port: owner name} for the sockets of the given processes."""
    ports = _tcp_local_ports()
    owners = {}
    for name, pid in pids.items():
        for inode in _socket_inodes(pid):
            if inode in ports:
                owners[ports[inode]] = name
    return owners


def snapshot(pids: dict[str, int], per_thread: tuple[str, ...]) -> dict:
    """Process CPU of every pid, and per-thread CPU of the `per_thread` ones."""
    return {"t": time.monotonic(),
            "cpu": {n: process_cpu_s(p) for n, p in pids.items()},
            "threads": {n: thread_cpu(pids[n]) for n in per_thread}}


def thread_roles(pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                 total_s: float, owners: dict[int, str]) -> list[dict]:
    """CPU seconds per thread role between two thread_cpu() readings of one process; a thread
    new in `after` started during the interval (all its time counts)."""
    roles: dict[str, dict] = {}
    attributed = 0.0
    for tid, (comm, cpu1) in after.items():
        cpu0 = before.get(tid, (comm, 0.0))[1]
        if tid == pid:
            role = "main"
        elif comm.startswith("conn-") and comm[5:].isdigit():
            role = f"conn from {owners.get(int(comm[5:]), 'clients')}"
        else:
            role = comm
        r = roles.setdefault(role, {"role": role, "threads": 0, "cpu_s": 0.0})
        r["threads"] += 1
        r["cpu_s"] += cpu1 - cpu0
        attributed += cpu1 - cpu0
    rest = total_s - attributed
    if abs(rest) > 0.5 / CLK_TCK:
        # Threads that ended during the interval, and the process total's rounding to ticks.
        roles["ended, or tick rounding"] = {"role": "ended, or tick rounding", "threads": 0, "cpu_s": rest}
    return sorted(roles.values(), key=lambda r: -r["cpu_s"])


# ----------------------------------------------------------------------------- clients


def _make_writer(kind: str, target, tag: str):
    """(write(i), close) for one client: a raftsql driver cursor or an etcd HTTP client."""
    if kind == "raftsql":
        conn = driver_connect(target)
        cur = conn.cursor()
        return (lambda i: cur.execute("INSERT INTO t (v) VALUES (?)", (f"{tag}-{i}",))), conn.close
    name, port = target
    cl = EtcdClient(SimpleNamespace(names=[name], client_ports={name: port}), name)
    return (lambda i: cl.put(f"k/{tag}-{i}", f"value {i}")), cl.close


def _worker(kind: str, target, threads: int, writes_each: int, warmup: int, tag: int,
            ready: mp.Queue, start: mp.Event, results: mp.Queue, close: mp.Event) -> None:
    clients = [_make_writer(kind, target, f"w{tag}-{k}") for k in range(threads)]
    for k, (write, _) in enumerate(clients):
        for i in range(warmup):
            write(-1 - i - k * warmup)
    ready.put(tag)
    start.wait()
    ok = [0] * threads
    errors = [0] * threads

    def run(k: int) -> None:
        write = clients[k][0]
        for i in range(writes_each):
            try:
                write(i)
                ok[k] += 1
            except Exception:  # noqa: BLE001 - counted and reported
                errors[k] += 1

    cpu0, t0 = process_cpu_s(os.getpid()), time.monotonic()
    if threads == 1:
        run(0)
    else:
        ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    results.put({"writes": sum(ok), "errors": sum(errors),
                 "cpu_s": process_cpu_s(os.getpid()) - cpu0, "wall_s": time.monotonic() - t0})
    close.wait(120)
    for _, close_client in clients:
        close_client()


def run_phase(kind: str, target, pids: dict[str, int], leader: str, per_thread: tuple[str, ...],
              clients: int, writes_each: int, warmup: int) -> dict:
    """Node CPU over `clients` clients writing `writes_each` single rows each."""
    procs_n = 1 if clients == 1 else min(WORKER_PROCESSES, clients)
    per = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    ready: mp.Queue = mp.Queue()
    results: mp.Queue = mp.Queue()
    start, close = mp.Event(), mp.Event()
    ps = [mp.Process(target=_worker, args=(kind, target, n, writes_each, warmup, i, ready, start, results, close))
          for i, n in enumerate(per)]
    for p in ps:
        p.start()
    try:
        for _ in ps:
            ready.get(timeout=180)
        owners = port_owners(pids) if per_thread else {}
        before = snapshot(pids, per_thread)
        start.set()
        got = [results.get(timeout=900) for _ in ps]
        after = snapshot(pids, per_thread)
    except queue.Empty:
        raise RuntimeError(f"{kind} phase with {clients} client(s): a worker did not report in time") from None
    finally:
        close.set()
        for p in ps:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
    writes = sum(g["writes"] for g in got)
    wall = after["t"] - before["t"]
    cpu = {n: after["cpu"][n] - before["cpu"][n] for n in pids}
    out = {"clients": clients, "writes": writes, "errors": sum(g["errors"] for g in got),
           "wall_s": round(wall, 3), "writes_per_s": round(writes / wall) if wall > 0 else None,
           "leader": leader, "cpu_s": {n: round(v, 3) for n, v in cpu.items()},
           "client_cpu_s": round(sum(g["cpu_s"] for g in got), 3)}
    if writes:
        out["us_per_write"] = {n: round(v / writes * 1e6) for n, v in cpu.items()}
        out["client_us_per_write"] = round(out["client_cpu_s"] / writes * 1e6)
        out["nodes_us_per_write"] = round(sum(cpu.values()) / writes * 1e6)
    out["threads"] = {}
    for n in per_thread:
        roles = thread_roles(pids[n], before["threads"][n], after["threads"][n], cpu[n], owners)
        for r in roles:
            r["cpu_s"] = round(r["cpu_s"], 4)
            if writes:
                r["us_per_write"] = round(r["cpu_s"] / writes * 1e6)
            r["share"] = round(r["cpu_s"] / cpu[n], 3) if cpu[n] > 0 else None
        out["threads"][n] = roles
    return out


def idle_phase(pids: dict[str, int], per_thread: tuple[str, ...], seconds: float) -> dict:
    owners = port_owners(pids) if per_thread else {}
    before = snapshot(pids, per_thread)
    time.sleep(seconds)
    after = snapshot(pids, per_thread)
    wall = after["t"] - before["t"]
    cpu = {n: after["cpu"][n] - before["cpu"][n] for n in pids}
    out = {"wall_s": round(wall, 3), "cpu_ms_per_s": {n: round(v / wall * 1000, 1) for n, v in cpu.items()},
           "threads": {}}
    for n in per_thread:
        roles = thread_roles(pids[n], before["threads"][n], after["threads"][n], cpu[n], owners)
        out["threads"][n] = [{"role": r["role"], "threads": r["threads"],
                              "cpu_ms_per_s": round(r["cpu_s"] / wall * 1000, 1)} for r in roles]
    return out


# ----------------------------------------------------------------------------- systems


def _phases(seq_writes: int, client_counts: tuple[int, ...], writes_per_client: int) -> list[tuple[int, int, int]]:
    """(clients, writes per client, warm-up writes per client) per phase."""
    return [(1, seq_writes, max(20, seq_writes // 20))] + [(c, writes_per_client, 3) for c in client_counts]


def _terms(cluster) -> dict:
    return {n: (st or {}).get("term") for n, st in ((n, cluster.status(n)) for n in cluster.ids)}


def bench_raftsql(phases, idle_s: float) -> dict:
    base = tmpdir("raftsql-cpu-")
    c = raftsql_cluster(base, 3)
    try:
        conn = driver_connect(c.dsn)
        conn.cursor().execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.close()
        pids = {n: c.procs[n].pid for n in c.ids}
        res: dict = {"pids": pids, "phases": []}
        leader = c.wait_leader()
        followers = [n for n in c.ids if n != leader]
        per_thread = (leader, followers[0])
        res["idle"] = idle_phase(pids, per_thread, idle_s)
        res["idle"]["leader"] = leader
        for clients, each, warmup in phases:
            leader = c.wait_leader()
            followers = [n for n in c.ids if n != leader]
            per_thread = (leader, followers[0])
            terms0 = _terms(c)
            click.echo(f"raftsql: {clients} client(s) x {each} writes ...", err=True)
            ph = run_phase("raftsql", c.dsn, pids, leader, per_thread, clients, each, warmup)
            terms1 = _terms(c)
            ph["followers"] = followers
            ph["terms_before"], ph["terms_after"] = terms0, terms1
            ph["leader_changed"] = terms0 != terms1 or c.wait_leader() != leader
            res["phases"].append(ph)
        return res
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)


def bench_etcd(phases, idle_s: float) -> dict | str:
    with etcd3("etcd-cpu-") as (ec, why):
        if ec is None:
            return why
        pids = {n: p.pid for n, p in ec.procs.items()}
        res: dict = {"pids": pids, "phases": []}
        res["idle"] = idle_phase(pids, (), idle_s)
        for clients, each, warmup in phases:
            leader = ec.wait_leader()
            click.echo(f"etcd: {clients} client(s) x {each} puts ...", err=True)
            ph = run_phase("etcd", (leader, ec.client_ports[leader]), pids, leader, (), clients, each, warmup)
            ph["followers"] = [n for n in ec.names if n != leader]
            ph["leader_changed"] = ec.wait_leader() != leader
            res["phases"].append(ph)
        return res


# ----------------------------------------------------------------------------- report


def _phase_label(ph: dict) -> str:
    return "1 client, sequential" if ph["clients"] == 1 else f"{ph['clients']} clients"


def _follower_mean(ph: dict) -> float | None:
    vals = [ph["us_per_write"][f] for f in ph["followers"]]
    return sum(vals) / len(vals) if vals else None


def report(doc: dict) -> str:
    rows = []
    systems = [("raftsql 3 nodes", doc["raftsql"])]
    if isinstance(doc["etcd"], dict):
        systems.append(("etcd 3 members", doc["etcd"]))
    for label, res in systems:
        for ph in res["phases"]:
            if "us_per_write" not in ph:
                rows.append([label, _phase_label(ph), 0, "", "", "", "", "", f"{ph['errors']} errors"])
                continue
            fol = " / ".join(f"{ph['us_per_write'][f]:,}" for f in ph["followers"])
            note = f"{ph['errors']} errors" if ph["errors"] else ""
            if ph.get("leader_changed"):
                note = (note + "; " if note else "") + "leader changed during the phase"
            rows.append([label, _phase_label(ph), ph["writes"], ph["writes_per_s"], f"{ph['us_per_write'][ph['leader']]:,}",
                         fol, f"{ph['client_us_per_write']:,}", f"{ph['nodes_us_per_write']:,}", note])
    if isinstance(doc["etcd"], dict):
        for ra, ea in zip(doc["raftsql"]["phases"], doc["etcd"]["phases"], strict=True):
            if "us_per_write" not in ra or "us_per_write" not in ea:
                continue
            fr, fe = _follower_mean(ra), _follower_mean(ea)
            rows.append(["raftsql / etcd", _phase_label(ra), "", f"{ra['writes_per_s'] / ea['writes_per_s']:.2f}x",
                         f"{ra['us_per_write'][ra['leader']] / ea['us_per_write'][ea['leader']]:.2f}x",
                         f"{fr / fe:.2f}x (mean)", f"{ra['client_us_per_write'] / ea['client_us_per_write']:.2f}x",
                         f"{ra['nodes_us_per_write'] / ea['nodes_us_per_write']:.2f}x", ""])
    else:
        rows.append([f"etcd 3 members: {doc['etcd']}", "", "", "", "", "", "", "", ""])
    out = md_table(["system", "phase", "writes", "writes/s", "leader µs CPU/write", "followers µs CPU/write",
                    "client µs CPU/write", "all nodes µs CPU/write", "note"], rows)

    idle_rows = []
    for label, res in systems:
        idle = res["idle"]["cpu_ms_per_s"]
        idle_rows.append([label, " / ".join(f"{n} {v}" for n, v in idle.items())])
    out += ("\n\nIdle (no client), CPU ms per second of each node; the per-write figures above "
            "include this background for the phase's duration:\n\n"
            + md_table(["system", "CPU ms/s per node"], idle_rows))

    r = doc["raftsql"]
    for ph in r["phases"]:
        for role_name, node in (("leader", ph["leader"]), ("follower", ph["followers"][0])):
            roles = ph["threads"].get(node, [])
            if not roles or "us_per_write" not in ph:
                continue
            # Threads that used under 1 µs per write (accept, parker, main, ...) stay in the JSON.
            trows = [[x["role"], x["threads"] or "", f"{x.get('us_per_write', 0):,}",
                      f"{100 * x['share']:.1f}%" if x["share"] is not None else ""]
                     for x in roles if abs(x.get("us_per_write", 0)) >= 1]
            out += (f"\n\nraftsql {role_name} {node} per thread, {_phase_label(ph)} "
                    f"({ph['us_per_write'][node]:,} µs CPU/write in all):\n\n"
                    + md_table(["thread", "threads", "µs CPU/write", "share"], trows))
    idle_threads = r["idle"]["threads"].get(r["idle"]["leader"], [])
    if idle_threads:
        out += (f"\n\nraftsql leader {r['idle']['leader']} per thread, idle:\n\n"
                + md_table(["thread", "threads", "CPU ms/s"],
                           [[x["role"], x["threads"] or "", x["cpu_ms_per_s"]] for x in idle_threads
                            if abs(x["cpu_ms_per_s"]) >= 0.1]))
    return out


@click.command()
@click.option("--quick", is_flag=True, help="300 sequential writes, 16 clients x 40 writes (CI).")
@click.option("--writes", type=int, default=3000, show_default=True, help="Sequential writes (one client).")
@click.option("--clients", "client_counts", multiple=True, type=int, help="Concurrent phases (default 16, 64).")
@click.option("--writes-per-client", type=int, default=100, show_default=True)
@click.option("--idle-seconds", type=float, default=5.0, show_default=True)
@click.option("--no-etcd", is_flag=True, help="Skip the etcd baseline.")
@click.option("--name", default="cpu", show_default=True, help="Result file name under benchmarks/results/.")
def main(quick: bool, writes: int, client_counts: tuple[int, ...], writes_per_client: int, idle_seconds: float,
         no_etcd: bool, name: str) -> None:
    if quick:
        name = name if name != "cpu" else "cpu-quick"
        writes, client_counts, writes_per_client, idle_seconds = 300, client_counts or (16,), 40, 2.0
    client_counts = client_counts or (16, 64)
    phases = _phases(writes, client_counts, writes_per_client)
    doc: dict = {"command": " ".join(["python", "benchmarks/cpu.py", *sys.argv[1:]]), "machine": machine(),
                 "clk_tck": CLK_TCK, "phases": [{"clients": c, "writes_per_client": w, "warmup_per_client": u}
                                                for c, w, u in phases]}
    doc["etcd"] = "skipped: --no-etcd" if no_etcd else bench_etcd(phases, idle_seconds)
    if isinstance(doc["etcd"], str):
        click.echo(f"etcd {doc['etcd']}", err=True)
    doc["raftsql"] = bench_raftsql(phases, idle_seconds)
    table = report(doc)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
