"""What the commit check costs in apply: a bank transfer's TXN entry (2 reads + 3 writes, each
statement replayed and compared with what the client saw) against a WRITE entry of the same
3 writes, applied by one StateMachine in the same run, alternating. No cluster: apply alone.

    python benchmarks/txn_apply.py            # prints the table; writes results/txn-apply.{json,md}
"""

from __future__ import annotations

import shutil
import sys
import time

import click
from _common import machine, md_table, tmpdir, write_report

from raftsql import txncheck
from raftsql.command import Command, CommandKind
from raftsql.server.statemachine import StateMachine

T0 = 1_700_000_000_000


class Bench:
    def __init__(self, path: str):
        self.sm = StateMachine(path)
        self.index = 0
        self._apply(Command(statements=[
            ("CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)", ()),
            ("CREATE TABLE log (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)", ()),
            *[(f"INSERT INTO acct VALUES ({i}, 1000)", ()) for i in range(100)]],
            leader_time_ms=T0, seed=1).encode())

    def _apply(self, data: bytes) -> float:
        self.index += 1
        t0 = time.perf_counter()
        r = self.sm.apply(self.index, data)
        elapsed = time.perf_counter() - t0
        if r.error is not None:
            raise SystemExit(f"entry {self.index} failed: {r.error}")
        return elapsed

    def txn_entry(self, k: int) -> bytes:
        """Preview a transfer as a driver would, then encode its commit entry."""
        src, dst = k % 100, (k + 7) % 100
        state = self.sm.txn_begin(f"c{k}", 1)
        steps = []
        stmts = [("SELECT bal FROM acct WHERE id = ?", (src,)),
                 ("SELECT bal FROM acct WHERE id = ?", (dst,))]
        for stmt in stmts:
            result, _, _ = self.sm.txn_preview(state, stmt, len(state.writes))
            steps.append((stmt, result))
        a, b = steps[0][1].rows[0][0], steps[1][1].rows[0][0]
        for stmt in [("UPDATE acct SET bal = ? WHERE id = ?", (a - 1, src)),
                     ("UPDATE acct SET bal = ? WHERE id = ?", (b + 1, dst)),
                     ("INSERT INTO log (src, dst, amount) VALUES (?, ?, 1)", (src, dst))]:
            result, _, _ = self.sm.txn_preview(state, stmt, len(state.writes))
            steps.append((stmt, result))
        self.sm.txn_end(state.id)
        checks = []
        for _, result in steps:
            d = txncheck.RowDigest(result.columns or [])
            d.add_all(result.rows or [])
            checks.append(txncheck.ok_check(result.rowcount, d, True, None))
        return Command(kind=CommandKind.TXN, client_id=f"c{k}", serial=1,
                       statements=[s for s, _ in steps], checks=checks, controls=[],
                       last_ms=T0, leader_time_ms=T0, seed=2).encode()

    def write_entry(self, k: int) -> bytes:
        src, dst = k % 100, (k + 7) % 100
        return Command(statements=[("UPDATE acct SET bal = bal - 1 WHERE id = ?", (src,)),
                                   ("UPDATE acct SET bal = bal + 1 WHERE id = ?", (dst,)),
                                   ("INSERT INTO log (src, dst, amount) VALUES (?, ?, 1)", (src, dst))],
                       client_id=f"w{k}", serial=1, leader_time_ms=T0, seed=1).encode()


@click.command()
@click.option("--entries", default=3000, show_default=True, help="entries of each kind")
def main(entries: int) -> None:
    """Apply cost of a checked transaction commit against the same writes as a WRITE entry."""
    info = machine()
    base = tmpdir("raftsql-bench-txn-apply-")
    try:
        b = Bench(str(base / "db.sqlite"))
        times: dict[str, float] = {"txn": 0.0, "write": 0.0}
        for k in range(entries):
            times["txn"] += b._apply(b.txn_entry(k))
            times["write"] += b._apply(b.write_entry(k))
        b.sm.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    txn_us, write_us = times["txn"] / entries * 1e6, times["write"] / entries * 1e6
    table = md_table(["entry", "apply µs (mean)", "vs WRITE"],
                     [["TXN: 2 reads + 3 writes, each checked", round(txn_us), f"{txn_us / write_us:.2f}x"],
                      ["WRITE: the same 3 writes", round(write_us), "1.00x"]])
    doc = {"machine": info, "command": "python benchmarks/txn_apply.py " + " ".join(sys.argv[1:]),
           "entries": entries, "txn_us": round(txn_us, 1), "write_us": round(write_us, 1)}
    write_report("txn-apply", doc, table + "\n\nOne StateMachine, entries of the two kinds alternating, "
                 "apply() timed alone (one SQLite transaction and commit per entry).")
    click.echo(table)


if __name__ == "__main__":
    main()
