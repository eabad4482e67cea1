"""Shared fixtures for the fault tests: every test must leave no node process and no proxy
thread behind. (Run directories are removed by the runs themselves when they pass; a failed
run keeps its directory on purpose and names it in the assertion message.)"""

import os
import threading

import pytest


def _our_node_processes() -> list[int]:
    """Node processes whose parent is this test process."""
    me = os.getpid()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if "raftsql.cli node" in cmd:
            pids.append(int(d))
    return pids


@pytest.fixture(autouse=True)
def no_leftovers():
    before_threads = {t.ident for t in threading.enumerate()}
    # Session-scoped clusters of other test directories (tests/dbapi) may already be running.
    before_nodes = set(_our_node_processes())
    yield
    left = sorted(set(_our_node_processes()) - before_nodes)
    proxies = [t.name for t in threading.enumerate() if t.ident not in before_threads and t.name == "faults-proxy"]
    assert not left, f"node processes left running: {left}"
    assert not proxies, f"proxy threads left running: {proxies}"
