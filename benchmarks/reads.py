"""Read latency and throughput at each consistency level on a 3-node cluster: linearizable
(ReadIndex, one quorum round shared by concurrent reads), leader (local state of the leader),
stale (any node, with the client's last write index as min_index). Baseline: the same SELECT
on a local SQLite file.

    python benchmarks/reads.py --quick
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

import click
from _common import (
    driver_connect,
    machine,
    md_table,
    pct,
    raftsql_cluster,
    summary_ms,
    tmpdir,
    write_report,
)


def sequential(dsn: str, consistency: str, n: int) -> list[float]:
    conn = driver_connect(dsn, consistency=consistency)
    cur = conn.cursor()
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        cur.execute("SELECT v FROM kv WHERE k = ?", (i % 100,))
        cur.fetchall()
        lat.append(time.perf_counter() - t0)
    conn.close()
    return lat


def concurrent(dsn: str, consistency: str, threads: int, seconds: float) -> dict:
    lats: list[float] = []
    lock = threading.Lock()
    start = time.time() + 0.5

    def run() -> None:
        conn = driver_connect(dsn, consistency=consistency)
        cur = conn.cursor()
        mine = []
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < start + seconds:
            t0 = time.perf_counter()
            cur.execute("SELECT v FROM kv WHERE k = ?", (len(mine) % 100,))
            cur.fetchall()
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            lats.extend(mine)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"threads": threads, "reads_per_s": round(len(lats) / seconds), "p50_ms": round(pct(lats, 50) * 1000, 3),
            "p99_ms": round(pct(lats, 99) * 1000, 3)}


def sqlite_baseline(n: int) -> list[float]:
    import apsw

    base = tmpdir("sqlite-reads-")
    try:
        db = apsw.Connection(str(base / "db.sqlite"))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
        with db:
            db.executemany("INSERT INTO kv VALUES (?, ?)", [(i, f"v{i}") for i in range(100)])
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            db.execute("SELECT v FROM kv WHERE k = ?", (i % 100,)).fetchall()
            lat.append(time.perf_counter() - t0)
        db.close()
        return lat
    finally:
        shutil.rmtree(base, ignore_errors=True)


@click.command()
@click.option("--quick", is_flag=True, help="300 reads per level, 3 s of concurrency (CI).")
@click.option("--reads", type=int, default=3000, show_default=True)
@click.option("--seconds", type=float, default=10.0, show_default=True)
@click.option("--threads", type=int, default=8, show_default=True)
@click.option("--name", default="reads", show_default=True)
def main(quick: bool, reads: int, seconds: float, threads: int, name: str) -> None:
    if quick:
        name = name if name != "reads" else "reads-quick"
        reads, seconds = 300, 3.0
    doc = {"command": " ".join(["python", "benchmarks/reads.py", *sys.argv[1:]]), "machine": machine(),
           "sequential": {}, "concurrent": {}}
    doc["sequential"]["sqlite_local"] = summary_ms(sqlite_baseline(reads))
    base = tmpdir("raftsql-reads-")
    c = raftsql_cluster(base, 3)
    try:
        conn = driver_connect(c.dsn)
        conn.cursor().execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
        conn.cursor().executemany("INSERT INTO kv VALUES (?, ?)", [(i, f"v{i}") for i in range(100)])
        conn.close()
        for level in ("linearizable", "leader", "stale"):
            click.echo(f"{level} ...", err=True)
            doc["sequential"][level] = summary_ms(sequential(c.dsn, level, reads))
            doc["concurrent"][level] = concurrent(c.dsn, level, threads, seconds)
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for level, s in doc["sequential"].items():
        conc = doc["concurrent"].get(level, {})
        rows.append([level, s["p50_ms"], s["p99_ms"], conc.get("reads_per_s", ""), conc.get("p99_ms", "")])
    table = md_table(["level", "1 client p50 ms", "1 client p99 ms", f"{threads} clients reads/s",
                      f"{threads} clients p99 ms"], rows)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
