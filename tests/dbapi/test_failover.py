"""Exactly-once under failover, with real node processes: the leader killed with SIGKILL while a
client inserts 2,000 rows, and connections cut right after a request left the client (a
fault-injecting TCP proxy). Also: transactions abort when their leader goes, and a write whose
outcome is unknown is resent with its serial.

Invariants checked after each run: every acknowledged row exists exactly once, no value exists
twice, rows whose insert raised OutcomeUnknown exist at most once, and no insert failed with
IntegrityError (a write applied twice would hit the UNIQUE column and come back as one)."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

import raftsql.driver as db
from raftsql.testing.cluster import LocalCluster

ROWS = 2000


@pytest.fixture(scope="module")
def fcluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("failover-cluster"), 3)
    try:
        c.start()
        c.wait_leader()
        yield c
    finally:
        c.close()


def _heal(cluster: LocalCluster) -> None:
    """Restart every dead node and wait until all nodes hold the same data."""
    for nid in cluster.ids:
        if not cluster.alive(nid):
            cluster.start(nid)
    cluster.wait_leader(timeout=30)
    hashes = cluster.hashes(timeout=60)
    assert len(set(hashes.values())) == 1, hashes


def _check_exactly_once(cluster, table, acked: set[int], unknown: set[int]) -> None:
    c = db.connect(cluster.dsn, autocommit=True, timeout=30)
    try:
        twice = c.execute(f"SELECT v, count(*) FROM {table} GROUP BY v HAVING count(*) > 1").fetchall()
        assert twice == []
        present = {v for (v,) in c.execute(f"SELECT v FROM {table}")}
    finally:
        c.close()
    missing = acked - present
    assert not missing, f"{len(missing)} acknowledged rows are missing, e.g. {sorted(missing)[:5]}"
    assert present <= acked | unknown, sorted(present - acked - unknown)[:5]


def _insert_all(conn, table, on_step=None) -> tuple[set[int], set[int], int]:
    """Insert 0..ROWS-1, one autocommit write each. Returns (acked, unknown, duplicates): a
    duplicate is a resend whose first attempt had been applied (the stored result came back)."""
    acked, unknown, duplicates = set(), set(), 0
    cur = conn.cursor()
    for i in range(ROWS):
        if on_step is not None:
            on_step(i)
        try:
            cur.execute(f"INSERT INTO {table} (v) VALUES (?)", (i,))
        except db.OutcomeUnknown:
            unknown.add(i)
            continue
        assert cur.rowcount == 1
        acked.add(i)
        duplicates += bool(cur._result.get("duplicate"))
    return acked, unknown, duplicates


# --------------------------------------------------------------------------- (a) kill -9


def test_exactly_once_when_the_leader_is_killed(fcluster):
    table = "kill9"
    leader = fcluster.wait_leader()
    conn = db.connect(fcluster.dsn, autocommit=True, timeout=30)
    killed = threading.Event()

    def kill_soon() -> None:
        time.sleep(random.uniform(0.0, 0.005))  # land in the middle of a request
        fcluster.kill(leader)  # SIGKILL
        killed.set()

    def on_step(i: int) -> None:
        if i == ROWS // 3:
            threading.Thread(target=kill_soon, daemon=True).start()

    try:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v INTEGER NOT NULL UNIQUE)")
        acked, unknown, duplicates = _insert_all(conn, table, on_step)
        assert killed.is_set()
        new_leader = fcluster.wait_leader(exclude=(leader,))
        assert new_leader != leader
    finally:
        conn.close()
    print(f"kill -9: {len(acked)} acknowledged, {len(unknown)} unknown, {duplicates} duplicates")
    assert len(acked) + len(unknown) == ROWS
    _check_exactly_once(fcluster, table, acked, unknown)
    _heal(fcluster)
    _check_exactly_once(fcluster, table, acked, unknown)


# --------------------------------------------------------------------------- (b) lost responses


class FaultProxy:
    """A TCP proxy on the cluster's 127.0.0.X address (so the node certificate's IP still
    matches). It forwards bytes both ways; drop_next_request() makes it close the connection
    right after forwarding the next client->server chunk, before any response can come back;
    blackhole=True does that to every chunk (so even handshakes fail)."""

    def __init__(self, host: str, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.blackhole = False
        self.drops = 0
        self._drop_next = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next_request(self) -> None:
        self._drop_next.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = {"client": client, "server": server, "dead": False}
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _cut(self, pair) -> None:
        pair["dead"] = True
        for side, how in (("client", socket.SHUT_RDWR), ("server", socket.SHUT_WR)):
            try:
                pair[side].shutdown(how)  # the server side still gets every byte, then EOF
            except OSError:
                pass
        pair["client"].close()

    def _pump(self, pair, client_to_server: bool) -> None:
        src, dst = (pair["client"], pair["server"]) if client_to_server else (pair["server"], pair["client"])
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if client_to_server:
                    with self._lock:
                        drop = self.blackhole or self._drop_next.is_set()
                        if drop:
                            self._drop_next.clear()
                            self.drops += 1
                            pair["dead"] = True  # no response may reach the client now
                    dst.sendall(data)
                    if drop:
                        self._cut(pair)
                        return
                else:
                    if pair["dead"]:
                        break
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if not client_to_server:
                for s in (pair["client"], pair["server"]):
                    s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


@pytest.fixture
def proxy(fcluster):
    leader = fcluster.wait_leader()
    p = FaultProxy(fcluster.host, (fcluster.host, fcluster.ports[leader]))
    try:
        yield p
    finally:
        p.close()


def test_exactly_once_when_responses_are_lost(fcluster, proxy):
    table = "lost_responses"
    conn = db.connect(fcluster.dsn, hosts=[proxy.address], autocommit=True, timeout=30,
                      discover=False)  # through the proxy only
    armed = 0

    def on_step(i: int) -> None:
        nonlocal armed
        if i % 40 == 20:  # the connection is idle and established: the next chunk is a request
            proxy.drop_next_request()
            armed += 1

    try:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v INTEGER NOT NULL UNIQUE)")
        acked, unknown, duplicates = _insert_all(conn, table, on_step)
    finally:
        conn.close()
    print(f"lost responses: {proxy.drops} cut, {len(acked)} acknowledged, "
          f"{len(unknown)} unknown, {duplicates} duplicates")
    assert proxy.drops == armed == ROWS // 40
    # Each cut request had reached the leader and was applied; its resend (same serial) got the
    # stored result instead of running again.
    assert duplicates >= proxy.drops * 0.9
    assert not unknown and len(acked) == ROWS
    _check_exactly_once(fcluster, table, acked, unknown)


def test_outcome_unknown_then_resend_with_the_same_serial(fcluster, proxy):
    table = "resend"
    conn = db.connect(fcluster.dsn, hosts=[proxy.address], autocommit=True, timeout=30,
                      discover=False)  # through the proxy only
    try:
        conn.execute(f"CREATE TABLE {table} (v INTEGER NOT NULL UNIQUE)")  # connects via the proxy
        proxy.blackhole = True
        conn.timeout = 1.5  # how long the driver keeps resending before giving up
        with pytest.raises(db.OutcomeUnknown) as info:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        err = info.value
        assert err.serial > 0 and err.statements == [(f"INSERT INTO {table} VALUES (1)", [])]
        assert not isinstance(err, db.Unavailable)
        # A resend that reaches no node leaves the outcome unknown: never Unavailable ("nothing
        # was applied"), which would have the application insert the row a second time.
        with pytest.raises(db.OutcomeUnknown) as again:
            conn.resend(err)
        assert not isinstance(again.value, db.Unavailable) and again.value.serial == err.serial
        proxy.blackhole = False
        conn.timeout = 30
        cur = conn.resend(again.value)
        assert cur.rowcount == 1 and cur._result["duplicate"] is True  # it had been applied
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
        with pytest.raises(db.ProgrammingError):
            conn.resend(db.OutcomeUnknown("x", serial=1, statements=[], client_id="someone else"))
    finally:
        conn.close()


# --------------------------------------------------------------------------- transactions


def test_transactions_abort_when_their_leader_changes(fcluster):
    _heal(fcluster)
    leader = fcluster.wait_leader()
    setup = db.connect(fcluster.dsn, autocommit=True, timeout=30)
    a = db.connect(fcluster.dsn, timeout=30)
    b = db.connect(fcluster.dsn, timeout=30)
    try:
        setup.execute("CREATE TABLE txn_abort (v TEXT)")
        a.execute("INSERT INTO txn_abort VALUES ('a1')")
        b.execute("INSERT INTO txn_abort VALUES ('b1')")
        assert a._txn.leader == b._txn.leader == fcluster.address(leader)

        fcluster.kill(leader)
        with pytest.raises(db.TransactionAborted):  # its leader is gone (unreachable)
            a.execute("INSERT INTO txn_abort VALUES ('a2')")
        assert not a.in_transaction
        a.execute("INSERT INTO txn_abort VALUES ('a1 again')")  # a new transaction, new leader
        a.commit()

        new_leader = fcluster.wait_leader(exclude=(leader,))
        fcluster.start(leader)  # back, as a follower of the new leader
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = fcluster.status(leader)
            if st and st.get("leader") == new_leader:
                break
            time.sleep(0.05)
        with pytest.raises(db.TransactionAborted):  # its leader is alive but NOT_LEADER now
            b.execute("SELECT * FROM txn_abort")
        assert not b.in_transaction
        b.commit()  # nothing to commit: the aborted transaction applied nothing
        rows = setup.execute("SELECT v FROM txn_abort ORDER BY rowid").fetchall()
        assert rows == [("a1 again",)]
    finally:
        for c in (setup, a, b):
            c.close()
    _heal(fcluster)
