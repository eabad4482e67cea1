"""Jepsen-style fault runs through the real driver client (raftsql/testing/): linearizable
registers, a set with no lost or duplicated inserts, read-your-writes on stale reads, and
transactions with no isolation anomaly (Elle's list-append), under kill -9, SIGSTOP,
partitions, clock offsets, leadership transfers and slow links.

The CI slice: five short randomized runs that together apply every nemesis; a scripted
broken-read run that the checker must reject, and the same script on a correct build, which it
must accept; a randomized broken-read run that must fail; a list-append run under faults and
a broken-validation run the transaction checker must reject; the jetcd case (retried writes while
the leader is killed); and a leader clock jump across which a resent write still applies once.
Long runs: `python benchmarks/faults.py --duration 60 --runs 30`. See DESIGN.md.
"""

import os
import random
import shutil
import signal
import threading
import time

import pytest

from raftsql.testing import checker
from raftsql.testing.clock import clock_offset_env
from raftsql.testing.faultcluster import FaultCluster
from raftsql.testing.history import Ctx, History
from raftsql.testing.nemesis import NEMESES
from raftsql.testing.run import RunConfig, run
from raftsql.testing.workloads import RegisterWorkload, SetWorkload

# Each run: ~2-5 s to start, DURATION of clients and faults, ~1 s to heal and check.
DURATION = float(os.environ.get("RAFTSQL_FAULTS_CI_DURATION", "12"))

# Every nemesis at least once across the matrix (the schedule cycles through a run's list).
MATRIX = [
    pytest.param(3, ["kill", "kill-leader", "pause"], id="3-kill-pause"),
    pytest.param(3, ["pause-leader", "transfer", "clock"], id="3-pause-leader-transfer-clock"),
    pytest.param(5, ["partition-halves", "partition-bridge", "partition-ring"], id="5-partitions"),
    pytest.param(3, ["partition-leader", "partition-one-way", "slow"], id="3-partition-leader-one-way-slow"),
    pytest.param(5, ["kill-leader", "pause-leader", "clock"], id="5-kill-pause-clock"),
    pytest.param(3, ["membership", "kill"], id="3-membership-kill"),
]


def test_matrix_covers_every_nemesis():
    covered = {n for p in MATRIX for n in p.values[1]}
    assert covered == set(NEMESES)


@pytest.mark.parametrize("nodes,nemeses", MATRIX)
def test_fault_run_is_linearizable_and_loses_nothing(nodes, nemeses):
    report = run(RunConfig(nodes=nodes, duration=DURATION, nemeses=nemeses, min_faults=len(nemeses),
                           quiet=(0.5, 1.0), hold=(2.0, 3.0)))
    assert report.ok, report.explain()
    assert set(report.nemeses_applied) == set(nemeses), report.explain()
    for name in ("register", "set", "ryw"):
        assert report.workloads[name]["counts"]["ok"] > 50, report.explain()


# --------------------------------------------------------------------------- bank


def test_bank_transfers_keep_the_total_while_the_leader_is_killed():
    """The bank workload (serializable transactions): 4 clients run read-then-write transfers in
    serializable transactions while the leader is kill -9'd again and again. Every read sees
    the same total, no transfer is applied twice, acknowledged ones are all there, failed ones
    are not, and the final balances are exactly the initial ones plus the logged transfers."""
    report = run(RunConfig(nodes=3, duration=DURATION, nemeses=["kill-leader"], min_faults=2,
                           workloads={"bank": 4}, quiet=(0.5, 1.0), hold=(1.5, 2.5)))
    assert report.ok, report.explain()
    assert report.nemeses_applied.count("kill-leader") >= 2, report.explain()
    bank = report.workloads["bank"]
    assert bank["counts"]["ok"] > 20 and bank["reads"] > 10, report.explain()
    print(report.explain())


# --------------------------------------------------------------------------- transactions


def test_append_transactions_have_no_anomalies_under_kill_pause_and_partitions():
    """Elle's list-append workload (raftsql/testing/elle.py): transactions of reads and appends
    on a few hot keys, through the DB-API driver, while nodes are killed, paused and cut off.
    The dependency graph of the committed transactions (ww, wr, rw and real-time edges) must
    have no cycle and no aborted or intermediate read: strict serializability."""
    report = run(RunConfig(nodes=3, duration=DURATION, workloads={"append": 6}, min_faults=3,
                           nemeses=["kill", "pause", "partition-halves", "partition-leader"],
                           quiet=(0.5, 1.0), hold=(1.5, 2.5)))
    assert report.ok, report.explain()
    append = report.workloads["append"]
    assert append["counts"]["ok"] > 100 and not append["anomalies"], report.explain()
    assert append["edges"].get("rw", 0) > 50 and append["edges"].get("wr", 0) > 50, report.explain()
    print(report.explain())


def test_broken_transaction_validation_is_caught():
    """With RAFTSQL_TEST_BROKEN_TXN_VALIDATION=1 every commit applies without comparing what its
    statements see now with what the client saw: the checker must find the anomalies."""
    report = run(RunConfig(nodes=3, duration=6, nemeses=["none"], workloads={"append": 6},
                           env={"RAFTSQL_TEST_BROKEN_TXN_VALIDATION": "1"}))
    try:
        assert not report.ok, report.explain()
        found = report.workloads["append"]["anomalies"]
        assert {"G-single", "G2"} & set(found), report.explain()
    finally:
        if report.dir:
            shutil.rmtree(report.dir, ignore_errors=True)


# --------------------------------------------------------------------------- broken reads


def _kept(d, what: str) -> str:
    return f"{what}; history and node logs kept in {d}"


@pytest.mark.parametrize("broken", [True, False], ids=["broken-reads", "correct-reads"])
def test_checker_reports_stale_reads_from_a_deposed_leader(tmp_path, broken):
    """Isolate the leader, write through the new leader, then read from the old one.

    With RAFTSQL_TEST_BROKEN_READS=1 the old leader answers "linearizable" reads from its own
    state, so it returns the value from before the acknowledged write: the checker must call
    the history non-linearizable. On a correct build the same script must pass (the old
    leader cannot confirm its leadership, so the read fails and is dropped)."""
    d = tmp_path / "run"
    d.mkdir()
    cl = FaultCluster(d / "cluster", 3, env={"RAFTSQL_TEST_BROKEN_READS": "1"} if broken else {})
    history = History(d / "history.jsonl")
    stop = threading.Event()
    ctx = Ctx(cl, history, random.Random(7), stop, op_timeout=10)
    reg = RegisterWorkload(threads=0)
    writer = reader = None
    failed = True
    try:
        cl.start()
        old = cl.wait_leader(30)
        writer = cl.client(timeout=15)
        reg.setup(ctx, writer)
        assert reg.op(ctx, writer, "w", "write", "x", 1)["type"] == "ok"
        cl.hashes(timeout=30)  # every node applied x=1
        cl.net.partition([[old], [n for n in cl.ids if n != old]])
        history.record(process="nemesis", type="info", f="start", value=f"isolated {old}")
        new = cl.wait_leader(30, exclude=(old,))
        assert new != old
        ev = reg.op(ctx, writer, "w", "write", "x", 2)
        assert ev["type"] == "ok", _kept(d, f"write through the new leader failed: {ev}")
        reader = cl.node_client(old, timeout=1.5)
        reads = [reg.op(ctx, reader, "r", "read", "x", None) for _ in range(3)]
        cl.net.heal()
        history.record(process="nemesis", type="info", f="stop", value="healed")
        ops, _ = checker.ops_from_events([e for e in history.events if e.get("workload") == "register"])
        res = checker.check_registers(ops)["x"]
        if broken:
            assert [r["value"] for r in reads] == [1, 1, 1], _kept(d, f"the stale leader did not serve stale reads: {reads}")
            assert res.valid is False, _kept(d, "checker missed the stale reads:\n" + res.explain())
            assert any(op.f == "read" and op.value == 1 for op in res.stuck), res.explain()
        else:
            assert all(r["type"] != "ok" or r["value"] == 2 for r in reads), _kept(d, f"stale read on a correct build: {reads}")
            assert res.valid is True, _kept(d, res.explain())
        failed = False
    finally:
        for c in (writer, reader):
            if c is not None:
                c.close()
        cl.close()
        history.close()
        if not failed:
            shutil.rmtree(d, ignore_errors=True)


def test_random_run_with_broken_reads_is_caught():
    """The randomized harness also catches the broken read path: with the leader isolated
    again and again, clients still attached to it read stale values."""
    report = run(RunConfig(nodes=3, duration=8, nemeses=["partition-leader"], env={"RAFTSQL_TEST_BROKEN_READS": "1"},
                           workloads={"register": 6}, quiet=(0.3, 0.6), hold=(2.0, 2.5), short_timeout=None))
    try:
        assert not report.ok, report.explain()
        reg = report.workloads["register"]
        assert reg["valid"] is False and "NOT linearizable" in reg["explain"], report.explain()
    finally:
        if report.dir:
            shutil.rmtree(report.dir, ignore_errors=True)


# --------------------------------------------------------------------------- jetcd


def test_retried_writes_apply_once_while_the_leader_is_killed(tmp_path):
    """jetcd #710-style: clients resend writes (same serial) after OutcomeUnknown while the
    leader is kill -9'd repeatedly. No value may be applied twice; every acknowledged value
    is present; every value whose outcome was ever unknown is resent until acknowledged."""
    d = tmp_path / "run"
    d.mkdir()
    cl = FaultCluster(d / "cluster", 3)
    history = History(d / "history.jsonl")
    stop = threading.Event()
    ctx = Ctx(cl, history, random.Random(11), stop, op_timeout=1.0)
    sw = SetWorkload(threads=4, retry_unknown=True)
    threads = []
    kills = []
    failed = True
    try:
        cl.start()
        cl.wait_leader(30)
        setup = cl.client(timeout=15)
        sw.setup(ctx, setup)
        setup.close()
        for p in range(sw.threads):
            t = threading.Thread(target=sw.worker, args=(ctx, p, random.Random(p)), daemon=True)
            threads.append(t)
            t.start()
        victim = None
        for _ in range(3):
            time.sleep(2.0)
            if victim is not None:
                cl.start(victim)
            victim = cl.wait_leader(30, exclude=(victim,) if victim else ())
            cl.kill(victim, signal.SIGKILL)
            kills.append(victim)
            history.record(process="nemesis", type="info", f="kill", value=victim)
        time.sleep(2.0)
        cl.start(victim)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        cl.wait_leader(30)
        sw.final(ctx)
        res = sw.outcome(ctx)
        events = [e for e in history.events if e.get("workload") == "set"]
        resends = sum(1 for e in events if e["type"] == "invoke" and e.get("serial") is not None)
        dups = sum(1 for e in events if e["type"] == "ok" and e.get("dup"))
        assert res.valid, _kept(d, res.explain())
        assert not res.duplicated and not res.lost
        assert res.acknowledged > 100, _kept(d, res.explain())
        # Values left unknown can only be the ones in flight when the clients stopped.
        assert res.unknown <= sw.threads, _kept(d, res.explain())
        assert resends + dups > 0, _kept(d, "no write was ever retried: the scenario did not happen")
        hashes = cl.hashes(timeout=30)
        assert len(set(hashes.values())) == 1, _kept(d, f"replicas diverged: {hashes}")
        print(f"jetcd: {len(kills)} leader kills {kills}, {res.acknowledged} acknowledged, "
              f"{resends} explicit resends, {dups} answered from the session table, 0 duplicates")
        failed = False
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        cl.close()
        history.close()
        if not failed:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- clock jumps


# This was a strict xfail until sessions got their own clock (server/statemachine.py,
# SESSION_CLOCK_MAX_STEP_MS): a leader whose wall clock jumped ahead by more than the session
# timeout used to expire every session at once, so a resend across the jump applied twice.
def test_resend_after_a_leader_clock_jump_is_still_applied_once(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    cl = FaultCluster(d / "cluster", 3)
    a = b = None
    try:
        cl.start()
        cl.wait_leader(30)
        a = cl.client(timeout=15)
        a.execute([("CREATE TABLE t (v INTEGER)", [])])
        r1 = a.execute([("INSERT INTO t (v) VALUES (1)", [])], serial=1000)
        assert r1["error"] is None and not r1["duplicate"]
        cl.hashes(timeout=30)
        # The wall clocks step 7 h ahead (an NTP step, VMs restored with a wrong clock): a
        # rolling restart with the offset, so whichever node leads next is ahead.
        for n in cl.ids:
            cl.kill(n, signal.SIGTERM)
            cl.node_env[n] = clock_offset_env(d, 7 * 3600)
            cl.start(n)
            cl.wait_leader(30)
        b = cl.client(timeout=15)
        b.execute([("INSERT INTO t (v) VALUES (2)", [])])
        # The response to serial 1000 was "lost": the client resends it with the same serial.
        again = a.execute([("INSERT INTO t (v) VALUES (1)", [])], serial=1000)
        count = a.execute([("SELECT count(*) FROM t WHERE v = 1", [])])["rows"][0][0]
        assert again["duplicate"] is True and count == 1, f"applied twice: {again}, count {count}"
    finally:
        for c in (a, b):
            if c is not None:
                c.close()
        cl.close()
