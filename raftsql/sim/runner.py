"""Command-line runner for the simulator (see __main__.py)."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

from raftsql.raft.core import MUTATIONS
from raftsql.sim.cluster import SIM_BUGS, Simulation, Violation


def run_seed(
    seed: int,
    nodes: int | None = None,
    mutations: frozenset[str] = frozenset(),
    snapshots: bool = True,
    sim_bugs: frozenset[str] = frozenset(),
):
    """Run one seed. Returns None, or (invariant, detail, trace tail) on a violation.
    nodes=None: the seed draws its cluster size (3 to 5 voters)."""
    return _run(seed, nodes, mutations, snapshots, sim_bugs)[0]


def _run(seed, nodes, mutations, snapshots, sim_bugs):
    sim = Simulation(seed, nodes=nodes, mutations=mutations, snapshots=snapshots, sim_bugs=sim_bugs)
    try:
        sim.run()
    except Violation as v:
        trace = [*sim.trace, f"swarm: {sim.mix.describe()}"]
        return (v.invariant, v.detail, trace), sim.stats
    return None, sim.stats


def _run_one(args):
    seed, *rest = args
    return (seed, *_run(seed, *rest))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raftsql.sim", description=__doc__)
    ap.add_argument("--seeds", type=int, default=300, help="how many seeds to run (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--nodes", type=int, choices=(3, 4, 5), default=None,
                    help="voters in every seed (default: each seed draws 3 to 5)")
    ap.add_argument("--mutate", action="append", default=[], metavar="NAME",
                    help="switch off one Raft rule (repeatable); see --list-mutations")
    ap.add_argument("--list-mutations", action="store_true",
                    help="list the mutations, and the simulator bugs of --sim-bug")
    ap.add_argument("--no-snapshots", action="store_true",
                    help="no log compaction or InstallSnapshot")
    ap.add_argument("--sim-bug", action="append", default=[], metavar="NAME",
                    help="break the simulated snapshot path or the Ready driver (repeatable; for tests); see --list-mutations")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--keep-going", action="store_true",
                    help="run every seed even after a violation (default: stop at the first)")
    ap.add_argument("--reports", type=int, default=3, help="violations to print in full (default 3)")
    ap.add_argument("--check-mutations", action="store_true",
                    help="run each mutation (or each --mutate) until a seed catches it; print the table")
    args = ap.parse_args(argv)

    if args.list_mutations:
        for name, text in MUTATIONS.items():
            print(f"{name:30} {text}")
        print("# simulator bugs (--sim-bug), in the driving code (snapshot paths, the Ready driver), not the core:")
        for name, text in SIM_BUGS.items():
            print(f"{name:30} {text}")
        return 0
    bad = [m for m in args.mutate if m not in MUTATIONS]
    if bad:
        ap.error(f"unknown mutation {bad[0]!r}; see --list-mutations")
    bad = [b for b in args.sim_bug if b not in SIM_BUGS]
    if bad:
        ap.error(f"unknown simulator bug {bad[0]!r}; see --list-mutations")
    if args.sim_bug and args.no_snapshots:
        ap.error("--sim-bug needs snapshots")
    if args.check_mutations:
        return check_mutations(args.mutate or list(MUTATIONS), args.seed, args.seeds, args.nodes)
    mutations = frozenset(args.mutate)
    seeds = range(args.seed, args.seed + args.seeds)
    work = [(s, args.nodes, mutations, not args.no_snapshots, frozenset(args.sim_bug)) for s in seeds]
    started = time.monotonic()
    totals: dict[str, int] = {}
    if args.jobs > 1:
        # imap keeps results in seed order; at the first violation the pool is terminated, so a
        # mutated run stops as soon as the lowest failing seed is known.
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            ran, violations = _report(pool.imap(_run_one, work, chunksize=1), args, mutations, totals)
            pool.terminate()
    else:
        ran, violations = _report(map(_run_one, work), args, mutations, totals)
    took = time.monotonic() - started
    print(f"# {ran} seeds in {took:.1f}s", file=sys.stderr)
    if totals:
        print("# " + " ".join(f"{k}={v}" for k, v in totals.items()), file=sys.stderr)
    print(f"seeds={ran} violations={violations}")
    return 1 if violations else 0


def _report(results, args, mutations, totals: dict[str, int]) -> tuple[int, int]:
    violations = ran = 0
    for seed, res, stats in results:
        ran += 1
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        if res is None:
            continue
        violations += 1
        if violations <= args.reports:
            invariant, detail, trace = res
            mut = "".join(f" --mutate {m}" for m in sorted(mutations))
            mut += f" --nodes {args.nodes}" if args.nodes else ""
            mut += " --no-snapshots" if args.no_snapshots else ""
            mut += "".join(f" --sim-bug {b}" for b in sorted(args.sim_bug))
            print(f"VIOLATION seed={seed} invariant={invariant!r}")
            print(f"  {detail}")
            print("  trace tail:")
            for line in trace[-25:]:
                print(f"    {line}")
            print(f"  replay: python -m raftsql.sim --seeds 1 --seed {seed}{mut}", flush=True)
        if not args.keep_going:
            break
    return ran, violations


def check_mutations(names: list[str], first: int, seeds: int, nodes: int | None) -> int:
    """Each mutation alone, seed after seed, until one catches it: the table in DESIGN.md."""
    survived = 0
    print(f"{'mutation':32} {'seed':>5} {'secs':>6}  invariant")
    for name in names:
        started = time.monotonic()
        for seed in range(first, first + seeds):
            res = run_seed(seed, nodes, frozenset({name}))
            if res is not None:
                took = time.monotonic() - started
                print(f"{name:32} {seed:>5} {took:>6.1f}  {res[0]}: {res[1][:160]}", flush=True)
                break
        else:
            survived += 1
            print(f"{name:32} {'-':>5} {time.monotonic() - started:>6.1f}  SURVIVED {seeds} seeds", flush=True)
    print(f"mutations={len(names)} survived={survived}")
    return 1 if survived else 0
