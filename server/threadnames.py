"""Operating-system names for a node process's threads.

Python before 3.14 gives every thread the process's name at the OS level, so `top -H`, `perf`
and /proc/<pid>/task/<tid>/comm cannot tell the Ready loop from a connection thread.
`name_os_threads(node_id)` makes every thread started afterwards in this process take its Python
name as its OS name, shortened to what the kernel keeps (15 bytes): the node id prefix goes (a
process is one node) and an address keeps only its port, so `n1-ready` becomes `ready` and
`n1-conn-127.0.4.9:52114` becomes `conn-52114` (the remote port, which says who dialed).
benchmarks/cpu.py reads these names to charge CPU time to threads."""

from __future__ import annotations

import re
import threading

COMM_BYTES = 15  # the kernel's TASK_COMM_LEN is 16, with the terminating NUL
_ADDRESS = re.compile(r"(?:\[[^\]]*\]|[^-\[\]:]+):(\d+)$")


def os_thread_name(name: str, node_id: str) -> str:
    """The OS name for Python thread `name` in node `node_id`'s process (at most 15 bytes)."""
    short = name[len(node_id) + 1:] if name.startswith(node_id + "-") else name
    short = _ADDRESS.sub(r"\1", short)
    return short.encode("utf-8")[:COMM_BYTES].decode("utf-8", "ignore") or "thread"


def set_os_thread_name(name: str) -> bool:
    """Give the calling thread this OS name; False where the platform does not allow it."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
        return True
    except OSError:
        return False


def name_os_threads(node_id: str) -> None:
    """From now on, every thread started in this process names itself at the OS level after
    its Python name (see os_thread_name) before it runs. Once per process; the cost is one
    small write per thread start."""
    run = threading.Thread.run
    if getattr(run, "_names_os_threads", False):
        return

    def named_run(self: threading.Thread) -> None:
        set_os_thread_name(os_thread_name(self.name, node_id))
        run(self)

    named_run._names_os_threads = True  # type: ignore[attr-defined]
    threading.Thread.run = named_run  # type: ignore[method-assign]
