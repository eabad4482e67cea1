"""Write throughput against concurrency (1, 8, 64 clients) and batched writes (1,000 rows per
entry, executemany, from 1 and from 4 writer processes), on a 3-node cluster, next to a 3-member etcd (puts, same client counts) and plain SQLite
(synchronous=FULL), all run the same way in the same invocation.

Clients are spread over worker processes (threads within each) so that the client side's own
Python work does not serialize on one GIL.

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --seconds 15

Writes benchmarks/results/throughput[-quick].{json,md,png} (PNG with the `plots` extra).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sys
import time
from types import SimpleNamespace

import click
from _common import (
    EtcdClient,
    driver_connect,
    etcd3,
    machine,
    md_table,
    pct,
    raftsql_cluster,
    timed_threads,
    tmpdir,
    wait_bar,
    write_report,
)
from _plots import throughput_bars

BATCH_WRITERS = 4  # concurrent batch writers (processes) of the pipelined batched run


def _connect(target):
    """A raftsql cursor for a DSN, or an etcd client for a {name: client port} map of the leader."""
    if isinstance(target, str):
        conn = driver_connect(target)
        cur = conn.cursor()
        return lambda v: cur.execute("INSERT INTO t (v) VALUES (?)", (v,)), conn.close
    name, port = next(iter(target.items()))
    cl = EtcdClient(SimpleNamespace(names=[name], client_ports={name: port}), name)
    return lambda v: cl.put(f"k/{v}", v), cl.close


def _worker(target, threads: int, seconds: float, start_at: float, out: mp.Queue, tag: int) -> None:
    def make(k: int):
        write, close = _connect(target)
        return (lambda i: write(f"{tag}-{k}-{i}")), close

    # Wall clock: the start time is shared by several worker processes.
    out.put(timed_threads(threads, start_at, seconds, make))


def concurrent_writes(target, clients: int, seconds: float, label: str) -> dict:
    procs_n = 1 if clients == 1 else min(4, clients)
    per = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 1.5
    ps = [mp.Process(target=_worker, args=(target, n, seconds, start_at, q, i)) for i, n in enumerate(per)]
    for p in ps:
        p.start()
    wait_bar(f"{label}, {clients} client(s)", start_at + seconds)
    lats: list[float] = []
    errors = 0
    for _ in ps:
        got, err = q.get()
        lats.extend(got)
        errors += err
    for p in ps:
        p.join()
    return {"clients": clients, "writes_per_s": round(len(lats) / seconds), "p50_ms": round(pct(lats, 50) * 1000, 2),
            "p99_ms": round(pct(lats, 99) * 1000, 2), "errors": errors, "n": len(lats)}


def _batch_worker(dsn: str, seconds: float, start_at: float, rows_per_entry: int, tag: int,
                  out: mp.Queue) -> None:
    conn = driver_connect(dsn)
    cur = conn.cursor()
    rows = 0
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cur.executemany("INSERT INTO b (v) VALUES (?)", [(f"r{tag}-{rows + j}",) for j in range(rows_per_entry)])
        rows += rows_per_entry
    out.put((rows, time.perf_counter() - t0))
    conn.close()


def batched(dsn: str, seconds: float, writers: int = 1, rows_per_entry: int = 1000) -> dict:
    """executemany of rows_per_entry rows (one entry each) in a loop, from `writers` processes."""
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 1.5
    ps = [mp.Process(target=_batch_worker, args=(dsn, seconds, start_at, rows_per_entry, i, q))
          for i in range(writers)]
    for p in ps:
        p.start()
    wait_bar(f"raftsql batched, {rows_per_entry} rows/write, {writers} writer(s)", start_at + seconds)
    got = [q.get() for _ in ps]
    for p in ps:
        p.join()
    rows = sum(r for r, _ in got)
    took = max(t for _, t in got)
    return {"rows_per_entry": rows_per_entry, "writers": writers, "rows_per_s": round(rows / took),
            "entries": rows // rows_per_entry}


def etcd_concurrency(client_counts, seconds: float) -> list[dict] | str:
    with etcd3("etcd-tp-") as (ec, why):
        if ec is None:
            return why
        leader = ec.leader()
        target = {leader: ec.client_ports[leader]}
        return [concurrent_writes(target, n, seconds, "etcd 3 members") for n in client_counts]


def sqlite_baseline(seconds: float, rows_per_entry: int = 1000) -> dict:
    import apsw

    base = tmpdir("sqlite-tp-")
    try:
        db = apsw.Connection(str(base / "db.sqlite"))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            with db:
                db.execute("INSERT INTO t (v) VALUES (?)", (f"v{n}",))
            n += 1
        single = n / (time.perf_counter() - t0)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            with db:
                db.executemany("INSERT INTO t (v) VALUES (?)", [(f"b{n + j}",) for j in range(rows_per_entry)])
            n += rows_per_entry
        rows = n / (time.perf_counter() - t0)
        db.close()
        return {"writes_per_s": round(single), "batched_rows_per_s": round(rows)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@click.command()
@click.option("--quick", is_flag=True, help="3 s per measurement (CI).")
@click.option("--seconds", type=float, default=15.0, show_default=True)
@click.option("--clients", "client_counts", multiple=True, type=int, help="Default 1, 8, 64.")
@click.option("--no-etcd", is_flag=True, help="Skip the etcd baseline.")
@click.option("--name", default="throughput", show_default=True)
def main(quick: bool, seconds: float, client_counts: tuple[int, ...], no_etcd: bool, name: str) -> None:
    if quick:
        name = name if name != "throughput" else "throughput-quick"
        seconds = 3.0
    client_counts = client_counts or (1, 8, 64)
    doc = {"command": " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]), "machine": machine()}
    click.echo("sqlite FULL ...", err=True)
    doc["sqlite_full"] = sqlite_baseline(seconds)
    doc["etcd_concurrency"] = "skipped: --no-etcd" if no_etcd else etcd_concurrency(client_counts, seconds)
    if isinstance(doc["etcd_concurrency"], str):
        click.echo(f"etcd {doc['etcd_concurrency']}", err=True)
    base = tmpdir("raftsql-tp-")
    c = raftsql_cluster(base, 3)
    try:
        conn = driver_connect(c.dsn)
        conn.cursor().execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.cursor().execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT)")
        conn.close()
        doc["concurrency"] = [concurrent_writes(c.dsn, n, seconds, "raftsql 3 nodes") for n in client_counts]
        # One writer (each entry waits for the previous one), and four (entries pipelined).
        runs = [batched(c.dsn, seconds, writers) for writers in (1, BATCH_WRITERS)]
        doc["batched"] = max(runs, key=lambda r: r["rows_per_s"])
        doc["batched_runs"] = runs
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    s = doc["sqlite_full"]
    etcd = {r["clients"]: r for r in doc["etcd_concurrency"]} if isinstance(doc["etcd_concurrency"], list) else {}
    rows = []
    for r in doc["concurrency"]:
        e = etcd.get(r["clients"])
        rows.append([f"raftsql 3 nodes, {r['clients']} client(s)", r["writes_per_s"], r["p50_ms"], r["p99_ms"],
                     r["errors"], f"{r['writes_per_s'] / e['writes_per_s']:.2f}x" if e else "n/a",
                     f"{r['p99_ms'] / e['p99_ms']:.2f}x" if e else "n/a",
                     f"{r['writes_per_s'] / s['writes_per_s']:.2f}x"])
    for r in etcd.values():
        rows.append([f"etcd 3 members, {r['clients']} client(s)", r["writes_per_s"], r["p50_ms"], r["p99_ms"],
                     r["errors"], "1.00x", "1.00x", f"{r['writes_per_s'] / s['writes_per_s']:.2f}x"])
    if not etcd:
        rows.append([f"etcd 3 members: {doc['etcd_concurrency']}", "", "", "", "", "", "", ""])
    rows.append(["sqlite FULL, 1 writer", s["writes_per_s"], "", "", "", "", "", "1.00x"])
    for b in doc.get("batched_runs", [doc["batched"]]):
        rows.append([f"raftsql batched ({b['rows_per_entry']} rows/write, {b.get('writers', 1)} writer(s)), rows/s",
                     b["rows_per_s"], "", "", "", "", "",
                     f"{b['rows_per_s'] / s['batched_rows_per_s']:.2f}x of sqlite batched"])
    rows.append(["sqlite FULL batched, rows/s", s["batched_rows_per_s"], "", "", "", "", "", "1.00x"])
    table = md_table(["workload", "writes/s (or rows/s)", "p50 ms", "p99 ms", "errors", "writes/s vs etcd",
                      "p99 vs etcd", "vs sqlite FULL"], rows)
    notes = targets(doc)
    doc["findings"] = notes
    table += "\n\n" + "\n".join(f"- {line}" for line in notes)
    click.echo(table)
    write_report(name, doc, table)
    throughput_bars(name, doc)


def targets(doc: dict) -> list[str]:
    out = []
    top = max(doc["concurrency"], key=lambda r: r["clients"])
    if top["clients"] >= 64:
        out.append(f"Target 64 clients >= 5,000 writes/s: {'met' if top['writes_per_s'] >= 5000 else 'NOT met'} "
                   f"({top['writes_per_s']:,} writes/s with {top['clients']} clients).")
    b = doc["batched"]["rows_per_s"]
    out.append(f"Target batched >= 100,000 rows/s: {'met' if b >= 100_000 else 'NOT met'} ({b:,} rows/s, "
               f"best of 1 and {BATCH_WRITERS} writers).")
    return out


if __name__ == "__main__":
    main()
