"""Memory per request: the peak RSS of every node (and of the driver) while a client iterates a
huge result, and while many large entries are written.

    python benchmarks/memory.py --quick     # 200 MB result, 20 entries of 3.9 MB (~1 minute)
    python benchmarks/memory.py             # 2 GB result, 100 entries of 3.9 MB

Read: one client iterates `SELECT x, zeroblob(ROW) FROM <N rows>` through raftsql.driver
(fetchmany), in rows of 1 MB and, separately, 8 rows of 50 MB (the hostile-client repro). A
sampler reads VmRSS of each node process from /proc every 20 ms; the table gives each node's RSS
before, its peak during, and the peak's rise, plus the driver's own peak rise.

Write: 100 executemany calls of 100 rows x 39 KB (one 3.9 MB log entry each), then RSS after.
The log keeps a bounded cache of recent entries (server/DESIGN.md), so RSS must not grow with
the number of entries written.

Writes benchmarks/results/memory[-quick].{json,md}.
"""

from __future__ import annotations

import resource
import shutil
import threading
import time

import click
from _common import driver_connect, machine, md_table, raftsql_cluster, tmpdir, write_report


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _Peak:
    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def __enter__(self):
        self.before = {n: _rss_mb(p) for n, p in self.pids.items()}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.driver0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            for n, p in self.pids.items():
                self.peak[n] = max(self.peak[n], _rss_mb(p))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.after = {n: _rss_mb(p) for n, p in self.pids.items()}
        self.driver_rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.driver0

    def rows(self, label: str) -> list[list]:
        return [[label, n, round(self.before[n]), round(self.peak[n]), round(self.after[n]),
                 round(self.peak[n] - self.before[n])] for n in sorted(self.pids)]


def _series(rows: int, row_bytes: int) -> str:
    return (f"SELECT x, zeroblob({row_bytes}) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
            f"SELECT x+1 FROM c WHERE x < {rows}) SELECT x FROM c)")


@click.command()
@click.option("--quick", is_flag=True, help="A 200 MB result and 20 entries (about a minute).")
@click.option("--result-mb", type=int, default=None, help="Size of the big result (MB).")
@click.option("--entries", type=int, default=None, help="Number of 3.9 MB entries to write.")
def main(quick: bool, result_mb: int | None, entries: int | None) -> None:
    result_mb = result_mb or (200 if quick else 2000)
    entries = entries or (20 if quick else 100)
    m = machine()
    base = tmpdir("raftsql-bench-memory-")
    cluster = raftsql_cluster(base, 3)
    table: list[list] = []
    doc: dict = {"command": "python benchmarks/memory.py" + (" --quick" if quick else ""),
                 "machine": m, "result_mb": result_mb, "entries": entries}
    try:
        pids = {n: cluster.procs[n].pid for n in cluster.ids}
        leader = cluster.wait_leader()
        term0 = cluster.status(leader)["term"]
        conn = driver_connect(cluster.dsn, timeout=120)
        for label, q, fetch in (
            (f"iterate {result_mb} MB in 1 MB rows", _series(result_mb, 1_000_000), 4),
            ("iterate 8 rows of 50 MB (400 MB)", _series(8, 50_000_000), 1),
        ):
            t0 = time.monotonic()
            n = 0
            with _Peak(pids) as peak:
                cur = conn.execute(q)
                while True:
                    got = cur.fetchmany(fetch)
                    if not got:
                        break
                    n += len(got)
            secs = time.monotonic() - t0
            table += peak.rows(label)
            table.append([label, "driver", "", "", "", round(peak.driver_rise)])
            doc[label] = {"rows": n, "seconds": round(secs, 1), "peak_mb": peak.peak,
                          "before_mb": peak.before, "driver_rise_mb": round(peak.driver_rise)}
            click.echo(f"{label}: {n} rows in {secs:.1f} s", err=True)
        conn.execute("CREATE TABLE bulk(v BLOB)")
        blob = b"x" * 39_000
        label = f"write {entries} entries of 3.9 MB"
        t0 = time.monotonic()
        with _Peak(pids) as peak:
            for _ in range(entries):
                conn.executemany("INSERT INTO bulk VALUES(?)", [(blob,)] * 100)
            time.sleep(1.0)  # let followers apply the last ones
        table += peak.rows(label)
        doc[label] = {"seconds": round(time.monotonic() - t0, 1), "peak_mb": peak.peak,
                      "before_mb": peak.before, "after_mb": peak.after}
        doc["term_before"], doc["term_after"] = term0, cluster.status(cluster.wait_leader())["term"]
        conn.close()
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    headers = ["workload", "process", "RSS before MB", "peak MB", "after MB", "peak rise MB"]
    md = md_table(headers, table)
    md += f"\n\nTerm before {doc['term_before']}, after {doc['term_after']}.\n"
    click.echo(md)
    write_report("memory-quick" if quick else "memory", doc, md)


if __name__ == "__main__":
    main()
