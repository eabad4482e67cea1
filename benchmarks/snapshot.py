"""Snapshots and log compaction: write latency while snapshots are being taken, and a node that
catches up through InstallSnapshot after missing many writes.

    python benchmarks/snapshot.py --quick                     # under 2 minutes
    python benchmarks/snapshot.py                             # full: 100 MB database
    python benchmarks/snapshot.py --catch-up-writes 100000    # a node catching up over 100,000 writes

Latency: a 3-node cluster, a prefilled database (so a snapshot copies real megabytes), then one
client doing sequential single-row INSERTs while every node snapshots every --snapshot-entries
entries. A status poller records when each node's snapshot copy ran (start = end - duration,
from the node's own clock), and each write is classed "during" if it overlapped any node's
copy (plus 20 ms for the fsync/rename tail and compaction), else "normal". Target: p99 during
<= 2x p99 normal.

Catch-up: a follower is killed, --catch-up-writes single-row writes (one log entry each, from
--clients concurrent clients) go to the other two, whose logs are compacted past what the
follower has; the follower restarts, must install a snapshot, and its content hash must equal
the leader's.

Writes benchmarks/results/snapshot[-quick].{json,md}.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time

import click
from _common import driver_connect, machine, md_table, summary_ms, tmpdir, write_report


def _cluster(base, env: dict[str, str]):
    from raftsql.testing.cluster import LocalCluster

    c = LocalCluster(base, 3, env=env)
    c.start()
    c.wait_leader(30)
    return c


class _SnapshotPoller:
    """Polls every node's status; collects (node, start, end) of each snapshot copy."""

    def __init__(self, cluster, period: float = 0.05):
        self.c = cluster
        self.period = period
        self.intervals: dict[tuple[str, int], tuple[float, float]] = {}
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for nid in self.c.ids:
                st = self.c.status(nid)
                s = (st or {}).get("snapshot") or {}
                if s.get("last_taken_at") and s.get("last_taken_ms") is not None:
                    end = s["last_taken_at"]
                    self.intervals[(nid, s["taken"])] = (end - s["last_taken_ms"] / 1000, end)
            self.stop.wait(self.period)

    def close(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.t.join()
        return sorted(self.intervals.values())


def bench_latency(prefill_mb: int, writes: int, snapshot_entries: int) -> dict:
    base = tmpdir("raftsql-snaplat-")
    env = {"RAFTSQL_SNAPSHOT_ENTRIES": str(snapshot_entries), "RAFTSQL_SNAPSHOT_TRAILING": "100"}
    c = _cluster(base, env)
    try:
        conn = driver_connect(c.dsn)
        cur = conn.cursor()
        cur.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        blob = "x" * 1000
        rows = prefill_mb * 1000
        with click.progressbar(range(0, rows, 500), label=f"prefill {prefill_mb} MB", file=sys.stderr) as bar:
            for _k in bar:  # 500 rows per log entry: prefilling is not what is measured
                cur.executemany("INSERT INTO t (v) VALUES (?)", [(blob,) for _ in range(500)])
        poller = _SnapshotPoller(c)
        samples: list[tuple[float, float]] = []  # (start unix time, seconds)
        with click.progressbar(range(writes), label="writes", file=sys.stderr) as bar:
            for i in bar:
                t_wall = time.time()
                t0 = time.perf_counter()
                cur.execute("INSERT INTO t (v) VALUES (?)", (f"value {i}",))
                samples.append((t_wall, time.perf_counter() - t0))
        time.sleep(0.3)
        intervals = poller.close()
        status = {nid: (c.status(nid) or {}).get("snapshot") for nid in c.ids}
        conn.close()
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    slack = 0.02
    during, normal = [], []
    for t, d in samples:
        hit = any(s - slack <= t + d and t <= e + slack for s, e in intervals)
        (during if hit else normal).append(d)
    copies = [round((e - s) * 1000, 1) for s, e in intervals]
    return {
        "prefill_mb": prefill_mb,
        "writes": writes,
        "snapshot_entries": snapshot_entries,
        "snapshots_seen": len(intervals),
        "snapshot_copy_ms": copies,
        "normal": summary_ms(normal),
        "during": summary_ms(during),
        "node_snapshot_status": status,
    }


def bench_catch_up(writes: int, clients: int, snapshot_entries: int, trailing: int) -> dict:
    base = tmpdir("raftsql-snapcatch-")
    env = {"RAFTSQL_SNAPSHOT_ENTRIES": str(snapshot_entries), "RAFTSQL_SNAPSHOT_TRAILING": str(trailing)}
    c = _cluster(base, env)
    try:
        leader = c.wait_leader(30)
        conn = driver_connect(c.dsn)
        conn.cursor().execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        c.hashes(60)
        follower = next(n for n in c.ids if n != leader)
        behind = c.status(follower)["applied_index"]
        c.kill(follower)
        errors: list[str] = []
        done = [0]
        lock = threading.Lock()

        def worker(k: int) -> None:
            wconn = driver_connect(c.dsn)
            wcur = wconn.cursor()
            for i in range(k, writes, clients):
                try:
                    wcur.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, f"row {i}"))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))
                with lock:
                    done[0] += 1
            wconn.close()

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        with click.progressbar(length=writes, label=f"{writes} writes, {follower} down", file=sys.stderr) as bar:
            seen = 0
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
                bar.update(done[0] - seen)
                seen = done[0]
        for t in threads:
            t.join()
        write_s = time.monotonic() - t0
        lst = c.status(c.wait_leader(30))
        t1 = time.monotonic()
        c.start(follower)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = c.status(follower)
            if st and st["snapshot"]["installed"] >= 1:
                break
            time.sleep(0.1)
        installed_s = time.monotonic() - t1
        hashes = c.hashes(120)
        caught_up_s = time.monotonic() - t1
        fst = c.status(follower)
        count = conn.cursor().execute("SELECT count(*) FROM t").fetchone()[0]
        conn.close()
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "writes": writes,
        "clients": clients,
        "entries_per_write": 1,
        "snapshot_entries": snapshot_entries,
        "trailing": trailing,
        "write_errors": len(errors),
        "write_s": round(write_s, 1),
        "writes_per_s": round(writes / write_s),
        "follower_applied_before": behind,
        "leader_snapshot_index": lst["snapshot_index"],
        "leader_last_index": lst["last_index"],
        "leader_snapshots_taken": lst["snapshot"]["taken"],
        "snapshot_size_bytes": lst["snapshot"]["current_size"],
        "follower_installed": fst["snapshot"]["installed"],
        "follower_installed_index": fst["snapshot"]["last_installed_index"],
        "install_after_restart_s": round(installed_s, 2),
        "hash_equal_after_restart_s": round(caught_up_s, 2),
        "rows": count,
        "hashes_equal": len(set(hashes.values())) == 1,
        "hashes": hashes,
    }


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes, under 2 minutes.")
@click.option("--prefill-mb", type=int, default=None, help="Database size before measuring (default 100; quick 20).")
@click.option("--writes", type=int, default=None, help="Measured writes (default 6000; quick 2500).")
@click.option("--snapshot-entries", type=int, default=None, help="Snapshot every N entries (default 1500; quick 800).")
@click.option("--catch-up-writes", type=int, default=None, help="Writes while a follower is down (default 20000; quick 3000).")
@click.option("--clients", type=int, default=8, show_default=True, help="Concurrent clients for the catch-up writes.")
@click.option("--skip-latency", is_flag=True)
@click.option("--skip-catch-up", is_flag=True)
def main(quick, prefill_mb, writes, snapshot_entries, catch_up_writes, clients, skip_latency, skip_catch_up):
    prefill_mb = prefill_mb or (20 if quick else 100)
    writes = writes or (2500 if quick else 6000)
    snapshot_entries = snapshot_entries or (800 if quick else 1500)
    catch_up_writes = catch_up_writes or (3000 if quick else 20000)
    name = "snapshot-quick" if quick else "snapshot"
    doc: dict = {"command": " ".join(["python benchmarks/snapshot.py", *sys.argv[1:]]), "machine": machine()}
    md = []
    if not skip_latency:
        lat = bench_latency(prefill_mb, writes, snapshot_entries)
        doc["latency"] = lat
        n, d = lat["normal"], lat["during"]
        ratio = d["p99_ms"] / n["p99_ms"] if d["n"] and n["n"] else float("nan")
        lat["p99_ratio"] = round(ratio, 2)
        lat["target_met"] = bool(ratio <= 2.0)
        md.append(f"## Write latency while snapshots are taken ({prefill_mb} MB database, 3 nodes)\n")
        md.append(md_table(
            ["writes", "n", "p50 ms", "p95 ms", "p99 ms", "max ms"],
            [[k, s["n"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"]] for k, s in (("normal", n), ("during a snapshot", d))],
        ))
        md.append(f"\n- {lat['snapshots_seen']} snapshot copies seen (all nodes), copy time ms: {lat['snapshot_copy_ms']}")
        md.append(f"- p99 during / p99 normal = {ratio:.2f} (target <= 2.0: {'met' if ratio <= 2.0 else 'NOT met'})\n")
    if not skip_catch_up:
        cu = bench_catch_up(catch_up_writes, clients, 500 if quick else 10000, 100 if quick else 5000)
        doc["catch_up"] = cu
        md.append(f"## Catch-up through a snapshot ({cu['writes']} writes while a follower was down)\n")
        md.append(md_table(["what", "value"], [[k, v] for k, v in cu.items() if k != "hashes"]))
        md.append(f"\n- hashes: {cu['hashes']}")
    table = "\n".join(md)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
