"""What a transaction costs next to autocommit, one client, one 3-node cluster, one run:

- `execute(INSERT); commit()` (sqlite3's default transaction mode) against one autocommit INSERT;
- a one-row read-modify-write (`SELECT`, `UPDATE`, `commit()`) against the same two statements
  in autocommit mode, in sqlite3's default mode (the SELECT is an ordinary linearizable read)
  and after an explicit BEGIN (every statement runs on the leader);
- the latency of one statement inside a transaction that already holds 10, 100 and 1,000
  writes: alone, and with a second client committing a write between every two statements
  (which parks the transaction and resumes it from its changeset: server/DESIGN.md);
- executemany of 1,000 rows inside a transaction: requests sent, latency.

The measures are interleaved in rounds (each round runs every measure a few times), so a busy
machine slows them alike and the ratios stay meaningful.

    python benchmarks/txn.py --quick      # about a minute; writes results/txn-quick.{json,md}
    python benchmarks/txn.py              # writes results/txn.{json,md}
"""

from __future__ import annotations

import shutil
import sys
import time

import click
from _common import driver_connect, machine, md_table, pct, raftsql_cluster, tmpdir, write_report


def _p50(xs: list[float]) -> float:
    return round(pct(xs, 50) * 1000, 3)


class Measures:
    def __init__(self, dsn: str):
        import raftsql.driver as db

        self.db = db
        self.auto = driver_connect(dsn, timeout=20)
        self.legacy = db.connect(dsn, timeout=20)  # sqlite3's defaults
        self.auto.execute("CREATE TABLE ins (id INTEGER PRIMARY KEY, v TEXT)")
        self.auto.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)")
        self.auto.executemany("INSERT INTO acct VALUES (?, 1000)", [(i,) for i in range(100)])
        self.auto.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT)")
        self.lat: dict[str, list[float]] = {}
        self.k = 0
        self.aborted = 0  # statement-latency measures run again after a leader change

    def _time(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except self.db.TransactionAborted:
            # A leader change (a busy machine): not a sample; counted in the results.
            self.aborted += 1
            self.legacy.rollback()
            return
        self.lat.setdefault(name, []).append(time.perf_counter() - t0)

    def round(self, n: int) -> None:
        a, c = self.auto, self.legacy
        for _ in range(n):
            self.k += 1
            row = self.k % 100
            self._time("autocommit INSERT", lambda: a.execute("INSERT INTO ins (v) VALUES ('x')"))

            def insert_commit():
                c.execute("INSERT INTO ins (v) VALUES ('x')")
                c.commit()

            self._time("execute(INSERT); commit()", insert_commit)

            def rmw_auto(row=row):
                (bal,) = a.execute("SELECT bal FROM acct WHERE id = ?", (row,)).fetchone()
                a.execute("UPDATE acct SET bal = ? WHERE id = ?", (bal + 1, row))

            self._time("autocommit SELECT; UPDATE", rmw_auto)

            def rmw_txn(row=row):
                (bal,) = c.execute("SELECT bal FROM acct WHERE id = ?", (row,)).fetchone()
                c.execute("UPDATE acct SET bal = ? WHERE id = ?", (bal + 1, row))
                c.commit()

            self._time("SELECT; UPDATE; commit()", rmw_txn)

            def rmw_begin(row=row):
                c.execute("BEGIN")
                (bal,) = c.execute("SELECT bal FROM acct WHERE id = ?", (row,)).fetchone()
                c.execute("UPDATE acct SET bal = ? WHERE id = ?", (bal + 1, row))
                c.execute("COMMIT")

            self._time("BEGIN; SELECT; UPDATE; COMMIT", rmw_begin)

    def statement_latency(self, earlier: int, statements: int, contended: bool) -> list[float]:
        """p50 of `statements` single-row INSERTs in a transaction that already holds `earlier`
        writes (loaded with one executemany); contended: another client commits a write
        between every two statements."""
        c, a = self.legacy, self.auto
        for _attempt in range(5):
            base = self.k * 10_000_000
            self.k += 1
            try:
                c.executemany("INSERT INTO big (id, v) VALUES (?, 'x')", [(base + i,) for i in range(earlier)])
                out = []
                for i in range(statements):
                    if contended:
                        a.execute("INSERT INTO ins (v) VALUES ('y')")
                    t0 = time.perf_counter()
                    c.execute("INSERT INTO big (id, v) VALUES (?, 'z')", (base + earlier + i,))
                    out.append(time.perf_counter() - t0)
            except self.db.TransactionAborted as e:
                # A leader change (a busy machine): measure this case again from the start.
                self.aborted += 1
                print(f"statement latency at {earlier} earlier writes: {e}; again", file=sys.stderr)
                c.rollback()
                continue
            c.rollback()
            return out
        raise RuntimeError(f"statement latency at {earlier} earlier writes: aborted 5 times")

    def executemany_requests(self, rows: int) -> tuple[int, float]:
        c = self.legacy
        calls = []
        inner = c._client._call

        def counting(req, *args, **kw):
            calls.append(req.get("op"))
            return inner(req, *args, **kw)

        c._client._call = counting
        try:
            base = self.k * 10_000_000
            self.k += 1
            t0 = time.perf_counter()
            c.executemany("INSERT INTO big (id, v) VALUES (?, 'm')", [(base + i,) for i in range(rows)])
            elapsed = time.perf_counter() - t0
            n = len(calls)
            c.rollback()
        finally:
            c._client._call = inner
        return n, elapsed

    def close(self) -> None:
        self.auto.close()
        self.legacy.close()


@click.command()
@click.option("--quick", is_flag=True, help="a short run; writes txn-quick.*")
@click.option("--rounds", default=20, show_default=True, help="rounds of the interleaved measures")
@click.option("--per-round", default=10, show_default=True, help="operations per measure per round")
def main(quick: bool, rounds: int, per_round: int) -> None:
    """Transaction latencies next to autocommit, in one run."""
    if quick:
        rounds, per_round = 5, 8
    info = machine()
    base = tmpdir("raftsql-bench-txn-")
    cluster = raftsql_cluster(base / "cluster", 3)
    stmt_rows: list[list] = []
    doc: dict = {"machine": info, "command": "python benchmarks/txn.py " + " ".join(sys.argv[1:])}
    try:
        m = Measures(cluster.dsn)
        m.round(3)  # warm-up
        m.lat.clear()
        with click.progressbar(range(rounds), label="interleaved rounds", file=sys.stderr) as bar:
            for _ in bar:
                m.round(per_round)
        statements = 20 if quick else 50
        flat: dict = {}
        for contended in (False, True):
            for earlier in (10, 100, 1000):
                lats = m.statement_latency(earlier, statements, contended)
                flat[(earlier, contended)] = lats
        n_req, many_s = m.executemany_requests(1000)
        m.close()
    finally:
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)

    lat = m.lat
    rows = []
    pairs = [("execute(INSERT); commit()", "autocommit INSERT", 1.1),
             ("SELECT; UPDATE; commit()", "autocommit SELECT; UPDATE", 1.3),
             ("BEGIN; SELECT; UPDATE; COMMIT", "autocommit SELECT; UPDATE", 1.3)]
    for name, baseline, target in pairs:
        ratio = pct(lat[name], 50) / pct(lat[baseline], 50)
        rows.append([name, len(lat[name]), _p50(lat[name]), baseline, _p50(lat[baseline]),
                     f"{ratio:.2f}x", f"<= {target}x: {'met' if ratio <= target else 'NOT met'}"])
    table1 = md_table(["transaction", "n", "p50 ms", "autocommit baseline", "baseline p50 ms",
                       "ratio", "target"], rows)
    base10 = pct(flat[(10, False)], 50)
    for earlier in (10, 100, 1000):
        alone, busy = flat[(earlier, False)], flat[(earlier, True)]
        stmt_rows.append([earlier, _p50(alone), f"{pct(alone, 50) / base10:.2f}x", _p50(busy),
                          f"{pct(busy, 50) / base10:.2f}x"])
    table2 = md_table(["earlier writes in the transaction", "statement p50 ms, alone",
                       "vs 10 earlier", "p50 ms, another client commits between statements",
                       "vs 10 earlier (alone)"], stmt_rows)
    table3 = md_table(["executemany in a transaction", "requests", "latency ms"],
                      [["1,000 rows", n_req, round(many_s * 1000, 1)]])
    doc["results"] = {
        "p50_ms": {k: _p50(v) for k, v in lat.items()},
        "n": {k: len(v) for k, v in lat.items()},
        "statement_p50_ms": {f"{e}{'-contended' if c else ''}": _p50(v) for (e, c), v in flat.items()},
        "executemany_1000": {"requests": n_req, "ms": round(many_s * 1000, 1)},
        "aborted_by_leader_change_and_run_again": m.aborted,
    }
    text = "\n\n".join([table1, table2, table3]) + (
        "\n\nOne client thread, a 3-node cluster on loopback. Measures interleaved in rounds. "
        "Statement latency: single-row INSERTs into a transaction that already holds that many "
        "writes; with another client committing between every two statements the transaction "
        "is parked and resumed from its changeset each time.")
    write_report("txn-quick" if quick else "txn", doc, text)
    click.echo(text)


if __name__ == "__main__":
    main()
