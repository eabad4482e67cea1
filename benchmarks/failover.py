"""Failover: kill -9 the leader while a client writes continuously, and a graceful stop
(SIGTERM: leadership transfer), for raftsql and for a 3-member etcd (at its defaults and at
raftsql's heartbeat/election settings), in the same run.

Per trial: the gap the client saw (completion of the last successful write before the kill to
completion of the first successful write after it) and the time until a new leader is known.

    python benchmarks/failover.py --quick        # 3 trials each
    python benchmarks/failover.py --trials 20
"""

from __future__ import annotations

import shutil
import signal
import statistics
import sys
import threading
import time

import click
from _common import (
    EtcdClient,
    EtcdCluster,
    driver_connect,
    machine,
    md_table,
    raftsql_cluster,
    tmpdir,
    write_report,
)


class Writer(threading.Thread):
    """Writes continuously; records the completion time of every successful write."""

    def __init__(self, write):
        super().__init__(daemon=True)
        self.write = write
        self.oks: list[float] = []
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.write(i)
                self.oks.append(time.monotonic())
            except Exception:  # noqa: BLE001 - a failed attempt is part of the gap
                self.errors += 1
                time.sleep(0.001)
            i += 1

    def gap_around(self, t_kill: float, timeout: float = 15.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [t for t in self.oks if t > t_kill]
            if after:
                before = [t for t in self.oks if t <= t_kill]
                return after[0] - (before[-1] if before else t_kill)
            time.sleep(0.005)
        return None


def _wait_caught_up(c, nid: str, timeout: float = 60.0) -> None:
    """Wait until the restarted node has applied what the leader had committed at restart."""
    deadline = time.monotonic() + timeout
    target = None
    while time.monotonic() < deadline:
        if target is None:
            ld = c.wait_leader(30)
            st = c.status(ld)
            target = st["commit_index"] if st else None
        st = c.status(nid)
        if target is not None and st and st["applied_index"] >= target:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{nid} did not catch up to {target}")


def raftsql_trials(trials: int, graceful: bool) -> list[dict]:
    base = tmpdir("raftsql-fo-")
    c = raftsql_cluster(base, 3)
    out = []
    try:
        conn = driver_connect(c.dsn, timeout=20)
        conn.cursor().execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")
        cur = conn.cursor()
        w = Writer(lambda i: cur.execute("INSERT INTO t (v) VALUES (?)", (i,)))
        w.start()
        label = "graceful" if graceful else "kill -9"
        with click.progressbar(range(trials), label=f"raftsql {label}", file=sys.stderr) as bar:
            for _ in bar:
                leader = c.wait_leader(30)
                time.sleep(0.3)
                t_kill = time.monotonic()
                c.procs[leader].send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
                others = [n for n in c.ids if n != leader]
                elected = None
                while elected is None and time.monotonic() - t_kill < 15:
                    for n in others:
                        st = c.status(n)
                        if st and st.get("leader") and st["leader"] != leader:
                            elected = time.monotonic() - t_kill
                            break
                    time.sleep(0.002)
                gap = w.gap_around(t_kill)
                out.append({"gap_s": gap, "election_s": elected})
                c.procs[leader].wait()
                c.start(leader)
                _wait_caught_up(c, leader)
        w.stop.set()
        w.join(20)
        conn.close()
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    return out


def etcd_trials(trials: int, heartbeat_ms: int, election_ms: int, graceful: bool = False) -> list[dict] | str:
    base = tmpdir("etcd-fo-")
    try:
        try:
            ec = EtcdCluster(base, 3, heartbeat_ms, election_ms)
        except RuntimeError as e:
            return f"skipped: {e}"
        ec.start()
        out = []
        try:
            ec.wait_ready()
            cl = EtcdClient(ec)
            w = Writer(lambda i: cl.put(f"k{i % 1000}", str(i), timeout=1.0))
            w.start()
            with click.progressbar(range(trials), label=f"etcd {heartbeat_ms}/{election_ms} ms", file=sys.stderr) as bar:
                for _ in bar:
                    ec.wait_ready()
                    leader = ec.leader()
                    time.sleep(0.3)
                    t_kill = time.monotonic()
                    if graceful:
                        ec.procs[leader].send_signal(signal.SIGTERM)
                    else:
                        ec.procs[leader].kill()
                    elected = None
                    while elected is None and time.monotonic() - t_kill < 15:
                        ld = ec.leader()
                        if ld is not None and ld != leader:
                            elected = time.monotonic() - t_kill
                        time.sleep(0.002)
                    gap = w.gap_around(t_kill)
                    out.append({"gap_s": gap, "election_s": elected})
                    ec.procs[leader].wait()
                    ec.start(leader)
                    time.sleep(1.0)
            w.stop.set()
            w.join(20)
        finally:
            ec.close()
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def summarize(trials) -> dict:
    if isinstance(trials, str):
        return {"skipped": trials}
    gaps = [t["gap_s"] for t in trials if t["gap_s"] is not None]
    el = [t["election_s"] for t in trials if t["election_s"] is not None]
    return {
        "trials": len(trials),
        "failed_trials": sum(1 for t in trials if t["gap_s"] is None),
        "gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "gap_max_s": round(max(gaps), 3) if gaps else None,
        "election_median_s": round(statistics.median(el), 3) if el else None,
        "election_max_s": round(max(el), 3) if el else None,
    }


@click.command()
@click.option("--quick", is_flag=True, help="3 trials per system (CI).")
@click.option("--trials", type=int, default=20, show_default=True)
@click.option("--no-etcd", is_flag=True, help="Skip the etcd baselines.")
@click.option("--name", default="failover", show_default=True)
def main(quick: bool, trials: int, no_etcd: bool, name: str) -> None:
    if quick:
        name = name if name != "failover" else "failover-quick"
        trials = 3
    doc = {"command": " ".join(["python", "benchmarks/failover.py", *sys.argv[1:]]), "machine": machine(), "raw": {}}
    raw = doc["raw"]
    raw["raftsql_kill9"] = raftsql_trials(trials, graceful=False)
    raw["raftsql_graceful"] = raftsql_trials(trials, graceful=True)
    if not no_etcd:
        raw["etcd_default_kill9"] = etcd_trials(trials, 100, 1000)
        raw["etcd_raftsql_settings_kill9"] = etcd_trials(trials, 50, 300)
    doc["summary"] = {k: summarize(v) for k, v in raw.items()}
    rows = []
    for k, s in doc["summary"].items():
        if "skipped" in s:
            rows.append([k, s["skipped"], "", "", "", ""])
        else:
            rows.append([k, s["trials"], s["gap_median_s"], s["gap_max_s"], s["election_median_s"], s["election_max_s"]])
    table = md_table(["system", "trials", "client gap median s", "gap max s", "new leader median s", "new leader max s"], rows)
    click.echo(table)
    write_report(name, doc, table)


if __name__ == "__main__":
    main()
