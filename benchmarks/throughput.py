"""Write throughput against concurrency (1, 8, 64 clients) and batched writes (1,000 rows per
entry), on a 3-node cluster, next to plain SQLite (synchronous=FULL) run the same way.

Clients are spread over worker processes (threads within each) so that the client side's own
Python work does not serialize on one GIL.

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --seconds 20
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sys
import threading
import time

import click
from _common import driver_connect, machine, md_table, pct, raftsql_cluster, tmpdir, write_report


def _worker(dsn: str, threads: int, seconds: float, start_at: float, out: mp.Queue, tag: int) -> None:
    lats: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def run(k: int) -> None:
        conn = driver_connect(dsn)
        cur = conn.cursor()
        mine = []
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        i = 0
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                cur.execute("INSERT INTO t (v) VALUES (?)", (f"{tag}-{k}-{i}",))
                mine.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - counted, reported
                with lock:
                    errors[0] += 1
            i += 1
        conn.close()
        with lock:
            lats.extend(mine)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((lats, errors[0]))


def concurrent_writes(dsn: str, clients: int, seconds: float) -> dict:
    procs_n = 1 if clients == 1 else min(4, clients)
    per = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    q: mp.Queue = mp.Queue()
    start_at = time.time() + 1.5
    ps = [mp.Process(target=_worker, args=(dsn, n, seconds, start_at, q, i)) for i, n in enumerate(per)]
    for p in ps:
        p.start()
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


def batched(dsn: str, seconds: float, rows_per_entry: int = 1000) -> dict:
    conn = driver_connect(dsn)
    cur = conn.cursor()
    rows = 0
    entries = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        cur.executemany("INSERT INTO b (v) VALUES (?)", [(f"r{rows + j}",) for j in range(rows_per_entry)])
        rows += rows_per_entry
        entries += 1
    took = time.perf_counter() - t0
    conn.close()
    return {"rows_per_entry": rows_per_entry, "rows_per_s": round(rows / took), "entries": entries}


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
@click.option("--name", default="throughput", show_default=True)
def main(quick: bool, seconds: float, client_counts: tuple[int, ...], name: str) -> None:
    if quick:
        name = name if name != "throughput" else "throughput-quick"
        seconds = 3.0
    client_counts = client_counts or (1, 8, 64)
    doc = {"command": " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]), "machine": machine()}
    doc["sqlite_full"] = sqlite_baseline(seconds)
    base = tmpdir("raftsql-tp-")
    c = raftsql_cluster(base, 3)
    try:
        conn = driver_connect(c.dsn)
        conn.cursor().execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.cursor().execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT)")
        conn.close()
        doc["concurrency"] = []
        for n in client_counts:
            click.echo(f"{n} client(s) for {seconds:.0f}s ...", err=True)
            doc["concurrency"].append(concurrent_writes(c.dsn, n, seconds))
        click.echo("batched writes ...", err=True)
        doc["batched"] = batched(c.dsn, seconds)
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    s = doc["sqlite_full"]
    rows = [[f"raftsql 3 nodes, {r['clients']} client(s)", r["writes_per_s"], r["p50_ms"], r["p99_ms"], r["errors"],
             f"{r['writes_per_s'] / s['writes_per_s']:.2f}x"] for r in doc["concurrency"]]
    rows.append(["sqlite FULL, 1 writer", s["writes_per_s"], "", "", "", "1.00x"])
    b = doc["batched"]
    rows.append([f"raftsql batched ({b['rows_per_entry']} rows/entry), rows/s", b["rows_per_s"], "", "", "",
                 f"{b['rows_per_s'] / s['batched_rows_per_s']:.2f}x of sqlite batched"])
    rows.append(["sqlite FULL batched, rows/s", s["batched_rows_per_s"], "", "", "", ""])
    table = md_table(["workload", "writes/s (or rows/s)", "p50 ms", "p99 ms", "errors", "vs sqlite FULL"], rows)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
