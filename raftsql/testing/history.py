"""A fault run's record and context: History, the Jepsen-style event log written as JSON lines
as the run goes, and Ctx, what workloads and nemeses see of a run (cluster, history, rng, stop)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from raftsql.testing.faultcluster import FaultCluster


class History:
    """Jepsen-style event log: {"index", "time", "process", "type", "f", "key", "value", ...}.
    time is seconds since the run began, from the monotonic clock. An invocation is stamped
    before the request leaves and a completion after the response arrives, so each recorded
    interval contains the real one."""

    def __init__(self, path: str | os.PathLike | None = None):
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._t0 = time.monotonic_ns()
        self._f = open(path, "w", buffering=1) if path else None  # noqa: SIM115 - closed in close()

    def now(self) -> float:
        return (time.monotonic_ns() - self._t0) / 1e9

    def record(self, **ev: Any) -> dict[str, Any]:
        with self._lock:
            ev.setdefault("time", self.now())
            ev["index"] = len(self.events)
            self.events.append(ev)
            if self._f is not None:
                self._f.write(json.dumps(ev, default=repr) + "\n")
        return ev

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def load_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Ctx:
    """What workloads and nemeses see of a run."""

    cluster: FaultCluster
    history: History
    rng: random.Random
    stop: threading.Event
    op_timeout: float
    errors: list[str] = field(default_factory=list)
    short_timeout: float | None = None

    def timeout_for(self, process: int) -> float:
        """Odd processes use the short timeout (when set): more operations end with an
        unknown outcome, which is where exactly-once and the checker earn their keep."""
        if self.short_timeout and process % 2 == 1:
            return self.short_timeout
        return self.op_timeout

    def log_error(self, what: str) -> None:
        self.errors.append(what)
        self.history.record(process="harness", type="error", f="error", value=what)
