"""Write latency: one client, sequential single-row INSERTs through the driver, on clusters of
1, 3 and 5 nodes, next to a local SQLite file (synchronous=FULL) and a 3-member etcd, all in
the same invocation and measured the same way.

    python benchmarks/latency.py --quick     # ~1 minute
    python benchmarks/latency.py --writes 5000
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
    machine,
    md_table,
    raftsql_cluster,
    summary_ms,
    tmpdir,
    write_report,
)


def bench_raftsql(nodes: int, writes: int, warmup: int) -> list[float]:
    base = tmpdir(f"raftsql-lat{nodes}-")
    c = raftsql_cluster(base, nodes)
    try:
        conn = driver_connect(c.dsn)
        cur = conn.cursor()
        cur.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        lat = []
        with click.progressbar(range(warmup + writes), label=f"raftsql {nodes} node(s)", file=sys.stderr) as bar:
            for i in bar:
                t0 = time.perf_counter()
                cur.execute("INSERT INTO t (v) VALUES (?)", (f"value {i}",))
                if i >= warmup:
                    lat.append(time.perf_counter() - t0)
        conn.close()
        return lat
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)


def bench_sqlite(writes: int, warmup: int) -> list[float]:
    import apsw

    base = tmpdir("sqlite-lat-")
    try:
        db = apsw.Connection(str(base / "db.sqlite"))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        lat = []
        for i in range(warmup + writes):
            t0 = time.perf_counter()
            with db:
                db.execute("INSERT INTO t (v) VALUES (?)", (f"value {i}",))
            if i >= warmup:
                lat.append(time.perf_counter() - t0)
        db.close()
        return lat
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_etcd(writes: int, warmup: int) -> list[float] | str:
    base = tmpdir("etcd-lat-")
    try:
        try:
            ec = EtcdCluster(base, 3)
        except RuntimeError as e:
            return f"skipped: {e}"
        ec.start()
        try:
            ec.wait_ready()
            cl = EtcdClient(ec, ec.leader())
            lat = []
            with click.progressbar(range(warmup + writes), label="etcd 3 members", file=sys.stderr) as bar:
                for i in bar:
                    t0 = time.perf_counter()
                    cl.put(f"k{i}", f"value {i}")
                    if i >= warmup:
                        lat.append(time.perf_counter() - t0)
            return lat
        finally:
            ec.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@click.command()
@click.option("--quick", is_flag=True, help="300 writes per system (CI).")
@click.option("--writes", type=int, default=3000, show_default=True)
@click.option("--nodes", "node_counts", multiple=True, type=int, help="Cluster sizes (default 1, 3, 5).")
@click.option("--name", default="latency", show_default=True, help="Result file name under benchmarks/results/.")
def main(quick: bool, writes: int, node_counts: tuple[int, ...], name: str) -> None:
    if quick:
        name = name if name != "latency" else "latency-quick"
        writes = 300
    warmup = max(20, writes // 20)
    node_counts = node_counts or (1, 3, 5)
    doc = {"command": " ".join(["python", "benchmarks/latency.py", *sys.argv[1:]]), "machine": machine(), "results": {}}
    res = doc["results"]
    res["sqlite_full"] = summary_ms(bench_sqlite(writes, warmup))
    etcd = bench_etcd(writes, warmup)
    res["etcd_3"] = etcd if isinstance(etcd, str) else summary_ms(etcd)
    for n in node_counts:
        res[f"raftsql_{n}"] = summary_ms(bench_raftsql(n, writes, warmup))
    base_etcd = res["etcd_3"] if isinstance(res["etcd_3"], dict) else None
    rows = []
    for key, s in res.items():
        if isinstance(s, str):
            rows.append([key, s, "", "", "", "", ""])
            continue
        vs_etcd = f"{s['p50_ms'] / base_etcd['p50_ms']:.2f}x" if base_etcd else "n/a"
        vs_sqlite = f"{s['p50_ms'] / res['sqlite_full']['p50_ms']:.1f}x"
        rows.append([key, s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"], vs_etcd, vs_sqlite])
    table = md_table(["system", "p50 ms", "p95 ms", "p99 ms", "max ms", "p50 vs etcd", "p50 vs sqlite FULL"], rows)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
