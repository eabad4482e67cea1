"""Nemeses: the faults of a run (kill -9, SIGSTOP, partitions, slow links, clock offsets,
leadership transfers, membership changes), each with start() and stop(), the NEMESES registry
with its named groups, and the Schedule thread that cycles through them."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftsql.testing.clock import clock_offset_env
from raftsql.testing.faultcluster import FaultCluster
from raftsql.testing.history import Ctx


class Nemesis:
    """start() applies a fault and returns a description; stop() heals that fault."""

    name = "nemesis"

    def start(self, ctx: Ctx) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        return {}


def _leader_soon(ctx: Ctx, timeout: float = 3.0) -> str | None:
    """The current leader, waiting a little if an election is under way."""
    end = time.monotonic() + timeout
    while True:
        ld = ctx.cluster.leader()
        if ld is not None or time.monotonic() > end or ctx.stop.is_set():
            return ld
        time.sleep(0.05)


def _target(ctx: Ctx, which: str, exclude: tuple[str, ...] = ()) -> str | None:
    usable = [n for n in ctx.cluster.usable() if n not in exclude]
    if not usable:
        return None
    if which == "leader":
        ld = _leader_soon(ctx)
        if ld in usable:
            return ld
    return ctx.rng.choice(usable)


def _majority_usable(ctx: Ctx, extra_down: str) -> bool:
    """Keep a majority running: a nemesis never takes down more than a minority at once."""
    cl = ctx.cluster
    down = len(cl.ids) - len(cl.usable()) + 1
    return down <= (len(cl.ids) - 1) // 2


class KillNemesis(Nemesis):
    """kill -9 a random node or the leader; stop() restarts it."""

    def __init__(self, target: str = "random"):
        self.target = target
        self.name = "kill" if target == "random" else "kill-leader"
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        n = _target(ctx, self.target)
        if n is None or not _majority_usable(ctx, n):
            return {"skipped": "no target"}
        ctx.cluster.kill(n, signal.SIGKILL)
        self.victim = n
        return {"killed": n}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is not None:
            ctx.cluster.start(n)
            return {"restarted": n}
        return {}


class PauseNemesis(Nemesis):
    """SIGSTOP a random node or the leader; stop() sends SIGCONT."""

    def __init__(self, target: str = "random"):
        self.target = target
        self.name = "pause" if target == "random" else "pause-leader"
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        n = _target(ctx, self.target)
        if n is None or not _majority_usable(ctx, n):
            return {"skipped": "no target"}
        ctx.cluster.pause(n)
        self.victim = n
        return {"paused": n}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is not None:
            ctx.cluster.resume(n)
            return {"resumed": n}
        return {}


class PartitionNemesis(Nemesis):
    """Network partitions through the link proxies.

    halves   a random minority / majority split
    leader   the leader alone / the rest
    bridge   two halves that cannot talk, and one node that talks to both (5 nodes: 2-1-2)
    one-way  one node (the leader half of the time) cannot send to the others, or cannot
             receive from them
    ring     (5 nodes) everyone sees only its two ring neighbours: overlapping majorities
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"partition-{kind}"

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl, rng = ctx.cluster, ctx.rng
        net = cl.net
        ids = list(cl.ids)
        rng.shuffle(ids)
        mode = "drop" if rng.random() < 0.25 else "blackhole"
        if self.kind == "halves":
            k = len(ids) // 2
            groups = [ids[:k], ids[k:]]
            net.partition(groups, mode)
            return {"groups": groups, "mode": mode}
        if self.kind == "leader":
            ld = _leader_soon(ctx) or ids[0]
            groups = [[ld], [n for n in cl.ids if n != ld]]
            net.partition(groups, mode)
            return {"groups": groups, "mode": mode}
        if self.kind == "bridge":
            bridge = ids[0]
            rest = ids[1:]
            a, b = rest[: len(rest) // 2], rest[len(rest) // 2:]
            for x in a:
                for y in b:
                    net.block(x, y, mode)
                    net.block(y, x, mode)
            return {"bridge": bridge, "sides": [a, b], "mode": mode}
        if self.kind == "one-way":
            x = (_leader_soon(ctx) if rng.random() < 0.5 else None) or ids[0]
            direction = rng.choice(["out", "in"])
            for y in cl.ids:
                if y != x:
                    if direction == "out":
                        net.block(x, y, mode)
                    else:
                        net.block(y, x, mode)
            return {"node": x, "cannot": "send" if direction == "out" else "receive", "mode": mode}
        if self.kind == "ring":
            n = len(ids)
            if n < 5:
                return {"skipped": "a ring needs 5 nodes (with 3, every node sees both others)"}
            near = {ids[i]: {ids[(i - 1) % n], ids[(i + 1) % n]} for i in range(n)}
            for a in cl.ids:
                for b in cl.ids:
                    if a != b and b not in near[a]:
                        net.block(a, b, mode)
            return {"ring": ids, "mode": mode}
        raise ValueError(self.kind)

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        ctx.cluster.net.heal()
        return {"healed": True}


class SlowNetworkNemesis(Nemesis):
    """Delay (with jitter) on every peer link, or on the links of one node."""

    name = "slow"

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl, rng = ctx.cluster, ctx.rng
        delay = rng.choice([0.02, 0.05, 0.1, 0.2])
        jitter = delay / 2
        node = rng.choice([None, *cl.ids])
        for (a, b) in cl.net.links:
            if node is None or node in (a, b):
                cl.net.set_delay(a, b, delay, jitter)
        return {"delay": delay, "jitter": jitter, "links": "all" if node is None else f"of {node}"}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        ctx.cluster.net.heal()
        return {"healed": True}


class ClockNemesis(Nemesis):
    """Restart one node (the leader half of the time) with its wall clock offset (LD_PRELOAD,
    see clock_offset_env; the monotonic clock, which drives Raft's ticks, is untouched). stop()
    restarts it with the true clock. Offsets stay within the certificates' 5-minute
    backdating: a node further behind would reject every peer certificate as not yet valid."""

    name = "clock"
    OFFSETS = (-240, -60, -5, 5, 60, 600, 3600)

    def __init__(self):
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        n = _target(ctx, "leader" if ctx.rng.random() < 0.5 else "random")
        if n is None or not _majority_usable(ctx, n):
            return {"skipped": "no target"}
        offset = ctx.rng.choice(self.OFFSETS)
        cl = ctx.cluster
        env = clock_offset_env(cl.dir, offset)
        if env is None:
            return {"skipped": "no C compiler for the clock shim, and no libfaketime"}
        cl.kill(n, signal.SIGTERM)
        cl.node_env[n] = env
        cl.start(n)
        self.victim = n
        return {"node": n, "offset_s": offset, "via": Path(env["LD_PRELOAD"]).name}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is None:
            return {}
        cl = ctx.cluster
        cl.node_env[n] = {}
        cl.kill(n, signal.SIGTERM)
        cl.start(n)
        return {"node": n, "offset_s": 0}


class TransferNemesis(Nemesis):
    """SIGTERM the leader (it hands leadership over, then exits); stop() restarts it."""

    name = "transfer"

    def __init__(self):
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl = ctx.cluster
        ld = _leader_soon(ctx)
        if ld is None or ld not in cl.usable() or not _majority_usable(ctx, ld):
            return {"skipped": "no leader"}
        t0 = time.monotonic()
        cl.kill(ld, signal.SIGTERM)
        self.victim = ld
        code = cl.procs[ld].returncode
        if code != 0:
            ctx.log_error(f"transfer: {ld} exited with status {code} after SIGTERM")
        return {"stopped": ld, "exit": code, "stop_s": round(time.monotonic() - t0, 3)}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is not None:
            ctx.cluster.start(n)
            return {"restarted": n}
        return {}


def _admin(cl: FaultCluster, op: str, node_id: str, timeout: float, **extra: Any) -> dict[str, Any]:
    """One membership request (server/admin.py) through a driver client that follows the
    leader's redirects; BadRequest/Unavailable from the driver when it cannot be done."""
    c = cl.client(certs=cl.admin_certs, timeout=timeout)
    try:
        req = {"op": op, "node_id": node_id, "timeout_ms": int(timeout * 500), **extra}
        return c._call(req, timeout, None)
    finally:
        c.close()


class MembershipNemesis(Nemesis):
    """start(): remove a member (a follower, or a third of the time the leader, which hands
    leadership over first), kill it and wipe its state. stop(): start it empty and bring it
    back as a new member: added as a learner, promoted once it has caught up from the log."""

    name = "membership"

    def __init__(self):
        self.victim: str | None = None

    def start(self, ctx: Ctx) -> dict[str, Any]:
        cl = ctx.cluster
        if len(cl.usable()) < len(cl.ids):
            return {"skipped": "a node is down"}
        n = _target(ctx, "leader" if ctx.rng.random() < 1 / 3 else "random")
        if n is None:
            return {"skipped": "no target"}
        from raftsql.driver._client import BadRequest

        try:
            index = _admin(cl, "cluster_remove", n, 30.0)["index"]
        except BadRequest as e:
            if "is not a member" not in str(e):
                raise
            index = None  # a retry after a lost response: the first attempt removed it
        cl.kill(n, signal.SIGKILL)
        self.victim = n
        d = cl.data_dir(n)
        for name in os.listdir(d):
            if name != "node.log":  # the log of its first life stays, for post-mortems
                p = d / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return {"removed": n, "index": index}

    def stop(self, ctx: Ctx) -> dict[str, Any]:
        n, self.victim = self.victim, None
        if n is None:
            return {}
        cl = ctx.cluster
        cl.start(n)  # empty, with the first voters' --peer list: it waits to be added
        add = _admin(cl, "cluster_add", n, 60.0, address=cl.address(n))
        promote = _admin(cl, "cluster_promote", n, 120.0)
        return {"added": n, "learner_at": add["index"], "voter_at": promote["index"]}


NEMESES: dict[str, Callable[[], Nemesis]] = {
    "kill": lambda: KillNemesis("random"),
    "kill-leader": lambda: KillNemesis("leader"),
    "pause": lambda: PauseNemesis("random"),
    "pause-leader": lambda: PauseNemesis("leader"),
    "partition-halves": lambda: PartitionNemesis("halves"),
    "partition-leader": lambda: PartitionNemesis("leader"),
    "partition-bridge": lambda: PartitionNemesis("bridge"),
    "partition-one-way": lambda: PartitionNemesis("one-way"),
    "partition-ring": lambda: PartitionNemesis("ring"),
    "slow": SlowNetworkNemesis,
    "clock": ClockNemesis,
    "transfer": TransferNemesis,
    "membership": MembershipNemesis,
}
# Names for groups of nemeses (the CLI's --nemesis accepts these too).
NEMESIS_GROUPS: dict[str, list[str]] = {
    "all": list(NEMESES),
    "none": [],
    "kills": ["kill", "kill-leader"],
    "pauses": ["pause", "pause-leader"],
    "partitions": ["partition-halves", "partition-leader", "partition-bridge", "partition-one-way", "partition-ring"],
}


def expand_nemeses(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n in NEMESIS_GROUPS:
            out += NEMESIS_GROUPS[n]
        elif n in NEMESES:
            out.append(n)
        else:
            raise ValueError(f"unknown nemesis {n!r} (known: {', '.join([*NEMESES, *NEMESIS_GROUPS])})")
    return list(dict.fromkeys(out))


class Schedule(threading.Thread):
    """Cycles through the nemeses (shuffled, so every one of them runs in a short run):
    quiet for quiet seconds, fault for hold seconds, heal, repeat until stopped."""

    def __init__(self, ctx: Ctx, nemeses: list[Nemesis], quiet: tuple[float, float], hold: tuple[float, float]):
        super().__init__(name="nemesis", daemon=True)
        self.ctx, self.nemeses, self.quiet, self.hold = ctx, nemeses, quiet, hold
        self.applied: list[str] = []  # nemeses applied and healed, in order

    def _event(self, f: str, nem: Nemesis, value: Any) -> None:
        self.ctx.history.record(process="nemesis", type="info", f=f, nemesis=nem.name, value=value)

    def run(self) -> None:
        ctx = self.ctx
        order = list(self.nemeses)
        ctx.rng.shuffle(order)
        i = 0
        while order and not ctx.stop.wait(ctx.rng.uniform(*self.quiet)):
            nem = order[i % len(order)]
            i += 1
            try:
                desc = nem.start(ctx)
            except Exception as e:  # noqa: BLE001 - a harness bug: keep going, report it
                ctx.log_error(f"nemesis {nem.name} start failed: {e!r}\n{traceback.format_exc()}")
                desc = {"error": repr(e)}
            self._event("start", nem, desc)
            ctx.stop.wait(ctx.rng.uniform(*self.hold))
            try:
                self._event("stop", nem, nem.stop(ctx))
            except Exception as e:  # noqa: BLE001
                ctx.log_error(f"nemesis {nem.name} stop failed: {e!r}\n{traceback.format_exc()}")
            if "skipped" not in desc and "error" not in desc:
                self.applied.append(nem.name)
