"""Long Jepsen-style fault runs: linearizability, no lost / duplicated writes, read-your-writes,
and transactions without isolation anomalies (Elle's list-append, raftsql/testing/elle.py).

    python benchmarks/faults.py --duration 60 --runs 30
    python benchmarks/faults.py --duration 60 --runs 5 --nemesis partitions --nodes 5
    python benchmarks/faults.py --runs 3 --broken-reads        # must report violations
    python benchmarks/faults.py --duration 60 --runs 10 --workload append=6 \
        --nemesis kills --nemesis pauses --nemesis partitions --nodes 3
    python benchmarks/faults.py --runs 1 --workload append=6 --nemesis none \
        --broken-txn-validation                                 # must report anomalies

Each run starts a fresh cluster (raftsql/testing/run.py), runs the workloads under a nemesis schedule
that cycles through the chosen nemeses, heals, and checks the history. Prints one table row per
run and a summary; writes every run's report to benchmarks/results/faults-<time>.json (updated
after each run). A failed run keeps its directory (history.jsonl, node logs, report.json) and
names it. Exit status 1 if any run failed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from raftsql.testing.nemesis import NEMESES, NEMESIS_GROUPS, expand_nemeses
from raftsql.testing.run import RunConfig, run

RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = [("run", 4), ("seed", 10), ("nodes", 5), ("faults", 6), ("reg ok/info/fail", 17), ("keys", 5),
           ("set ack/unk(applied)", 20), ("ryw ok", 6), ("txn ok/fail/info", 17), ("anomalies", 10),
           ("check s", 7), ("total s", 7), ("result", 8)]


def _row(values: list) -> str:
    return "  ".join(str(v).rjust(w) for v, (_, w) in zip(values, COLUMNS, strict=True))


def _workload_spec(items: tuple[str, ...]) -> dict[str, int]:
    if not items:
        return {"register": 4, "set": 2, "ryw": 2}
    out = {}
    for item in items:
        name, _, n = item.partition("=")
        out[name] = int(n or 1)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds of clients and faults per run.")
@click.option("--runs", type=int, default=1, show_default=True)
@click.option("--nemesis", "nemeses", multiple=True,
              help=f"Nemesis or group (repeat). Default: all. Known: {', '.join([*NEMESES, *NEMESIS_GROUPS])}.")
@click.option("--nodes", "nodes", type=click.Choice(["3", "5"]), multiple=True,
              help="Cluster size (repeat to alternate). Default: 3 and 5 alternately.")
@click.option("--workload", "workloads", multiple=True, help="NAME=THREADS (repeat): register, set, ryw, bank, append. Default: register=4 set=2 ryw=2.")
@click.option("--seed", type=int, help="Seed of the first run (run i uses seed + i).")
@click.option("--op-timeout", type=float, default=3.0, show_default=True)
@click.option("--short-timeout", type=float, default=0.75, show_default=True, help="Timeout of every other client (0: none).")
@click.option("--broken-reads", is_flag=True, help="Start nodes with RAFTSQL_TEST_BROKEN_READS=1 (runs must FAIL).")
@click.option("--broken-txn-validation", is_flag=True,
              help="Start nodes with RAFTSQL_TEST_BROKEN_TXN_VALIDATION=1 (append runs must FAIL).")
@click.option("--keep", is_flag=True, help="Keep every run's directory, not only failed ones.")
@click.option("--base-dir", type=click.Path(file_okay=False), help="Where run directories go (default: the temp dir).")
@click.option("--out", type=click.Path(dir_okay=False), help="JSON output (default: benchmarks/results/faults-<time>.json).")
def main(duration, runs, nemeses, nodes, workloads, seed, op_timeout, short_timeout, broken_reads,
         broken_txn_validation, keep, base_dir, out):
    """Run fault runs and check every history."""
    names = expand_nemeses(list(nemeses) or ["all"])
    sizes = [int(n) for n in nodes] or [3, 5]
    wl = _workload_spec(workloads)
    out_path = Path(out) if out else RESULTS / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "nemeses": names,
           "duration": duration, "runs": []}
    click.echo(f"{runs} run(s) of {duration:.0f}s, nemeses: {', '.join(names) or 'none'}; results -> {out_path}")
    click.echo(_row([c for c, _ in COLUMNS]))
    failed = 0
    t0 = time.monotonic()
    env = {}
    if broken_reads:
        env["RAFTSQL_TEST_BROKEN_READS"] = "1"
    if broken_txn_validation:
        env["RAFTSQL_TEST_BROKEN_TXN_VALIDATION"] = "1"
    for i in range(runs):
        cfg = RunConfig(
            nodes=sizes[i % len(sizes)], duration=duration, nemeses=names or ["none"], workloads=wl,
            seed=None if seed is None else seed + i, op_timeout=op_timeout,
            short_timeout=short_timeout or None, keep=keep, base_dir=base_dir,
            env=dict(env),
        )
        report = run(cfg)
        w = report.workloads
        reg = w.get("register", {}).get("counts", {})
        st = w.get("set", {})
        ryw = w.get("ryw", {}).get("counts", {})
        txn = w.get("append", {}).get("counts", {})
        anomalies = sum(w.get("append", {}).get("anomalies", {}).values()) if "append" in w else "-"
        check_s = report.timings.get("check_s", 0)
        click.echo(_row([
            i + 1, report.seed, cfg.nodes, len(report.nemeses_applied),
            f"{reg.get('ok', 0)}/{reg.get('info', 0)}/{reg.get('fail', 0)}", w.get("register", {}).get("keys", 0),
            f"{st.get('counts', {}).get('ok', 0)}/{st.get('counts', {}).get('info', 0)}({st.get('recovered', 0)})",
            ryw.get("ok", 0), f"{txn.get('ok', 0)}/{txn.get('fail', 0)}/{txn.get('info', 0)}", anomalies,
            check_s, report.timings.get("total_s", 0), "ok" if report.ok else "FAILED",
        ]))
        if not report.ok:
            failed += 1
            click.echo(report.explain())
        doc["runs"].append(report.to_json())
        doc["summary"] = {"runs": i + 1, "failed": failed, "elapsed_s": round(time.monotonic() - t0, 1)}
        out_path.write_text(json.dumps(doc, indent=1, default=repr))
    applied: dict[str, int] = {}
    for r in doc["runs"]:
        for n in r["nemeses_applied"]:
            applied[n] = applied.get(n, 0) + 1
    click.echo(f"\n{runs - failed}/{runs} runs passed, {failed} failed, in {time.monotonic() - t0:.0f}s")
    click.echo("faults applied: " + ", ".join(f"{k}={v}" for k, v in sorted(applied.items())))
    click.echo(f"report: {out_path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
