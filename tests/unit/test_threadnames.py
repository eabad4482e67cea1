"""A node process names its threads at the OS level (server/threadnames.py), which is how
benchmarks/cpu.py tells the Ready loop's CPU time from a connection thread's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raftsql.server.threadnames import COMM_BYTES, os_thread_name


@pytest.mark.parametrize(
    ("python_name", "os_name"),
    [
        ("n1-ready", "ready"),
        ("n1-send-n2", "send-n2"),
        ("n1-conn-127.0.4.9:52114", "conn-52114"),
        ("n1-conn-[::1]:4001", "conn-4001"),
        ("n12-apply", "apply"),
        ("watch-nodes", "watch-nodes"),  # not this node's prefix: kept
        ("n1-" + "x" * 40, "x" * COMM_BYTES),
    ],
)
def test_os_name_drops_the_node_prefix_keeps_a_port_and_fits_the_kernel(python_name, os_name):
    assert os_thread_name(python_name, "n1" if not python_name.startswith("n12") else "n12") == os_name


_CHILD = r"""
import threading, time
from raftsql.server.threadnames import name_os_threads

def comm():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().strip()

before = []
t = threading.Thread(target=lambda: before.append(comm()), name="n7-ready")
t.start(); t.join()
name_os_threads("n7")
name_os_threads("n7")  # a second call changes nothing
seen = []
for name in ("n7-ready", "n7-conn-127.0.0.1:40123"):
    t = threading.Thread(target=lambda: seen.append(comm()), name=name)
    t.start(); t.join()
print(before[0], *seen)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_threads_started_after_name_os_threads_carry_their_name_in_proc():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True)
    before, *after = out.stdout.split()
    assert before != "ready"  # Python alone: no OS name before 3.14, the full name after
    assert after == ["ready", "conn-40123"]
