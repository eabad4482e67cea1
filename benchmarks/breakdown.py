"""Where a write's time goes: one client writes single rows, sequentially, to a 3-node cluster
whose nodes trace every write (RAFTSQL_TRACE=1, raftsql/trace.py); the per-stage records of
every node are joined with the client's own send and receive times by log index, and the
median (and p90) time between consecutive stages is printed as a table.

    python benchmarks/breakdown.py --quick     # a few seconds
    python benchmarks/breakdown.py --writes 3000

All processes run on one machine and use CLOCK_MONOTONIC (time.monotonic_ns), so times from
different processes compare directly. Writes benchmarks/results/breakdown[-quick].{json,md}.

The stages (L: the leader, F: the follower whose acknowledgement came first, the one that
made the entry commit in a 3-node cluster):

    client send -> L recv -> L propose -> L send -> F recv -> F persist -> F ack
    -> L ack -> (L persist, which overlaps) -> L commit -> L apply -> L reply -> client recv

Each row is the time from the previous stage to this one. L persist runs in parallel with the
round trip to F; its own row shows its time from L send. "commit" is when the entry was
handed to the apply thread: after both the leader's fsync and a follower's acknowledgement.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time

import click
from _common import driver_connect, machine, md_table, tmpdir, write_report

# (row label, node role, stage, measured from)
ROWS = [
    ("client -> leader (request read)", "L", "recv", "c.send"),
    ("leader: parse, validate, propose", "L", "propose", "L.recv"),
    ("leader: appends written to peers", "L", "send", "L.propose"),
    ("network -> follower (append stepped)", "F", "recv", "L.send"),
    ("follower: append + fsync", "F", "persist", "F.recv"),
    ("follower: ack written", "F", "ack", "F.persist"),
    ("network -> leader (ack stepped)", "L", "ack", "F.ack"),
    ("leader: commit (handed to apply)", "L", "commit", "L.ack"),
    ("leader: apply (SQLite)", "L", "apply", "L.commit"),
    ("leader: reply written", "L", "reply", "L.apply"),
    ("leader -> client (response read)", "C", "recv", "L.reply"),
]
# Shown beside the chain: overlapping work.
SIDE = [
    ("leader: own append + fsync (from send)", "L.persist", "L.send"),
    ("follower: commit learned (from its persist)", "F.commit", "F.persist"),
    ("total: client send -> client recv", "c.recv", "c.send"),
]


def run(writes: int, warmup: int) -> dict:
    from raftsql.testing.cluster import LocalCluster

    base = tmpdir("raftsql-breakdown-")
    c = LocalCluster(base, 3, env={"RAFTSQL_TRACE": "1"})
    try:
        c.start()
        leader = c.wait_leader(30)
        conn = driver_connect(c.dsn)
        cur = conn.cursor()
        cur.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        client: dict[int, tuple[int, int]] = {}
        with click.progressbar(range(warmup + writes), label="traced writes", file=sys.stderr) as bar:
            for i in bar:
                t0 = time.monotonic_ns()
                cur.execute("INSERT INTO t (v) VALUES (?)", (f"value {i}",))
                t1 = time.monotonic_ns()
                if i >= warmup:
                    client[conn.last_index] = (t0, t1)
        conn.close()
        if c.wait_leader(5) != leader:
            raise RuntimeError("the leader changed during the run; run again")
        traces = {}
        for nid in c.ids:
            resp = c.node_request(nid, {"id": 1, "op": "trace"}, timeout=30)
            if not resp.get("ok"):
                raise RuntimeError(f"{nid}: {resp.get('error')}")
            traces[nid] = resp["result"]["records"]
        return analyse(client, traces, leader)
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)


def analyse(client: dict[int, tuple[int, int]], traces: dict[str, list], leader: str) -> dict:
    per: dict[str, dict[int, dict[str, int]]] = {}
    for nid, records in traces.items():
        d: dict[int, dict[str, int]] = {}
        for index, stage, t in records:
            d.setdefault(index, {}).setdefault(stage, t)  # the first time a stage was reached
        per[nid] = d
    followers = [n for n in traces if n != leader]
    deltas: dict[str, list[float]] = {label: [] for label, *_ in ROWS + SIDE}
    for index, (t_send, t_recv) in client.items():
        lt = per[leader].get(index, {})
        acks = {k[4:]: v for k, v in lt.items() if k.startswith("ack:")}
        if not acks:
            continue
        first = min(acks, key=acks.get)
        if first not in followers:
            continue
        ft = per[first].get(index, {})
        times = {"c.send": t_send, "c.recv": t_recv}
        times.update({f"L.{k}": v for k, v in lt.items()})
        times["L.ack"] = acks[first]
        times.update({f"F.{k}": v for k, v in ft.items()})
        for label, who, stage, since in ROWS:
            key = "c.recv" if who == "C" else f"{who}.{stage}"
            if key in times and since in times:
                deltas[label].append((times[key] - times[since]) / 1e3)
        for label, key, since in SIDE:
            if key in times and since in times:
                deltas[label].append((times[key] - times[since]) / 1e3)
    out = {}
    for label, xs in deltas.items():
        if xs:
            xs.sort()
            out[label] = {
                "n": len(xs),
                "p50_us": round(statistics.median(xs), 1),
                "p90_us": round(xs[int(0.9 * (len(xs) - 1))], 1),
            }
    return out


@click.command()
@click.option("--writes", default=2000, show_default=True)
@click.option("--warmup", default=200, show_default=True)
@click.option("--quick", is_flag=True, help="300 writes (CI)")
def main(writes: int, warmup: int, quick: bool) -> None:
    if quick:
        writes, warmup = 300, 50
    m = machine()
    stages = run(writes, warmup)
    chain = sum(v["p50_us"] for k, v in stages.items() if k in {r[0] for r in ROWS})
    rows = [[k, v["p50_us"], v["p90_us"], v["n"]] for k, v in stages.items()]
    table = md_table(["stage (time since the previous one)", "p50 µs", "p90 µs", "writes"], rows)
    table += (f"\n\nSum of the chain's medians: {chain:.0f} µs (the total's median is the last "
              "row; medians do not add up exactly).")
    click.echo(table)
    report = {"command": " ".join(["python", *sys.argv]), "writes": writes, "stages": stages, "machine": m}
    write_report("breakdown" + ("-quick" if quick else ""), report, table)


if __name__ == "__main__":
    main()
