"""The opt-in metrics endpoint on a real cluster: every node started with --metrics-listen is
scraped over HTTPS with a client certificate, parsed with prometheus-client's own parser, and
its figures move as the cluster works: commit index and the write-latency histogram after
writes, term and leader changes after the leader hands over. Without the flag nothing listens.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import time

import prometheus_client.parser as prometheus_parser  # the test extra has it: missing is a failure
import pytest

import raftsql.driver as db
from raftsql.driver._tls import client_context, default_paths
from raftsql.testing.cluster import LocalCluster, free_port


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "c", 3)
    c.metrics_ports = {}
    taken = set(c.ports.values())
    try:
        for nid in c.ids:
            port = free_port(c.host, taken)
            taken.add(port)
            c.metrics_ports[nid] = port
            c.start(nid, extra_args=["--metrics-listen", f"{c.host}:{port}"])
        c.wait_leader()
        yield c
    finally:
        c.close()


def _context(certs) -> ssl.SSLContext:
    return client_context(*default_paths(certs))


def scrape(cluster: LocalCluster, nid: str, certs=None) -> dict[str, dict]:
    """GET /metrics from nid: {family name: {(sample name, labels): value}}, parsed by
    prometheus-client."""
    ctx = _context(certs or cluster.client_certs("prometheus", "read"))
    conn = http.client.HTTPSConnection(cluster.host, cluster.metrics_ports[nid], context=ctx,
                                       timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
        assert resp.getheader("Content-Type").startswith("text/plain")
    finally:
        conn.close()
    out: dict[str, dict] = {}
    for family in prometheus_parser.text_string_to_metric_families(body):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


def value(m: dict, family: str, sample: str | None = None, **labels) -> float:
    """One sample of a family (a counter's sample is FAMILY_total)."""
    want = {k: str(v) for k, v in labels.items()}
    names = (sample,) if sample else (family, family + "_total")
    for (name, lbls), v in m[family].items():
        if name in names and all(dict(lbls).get(k) == x for k, x in want.items()):
            return v
    raise KeyError((family, sample, labels))


def test_metrics_move_after_writes_and_a_leader_change(cluster):
    before = {nid: scrape(cluster, nid) for nid in cluster.ids}
    leader = cluster.wait_leader()
    for nid, m in before.items():
        assert value(m, "raftsql_role", role="leader") == (1.0 if nid == leader else 0.0)
        assert value(m, "raftsql_term") >= 1
    conn = db.connect(cluster.dsn, autocommit=True, timeout=20)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(50):
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i}",))
    conn.close()
    cluster.hashes()  # every node has applied them
    after = {nid: scrape(cluster, nid) for nid in cluster.ids}
    for nid in cluster.ids:
        b, a = before[nid], after[nid]
        assert value(a, "raftsql_commit_index") >= value(b, "raftsql_commit_index") + 51
        assert value(a, "raftsql_applied_index") >= value(b, "raftsql_applied_index") + 51
        # Every node fsyncs its log and applies what commits.
        assert value(a, "raftsql_fsync_seconds", "raftsql_fsync_seconds_count") > \
            value(b, "raftsql_fsync_seconds", "raftsql_fsync_seconds_count")
        assert value(a, "raftsql_apply_seconds", "raftsql_apply_seconds_count") > \
            value(b, "raftsql_apply_seconds", "raftsql_apply_seconds_count")
        assert value(a, "raftsql_log_bytes") > value(b, "raftsql_log_bytes")
    # The write-latency histogram is the leader's: 51 more writes, in its buckets and sum.
    b, a = before[leader], after[leader]
    count = "raftsql_write_seconds_count"
    assert value(a, "raftsql_write_seconds", count) - value(b, "raftsql_write_seconds", count) >= 51
    assert value(a, "raftsql_write_seconds", "raftsql_write_seconds_sum") > \
        value(b, "raftsql_write_seconds", "raftsql_write_seconds_sum")
    assert value(a, "raftsql_write_seconds", "raftsql_write_seconds_bucket", le="+Inf") == \
        value(a, "raftsql_write_seconds", count)
    assert value(a, "raftsql_proposals") >= value(b, "raftsql_proposals") + 51
    followers = [n for n in cluster.ids if n != leader]
    for f in followers:
        assert value(a, "raftsql_peer_lag_entries", peer=f) >= 0
        assert value(a, "raftsql_peer_connected", peer=f) == 1.0
    # Client connections: a gauge of what is open now.
    from raftsql.driver._admin import context_for
    from raftsql.driver._conn import DSN, NodeConnection

    held = NodeConnection(cluster.host, cluster.ports[leader], context_for(DSN.parse(cluster.dsn)), 5)
    assert held.request({"op": "ping"}, 5)["ok"]
    assert value(scrape(cluster, leader), "raftsql_client_connections") >= 1
    held.close()

    # The leader hands over and exits (SIGTERM): term and leader changes move on the others.
    cluster.kill(leader, signal.SIGTERM)
    new = cluster.wait_leader(exclude=(leader,))
    for nid in followers:
        m = scrape(cluster, nid)
        assert value(m, "raftsql_term") > value(after[nid], "raftsql_term")
        assert value(m, "raftsql_leader_changes_seen") > value(after[nid], "raftsql_leader_changes_seen")
        assert value(m, "raftsql_role", role="leader") == (1.0 if nid == new else 0.0)


def test_metrics_need_tls_and_a_certificate_that_is_not_revoked(cluster):
    nid = cluster.ids[0]
    port = cluster.metrics_ports[nid]
    # Plain HTTP gets no metrics.
    with socket.create_connection((cluster.host, port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert b"raftsql_term" not in data
    # TLS without a client certificate: the handshake fails.
    ctx = ssl.create_default_context(cafile=str(cluster.certs / "ca.crt"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
        conn = http.client.HTTPSConnection(cluster.host, port, context=ctx, timeout=5)
        try:
            conn.request("GET", "/metrics")
            conn.getresponse().read()
        finally:
            conn.close()
    # A revoked certificate: 403.
    spy = cluster.client_certs("spy", "read")
    assert "raftsql_term" in scrape(cluster, nid, spy)
    cluster.admin("revoke", "spy")
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPSConnection(cluster.host, port, context=_context(spy), timeout=5)
        conn.request("GET", "/metrics")
        status = conn.getresponse().status
        conn.close()
        if status == 403:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    # Only /metrics is served.
    conn = http.client.HTTPSConnection(cluster.host, port, context=_context(cluster.certs), timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 404
    conn.close()


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (its sockets in /proc/net/tcp{,6} in state LISTEN)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def test_without_the_flag_nothing_else_listens(tmp_path):
    with LocalCluster(tmp_path / "plain", 1) as c:
        c.start()
        c.wait_leader()
        assert _listening_ports(c.procs["n1"].pid) == {c.ports["n1"]}
    with LocalCluster(tmp_path / "metrics", 1) as c:
        port = free_port(c.host, set(c.ports.values()))
        c.start("n1", extra_args=["--metrics-listen", f"{c.host}:{port}"])
        c.wait_leader()
        assert _listening_ports(c.procs["n1"].pid) == {c.ports["n1"], port}
