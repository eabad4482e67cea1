"""Jepsen-style fault runs against a real cluster: proxies, nemeses, workloads, history.

A run starts a LocalCluster whose peer links go through fault-injecting proxies, runs
concurrent clients (threads, each with its own driver Client) that record every operation as
JSON lines, applies a nemesis schedule (kill -9, SIGSTOP, partitions, clock offsets, leadership
transfers, slow links), heals, reads the final state and checks the history with
raftsql.testing.checker. See tests/faults/DESIGN.md for the reasons behind the choices.

    report = run(RunConfig(nodes=3, duration=15, nemeses=["kill", "partition-leader"]))
    assert report.ok, report.explain()

Nothing here needs root: partitions are proxies, not iptables, so no kernel state outlives the
harness. Node processes are killed by pid in finally blocks (only a kill -9 of the harness
itself leaves them running).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raftsql.testing.faultcluster import FaultCluster
from raftsql.testing.history import Ctx, History
from raftsql.testing.nemesis import NEMESES, Schedule, expand_nemeses
from raftsql.testing.workloads import (
    AppendWorkload,
    BankWorkload,
    ReadYourWritesWorkload,
    RegisterWorkload,
    SetWorkload,
    Workload,
)


@dataclass
class RunConfig:
    nodes: int = 3
    duration: float = 15.0
    nemeses: list[str] = field(default_factory=lambda: ["all"])
    workloads: dict[str, int] = field(default_factory=lambda: {"register": 4, "set": 2, "ryw": 2})
    seed: int | None = None
    op_timeout: float = 3.0
    short_timeout: float | None = 0.75  # for every other register/set client (see Ctx.timeout_for)
    quiet: tuple[float, float] = (1.0, 2.0)
    hold: tuple[float, float] = (2.0, 4.0)
    env: dict[str, str] = field(default_factory=dict)  # for every node (e.g. RAFTSQL_TEST_BROKEN_READS)
    node_args: list[str] = field(default_factory=list)
    base_dir: str | None = None  # where run directories go (default: the system temp dir)
    keep: bool = False  # keep the run directory even when the run passes
    register_ops_per_key: int = 120
    min_faults: int = 0  # extend the run (up to 2x duration) until this many faults were applied


@dataclass
class RunReport:
    ok: bool
    seed: int
    config: dict[str, Any]
    dir: str | None
    nemeses_applied: list[str]
    workloads: dict[str, dict[str, Any]]
    errors: list[str]
    converged: bool
    hashes: dict[str, Any]
    timings: dict[str, float]
    history_events: int

    def explain(self) -> str:
        lines = [f"fault run seed={self.seed} nodes={self.config['nodes']} nemeses={self.nemeses_applied}: "
                 f"{'OK' if self.ok else 'FAILED'}"]
        for name, w in self.workloads.items():
            lines.append(f"  {w.get('summary', name)}")
            if w.get("valid") is not True and w.get("explain"):
                lines.append(w["explain"])
        if not self.converged:
            lines.append(f"  replicas did not converge: {self.hashes}")
        for e in self.errors:
            lines.append(f"  harness error: {e}")
        if self.dir:
            lines.append(f"  history, node logs and report kept in {self.dir}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run(cfg: RunConfig) -> RunReport:
    """One run: cluster up, clients + nemesis for cfg.duration, heal, final reads, checks.
    The run directory (cluster data, node logs, history.jsonl, report.json) is removed when the
    run passes, and kept (and named in the report) when it fails."""
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    names = expand_nemeses(cfg.nemeses)
    run_dir = Path(tempfile.mkdtemp(prefix=f"raftsql-faults-{seed}-", dir=cfg.base_dir))
    history = History(run_dir / "history.jsonl")
    timings: dict[str, float] = {}
    errors: list[str] = []
    workloads: list[Workload] = []
    for wname, threads in cfg.workloads.items():
        if threads <= 0:
            continue
        if wname == "register":
            workloads.append(RegisterWorkload(threads=threads, ops_per_key=cfg.register_ops_per_key))
        elif wname == "set":
            workloads.append(SetWorkload(threads=threads))
        elif wname == "ryw":
            workloads.append(ReadYourWritesWorkload(threads=threads))
        elif wname == "bank":
            workloads.append(BankWorkload(threads=threads))
        elif wname == "append":
            workloads.append(AppendWorkload(threads=threads))
        else:
            raise ValueError(f"unknown workload {wname!r}")
    results: dict[str, dict[str, Any]] = {}
    hashes: dict[str, Any] = {}
    converged = False
    applied: list[str] = []
    cluster: FaultCluster | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    schedule: Schedule | None = None
    t_start = time.monotonic()
    try:
        cluster = FaultCluster(run_dir / "cluster", cfg.nodes, env=cfg.env, node_args=cfg.node_args)
        ctx = Ctx(cluster, history, rng, stop, cfg.op_timeout, errors, cfg.short_timeout)
        history.record(process="harness", type="info", f="config", value={**asdict(cfg), "seed": seed,
                                                                             "host": cluster.host})
        cluster.start()
        cluster.wait_leader(30)
        setup_client = cluster.client(timeout=20)
        try:
            for w in workloads:
                w.setup(ctx, setup_client)
        finally:
            setup_client.close()
        timings["setup_s"] = round(time.monotonic() - t_start, 2)

        process = 0
        for w in workloads:
            for _ in range(w.threads):
                wrng = random.Random(rng.randrange(2**32))

                def body(w=w, p=process, wrng=wrng):
                    try:
                        w.worker(ctx, p, wrng)
                    except Exception as e:  # noqa: BLE001
                        ctx.log_error(f"{w.name} worker {p} crashed: {e!r}\n{traceback.format_exc()}")

                t = threading.Thread(target=body, name=f"{w.name}-{process}", daemon=True)
                threads.append(t)
                process += 1
        schedule = Schedule(ctx, [NEMESES[n]() for n in names], cfg.quiet, cfg.hold)
        t_run = time.monotonic()
        for t in threads:
            t.start()
        schedule.start()
        stop.wait(cfg.duration)
        # A short run may end before every nemesis had its turn: extend it (up to twice the
        # duration) until min_faults faults were applied and healed.
        end = time.monotonic() + cfg.duration
        while len(schedule.applied) < cfg.min_faults and time.monotonic() < end and schedule.is_alive():
            time.sleep(0.1)
        stop.set()
        schedule.join(60)
        if schedule.is_alive():
            errors.append("nemesis schedule did not finish within 60s")
        for t in threads:
            t.join(cfg.op_timeout * 4 + 10)
            if t.is_alive():
                errors.append(f"worker {t.name} did not stop")
        applied = schedule.applied
        timings["run_s"] = round(time.monotonic() - t_run, 2)

        t_heal = time.monotonic()
        finals_done = False
        try:
            healed = cluster.heal_all()
            history.record(process="nemesis", type="info", f="heal", value=healed)
            cluster.wait_leader(30)
            for w in workloads:
                w.final(ctx)
            finals_done = True
            hashes = {n: list(v) for n, v in cluster.hashes(timeout=60).items()}
            converged = len({tuple(v) for v in hashes.values()}) == 1 and len(hashes) == cfg.nodes
        except (TimeoutError, RuntimeError) as e:
            errors.append(f"cluster did not recover after healing: {e!r}")
        timings["heal_s"] = round(time.monotonic() - t_heal, 2)

        t_check = time.monotonic()
        for w in workloads:
            if not finals_done and not isinstance(w, RegisterWorkload):
                results[w.name] = {"valid": None, "summary": f"{w.name}: not checked (no final read)"}
                continue
            try:
                results[w.name] = w.check(ctx)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{w.name} check crashed: {e!r}\n{traceback.format_exc()}")
        timings["check_s"] = round(time.monotonic() - t_check, 2)
    except Exception as e:  # noqa: BLE001 - reported, and the directory is kept
        errors.append(f"run failed: {e!r}\n{traceback.format_exc()}")
    finally:
        stop.set()
        if cluster is not None:
            try:
                cluster.close()
            except Exception as e:  # noqa: BLE001
                errors.append(f"cluster close failed: {e!r}")
        for t in threads:
            t.join(cfg.op_timeout + 5)
        history.close()
    timings["total_s"] = round(time.monotonic() - t_start, 2)
    ok = (not errors and converged and all(r.get("valid") is True for r in results.values())
          and len(results) == len(workloads))
    report = RunReport(
        ok=ok, seed=seed, config=asdict(cfg), dir=None if ok and not cfg.keep else str(run_dir),
        nemeses_applied=applied, workloads=results, errors=errors, converged=converged, hashes=hashes,
        timings=timings, history_events=len(history.events),
    )
    with contextlib.suppress(OSError):
        (run_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2, default=repr))
    if ok and not cfg.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report
