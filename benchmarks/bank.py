"""Bank-transfer throughput in serializable interactive transactions, next to plain autocommit
single-row writes measured in the same run, on a 3-node cluster.

A transfer is BEGIN; SELECT two balances; UPDATE both (absolute values); INSERT a log row;
COMMIT: five statements on the leader plus one log entry. Conflicts (SerializationError: a
balance the transfer read changed before it committed) are retried and counted; the ratio is
committed transfers/s divided by autocommit single-row INSERTs/s with the same number of client
threads. The two are measured in alternating slices (transfers, then writes, again and again),
so a machine whose other load changes during the run slows both alike.

Each transfer runs in two driver modes, alternating in the same slices: the default one (every
statement is a request: six per transfer) and pipeline mode (`with conn.pipeline():`, the three
writes travel with the COMMIT: three requests; a write's error would surface at commit).

After the runs over all the accounts, the same transfers run over only --hot-accounts accounts
(default 2): nearly every pair of concurrent transfers then conflicts for real. Conflicts must
be caught there (counted) and the total kept.

    python benchmarks/bank.py --quick          # < 2 min, writes results/bank-quick.{json,md}
    python benchmarks/bank.py                  # writes results/bank.{json,md}
    python benchmarks/bank.py --zero-amount    # writes results/bank-zero.{json,md}

--zero-amount makes every transfer move 0: each writes back the balances it read, so no
transfer changes what another one read and none conflicts. It shows what transfers cost with
no conflict at all, next to autocommit writes in the same run: the ceiling of the ratio.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
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


def _transfers(dsn: str, threads: int, seconds: float, accounts: int,
               lats: list[float] | None = None, counts: dict | None = None,
               pipeline: bool = False) -> dict:
    """Transfers for `seconds`; adds to lats and counts (when given) and returns them.
    pipeline: in the driver's pipeline mode (the writes are sent with the COMMIT)."""
    lats = [] if lats is None else lats
    if counts is None:
        counts = {"committed": 0, "conflicts": 0, "aborted": 0, "errors": 0, "seconds": 0.0}
    lock = threading.Lock()
    start_at = time.monotonic() + 0.2

    def run(k: int) -> None:
        rng = random.Random(k)
        conn = driver_connect(dsn, timeout=20)
        mine: list[float] = []
        local = dict.fromkeys(counts, 0)
        while time.monotonic() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        mode = conn.pipeline() if pipeline else contextlib.nullcontext()
        with mode:
            _loop(conn, rng, end, accounts, mine, local)
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
    counts["seconds"] += seconds
    return {"lats": lats, "counts": counts}


MAX_AMOUNT = 10  # 0 with --zero-amount: no transfer changes a balance, so none conflicts


def _loop(conn, rng: random.Random, end: float, accounts: int, mine: list[float],
          local: dict) -> None:
    import raftsql.driver as db

    while time.monotonic() < end:
        src, dst = rng.sample(range(accounts), 2)
        t0 = time.perf_counter()
        while time.monotonic() < end:  # retry one transfer until it commits
            try:
                conn.execute("BEGIN")
                a = conn.execute("SELECT bal FROM acct WHERE id = ?", (src,)).fetchone()[0]
                b = conn.execute("SELECT bal FROM acct WHERE id = ?", (dst,)).fetchone()[0]
                amount = min(a, rng.randint(1, MAX_AMOUNT)) if MAX_AMOUNT else 0
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


def _summary_transfers(threads: int, lats: list[float], counts: dict) -> dict:
    secs = counts["seconds"]
    return {"threads": threads, "transfers_per_s": round(counts["committed"] / secs, 1),
            **{k: v for k, v in counts.items() if k != "seconds"}, "seconds": secs,
            "p50_ms": round(pct(lats, 50) * 1000, 2), "p99_ms": round(pct(lats, 99) * 1000, 2)}


def _autocommit_writes(dsn: str, threads: int, seconds: float, lats: list[float], errors: list[int]) -> None:
    def make(k: int):
        conn = driver_connect(dsn, timeout=20)
        cur = conn.cursor()
        return (lambda i: cur.execute("INSERT INTO plain (v) VALUES (?)", (f"{k}-{i}",))), conn.close

    got, errs = timed_threads(threads, time.monotonic() + 0.2, seconds, make, clock=time.monotonic)
    lats.extend(got)
    errors[0] += errs


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """CPU time (user + system) used so far by the node processes and by this client process."""
    nodes = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            nodes += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    me = resource.getrusage(resource.RUSAGE_SELF)
    return nodes, me.ru_utime + me.ru_stime


MODES = ("default", "pipeline")


def _interleaved(dsn: str, threads: int, seconds: float, slices: int, accounts: int,
                 pids: list[int], modes: tuple[str, ...] = MODES) -> tuple[dict, dict]:
    """Transfers (in each driver mode) and autocommit writes in `slices` alternating slices,
    seconds/slices each. Returns ({mode: transfers summary}, autocommit summary)."""
    t_lats: dict[str, list[float]] = {m: [] for m in modes}
    t_counts = {m: {"committed": 0, "conflicts": 0, "aborted": 0, "errors": 0, "seconds": 0.0}
                for m in modes}
    w_lats: list[float] = []
    w_errors = [0]
    cpu = {k: [0.0, 0.0] for k in (*modes, "plain")}  # [nodes, client] seconds

    def timed(kind: str, fn, *args) -> None:
        n0, c0 = _cpu_seconds(pids)
        fn(*args)
        n1, c1 = _cpu_seconds(pids)
        cpu[kind][0] += n1 - n0
        cpu[kind][1] += c1 - c0

    part = seconds / slices
    for _ in range(slices):
        for m in modes:
            timed(m, _transfers, dsn, threads, part, accounts, t_lats[m], t_counts[m],
                  m == "pipeline")
        timed("plain", _autocommit_writes, dsn, threads, part, w_lats, w_errors)
    banks = {m: _summary_transfers(threads, t_lats[m], t_counts[m]) for m in modes}
    plain = {"threads": threads, "writes_per_s": round(len(w_lats) / seconds, 1), "errors": w_errors[0],
             "p50_ms": round(pct(w_lats, 50) * 1000, 2), "p99_ms": round(pct(w_lats, 99) * 1000, 2)}
    # CPU per committed operation (the start delays included: a small overestimate for all).
    for kind, out, n in [*((m, banks[m], banks[m]["committed"]) for m in modes),
                         ("plain", plain, len(w_lats))]:
        n = max(n, 1)
        out["node_cpu_ms_per_op"] = round(cpu[kind][0] / n * 1000, 3)
        out["client_cpu_ms_per_op"] = round(cpu[kind][1] / n * 1000, 3)
    return banks, plain


@click.command()
@click.option("--quick", is_flag=True, help="a short run (< 2 min); writes bank-quick.*")
@click.option("--seconds", default=15.0, show_default=True, help="length of each measurement")
@click.option("--threads", "thread_counts", default="4,8", show_default=True,
              help="client thread counts, comma-separated")
@click.option("--accounts", default=100, show_default=True, help="number of accounts")
@click.option("--slices", default=5, show_default=True,
              help="alternating slices of transfers and autocommit writes per measurement")
@click.option("--hot-accounts", default=2, show_default=True,
              help="accounts of the contended run (0: skip it)")
@click.option("--hot-threads", default=8, show_default=True, help="client threads of the contended run")
@click.option("--zero-amount", is_flag=True,
              help="transfers move 0, so none conflicts (the ratio's ceiling); no contended run")
def main(quick: bool, seconds: float, thread_counts: str, accounts: int, slices: int,
         hot_accounts: int, hot_threads: int, zero_amount: bool) -> None:
    """Transfers/s in serializable transactions vs autocommit single-row writes/s."""
    global MAX_AMOUNT
    if zero_amount:
        MAX_AMOUNT, hot_accounts = 0, 0
    counts = [int(x) for x in thread_counts.split(",") if x.strip()]
    if quick:
        seconds, counts, slices = min(seconds, 8.0), [8], 2
    info = machine()
    base = tmpdir("raftsql-bench-bank-")
    cluster = raftsql_cluster(base / "cluster", 3)
    rows_out = []
    cpu_rows = []
    runs = []
    try:
        setup = driver_connect(cluster.dsn, timeout=20)
        setup.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)")
        setup.executemany("INSERT INTO acct VALUES (?, ?)", [(i, 1000) for i in range(accounts)])
        setup.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)")
        setup.execute("CREATE TABLE plain (id INTEGER PRIMARY KEY, v TEXT)")
        plan = [(n, accounts) for n in counts]
        if hot_accounts:
            plan.append((hot_threads, hot_accounts))
        for n, among in plan:
            pids = [p.pid for p in cluster.procs.values()]
            banks, plain = _interleaved(cluster.dsn, n, seconds, slices, among, pids)
            total = setup.execute("SELECT sum(bal) FROM acct").fetchone()[0]
            for mode, bank in banks.items():
                ratio = bank["transfers_per_s"] / plain["writes_per_s"] if plain["writes_per_s"] else float("nan")
                run = {"threads": n, "accounts": among, "mode": mode, "bank": bank, "autocommit": plain,
                       "ratio": round(ratio, 3), "total_ok": total == accounts * 1000}
                runs.append(run)
                attempts = bank["committed"] + bank["conflicts"]
                rows_out.append([among, n, mode, bank["transfers_per_s"], bank["p50_ms"], bank["p99_ms"],
                                 bank["conflicts"], f"{bank['conflicts'] / attempts:.0%}" if attempts else "-",
                                 bank["aborted"] + bank["errors"], plain["writes_per_s"], plain["p50_ms"],
                                 f"{ratio:.2f}", "yes" if run["total_ok"] else "NO"])
                nb, nw = bank["node_cpu_ms_per_op"], plain["node_cpu_ms_per_op"]
                cb, cw = bank["client_cpu_ms_per_op"], plain["client_cpu_ms_per_op"]
                cpu_rows.append([among, n, mode, nb, nw, f"{nb / nw:.2f}" if nw else "-", cb, cw,
                                 f"{(nb + cb) / (nw + cw):.2f}" if nw + cw else "-"])
                print(f"{n} threads over {among} accounts, {mode}: {bank['transfers_per_s']} transfers/s "
                      f"({bank['conflicts']} conflicts) vs {plain['writes_per_s']} autocommit writes/s: "
                      f"ratio {ratio:.2f}", file=sys.stderr)
        setup.close()
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    name = "bank" + ("-zero" if zero_amount else "") + ("-quick" if quick else "")
    doc = {"machine": info, "command": "python benchmarks/bank.py " + " ".join(sys.argv[1:]),
           "seconds": seconds, "slices": slices, "accounts": accounts, "runs": runs}
    table = md_table(["accounts", "threads", "driver mode", "transfers/s", "p50 ms", "p99 ms", "conflicts (retried)",
                      "conflicts / attempts", "other errors", "autocommit writes/s", "write p50 ms",
                      "ratio", "total kept"], rows_out)
    note = (f"\n\nA transfer is 2 reads + 3 writes + 1 log entry, retried on SerializationError "
            f"until it commits (latency includes retries): in the default driver mode six requests "
            f"to the leader (each statement, then the commit), in pipeline mode three (the writes "
            f"travel with the commit). Both modes and autocommit single-row INSERTs alternate in "
            f"{slices} slices of {seconds / slices:.1f} s each (per mode). A "
            "transfer conflicts only when a balance it read changed before its commit (the commit "
            "replays its statements and compares what they return)" + (
                f"; the run over {hot_accounts} accounts is the contended one, where nearly every "
                "overlap is a real conflict." if hot_accounts else "."))
    if zero_amount:
        note += (" With --zero-amount every transfer moves 0 (it writes back the balances it "
                 "read), so no transfer changes what another read and none conflicts: this run "
                 "shows the ratio without the cost of conflicts.")
    cpu_table = md_table(["accounts", "threads", "driver mode", "node CPU ms per transfer",
                          "node CPU ms per write", "transfer / write", "client CPU ms per transfer",
                          "client CPU ms per write", "all CPU: transfer / write"], cpu_rows)
    cpu_note = ("\n\nCPU time (user + system) of the three node processes, and of the benchmark's "
                "client process, per committed operation in the same slices. An autocommit write "
                "is one request: when the machine's cores are the limit, transfers/s over "
                "writes/s cannot exceed the inverse of the last column.")
    write_report(name, doc, table + note + "\n\n" + cpu_table + cpu_note)
    click.echo(table)


if __name__ == "__main__":
    main()
