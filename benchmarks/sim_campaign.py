"""A long simulator campaign (issue 15's 100,000 seeds) that survives being stopped.

    python benchmarks/sim_campaign.py                      # seeds 0..99,999, 2 workers
    python benchmarks/sim_campaign.py --quick              # 40 seeds into a temp file (CI)
    python benchmarks/sim_campaign.py --report             # only rewrite the .md summary
    nice -n 19 python benchmarks/sim_campaign.py &         # in the background, over sessions

The seeds run in chunks (`python -m raftsql.sim --keep-going`, one process per chunk), and each
finished chunk is appended to benchmarks/results/sim-campaign.json at once, with the code it ran.
A later start goes on from the first seed not yet covered, so a run that is killed (end of a
working session, reboot) loses at most one chunk.

"The code it ran" is a fingerprint: SHA-256 over the Python version and the source of every
raftsql module the simulator executes (the Raft core, the node's Ready driver in
raftsql/server/ready.py, the simulator itself), listed by importing the simulator. Chunks count
towards the campaign only when their fingerprint is the current code's: change any of those files
and the campaign starts again from seed 0 (the old chunks stay in the file, marked as another
fingerprint, and are never added in). Seeds are deterministic for a given fingerprint, so chunks
run on different days on the same code are one run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def fingerprint() -> tuple[str, list[str]]:
    """SHA-256 of the simulator's code, and the modules it covers (computed in a clean child,
    so that nothing this script imported is counted)."""
    probe = (
        "import sys, raftsql.sim.runner, raftsql.sim.cluster\n"
        "print('\\n'.join(sorted(f'{n} {m.__file__}' for n, m in sys.modules.items()"
        " if n.split('.')[0] == 'raftsql' and getattr(m, '__file__', None))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    h = hashlib.sha256(f"python {sys.version_info[0]}.{sys.version_info[1]}\n".encode())
    modules = []
    for line in out.splitlines():
        name, path = line.split(" ", 1)
        modules.append(name)
        h.update(f"{name}\n".encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest(), modules


def _load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"chunks": []}


def _save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def covered(doc: dict, fp: str) -> int:
    """How many seeds from 0 on are covered, without a gap, by chunks of this fingerprint."""
    ranges = sorted((c["first"], c["first"] + c["seeds"]) for c in doc["chunks"] if c["fingerprint"] == fp)
    upto = 0
    for a, b in ranges:
        if a > upto:
            break
        upto = max(upto, b)
    return upto


def run_chunk(first: int, seeds: int, jobs: int) -> dict:
    started = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "raftsql.sim", "--seed", str(first), "--seeds", str(seeds),
         "--jobs", str(jobs), "--keep-going", "--reports", "5"],
        cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"^seeds=(\d+) violations=(\d+)$", p.stdout, re.M)
    if not m:
        raise click.ClickException(f"simulator run {first}+{seeds} ended without a summary "
                                   f"(rc {p.returncode}): {p.stderr[-2000:]}")
    ran, violations = int(m.group(1)), int(m.group(2))
    if ran != seeds:
        raise click.ClickException(f"simulator ran {ran} of {seeds} seeds from {first}")
    totals = {}
    for line in p.stderr.splitlines():
        if line.startswith("# ") and "=" in line:
            totals = dict((k, int(v)) for k, v in (kv.split("=", 1) for kv in line[2:].split()))
    return {
        "first": first, "seeds": seeds, "violations": violations, "jobs": jobs,
        "wall_s": round(time.time() - started, 1),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "reports": [ln for ln in p.stdout.splitlines() if ln.startswith(("VIOLATION", "  replay"))],
        "stats": totals,
    }


def summary(doc: dict, fp: str, target: int) -> str:
    mine = [c for c in doc["chunks"] if c["fingerprint"] == fp]
    upto = covered(doc, fp)
    counted = [c for c in mine if c["first"] + c["seeds"] <= upto]
    wall = sum(c["wall_s"] for c in counted)
    core_s = sum(c["wall_s"] * c["jobs"] for c in counted)
    viol = sum(c["violations"] for c in counted)
    days = sorted({c["started"][:10] for c in counted})
    lines = [
        f"Code fingerprint `{fp[:16]}` (sha256 of the simulator's modules; listed in the JSON).",
        "",
        f"Seeds 0..{upto - 1:,} covered ({upto:,} of {target:,}), violations {viol}, in {len(counted)} chunks; "
        f"wall time {wall / 3600:.2f} h ({core_s / 3600:.2f} worker-hours), on {', '.join(days) or '-'}.",
        "",
    ]
    other = [c for c in doc["chunks"] if c["fingerprint"] != fp]
    if other:
        lines.append(f"{len(other)} chunks ({sum(c['seeds'] for c in other):,} seeds) ran on other code (another "
                     f"fingerprint) and are not counted; they had {sum(c['violations'] for c in other)} "
                     "violation(s), listed in the JSON.\n")
    bad = [r for c in counted for r in c["reports"]]
    if bad:
        lines += ["Violations:", "", *[f"    {r}" for r in bad], ""]
    return "\n".join(lines)


@click.command()
@click.option("--seeds", default=100_000, show_default=True, help="campaign size: seeds 0..N-1")
@click.option("--chunk", default=1_000, show_default=True, help="seeds per recorded chunk")
@click.option("--jobs", default=2, show_default=True, help="simulator worker processes")
@click.option("--hours", type=float, default=None, help="stop after the chunk that passes this many hours")
@click.option("--quick", is_flag=True, help="40 seeds in chunks of 20, recorded in a temp file (CI)")
@click.option("--report", is_flag=True, help="run nothing: write the .md summary of what is recorded")
@click.option("--results", type=click.Path(path_type=Path), default=None,
              help="record file (default benchmarks/results/sim-campaign.json)")
def main(seeds, chunk, jobs, hours, quick, report, results):
    tmp = None
    if quick:
        seeds, chunk = 40, 20
        tmp = tempfile.TemporaryDirectory(prefix="raftsql-simcampaign-")
        results = Path(tmp.name) / "sim-campaign.json"
    results = results or RESULTS / "sim-campaign.json"
    fp, modules = fingerprint()
    doc = _load(results)
    doc.setdefault("fingerprints", {})[fp] = modules
    deadline = time.time() + hours * 3600 if hours else None
    click.echo(f"fingerprint {fp[:16]}; {covered(doc, fp):,} of {seeds:,} seeds already covered")
    try:
        while not report and (start := covered(doc, fp)) < seeds:
            n = min(chunk, seeds - start)
            rec = run_chunk(start, n, jobs)
            if fingerprint()[0] != fp:
                raise click.ClickException("the simulator's code changed during the campaign; that "
                                           "chunk is not recorded; start again to go on with the new code")
            rec["fingerprint"] = fp
            doc["chunks"].append(rec)
            _save(results, doc)
            click.echo(f"seeds {start}..{start + n - 1}: violations {rec['violations']}, {rec['wall_s']} s", err=True)
            if deadline and time.time() > deadline:
                break
        text = summary(doc, fp, seeds)
        if not quick:
            (results.with_suffix(".md")).write_text(
                "# sim-campaign\n\nCommand: `python benchmarks/sim_campaign.py`\n\n" + text + "\n")
        click.echo(text)
        if any(c["violations"] for c in doc["chunks"] if c["fingerprint"] == fp):
            sys.exit(1)
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
