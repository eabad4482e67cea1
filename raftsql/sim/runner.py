"""Command-line runner for the simulator (see __main__.py)."""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from raftsql.raft.core import MUTATIONS
from raftsql.sim.cluster import SIM_BUGS, Simulation, Violation


def run_seed(
    seed: int,
    nodes: int = 3,
    mutations: frozenset[str] = frozenset(),
    snapshots: bool = True,
    sim_bugs: frozenset[str] = frozenset(),
):
    """Run one seed. Returns None, or (invariant, detail, trace tail) on a violation."""
    return _run(seed, nodes, mutations, snapshots, sim_bugs)[0]


def _run(seed, nodes, mutations, snapshots, sim_bugs):
    sim = Simulation(seed, nodes=nodes, mutations=mutations, snapshots=snapshots, sim_bugs=sim_bugs)
    try:
        sim.run()
    except Violation as v:
        return (v.invariant, v.detail, list(sim.trace)), sim.stats
    return None, sim.stats


def _run_one(args):
    seed, *rest = args
    return (seed, *_run(seed, *rest))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftsql.sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=300, help="how many seeds to run (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    ap.add_argument("--mutate", action="append", default=[], metavar="NAME",
                    help="switch off one Raft rule (repeatable); see --list-mutations")
    ap.add_argument("--list-mutations", action="store_true",
                    help="list the mutations, and the simulator bugs of --sim-bug")
    ap.add_argument("--no-snapshots", action="store_true",
                    help="no log compaction or InstallSnapshot (the schedules from before issue 7)")
    ap.add_argument("--sim-bug", action="append", default=[], metavar="NAME",
                    help="break the simulated snapshot path (repeatable; for tests); see --list-mutations")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--reports", type=int, default=3, help="violations to print in full (default 3)")
    args = ap.parse_args(argv)

    if args.list_mutations:
        for name, text in MUTATIONS.items():
            print(f"{name:26} {text}")
        print("# simulator bugs (--sim-bug), in the simulated driving code, not the core:")
        for name, text in SIM_BUGS.items():
            print(f"{name:26} {text}")
        return 0
    bad = [m for m in args.mutate if m not in MUTATIONS]
    if bad:
        ap.error(f"unknown mutation {bad[0]!r}; see --list-mutations")
    bad = [b for b in args.sim_bug if b not in SIM_BUGS]
    if bad:
        ap.error(f"unknown simulator bug {bad[0]!r}; see --list-mutations")
    if args.sim_bug and args.no_snapshots:
        ap.error("--sim-bug needs snapshots")
    mutations = frozenset(args.mutate)
    seeds = range(args.seed, args.seed + args.seeds)
    work = [(s, args.nodes, mutations, not args.no_snapshots, frozenset(args.sim_bug)) for s in seeds]
    started = time.monotonic()
    violations = 0
    totals: dict[str, int] = {}
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = pool.map(_run_one, work, chunksize=8)
            violations = _report(results, args, mutations, totals)
    else:
        violations = _report(map(_run_one, work), args, mutations, totals)
    took = time.monotonic() - started
    print(f"# {args.seeds} seeds in {took:.1f}s", file=sys.stderr)
    if totals:
        print("# " + " ".join(f"{k}={v}" for k, v in totals.items()), file=sys.stderr)
    print(f"seeds={args.seeds} violations={violations}")
    return 1 if violations else 0


def _report(results, args, mutations, totals: dict[str, int]) -> int:
    violations = 0
    for seed, res, stats in results:
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        if res is None:
            continue
        violations += 1
        if violations > args.reports:
            continue
        invariant, detail, trace = res
        mut = "".join(f" --mutate {m}" for m in sorted(mutations))
        mut += " --no-snapshots" if args.no_snapshots else ""
        mut += "".join(f" --sim-bug {b}" for b in sorted(args.sim_bug))
        print(f"VIOLATION seed={seed} invariant={invariant!r}")
        print(f"  {detail}")
        print("  trace tail:")
        for line in trace[-25:]:
            print(f"    {line}")
        print(f"  replay: python -m raftsql.sim --seeds 1 --seed {seed} --nodes {args.nodes}{mut}")
    return violations
