"""`raftsql cluster up` as a user runs it: a real subprocess with real node processes.

A node killed with kill -9 leaves the others serving writes; cluster up reports the node, its
pid and signal, and prints a command that restarts it; Ctrl-C still stops every node. The DSN
it prints names a directory with no CA key and no node key."""

from __future__ import annotations

import json
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from raftsql.server import certs as pki
from raftsql.server import launcher


class Output:
    """The lines a process writes, read by a thread so the pipe never fills."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pred, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; output so far: {self.seen}") from None
            self.seen.append(line)
            if pred(line):
                return line


def _is_our_node(pid: int, data: Path) -> bool:
    """pid is still one of this test's node processes (not a recycled pid)."""
    try:
        return str(data).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pid: int, data: Path) -> None:
    if _is_our_node(pid, data):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _status(dsn: str) -> dict[str, dict]:
    from raftsql.driver._admin import cluster_status

    return {r["address"] if "error" in r else r["id"]: r for r in cluster_status(dsn, timeout=2.0)}


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _leader(dsn: str) -> str | None:
    leaders = {r["id"] for r in _status(dsn).values() if r.get("role") == "leader"}
    return leaders.pop() if len(leaders) == 1 else None


def test_killed_node_is_reported_the_others_keep_serving_and_it_restarts(tmp_path):
    import raftsql.driver as raftsql

    data = tmp_path / "cluster-data"
    host = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
    up = subprocess.Popen(
        [sys.executable, "-m", "raftsql.cli", "cluster", "up", "--nodes", "3", "--data-dir", str(data),
         "--host", host],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    out = Output(up)
    pids: dict[str, int] = {}
    restarted: subprocess.Popen | None = None
    conn = None
    try:
        dsn = out.wait_for(lambda line: line.startswith("DSN: "))[len("DSN: "):]
        pids = {n["id"]: n["pid"] for n in json.loads((data / "cluster.json").read_text())["nodes"]}
        # A second `cluster up` on the running data directory is refused before it touches
        # anything (it used to rewrite cluster.json with the pids of nodes that died at once).
        before = (data / "cluster.json").read_bytes()
        again = subprocess.run([sys.executable, "-m", "raftsql.cli", "cluster", "up", "--data-dir", str(data)],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "running already" in again.stderr, again.stderr
        assert (data / "cluster.json").read_bytes() == before
        certs = Path(dsn.partition("?certs=")[2])
        assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "client.crt", "client.key"]
        assert (data / "certs" / "ca" / "ca.key").exists()

        conn = raftsql.connect(dsn, autocommit=True)
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.execute("INSERT INTO t (v) VALUES ('before')")
        victim = _wait(lambda: _leader(dsn), 15, "a leader")
        os.kill(pids[victim], signal.SIGKILL)

        report = out.wait_for(lambda line: line.startswith(f"node {victim} "))
        assert report.startswith(f"node {victim} (pid {pids[victim]}) exited: killed by signal SIGKILL (9)")
        out.wait_for(lambda line: "keep running" in line and f"To restart {victim}" in line)
        command = out.wait_for(lambda line: line.startswith("  ")).strip()

        # The cluster up process and the other nodes keep running, and the cluster keeps writing.
        time.sleep(1.0)
        assert up.poll() is None
        for nid, pid in pids.items():
            assert _is_our_node(pid, data) == (nid != victim), nid
        for i in range(20):
            conn.execute("INSERT INTO t (v) VALUES (?)", (f"after kill {i}",))
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (21,)

        # The printed command restarts the node; it catches up with the others.
        args = shlex.split(command)
        assert args[:5] == [sys.executable, "-m", "raftsql.cli", "node", "--id"]
        with open(tmp_path / "restarted.log", "wb") as log:
            restarted = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=tmp_path)
        conn.execute("INSERT INTO t (v) VALUES ('after restart')")

        def caught_up():
            rows = _status(dsn)
            views = [r for r in rows.values() if "error" not in r]
            return (len(views) == 3 and victim in rows
                    and len({r["applied_index"] for r in views}) == 1)

        _wait(caught_up, 30, f"{victim} to catch up")
        assert restarted.poll() is None

        # Ctrl-C stops every node cluster up started, and cluster up itself.
        up.send_signal(signal.SIGINT)
        out.wait_for(lambda line: line == "cluster stopped")
        assert up.wait(30) == 0
        for nid, pid in pids.items():
            assert not _is_our_node(pid, data), nid
    finally:
        if conn is not None:
            conn.close()
        if restarted is not None and restarted.poll() is None:
            restarted.kill()
            restarted.wait(10)
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(15)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)
        for pid in pids.values():
            _kill(pid, data)


def test_reused_cluster_dir_with_flat_certs_is_split(tmp_path):
    """A cluster dir from before the split: its certs/ had ca.key beside every key."""
    certs = tmp_path / "cluster-data" / "certs"
    nodes = [{"id": f"n{i}", "address": f"127.0.0.1:{4000 + i}", "data_dir": str(tmp_path / f"n{i}")}
             for i in (1, 2, 3)]
    pki.make_ca(certs)
    pki.make_client_cert(certs, "client")
    for n in nodes:
        pki.make_node_cert(certs, n["id"], ["127.0.0.1"])
    ca = (certs / "ca.crt").read_bytes()
    client_dir, node_dirs, moved = launcher.make_certs(certs, nodes)
    assert moved and any("ca.key" in line for line in moved)
    assert client_dir == certs / "client"
    assert sorted(p.name for p in client_dir.iterdir()) == ["ca.crt", "client.crt", "client.key"]
    assert node_dirs == {n["id"]: certs / n["id"] for n in nodes}
    assert (certs / "ca" / "ca.crt").read_bytes() == ca  # the same CA: the nodes' certificates stay
    assert "certs/client" in launcher.dsn_for(nodes, client_dir)
    assert launcher.make_certs(certs, nodes)[2] == []  # the next start has nothing to move


def test_exit_descriptions():
    assert launcher.describe_exit(-9) == "killed by signal SIGKILL (9)"
    assert launcher.describe_exit(-15) == "killed by signal SIGTERM (15)"
    assert launcher.describe_exit(1) == "exit status 1"


def test_exit_report_names_the_node_and_its_restart_command(tmp_path):
    from types import SimpleNamespace

    nodes = [{"id": "n1", "address": "127.0.0.1:4001", "data_dir": str(tmp_path / "n1")},
             {"id": "n2", "address": "127.0.0.1:4002", "data_dir": str(tmp_path / "n2")}]
    proc = SimpleNamespace(pid=4242, returncode=-9)
    text = launcher.exit_report(nodes[1], proc, nodes, tmp_path / "certs" / "n2")
    first, second, command = text.splitlines()
    assert first.startswith("node n2 (pid 4242) exited: killed by signal SIGKILL (9)")
    assert second.startswith("the other nodes keep running. To restart n2")
    assert shlex.split(command) == launcher.node_command(nodes[1], nodes, tmp_path / "certs" / "n2")
    assert "--peer" in command and "n1=127.0.0.1:4001" in command
    alone = launcher.exit_report(nodes[1], proc, nodes, tmp_path / "certs" / "n2", others_running=False)
    assert "keep running" not in alone


def test_cluster_up_mistakes_are_one_line_errors_that_leave_nothing(tmp_path):
    """A --host that cannot be listened on (it hung, or ended in a traceback) and a damaged
    cluster.json (a KeyError) are one-line errors; a data directory made for them is removed."""
    def up(*args):
        return subprocess.run([sys.executable, "-m", "raftsql.cli", "cluster", "up", *args],
                              capture_output=True, text=True, timeout=60)

    for host, message in [("no.such.host.invalid", "cannot listen on --host"),
                          ("127.0.0.1:5000", "without a port"), ("", "without a port")]:
        r = up("--data-dir", str(tmp_path / "new"), "--host", host)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cluster.json").write_text('{"nodes": 5}')
    r = up("--data-dir", str(tmp_path / "old"))
    assert r.returncode == 1 and "cluster.json is damaged" in r.stderr and "Traceback" not in r.stderr
