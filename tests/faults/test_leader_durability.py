"""durability="leader" when the leader dies: what the window promises, measured.

Each of 20 trials runs writers at durability "leader" and one at "quorum" (every value unique)
against a 3-node cluster whose peer links go through proxies. It cuts the leader off from its
peers (clients still reach it: they talk to nodes directly), so the leader answers "leader"
writes from its own disk until max_unreplicated_writes (WINDOW) of them are outstanding and then
stalls; it kills the leader with SIGKILL, heals the links, lets the writers go on with the new
leader, starts the old one again and waits until every replica is equal. Then it counts, per
trial, the acknowledged writes missing from the database: for "leader" at most WINDOW (the
window really fills, so some are lost), for "quorum" none; and no value is there twice (a
retried write applies once). The per-trial counts are printed (pytest -s) and asserted.
"""

import threading
import time

import raftsql.driver as db
from raftsql.driver._connection import Connection
from raftsql.testing.faultcluster import FaultCluster

TRIALS = 20
WINDOW = 8
LEADER_WRITERS = 3


def _writer(cluster, durability, tag, acked, stop, errors):
    conn = Connection(cluster.client(timeout=5), autocommit=True, durability=durability)
    i = 0
    try:
        while not stop.is_set():
            value = f"{tag}-{i}"
            i += 1
            try:
                conn.execute("INSERT INTO w (v) VALUES (?)", (value,))
            except (db.OutcomeUnknown, db.Unavailable):
                continue  # not acknowledged: it may or may not be there; not counted either way
            acked.append(value)
        # After the failover: the next read answers (it does not wait for a lost write), and
        # the next write works.
        conn.execute("SELECT count(*) FROM w").fetchone()
        conn.execute("INSERT INTO w (v) VALUES (?)", (f"{tag}-after",))
        acked.append(f"{tag}-after")
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(f"{tag}: {type(e).__name__}: {e}")
    finally:
        conn.close()


def test_a_leader_crash_loses_at_most_the_window_and_quorum_writes_lose_nothing(tmp_path):
    c = FaultCluster(tmp_path / "c", 3, node_args=["--max-unreplicated-writes", str(WINDOW)])
    report = []
    try:
        c.start()
        c.wait_leader()
        setup = Connection(c.client(timeout=30), autocommit=True)
        setup.execute("CREATE TABLE w (v TEXT)")
        for trial in range(TRIALS):
            acked: dict[str, list[str]] = {"leader": [], "quorum": []}
            stop, errors = threading.Event(), []
            args = [("leader", f"t{trial}-l{k}", acked["leader"]) for k in range(LEADER_WRITERS)]
            args.append(("quorum", f"t{trial}-q", acked["quorum"]))
            threads = [threading.Thread(target=_writer, args=(c, d, tag, out, stop, errors))
                       for d, tag, out in args]
            victim = c.wait_leader()
            for t in threads:
                t.start()
            time.sleep(0.3)
            c.net.partition([[victim], [n for n in c.ids if n != victim]])
            time.sleep(0.5)  # the victim fills its window; the others elect a leader
            c.kill(victim)
            c.net.heal()
            time.sleep(0.5)  # the writers go on with the new leader
            stop.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a writer hung"
            assert not errors, errors
            c.start(victim)
            c.wait_leader()
            hashes = c.hashes(timeout=60)
            assert len(hashes) == 3 and len(set(hashes.values())) == 1, hashes
            present = dict(setup.execute("SELECT v, count(*) FROM w WHERE v LIKE ? GROUP BY v",
                                         (f"t{trial}-%",)).fetchall())
            twice = [v for v, n in present.items() if n > 1]
            lost = {k: [v for v in vals if v not in present] for k, vals in acked.items()}
            report.append((trial, len(acked["leader"]), len(lost["leader"]), len(acked["quorum"]),
                           len(lost["quorum"]), len(twice)))
            assert not twice, f"trial {trial}: applied twice: {twice[:5]}"
            assert not lost["quorum"], f"trial {trial}: quorum writes lost: {lost['quorum'][:5]}"
            assert len(lost["leader"]) <= WINDOW, f"trial {trial}: {lost['leader']}"
            assert acked["leader"] and acked["quorum"]
        setup.close()
        # The cut-off leader really answered writes it then lost: the window is what bounds it.
        assert sum(r[2] for r in report) > 0, report
    finally:
        c.close()
        print("\ntrial  leader-acked  leader-lost  quorum-acked  quorum-lost  twice")
        for r in report:
            print("{:5d}  {:12d}  {:11d}  {:12d}  {:11d}  {:5d}".format(*r))
        if report:
            print(f"lost at durability=leader: {sum(r[2] for r in report)} of "
                  f"{sum(r[1] for r in report)} acknowledged in {len(report)} trials "
                  f"(window {WINDOW} per trial); at quorum: {sum(r[4] for r in report)}")
