"""Command-line runner for the simulator (see __main__.py)."""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from raftsql.raft.core import MUTATIONS
from raftsql.sim.cluster import Simulation, Violation


def run_seed(seed: int, nodes: int = 3, mutations: frozenset[str] = frozenset()):
    """Run one seed. Returns None, or (invariant, detail, trace tail) on a violation."""
    sim = Simulation(seed, nodes=nodes, mutations=mutations)
    try:
        sim.run()
    except Violation as v:
        return (v.invariant, v.detail, list(sim.trace))
    return None


def _run_one(args):
    seed, nodes, mutations = args
    return seed, run_seed(seed, nodes, mutations)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftsql.sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=300, help="how many seeds to run (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    ap.add_argument("--mutate", action="append", default=[], metavar="NAME",
                    help="switch off one Raft rule (repeatable); see --list-mutations")
    ap.add_argument("--list-mutations", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--reports", type=int, default=3, help="violations to print in full (default 3)")
    args = ap.parse_args(argv)

    if args.list_mutations:
        for name, text in MUTATIONS.items():
            print(f"{name:26} {text}")
        return 0
    bad = [m for m in args.mutate if m not in MUTATIONS]
    if bad:
        ap.error(f"unknown mutation {bad[0]!r}; see --list-mutations")
    mutations = frozenset(args.mutate)
    seeds = range(args.seed, args.seed + args.seeds)
    work = [(s, args.nodes, mutations) for s in seeds]
    started = time.monotonic()
    violations = 0
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = pool.map(_run_one, work, chunksize=8)
            violations = _report(results, args, mutations)
    else:
        violations = _report(map(_run_one, work), args, mutations)
    took = time.monotonic() - started
    print(f"# {args.seeds} seeds in {took:.1f}s", file=sys.stderr)
    print(f"seeds={args.seeds} violations={violations}")
    return 1 if violations else 0


def _report(results, args, mutations) -> int:
    violations = 0
    for seed, res in results:
        if res is None:
            continue
        violations += 1
        if violations > args.reports:
            continue
        invariant, detail, trace = res
        mut = "".join(f" --mutate {m}" for m in sorted(mutations))
        print(f"VIOLATION seed={seed} invariant={invariant!r}")
        print(f"  {detail}")
        print("  trace tail:")
        for line in trace[-25:]:
            print(f"    {line}")
        print(f"  replay: python -m raftsql.sim --seeds 1 --seed {seed} --nodes {args.nodes}{mut}")
    return violations
