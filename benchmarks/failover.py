"""Failover: kill -9 the leader while a client writes continuously, and a graceful stop
(SIGTERM: leadership transfer), for raftsql and for a 3-member etcd (at its defaults and at
raftsql's heartbeat/election settings), in the same run.

Per trial: the gap the client saw (the longest time between two consecutive successful writes,
from the last one before the signal until the client is writing through the new leader) and the
time until a new leader is known.

    python benchmarks/failover.py --quick        # 3 trials each
    python benchmarks/failover.py --trials 20
"""

from __future__ import annotations

import bisect
import shutil
import signal
import statistics
import sys
import threading
import time

import click
from _common import (
    EtcdClient,
    driver_connect,
    machine,
    md_table,
    raftsql_cluster,
    start_etcd,
    tmpdir,
    write_report,
)
from _plots import failover_timeline


def _raftsql_timing() -> tuple[int, int]:
    """raftsql's node defaults (heartbeat, minimum election timeout, ms)."""
    from raftsql.server import config as node

    return (node.DEFAULT_TICK_MS * node.DEFAULT_HEARTBEAT_TICKS,
            node.DEFAULT_TICK_MS * node.DEFAULT_ELECTION_TICKS)


RAFTSQL_HEARTBEAT_MS, RAFTSQL_ELECTION_MS = _raftsql_timing()
# etcd at raftsql's settings: the same election timeout; etcd refuses an election timeout under
# 5 heartbeats, so its heartbeat is shortened to fit where raftsql's ratio is smaller.
ETCD_LIKE_RAFTSQL = (min(RAFTSQL_HEARTBEAT_MS, RAFTSQL_ELECTION_MS // 5), RAFTSQL_ELECTION_MS)


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

    def gap_around(self, t_kill: float, elected: float | None, timeout: float = 15.0,
                   settle: float = 0.2) -> tuple[float | None, float]:
        """(gap, start): the longest time between consecutive successful writes from the last one
        at or before t_kill until `settle` s after the first one that completed after the new
        leader was known; and when that gap started relative to t_kill. (Not simply "last before
        to first after": a write already committed when the leader died can still complete just
        after the kill, and the outage comes after it.) gap None if no write came."""
        t_known = t_kill + (elected or 0.0)
        deadline = time.monotonic() + timeout
        oks = self.oks  # appended in time order by one thread: sorted, so bisect works
        while time.monotonic() < deadline:
            k = bisect.bisect_right(oks, t_known)
            if k < len(oks) and time.monotonic() >= oks[k] + settle:
                end = oks[k] + settle
                i = bisect.bisect_right(oks, t_kill)
                j = bisect.bisect_right(oks, end)
                points = [oks[i - 1] if i > 0 else t_kill] + oks[i:j]
                gap, start = max((b - a, a) for a, b in zip(points, points[1:], strict=False))
                return gap, start - t_kill
            time.sleep(0.005)
        return None, 0.0


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
        try:
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
                    gap, start = w.gap_around(t_kill, elected)
                    out.append({"gap_s": _r(gap), "gap_start_s": _r(start), "election_s": _r(elected)})
                    c.procs[leader].wait()
                    c.start(leader)
                    _wait_caught_up(c, leader)
        except Exception as e:  # noqa: BLE001 - a broken cluster ends the series, reported
            out.append(_broken(e))
        w.stop.set()
        w.join(20)
        conn.close()
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    return out


def etcd_request_timeout(election_ms: int) -> float:
    """The etcd writer's per-request timeout: one election timeout. A put sent to a follower that
    still forwards to the dead leader hangs until this fires; the client then tries the next
    member. (raftsql's driver needs no such timeout: its nodes answer NOT_LEADER or wait for
    the new leader themselves.)"""
    return election_ms / 1000


def etcd_trials(trials: int, heartbeat_ms: int, election_ms: int, graceful: bool = False) -> list[dict] | str:
    base = tmpdir("etcd-fo-")
    try:
        try:
            ec = start_etcd(base, 3, heartbeat_ms, election_ms)
        except RuntimeError as e:
            return f"skipped: {e}"
        except TimeoutError as e:
            return f"failed: {e}"
        out = []
        try:
            cl = EtcdClient(ec)
            timeout = etcd_request_timeout(election_ms)
            w = Writer(lambda i: cl.put(f"k{i % 1000}", str(i), timeout=timeout))
            w.start()
            label = f"etcd {heartbeat_ms}/{election_ms} ms {'graceful' if graceful else 'kill -9'}"
            try:
                with click.progressbar(range(trials), label=label, file=sys.stderr) as bar:
                    for _ in bar:
                        leader = ec.wait_leader()
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
                        gap, start = w.gap_around(t_kill, elected)
                        out.append({"gap_s": _r(gap), "gap_start_s": _r(start), "election_s": _r(elected)})
                        ec.procs[leader].wait()
                        ec.start(leader)
                        time.sleep(1.0)
            except Exception as e:  # noqa: BLE001 - a broken cluster ends the series, reported
                out.append(_broken(e))
            w.stop.set()
            w.join(20)
        finally:
            ec.close()
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _broken(e: Exception) -> dict:
    """A trial that could not run (the cluster did not recover): counted as a trial without
    recovery, with the reason, and the series stops."""
    click.echo(f"\ntrial series stopped: {type(e).__name__}: {e}", err=True)
    return {"gap_s": None, "gap_start_s": 0.0, "election_s": None, "error": f"{type(e).__name__}: {e}"}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


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
    doc["settings"] = {"raftsql_heartbeat_ms": RAFTSQL_HEARTBEAT_MS, "raftsql_election_ms": RAFTSQL_ELECTION_MS,
                       "etcd_default_heartbeat_election_ms": [100, 1000],
                       "etcd_raftsql_settings_heartbeat_election_ms": list(ETCD_LIKE_RAFTSQL)}
    raw["raftsql_kill9"] = raftsql_trials(trials, graceful=False)
    raw["raftsql_graceful"] = raftsql_trials(trials, graceful=True)
    if not no_etcd:
        raw["etcd_default_kill9"] = etcd_trials(trials, 100, 1000)
        raw["etcd_default_graceful"] = etcd_trials(trials, 100, 1000, graceful=True)
        raw["etcd_raftsql_settings_kill9"] = etcd_trials(trials, *ETCD_LIKE_RAFTSQL)
    doc["summary"] = summ = {k: summarize(v) for k, v in raw.items()}
    # Each raftsql row's baseline: etcd under the same fault; kill -9 at both etcd settings.
    baselines = {"raftsql_kill9": ["etcd_default_kill9", "etcd_raftsql_settings_kill9"],
                 "raftsql_graceful": ["etcd_default_graceful"]}
    rows = []
    for k, s in summ.items():
        if "skipped" in s:
            rows.append([k, s["skipped"], "", "", "", "", "", ""])
            continue
        ratios = []
        for b in baselines.get(k, []):
            bs = summ.get(b, {})
            if bs.get("gap_median_s") and s["gap_median_s"] is not None and bs.get("election_median_s"):
                ratios.append(f"{s['gap_median_s'] / bs['gap_median_s']:.2f}x / "
                              f"{s['election_median_s'] / bs['election_median_s']:.2f}x {b}")
        rows.append([k, s["trials"], s["failed_trials"], s["gap_median_s"], s["gap_max_s"], s["election_median_s"],
                     s["election_max_s"], "; ".join(ratios) if ratios else ("1.00x" if k.startswith("etcd") else "n/a")])
    table = md_table(["system", "trials", "trials without recovery", "client gap median s", "gap max s",
                      "new leader median s", "new leader max s", "median gap / new leader vs etcd"], rows)
    notes = targets(summ)
    if not no_etcd:
        notes.append(f"etcd's writer: puts through its HTTP/JSON gateway on one keep-alive connection; per-request "
                     f"timeout = one election timeout ({etcd_request_timeout(1000)} s at defaults, "
                     f"{etcd_request_timeout(ETCD_LIKE_RAFTSQL[1])} s at {ETCD_LIKE_RAFTSQL[0]}/{ETCD_LIKE_RAFTSQL[1]} ms), "
                     f"then the next member. Its client gap includes that timeout when its member was a follower; "
                     f"the new-leader time does not depend on the client.")
    doc["findings"] = notes
    table += "\n\n" + "\n".join(f"- {line}" for line in notes)
    click.echo(table)
    write_report(name, doc, table)
    failover_timeline(name, raw, doc["machine"])


def targets(summ: dict) -> list[str]:
    out = []
    k = summ.get("raftsql_kill9", {})
    if k.get("gap_median_s") is not None:
        med, mx = k["gap_median_s"], k["gap_max_s"]
        out.append(f"Target kill -9 failover median <= 0.4 s over {k['trials']} trials: "
                   f"{'met' if med <= 0.4 else 'NOT met'} (client gap median {med} s; new leader median "
                   f"{k['election_median_s']} s).")
        out.append(f"Target kill -9 failover max <= 1 s: {'met' if mx <= 1.0 and not k['failed_trials'] else 'NOT met'} "
                   f"(client gap max {mx} s, {k['failed_trials']} trial(s) without recovery).")
    g = summ.get("raftsql_graceful", {})
    if g.get("gap_median_s") is not None:
        out.append(f"Target graceful transfer gap <= 50 ms: {'met' if g['gap_max_s'] <= 0.05 else 'NOT met'} "
                   f"(median {g['gap_median_s'] * 1000:.0f} ms, max {g['gap_max_s'] * 1000:.0f} ms; "
                   f"'met' means every trial).")
    return out


if __name__ == "__main__":
    main()
