"""Membership changes on real node processes: grow 3 -> 5 and shrink back under a write load,
remove the leader, --join, restarts after changes, and the errors an operator can hit."""

import signal
import threading
import time
from collections import Counter

import pytest

from raftsql.driver._client import BadRequest, OutcomeUnknown, Unavailable
from raftsql.testing.cluster import LocalCluster, running


@pytest.fixture
def cluster(tmp_path):
    with running(tmp_path / "c", 3) as c:
        yield c


class Writer(threading.Thread):
    """Inserts v = 0, 1, 2, ... one at a time. A write that ends in an exception is resent
    with the same serial (OutcomeUnknown) or as is (Unavailable) until it is acknowledged,
    as an application using the driver would; every exception is recorded."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.client = cluster.client(timeout=20)
        self.stop = threading.Event()
        self.acked: list[int] = []
        self.errors: list[BaseException] = []
        self.progress = threading.Condition()

    def run(self):
        v = 0
        try:
            while not self.stop.is_set():
                serial = self.client.next_serial()
                while True:
                    try:
                        r = self.client.execute([("INSERT INTO t (v) VALUES (?)", [v])], serial=serial)
                        break
                    except (OutcomeUnknown, Unavailable) as e:
                        self.errors.append(e)
                        if len(self.errors) > 20:
                            return
                assert r["error"] is None, r
                with self.progress:
                    self.acked.append(v)
                    self.progress.notify_all()
                v += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)
        finally:
            self.client.close()

    def wait_more(self, n: int, timeout: float = 60.0) -> None:
        """Wait until n more writes were acknowledged (progress, not timing)."""
        with self.progress:
            target = len(self.acked) + n
            assert self.progress.wait_for(lambda: len(self.acked) >= target or not self.is_alive(), timeout), \
                f"the writer made no progress: {len(self.acked)} acknowledged, errors {self.errors}"
        assert self.is_alive(), f"the writer stopped: {self.errors}"


def _voters(cluster, nid):
    st = cluster.status(nid)
    return st and (sorted(st["voters"]), sorted(st["learners"]))


def _wait_membership(cluster, voters, learners=(), timeout=30.0):
    """Every live member reports this membership."""
    want = (sorted(voters), sorted(learners))
    deadline = time.monotonic() + timeout
    seen = {}
    while time.monotonic() < deadline:
        seen = {n: _voters(cluster, n) for n in [*voters, *learners] if cluster.alive(n)}
        if all(v == want for v in seen.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"membership is not {want}: {seen}")


def _wait_serving(cluster, nid, timeout=60.0):
    deadline = time.monotonic() + timeout
    while cluster.status(nid) is None:
        assert cluster.alive(nid), f"{nid} exited; see {cluster.data_dir(nid) / 'node.log'}"
        assert time.monotonic() < deadline, f"{nid} does not answer"
        time.sleep(0.05)


def test_grow_3_to_5_and_shrink_back_under_writes(cluster):
    c = cluster.client(timeout=20)
    c.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)", [])])
    c.close()
    w = Writer(cluster)
    w.start()
    try:
        w.wait_more(50)
        for nid in ("n4", "n5"):
            cluster.add_node(nid)
            cluster.start(nid)  # --join: added as a learner by its own request
            _wait_serving(cluster, nid)  # it serves only once the join was accepted
            w.wait_more(20)
            r = cluster.admin("cluster_promote", nid, timeout=60)
            assert r["node_id"] == nid and r["role"] == "voter"
            w.wait_more(20)
        _wait_membership(cluster, ["n1", "n2", "n3", "n4", "n5"])
        # Shrink: remove the leader (it hands over first), then one more of the first voters.
        first = cluster.wait_leader()
        assert first in ("n1", "n2", "n3", "n4", "n5")
        victims = [first] + [n for n in ("n1", "n2", "n3") if n != first][:1]
        for nid in victims:
            r = cluster.admin("cluster_remove", nid, timeout=30)
            assert r["node_id"] == nid and nid not in r["members"]
            cluster.kill(nid, signal.SIGTERM)
            w.wait_more(20)
        rest = sorted(set(cluster.ids) - set(victims))
        _wait_membership(cluster, rest)
        # The address book survives restarts: a first voter and a joined node restart and
        # still reach everyone (the joined nodes' addresses are in no --peer list).
        for nid in (rest[0], "n5"):
            cluster.kill(nid)  # SIGKILL
            w.wait_more(10)
            cluster.start(nid)
            w.wait_more(10)
    finally:
        w.stop.set()
        w.join(60)
    assert not w.is_alive()
    # Only retryable pauses: nothing but Unavailable/OutcomeUnknown (and, with a 20 s budget
    # per attempt, we expect none at all).
    assert all(isinstance(e, OutcomeUnknown | Unavailable) for e in w.errors), w.errors
    assert not w.errors, w.errors
    hashes = cluster.hashes(timeout=60)
    assert set(hashes) == set(rest)
    assert len(set(hashes.values())) == 1, hashes
    c = cluster.client(timeout=20)
    counts = Counter(r[0] for r in c.execute([("SELECT v FROM t", [])])["rows"])
    c.close()
    assert len(w.acked) >= 200
    missing = [v for v in w.acked if counts[v] != 1]
    assert not missing, f"acknowledged writes missing or duplicated: {missing[:10]}"
    assert set(counts) <= set(range(len(w.acked) + 1))  # at most the one in flight at stop
    for nid in rest:
        st = cluster.status(nid)
        assert sorted(st["voters"]) == rest and st["learners"] == []


def test_remove_the_leader_hands_over_first(cluster):
    leader = cluster.wait_leader()
    c = cluster.client(timeout=20)
    c.execute([("CREATE TABLE t (v INTEGER)", [])])
    r = cluster.admin("cluster_remove", leader, timeout=30)
    assert r["node_id"] == leader and leader not in r["members"]
    rest = [n for n in cluster.ids if n != leader]
    _wait_membership(cluster, rest)
    new = cluster.wait_leader(exclude=(leader,))
    assert new in rest
    cluster.kill(leader, signal.SIGTERM)
    assert c.execute([("INSERT INTO t VALUES (1)", [])])["error"] is None
    assert c.execute([("SELECT count(*) FROM t", [])])["rows"] == [[1]]
    c.close()


def test_errors(cluster, tmp_path):
    with pytest.raises(BadRequest, match="n2 is already a voter"):
        cluster.admin("cluster_add", "n2", cluster.address("n2"), timeout=10)
    with pytest.raises(BadRequest, match="nx is not a member"):
        cluster.admin("cluster_remove", "nx", timeout=10)
    with pytest.raises(BadRequest, match="nx is not a learner"):
        cluster.admin("cluster_promote", "nx", timeout=10)
    with pytest.raises(BadRequest, match="not a valid node id"):
        cluster.admin("cluster_add", "bad id!", "127.0.0.1:1", timeout=10)
    with pytest.raises(BadRequest, match="not host:port"):
        cluster.admin("cluster_add", "n9", "nowhere", timeout=10)
    # A learner that never runs never catches up: promote refuses (retryable) at its deadline.
    cluster.add_node("n4")  # a certificate and a port, but not started
    r = cluster.admin("cluster_add", "n4", cluster.address("n4"), timeout=10)
    assert r["role"] == "learner" and "n4" in r["members"]
    again = cluster.admin("cluster_add", "n4", cluster.address("n4"), timeout=10)
    assert again.get("already") is True
    with pytest.raises(BadRequest, match="already a learner"):
        cluster.admin("cluster_add", "n4", "127.0.0.1:1", timeout=10)
    with pytest.raises(Unavailable, match="n4 has not caught up"):
        cluster.admin("cluster_promote", "n4", timeout=3)
    cluster.admin("cluster_remove", "n4", timeout=10)
    _wait_membership(cluster, ["n1", "n2", "n3"])
    # Joining needs the joining node's own certificate: a client certificate cannot.
    from raftsql.driver._admin import _admin_call
    from raftsql.driver._client import Forbidden

    for dsn in (cluster.dsn, cluster.admin_dsn):  # not even an admin's
        with pytest.raises(Forbidden, match="may not run cluster join: only a node's own certificate may"):
            _admin_call(dsn, {"op": "cluster_join", "node_id": "n7", "address": "127.0.0.1:1"}, 10)


def test_cannot_remove_the_last_voter(tmp_path):
    with LocalCluster(tmp_path / "one", 1) as c:
        c.start()
        c.wait_leader()
        with pytest.raises(BadRequest, match="last voter"):
            c.admin("cluster_remove", "n1", timeout=10)


def test_a_voter_cannot_rejoin_with_join(cluster):
    """A node that lost its data must not come back as the voter it was."""
    from raftsql.driver._client import Client
    from raftsql.driver._conn import DSN
    from raftsql.server.tls import node_client_context

    client = Client(DSN.parse(cluster.dsn).hosts, node_client_context(cluster.node_certs("n3"), "n3"), timeout=10)
    try:
        with pytest.raises(BadRequest, match="n3 is already a voter"):
            client._call({"op": "cluster_join", "node_id": "n3", "address": cluster.address("n3")}, 10, None)
    finally:
        client.close()


def test_a_member_address_cannot_be_given_to_another_node(cluster):
    """`cluster add` and `--join` with an address a member already has used to be accepted: the
    new member's peers then dialed the old one there and refused its certificate."""
    with pytest.raises(Exception, match="is the address of member n2"):
        cluster.admin("cluster_add", "n9", cluster.address("n2"), timeout=10)
    assert "n9" not in str(cluster.status(cluster.wait_leader()))


def test_cli_commands(cluster):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "raftsql.cli", *args], capture_output=True, text=True, timeout=120)

    cluster.add_node("n4")  # not started: a learner that cannot catch up
    p = cli("cluster", "add", cluster.admin_dsn, "n4", cluster.address("n4"))
    assert p.returncode == 0 and "added n4" in p.stdout and "n4=" in p.stdout, p.stdout + p.stderr
    p = cli("status", cluster.dsn)
    assert p.returncode == 0 and "voters: n1, n2, n3   learners: n4" in p.stdout, p.stdout + p.stderr
    p = cli("cluster", "promote", cluster.admin_dsn, "n4", "--timeout", "2")
    assert p.returncode == 1 and "n4 has not caught up" in p.stderr, p.stdout + p.stderr
    p = cli("cluster", "remove", cluster.admin_dsn, "n4")
    assert p.returncode == 0 and "removed n4" in p.stdout, p.stdout + p.stderr
    p = cli("cluster", "remove", cluster.admin_dsn, "n4")
    assert p.returncode == 1 and "Error: n4 is not a member" in p.stderr, p.stdout + p.stderr


def _log_once_it_says(c: LocalCluster, nid: str, words: str, timeout: float = 30) -> str:
    """nid's node.log, once it holds `words` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline and words not in text:
        time.sleep(0.2)
        text = (c.data_dir(nid) / "node.log").read_text()
    return text


def test_a_node_restarted_on_another_address_says_so(tmp_path):
    """Its peers keep dialing the address the cluster recorded: the node's log must say why it
    may then never catch up, and what to do."""
    from raftsql.testing.cluster import free_port

    with running(tmp_path / "c") as c:
        old = c.address("n3")
        c.kill("n3", signal.SIGTERM)
        c.ports["n3"] = free_port(c.host, set(c.ports.values()))
        c.start("n3")
        text = _log_once_it_says(c, "n3", "the cluster knows this node at")
        assert f"the cluster knows this node at {old}" in text, text[-2000:]
        assert f"--listen (or --advertise) {old}" in text


def test_a_new_node_started_with_peer_instead_of_join_says_what_to_do(tmp_path):
    """A new id started with --peer was never added: it pre-votes forever and hears nothing
    back. Its log must say so (after 30 s; 2 s here) instead of only pre-candidate lines."""
    with running(tmp_path / "c") as c:
        c.add_node("n4")
        c.joining.discard("n4")  # the mistake: --peer n1 --peer n2 --peer n3, not --join
        c.env["RAFTSQL_TEST_LEADERLESS_HINT_S"] = "2"
        c.start("n4")
        text = _log_once_it_says(c, "n4", "must be added first")
        assert "start it with --join DSN (a new id cannot start with --peer)" in text, text[-2000:]
        assert c.status("n1")["voters"] == ["n1", "n2", "n3"]
