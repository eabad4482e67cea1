"""Bank-transfer throughput in serializable interactive transactions, next to plain autocommit
single-row writes measured in the same run, on a 3-node cluster.

A transfer is BEGIN; SELECT two balances; UPDATE both (absolute values); INSERT a log row;
COMMIT: five statements on the leader (two reads, three previews) plus one log entry. Conflicts
(SerializationError) are retried and counted; the ratio is committed transfers/s divided by
autocommit single-row INSERTs/s with the same number of client threads.

    python benchmarks/bank.py --quick          # < 2 min, writes results/bank-quick.{json,md}
    python benchmarks/bank.py --seconds 20     # writes results/bank.{json,md}
"""

from __future__ import annotations

import random
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
    timed_threads,
    tmpdir,
    write_report,
)


def _transfers(dsn: str, threads: int, seconds: float, accounts: int) -> dict:
    import raftsql.driver as db

    lats: list[float] = []
    counts = {"committed": 0, "conflicts": 0, "aborted": 0, "errors": 0}
    lock = threading.Lock()
    start_at = time.monotonic() + 1.0

    def run(k: int) -> None:
        rng = random.Random(k)
        conn = driver_connect(dsn, timeout=20)
        mine: list[float] = []
        local = dict.fromkeys(counts, 0)
        while time.monotonic() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        while time.monotonic() < end:
            src, dst = rng.sample(range(accounts), 2)
            t0 = time.perf_counter()
            while time.monotonic() < end:  # retry one transfer until it commits
                try:
                    conn.execute("BEGIN")
                    a = conn.execute("SELECT bal FROM acct WHERE id = ?", (src,)).fetchone()[0]
                    b = conn.execute("SELECT bal FROM acct WHERE id = ?", (dst,)).fetchone()[0]
                    amount = min(a, rng.randint(1, 10))
                    conn.execute("UPDATE acct SET bal = ? WHERE id = ?", (a - amount, src))
                    conn.execute("UPDATE acct SET bal = ? WHERE id = ?", (b + amount, dst))
                    conn.execute("INSERT INTO log (src, dst, amount) VALUES (?, ?, ?)", (src, dst, amount))
                    conn.execute("COMMIT")
                    local["committed"] += 1
                    mine.append(time.perf_counter() - t0)
                    break
                except db.SerializationError:
                    local["conflicts"] += 1
                    conn.rollback()
                except db.TransactionAborted:
                    local["aborted"] += 1
                    conn.rollback()
                except db.Error:
                    local["errors"] += 1
                    conn.rollback()
        conn.close()
        with lock:
            lats.extend(mine)
            for key, v in local.items():
                counts[key] += v

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"threads": threads, "transfers_per_s": round(counts["committed"] / seconds, 1), **counts,
            "p50_ms": round(pct(lats, 50) * 1000, 2), "p99_ms": round(pct(lats, 99) * 1000, 2)}


def _autocommit_writes(dsn: str, threads: int, seconds: float) -> dict:
    def make(k: int):
        conn = driver_connect(dsn, timeout=20)
        cur = conn.cursor()
        return (lambda i: cur.execute("INSERT INTO plain (v) VALUES (?)", (f"{k}-{i}",))), conn.close

    lats, errors = timed_threads(threads, time.monotonic() + 1.0, seconds, make, clock=time.monotonic)
    return {"threads": threads, "writes_per_s": round(len(lats) / seconds, 1), "errors": errors,
            "p50_ms": round(pct(lats, 50) * 1000, 2), "p99_ms": round(pct(lats, 99) * 1000, 2)}


@click.command()
@click.option("--quick", is_flag=True, help="a short run (< 2 min); writes bank-quick.*")
@click.option("--seconds", default=15.0, show_default=True, help="length of each measurement")
@click.option("--threads", "thread_counts", default="4,8", show_default=True,
              help="client thread counts, comma-separated")
@click.option("--accounts", default=100, show_default=True, help="number of accounts")
def main(quick: bool, seconds: float, thread_counts: str, accounts: int) -> None:
    """Transfers/s in serializable transactions vs autocommit single-row writes/s."""
    counts = [int(x) for x in thread_counts.split(",") if x.strip()]
    if quick:
        seconds, counts = min(seconds, 8.0), [4]
    info = machine()
    base = tmpdir("raftsql-bench-bank-")
    cluster = raftsql_cluster(base / "cluster", 3)
    rows_out = []
    runs = []
    try:
        setup = driver_connect(cluster.dsn, timeout=20)
        setup.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)")
        setup.executemany("INSERT INTO acct VALUES (?, ?)", [(i, 1000) for i in range(accounts)])
        setup.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)")
        setup.execute("CREATE TABLE plain (id INTEGER PRIMARY KEY, v TEXT)")
        for n in counts:
            bank = _transfers(cluster.dsn, n, seconds, accounts)
            total = setup.execute("SELECT sum(bal) FROM acct").fetchone()[0]
            plain = _autocommit_writes(cluster.dsn, n, seconds)
            ratio = bank["transfers_per_s"] / plain["writes_per_s"] if plain["writes_per_s"] else float("nan")
            run = {"threads": n, "bank": bank, "autocommit": plain, "ratio": round(ratio, 3),
                   "total_ok": total == accounts * 1000}
            runs.append(run)
            rows_out.append([n, bank["transfers_per_s"], bank["p50_ms"], bank["p99_ms"], bank["conflicts"],
                             bank["aborted"] + bank["errors"], plain["writes_per_s"], plain["p50_ms"],
                             f"{ratio:.2f}", "yes" if run["total_ok"] else "NO"])
            print(f"{n} threads: {bank['transfers_per_s']} transfers/s ({bank['conflicts']} conflicts) vs "
                  f"{plain['writes_per_s']} autocommit writes/s: ratio {ratio:.2f}", file=sys.stderr)
        setup.close()
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    name = "bank-quick" if quick else "bank"
    doc = {"machine": info, "command": "python benchmarks/bank.py " + " ".join(sys.argv[1:]),
           "seconds": seconds, "accounts": accounts, "runs": runs}
    table = md_table(["threads", "transfers/s", "p50 ms", "p99 ms", "conflicts (retried)", "other errors",
                      "autocommit writes/s", "write p50 ms", "ratio", "total kept"], rows_out)
    note = ("\n\nA transfer is 2 reads + 3 previewed writes on the leader + 1 log entry, retried on "
            "SerializationError until it commits (latency includes retries). The read set is kept per "
            "table, so concurrent transfers on one table conflict whenever their snapshots overlap a "
            "commit; the conflict count says how often.")
    write_report(name, doc, table + note)
    click.echo(table)


if __name__ == "__main__":
    main()
