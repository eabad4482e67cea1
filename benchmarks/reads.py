"""Read latency and throughput at each consistency level on a 3-node cluster: linearizable
(ReadIndex, one quorum round shared by concurrent reads), leader (local state of the leader),
stale (any node, with the client's last write index as min_index). Baselines in the same run,
measured the same way: the same SELECT on a local SQLite file, and a 3-member etcd's range read
of one key, linearizable (its default) and serializable (local, may be stale).

    python benchmarks/reads.py --quick
    python benchmarks/reads.py --reads 3000 --seconds 10

Writes benchmarks/results/reads[-quick].{json,md,png} (PNG with the `plots` extra).
"""

from __future__ import annotations

import shutil
import sys
import time

import click
from _common import (
    EtcdClient,
    EtcdCluster,
    driver_connect,
    etcd3,
    machine,
    md_table,
    pct,
    raftsql_cluster,
    summary_ms,
    timed_threads,
    tmpdir,
    wait_bar,
    write_report,
)
from _plots import reads_bars

KEYS = 100
# Which etcd read each raftsql level is compared with: the same guarantee, or the nearest one.
ETCD_PEER = {"linearizable": "etcd_linearizable", "leader": "etcd_serializable", "stale": "etcd_serializable"}


def raftsql_reader(dsn: str, consistency: str):
    conn = driver_connect(dsn, consistency=consistency)
    cur = conn.cursor()

    def read(i: int) -> None:
        cur.execute("SELECT v FROM kv WHERE k = ?", (i % KEYS,))
        cur.fetchall()

    return read, conn.close


def sqlite_reader(path: str):
    import apsw

    db = apsw.Connection(path)

    def read(i: int) -> None:
        db.execute("SELECT v FROM kv WHERE k = ?", (i % KEYS,)).fetchall()

    return read, db.close


def etcd_reader(ec: EtcdCluster, member: str, serializable: bool):
    cl = EtcdClient(ec, member)

    def read(i: int) -> None:
        cl.get(f"k{i % KEYS}", serializable=serializable)

    return read, cl.close


def sequential(label: str, make, n: int) -> list[float]:
    read, close = make()
    lat = []
    with click.progressbar(range(n), label=f"{label}, 1 client", file=sys.stderr) as bar:
        for i in bar:
            t0 = time.perf_counter()
            read(i)
            lat.append(time.perf_counter() - t0)
    close()
    return lat


def concurrent(label: str, make, threads: int, seconds: float) -> dict:
    start = time.time() + 0.5
    lats, errors = timed_threads(threads, start, seconds, lambda _k: make(), while_running=lambda: wait_bar(
        f"{label}, {threads} clients", start + seconds))
    return {"threads": threads, "reads_per_s": round(len(lats) / seconds), "p50_ms": round(pct(lats, 50) * 1000, 3),
            "p99_ms": round(pct(lats, 99) * 1000, 3), "errors": errors}


def measure(doc: dict, key: str, make, reads: int, threads: int, seconds: float) -> None:
    label = key.replace("_", " ")
    doc["sequential"][key] = summary_ms(sequential(label, make, reads))
    doc["concurrent"][key] = concurrent(label, make, threads, seconds)


def sqlite_baseline(doc: dict, reads: int, threads: int, seconds: float) -> None:
    import apsw

    base = tmpdir("sqlite-reads-")
    try:
        path = str(base / "db.sqlite")
        db = apsw.Connection(path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
        with db:
            db.executemany("INSERT INTO kv VALUES (?, ?)", [(i, f"v{i}") for i in range(KEYS)])
        db.close()
        measure(doc, "sqlite_local", lambda: sqlite_reader(path), reads, threads, seconds)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def etcd_baseline(doc: dict, reads: int, threads: int, seconds: float) -> str | None:
    with etcd3("etcd-reads-") as (ec, why):
        if ec is None:
            return why
        leader = ec.leader()
        cl = EtcdClient(ec, leader)
        for i in range(KEYS):
            cl.put(f"k{i}", f"v{i}")
        cl.close()
        for ser in (False, True):
            key = "etcd_serializable" if ser else "etcd_linearizable"
            measure(doc, key, lambda ser=ser: etcd_reader(ec, leader, ser), reads, threads, seconds)
        return None


def _ratio(a: float | None, b: float | None) -> str:
    if not (a and b):
        return "n/a"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


@click.command()
@click.option("--quick", is_flag=True, help="300 reads per level, 3 s of concurrency (CI).")
@click.option("--reads", type=int, default=3000, show_default=True)
@click.option("--seconds", type=float, default=10.0, show_default=True)
@click.option("--threads", type=int, default=8, show_default=True)
@click.option("--no-etcd", is_flag=True, help="Skip the etcd baseline.")
@click.option("--name", default="reads", show_default=True)
def main(quick: bool, reads: int, seconds: float, threads: int, no_etcd: bool, name: str) -> None:
    if quick:
        name = name if name != "reads" else "reads-quick"
        reads, seconds = 300, 3.0
    doc = {"command": " ".join(["python", "benchmarks/reads.py", *sys.argv[1:]]), "machine": machine(),
           "sequential": {}, "concurrent": {}}
    sqlite_baseline(doc, reads, threads, seconds)
    skipped = "skipped: --no-etcd" if no_etcd else etcd_baseline(doc, reads, threads, seconds)
    if skipped:
        click.echo(f"etcd {skipped}", err=True)
        doc["etcd"] = skipped
    base = tmpdir("raftsql-reads-")
    c = raftsql_cluster(base, 3)
    try:
        conn = driver_connect(c.dsn)
        conn.cursor().execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
        conn.cursor().executemany("INSERT INTO kv VALUES (?, ?)", [(i, f"v{i}") for i in range(KEYS)])
        conn.close()
        for level in ("linearizable", "leader", "stale"):
            measure(doc, level, lambda level=level: raftsql_reader(c.dsn, level), reads, threads, seconds)
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    seq, conc = doc["sequential"], doc["concurrent"]
    sq = seq["sqlite_local"]
    rows = []
    for key, s in seq.items():
        cc = conc.get(key, {})
        peer = ETCD_PEER.get(key, key if key.startswith("etcd") else None)
        ps, pc = seq.get(peer, {}), conc.get(peer, {})
        label = f"raftsql {key}" if key in ETCD_PEER else key
        rows.append([label, s["p50_ms"], s["p99_ms"], _ratio(s["p50_ms"], ps.get("p50_ms")),
                     _ratio(s["p50_ms"], sq["p50_ms"]), cc.get("reads_per_s", ""), cc.get("p99_ms", ""),
                     _ratio(cc.get("reads_per_s"), pc.get("reads_per_s")),
                     _ratio(cc.get("reads_per_s"), conc["sqlite_local"]["reads_per_s"])])
    if skipped:
        rows.append([f"etcd: {skipped}", "", "", "", "", "", "", "", ""])
    table = md_table(["reads", "1 client p50 ms", "1 client p99 ms", "p50 vs etcd", "p50 vs sqlite",
                      f"{threads} clients reads/s", f"{threads} clients p99 ms", "reads/s vs etcd",
                      "reads/s vs sqlite"], rows)
    notes = ["'vs etcd' compares raftsql linearizable reads with etcd's linearizable range reads, and "
             "raftsql leader and stale reads with etcd's serializable (local) range reads; every client "
             "reads from the leader except raftsql stale, which the driver may send to any node.",
             f"{threads} clients are threads in one Python process, for every system alike."]
    doc["findings"] = notes
    table += "\n\n" + "\n".join(f"- {line}" for line in notes)
    click.echo(table)
    write_report(name, doc, table)
    reads_bars(name, doc)


if __name__ == "__main__":
    main()
