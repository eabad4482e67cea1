"""Heavy statements against Raft: does a statement that makes SQLite work for seconds stall
heartbeats? On a 3-node cluster, a second client (its own process) writes single rows in a loop
the whole time, while one client runs each heavy statement in turn:

- an unbounded recursive CTE as a write, which runs until the apply step limit stops it (the
  node's apply_vm_step_limit, 100M VM steps by default: server/statemachine.py);
- the same CTE as a read, which runs until the read time limit stops it (query_timeout_s, 10 s);
- a runaway transaction preview: BEGIN, then an unbounded INSERT ... SELECT (previewed on the
  leader until the step limit), then ROLLBACK;
- a 400 MB zeroblob in one value (over SQLite's 100 MB length limit: an error, but only when
  applied, since the request itself is a few bytes);
- a 400 MB read, 8 rows of zeroblob(50 MB), streamed with fetchmany(1);
- a 1,000,000-row executemany (the parameters are small integers, so the request stays under
  the 4 MiB request limit);
- the `hash` request (the content hash tests use, the status request's sibling) on the leader,
  over a 3.8-million-row table, built before (in chunks, outside the measured part);
- DROP TABLE of that table;
- a 400 MB zeroblob insert as 8 rows of 50 MB in one entry.

For each: every node's term (status request) before and after, whether any changed, the leader
before and after, the heavy statement's duration and outcome, and the second client's longest
gap between two successful writes from the statement's start until every node has applied what
the leader had when the statement ended, plus one second (so an election it caused at its end is
counted). A baseline window with the writer alone, in the same run, gives the gap to compare
with.

    python benchmarks/heavy.py --quick   # sizes / 10 (40 MB blobs, 100k rows, 380k-row table)
    python benchmarks/heavy.py           # the sizes above

Writes benchmarks/results/heavy[-quick].{json,md}.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import shutil
import sys
import time
from collections.abc import Callable

import click
from _common import driver_connect, machine, md_table, raftsql_cluster, tmpdir, write_report

UNBOUNDED = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT x FROM c"
SETTLE_EXTRA_S = 1.0  # after every node applied the statement's entries: late elections count too
BIG_TABLE_CHUNK = 950_000  # rows per INSERT ... SELECT entry while building the big table (~25M VM steps)


def _rows(n: int, start: int = 1) -> str:
    return f"WITH RECURSIVE c(x) AS (SELECT {start} UNION ALL SELECT x+1 FROM c WHERE x < {start + n - 1}) SELECT x FROM c"


# ----------------------------------------------------------------------------- the second client


def _writer(dsn: str, ready: mp.Queue, stop: mp.Event, last_ok: mp.Value, out: mp.Queue) -> None:
    """Single-row INSERTs in a loop until `stop`; sends back (start, end, error or None) per
    write, times on the system-wide monotonic clock (the same in every process)."""
    conn = driver_connect(dsn, timeout=60)
    cur = conn.cursor()
    recs: list[tuple[float, float, str | None]] = []
    ready.put(True)
    i = 0
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            cur.execute("INSERT INTO w (v) VALUES (?)", (i,))
            t1 = time.monotonic()
            recs.append((t0, t1, None))
            last_ok.value = t1
        except Exception as e:  # noqa: BLE001 - recorded: the table counts them
            recs.append((t0, time.monotonic(), f"{type(e).__name__}: {str(e)[:200]}"))
            time.sleep(0.01)  # an error that comes back at once must not spin
        i += 1
    with contextlib.suppress(Exception):
        conn.close()
    out.put(recs)


def longest_gap(recs: list[tuple[float, float, str | None]], t0: float, t1: float) -> dict:
    """The longest time between two consecutive successful writes (completion times) that
    overlaps [t0, t1]: from the last success before t0 through the first success after t1."""
    oks = [e for _, e, err in recs if err is None]
    before = [e for e in oks if e <= t0]
    inside = [e for e in oks if t0 < e <= t1]
    after = [e for e in oks if e > t1][:1]
    points = before[-1:] + inside + after
    gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
    lat = [e - s for s, e, err in recs if err is None and t0 < e <= t1]
    errors = [err for s, e, err in recs if err is not None and t0 < e <= t1]
    out = {"longest_gap_s": round(max(gaps), 3) if gaps else None, "writes": len(inside),
           "errors": len(errors), "max_write_s": round(max(lat), 3) if lat else None,
           "recovered": bool(after) or bool(inside)}
    if errors:
        out["first_error"] = errors[0]
    return out


# ----------------------------------------------------------------------------- cluster state


def node_states(cluster) -> dict[str, dict | None]:
    out = {}
    for n in cluster.ids:
        st = cluster.status(n)
        out[n] = None if st is None else {"term": st.get("term"), "role": st.get("role"), "leader": st.get("leader"),
                                          "applied_index": st.get("applied_index"), "snapshot": st.get("snapshot")}
    return out


def settle(cluster, last_ok, timeout: float = 180.0) -> float:
    """Wait until the nodes agree on a leader, every node has applied what that leader had
    applied when this was called, SETTLE_EXTRA_S passed, and the writer succeeded since.
    Returns the time (monotonic) the window closes."""
    deadline = time.monotonic() + timeout
    leader = cluster.wait_leader(timeout)
    target = None
    while time.monotonic() < deadline:
        st = cluster.status(leader)
        if st is not None and st.get("applied_index") is not None:
            target = st["applied_index"]
            break
        time.sleep(0.05)
    while target is not None and time.monotonic() < deadline:
        applied = [(cluster.status(n) or {}).get("applied_index") for n in cluster.ids]
        if all(a is not None and a >= target for a in applied):
            break
        time.sleep(0.05)
    else:
        raise TimeoutError(f"the nodes did not all apply index {target} within {timeout:.0f} s")
    time.sleep(SETTLE_EXTRA_S)
    mark = time.monotonic()
    while last_ok.value <= mark:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the second client wrote nothing for {timeout:.0f} s")
        time.sleep(0.02)
    return mark


# ----------------------------------------------------------------------------- heavy statements


def _execute(conn, sql: str, params=()) -> str:
    cur = conn.cursor()
    cur.execute(sql, params)
    return f"ok, rowcount {cur.rowcount}"


def cte_write(ctx) -> str:
    return _execute(ctx.conn, f"INSERT INTO scratch (v) SELECT max(x) FROM ({UNBOUNDED})")


def cte_read(ctx) -> str:
    rows = ctx.conn.cursor().execute(f"SELECT max(x) FROM ({UNBOUNDED})").fetchall()
    return f"ok, {rows!r}"


def txn_preview(ctx) -> str:
    conn = ctx.conn
    conn.execute("BEGIN")
    try:
        return _execute(conn, f"INSERT INTO scratch (v) SELECT x FROM ({UNBOUNDED})")
    finally:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")


def zeroblob_value(ctx) -> str:
    return _execute(ctx.conn, "INSERT INTO blobs (v) VALUES (zeroblob(?))", (ctx.blob_total,))


def zeroblob_read(ctx) -> str:
    cur = ctx.conn.cursor()
    cur.execute(f"SELECT zeroblob({ctx.blob_row}) FROM ({_rows(ctx.blob_rows)})")
    n = size = 0
    while True:
        got = cur.fetchmany(1)
        if not got:
            break
        n += len(got)
        size += sum(len(r[0]) for r in got)
    return f"ok, {n} rows, {size / 1e6:.0f} MB"


def zeroblob_rows(ctx) -> str:
    return _execute(ctx.conn, f"INSERT INTO blobs (v) SELECT zeroblob({ctx.blob_row}) FROM ({_rows(ctx.blob_rows)})")


def executemany(ctx) -> str:
    cur = ctx.conn.cursor()
    cur.executemany("INSERT INTO many (v) VALUES (?)", ((i % 100,) for i in range(ctx.many_rows)))
    return f"ok, rowcount {cur.rowcount}"


def hash_request(ctx) -> str:
    leader = ctx.cluster.wait_leader(60)
    resp = ctx.cluster.node_request(leader, {"op": "hash"}, timeout=ctx.timeout)
    if resp.get("ok"):
        return f"ok, index {resp['result']['index']} (asked {leader})"
    return f"error: {resp.get('error')}"


def drop_big(ctx) -> str:
    return _execute(ctx.conn, "DROP TABLE big")


def build_big(ctx) -> None:
    """The big table, in chunks well under the step limit (not measured)."""
    cur = ctx.conn.cursor()
    cur.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT)")
    done = 0
    while done < ctx.big_rows:
        n = min(BIG_TABLE_CHUNK, ctx.big_rows - done)
        cur.execute(f"INSERT INTO big (v) SELECT printf('row %d', x) FROM ({_rows(n, done + 1)})")
        done += n
    (count,) = cur.execute("SELECT count(*) FROM big").fetchone()
    if count != ctx.big_rows:
        raise RuntimeError(f"the big table has {count} rows, not {ctx.big_rows}")


class Ctx:
    def __init__(self, cluster, conn, quick: bool, timeout: float):
        self.cluster, self.conn, self.timeout = cluster, conn, timeout
        scale = 10 if quick else 1
        self.blob_total = 400_000_000  # one value: over the length limit whatever the scale
        self.blob_rows, self.blob_row = 8, 50_000_000 // scale
        self.many_rows = 1_000_000 // scale
        self.big_rows = 3_800_000 // scale


def statements(ctx: Ctx) -> list[tuple[str, str, Callable[[Ctx], str]]]:
    mb = ctx.blob_rows * ctx.blob_row // 1_000_000
    return [
        ("cte_write", "unbounded recursive CTE, write (apply step limit)", cte_write),
        ("cte_read", "unbounded recursive CTE, read (read time limit)", cte_read),
        ("txn_preview", "transaction preview: unbounded INSERT ... SELECT in BEGIN, then ROLLBACK", txn_preview),
        ("zeroblob_value", f"INSERT of zeroblob({ctx.blob_total:,}): one {ctx.blob_total // 1_000_000} MB value",
         zeroblob_value),
        ("zeroblob_read", f"SELECT of {ctx.blob_rows} x zeroblob({ctx.blob_row:,}) ({mb} MB), fetchmany(1)",
         zeroblob_read),
        ("executemany", f"executemany of {ctx.many_rows:,} rows", executemany),
        ("hash", f"hash request on the leader ({ctx.big_rows:,}-row table)", hash_request),
        ("drop_big", f"DROP TABLE of {ctx.big_rows:,} rows", drop_big),
        ("zeroblob_rows", f"INSERT of {ctx.blob_rows} x zeroblob({ctx.blob_row:,}) ({mb} MB) in one entry",
         zeroblob_rows),
    ]


# ----------------------------------------------------------------------------- the run


def run(quick: bool, baseline_s: float, timeout: float) -> dict:
    base = tmpdir("raftsql-heavy-")
    c = raftsql_cluster(base, 3)
    ready: mp.Queue = mp.Queue()
    out: mp.Queue = mp.Queue()
    stop = mp.Event()
    last_ok = mp.Value("d", 0.0, lock=False)
    writer = None
    res: dict = {"statements": []}
    try:
        conn = driver_connect(c.dsn, timeout=timeout)
        for ddl in ("CREATE TABLE w (id INTEGER PRIMARY KEY, v)", "CREATE TABLE scratch (v)",
                    "CREATE TABLE blobs (v BLOB)", "CREATE TABLE many (id INTEGER PRIMARY KEY, v)"):
            conn.execute(ddl)
        ctx = Ctx(c, conn, quick, timeout)
        writer = mp.Process(target=_writer, args=(c.dsn, ready, stop, last_ok, out))
        writer.start()
        ready.get(timeout=60)
        time.sleep(1.0)  # the writer warms up

        click.echo(f"baseline: the writer alone for {baseline_s:.0f} s ...", err=True)
        states0 = node_states(c)
        t0 = time.monotonic()
        time.sleep(baseline_s)
        res["baseline"] = {"t0": t0, "t1": time.monotonic(), "nodes_before": states0, "nodes_after": node_states(c)}

        for key, label, fn in statements(ctx):
            if key == "hash":
                click.echo(f"building the {ctx.big_rows:,}-row table (not measured) ...", err=True)
                tb = time.monotonic()
                build_big(ctx)
                settle(c, last_ok)
                res["big_table_build_s"] = round(time.monotonic() - tb, 1)
            click.echo(f"{key}: {label} ...", err=True)
            entry: dict = {"key": key, "statement": label}
            try:
                c.wait_leader(60)
                entry["nodes_before"] = node_states(c)
                t0 = time.monotonic()
                try:
                    entry["outcome"] = fn(ctx)
                except Exception as e:  # noqa: BLE001 - the outcome is part of the result
                    entry["outcome"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                t1 = time.monotonic()
                entry.update(t0=t0, t1=t1, duration_s=round(t1 - t0, 3))
                entry["t_settled"] = settle(c, last_ok)
                entry["nodes_after"] = node_states(c)
            except Exception as e:  # noqa: BLE001 - a cluster that does not recover ends the run
                entry["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                res["statements"].append(entry)
                click.echo(f"{key}: the cluster did not settle ({entry['failed']}); stopping here", err=True)
                break
            click.echo(f"  {entry['outcome']} in {entry['duration_s']:.2f} s", err=True)
            res["statements"].append(entry)
        conn.close()
    finally:
        stop.set()
        recs: list = []
        if writer is not None:
            with contextlib.suppress(queue.Empty):
                recs = out.get(timeout=120)
            writer.join(30)
            if writer.is_alive():
                writer.kill()
                writer.join()
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    res["writer_writes"] = sum(1 for r in recs if r[2] is None)
    res["writer_errors"] = sum(1 for r in recs if r[2] is not None)
    b = res.get("baseline")
    if b:
        b.update(longest_gap(recs, b["t0"], b["t1"]))
        b["terms_before"] = _terms(b["nodes_before"])
        b["terms_after"] = _terms(b["nodes_after"])
    for e in res["statements"]:
        if "t0" in e:
            e.update(longest_gap(recs, e["t0"], e.get("t_settled", e["t1"])))
            e["window_s"] = round(e.get("t_settled", e["t1"]) - e["t0"], 3)
        if "nodes_after" in e:
            e["terms_before"], e["terms_after"] = _terms(e["nodes_before"]), _terms(e["nodes_after"])
            e["term_changed"] = e["terms_before"] != e["terms_after"]
            e["leader_before"], e["leader_after"] = _leader(e["nodes_before"]), _leader(e["nodes_after"])
    return res


def _terms(states: dict) -> dict:
    return {n: (s or {}).get("term") for n, s in states.items()}


def _leader(states: dict) -> str | None:
    leaders = {(s or {}).get("leader") for s in states.values()} - {None}
    return leaders.pop() if len(leaders) == 1 else None


def _term_text(terms: dict) -> str:
    vals = set(terms.values())
    return str(vals.pop()) if len(vals) == 1 else " / ".join(f"{n} {t}" for n, t in terms.items())


def report(res: dict) -> tuple[str, list[str]]:
    b = res.get("baseline", {})
    base_gap = b.get("longest_gap_s")
    rows = []
    if b:
        rows.append(["none: the writer alone", "", f"{b['t1'] - b['t0']:.1f}", _term_text(b["terms_before"]),
                     _term_text(b["terms_after"]), "yes" if b["terms_before"] != b["terms_after"] else "no", "",
                     base_gap, "1.0x", f"{b['writes']} ({b['errors']})"])
    changed = []
    for e in res["statements"]:
        if "nodes_after" not in e:
            rows.append([e["statement"], e.get("outcome", ""), e.get("duration_s", ""), "", "", "",
                         "", e.get("longest_gap_s", ""), "", f"did not settle: {e.get('failed')}"])
            continue
        gap = e["longest_gap_s"]
        ratio = f"{gap / base_gap:.1f}x" if gap is not None and base_gap else "n/a"
        if e["term_changed"]:
            changed.append(e["key"])
        rows.append([e["statement"], e["outcome"][:90], e["duration_s"], _term_text(e["terms_before"]),
                     _term_text(e["terms_after"]), "YES" if e["term_changed"] else "no",
                     f"{e['leader_before']} -> {e['leader_after']}", gap, ratio,
                     f"{e['writes']} ({e['errors']})"])
    table = md_table(["heavy statement", "outcome", "duration s", "term before", "term after", "term changed",
                      "leader", "writer longest gap s", "gap vs baseline", "writer writes (errors)"], rows)
    measured = [e for e in res["statements"] if "nodes_after" in e]
    notes = [f"Term changed (an election) during {len(changed)} of {len(measured)} heavy statements"
             + (f": {', '.join(changed)}." if changed else ".")]
    if base_gap is not None:
        worst = max(measured, key=lambda e: e["longest_gap_s"] or 0, default=None)
        if worst is not None:
            notes.append(f"Longest writer gap: {worst['longest_gap_s']} s during {worst['key']}, against "
                         f"{base_gap} s with the writer alone.")
    if "big_table_build_s" in res:
        notes.append(f"The big table was built in {res['big_table_build_s']} s before its statements "
                     f"(chunks of {BIG_TABLE_CHUNK:,} rows; not measured).")
    notes.append("The writer's gap window runs from the statement's start until every node has applied what "
                 f"the leader had when it ended, plus {SETTLE_EXTRA_S:.0f} s.")
    return table, notes


@click.command()
@click.option("--quick", is_flag=True, help="Sizes / 10: 40 MB blobs, 100k-row executemany, 380k-row table (CI).")
@click.option("--baseline-seconds", type=float, default=None, help="The writer alone first (default 10, quick 3).")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Driver timeout of the heavy statements' client.")
@click.option("--name", default="heavy", show_default=True, help="Result file name under benchmarks/results/.")
def main(quick: bool, baseline_seconds: float | None, timeout: float, name: str) -> None:
    if quick:
        name = name if name != "heavy" else "heavy-quick"
    baseline_s = baseline_seconds if baseline_seconds is not None else (3.0 if quick else 10.0)
    doc: dict = {"command": " ".join(["python", "benchmarks/heavy.py", *sys.argv[1:]]), "machine": machine()}
    doc.update(run(quick, baseline_s, timeout))
    table, notes = report(doc)
    doc["findings"] = notes
    table += "\n\n" + "\n".join(f"- {line}" for line in notes)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
