"""Write latency: one client, sequential single-row INSERTs through the driver, on clusters of
1, 3 and 5 nodes, next to a local SQLite file (synchronous=FULL) and a 3-member etcd, all in
the same invocation and measured the same way. With 3 nodes it also measures writes at
durability="leader" (answered once the leader's disk holds them: raftsql_3_leader).

    python benchmarks/latency.py --quick     # under a minute
    python benchmarks/latency.py --writes 2000

Writes benchmarks/results/latency[-quick].{json,md,png}; the PNG (a latency CDF per system)
needs the optional `plots` extra.
"""

from __future__ import annotations

import shutil
import sys
import time

import click
from _common import (
    EtcdClient,
    driver_connect,
    etcd3,
    machine,
    md_table,
    raftsql_cluster,
    summary_ms,
    tmpdir,
    write_report,
)
from _plots import latency_cdf


def bench_raftsql(nodes: int, writes: int, warmup: int, durability: str = "quorum") -> list[float]:
    base = tmpdir(f"raftsql-lat{nodes}-")
    c = raftsql_cluster(base, nodes)
    try:
        conn = driver_connect(c.dsn)
        conn.durability = durability
        cur = conn.cursor()
        cur.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        lat = []
        label = f"raftsql {nodes} node(s)" + (f", durability={durability}" if durability != "quorum" else "")
        with click.progressbar(range(warmup + writes), label=label, file=sys.stderr) as bar:
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
    with etcd3("etcd-lat-") as (ec, why):
        if ec is None:
            return why
        cl = EtcdClient(ec, ec.leader())
        lat = []
        with click.progressbar(range(warmup + writes), label="etcd 3 members", file=sys.stderr) as bar:
            for i in bar:
                t0 = time.perf_counter()
                cl.put(f"k{i}", f"value {i}")
                if i >= warmup:
                    lat.append(time.perf_counter() - t0)
        return lat


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
    raw: dict[str, list[float]] = {}
    click.echo("sqlite FULL ...", err=True)
    raw["sqlite_full"] = bench_sqlite(writes, warmup)
    res["sqlite_full"] = summary_ms(raw["sqlite_full"])
    etcd = bench_etcd(writes, warmup)
    if isinstance(etcd, str):
        click.echo(f"etcd {etcd}", err=True)
        res["etcd_3"] = etcd
    else:
        raw["etcd_3"] = etcd
        res["etcd_3"] = summary_ms(etcd)
    for n in node_counts:
        raw[f"raftsql_{n}"] = bench_raftsql(n, writes, warmup)
        res[f"raftsql_{n}"] = summary_ms(raw[f"raftsql_{n}"])
        if n == 3:
            raw["raftsql_3_leader"] = bench_raftsql(3, writes, warmup, durability="leader")
            res["raftsql_3_leader"] = summary_ms(raw["raftsql_3_leader"])
    base_etcd = res["etcd_3"] if isinstance(res["etcd_3"], dict) else None
    base_sqlite = res["sqlite_full"]
    rows = []
    for key, s in res.items():
        if isinstance(s, str):
            rows.append([key, s, "", "", "", "", "", ""])
            continue
        vs_etcd = [f"{s[k] / base_etcd[k]:.2f}x" if base_etcd else "n/a" for k in ("p50_ms", "p99_ms")]
        vs_sqlite = f"{s['p50_ms'] / base_sqlite['p50_ms']:.1f}x"
        rows.append([key, s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"], *vs_etcd, vs_sqlite])
    table = md_table(["system", "p50 ms", "p95 ms", "p99 ms", "max ms", "p50 vs etcd", "p99 vs etcd",
                      "p50 vs sqlite FULL"], rows)
    notes = claim_3_vs_5(res) + targets(res) + leader_durability(res)
    doc["findings"] = notes
    table += "\n\n" + "\n".join(f"- {line}" for line in notes)
    click.echo(table)
    write_report(name, doc, table)
    latency_cdf(name, {k.replace("_", " "): v for k, v in raw.items()}, doc["machine"])


def leader_durability(res: dict) -> list[str]:
    lead, quorum, etcd = res.get("raftsql_3_leader"), res.get("raftsql_3"), res.get("etcd_3")
    if not isinstance(lead, dict) or not isinstance(quorum, dict):
        return []
    line = (f"3 nodes, durability=leader: p50 {lead['p50_ms']} ms, p99 {lead['p99_ms']} ms = "
            f"{lead['p50_ms'] / quorum['p50_ms']:.2f}x / {lead['p99_ms'] / quorum['p99_ms']:.2f}x "
            "of durability=quorum")
    if isinstance(etcd, dict):
        line += (f", {lead['p50_ms'] / etcd['p50_ms']:.2f}x / {lead['p99_ms'] / etcd['p99_ms']:.2f}x "
                 "of etcd")
    return [line + " (p50 / p99)."]


def claim_3_vs_5(res: dict) -> list[str]:
    """The seed document claims more nodes give a lower 95th percentile: say how it came out."""
    three, five = res.get("raftsql_3"), res.get("raftsql_5")
    if not (isinstance(three, dict) and isinstance(five, dict)):
        return ["Claim '5 nodes give a lower p95 than 3': not measured (run with --nodes 3 --nodes 5)."]
    ratio = five["p95_ms"] / three["p95_ms"]
    verdict = "holds" if five["p95_ms"] < three["p95_ms"] else "does not hold"
    return [f"Claim '5 nodes give a lower p95 than 3' {verdict} in this run: p95 {five['p95_ms']} ms on "
            f"5 nodes against {three['p95_ms']} ms on 3 ({ratio:.2f}x); p50 {five['p50_ms']} against "
            f"{three['p50_ms']} ms."]


def targets(res: dict) -> list[str]:
    three, etcd = res.get("raftsql_3"), res.get("etcd_3")
    if not isinstance(three, dict):
        return []
    out = [f"Target 3-node p50 <= 1.0 ms: {'met' if three['p50_ms'] <= 1.0 else 'NOT met'} "
           f"({three['p50_ms']} ms)."]
    if isinstance(etcd, dict):
        r = three["p50_ms"] / etcd["p50_ms"]
        out.append(f"Target 3-node p50 <= 0.6x etcd p50: {'met' if r <= 0.6 else 'NOT met'} ({r:.2f}x, "
                   f"etcd p50 {etcd['p50_ms']} ms).")
    else:
        out.append("Target 3-node p50 <= 0.6x etcd p50: not measured (etcd skipped).")
    return out


if __name__ == "__main__":
    main()
