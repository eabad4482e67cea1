"""The simulator passes on the real core and reports violations when a rule is switched off."""

import os
import subprocess
import sys

import pytest

from raftsql.raft.core import MUTATIONS
from raftsql.sim.cluster import SIM_BUGS, Simulation
from raftsql.sim.runner import main, run_seed

# Mutations the simulator must catch within its default budget of 300 seeds. The others
# (commit_any_term, leader_ack_unpersisted, no_check_quorum) need rarer schedules: see DESIGN.md.
CAUGHT = [
    "no_election_restriction",
    "double_vote",
    "no_consistency_check",
    "no_truncate",
    "read_no_confirm",
    "read_before_term_commit",
    "vote_before_persist",
]


# Broken snapshot paths in the simulated driving code, each with the invariant that catches it.
SIM_BUGS_CAUGHT = {
    "install_keeps_state": "State Machine Safety",  # applies index i+1 on a state machine at j < i
    "snapshot_short_by_one": "State Machine Safety",  # installed data is not the committed prefix
    "snapshot_of_current_state": "State Machine Safety",
    "snapshot_file_after_log": "Snapshot durability",  # a crash in between loses the file
}


def _totals(err: str) -> dict[str, int]:
    line = [ln for ln in err.splitlines() if ln.startswith("# acked=")][-1]
    return {k: int(v) for k, v in (kv.split("=") for kv in line[2:].split())}


def test_300_seeds_without_violations(capsys):
    rc = main(["--seeds", "300", "--jobs", "2"])
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    assert out[-1] == "seeds=300 violations=0", "\n".join(out[-40:])
    assert rc == 0
    # The schedule really exercised the snapshot paths: compaction, InstallSnapshot (also to a
    # learner added by a membership change), every kind of transport report, and restarts
    # both from a snapshot and after a crash between the snapshot file and the log store.
    t = _totals(cap.err)
    for key in (
        "compactions", "snapshots_sent", "installs", "learner_installs", "snapshots_stale",
        "snapshots_fast_forward", "reports_ok",
        "reports_failed", "reports_lost", "restarts_from_snapshot", "crash_between", "conf_changes",
    ):
        assert t[key] > 0, (key, t)


def test_five_node_seeds_without_violations(capsys):
    rc = main(["--seeds", "40", "--seed", "1000", "--nodes", "5", "--jobs", "2"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "seeds=40 violations=0"
    assert rc == 0


@pytest.mark.parametrize("mutation", CAUGHT)
def test_mutation_is_caught_within_300_seeds(mutation):
    for seed in range(300):
        if run_seed(seed, 3, frozenset({mutation})) is not None:
            return
    pytest.fail(f"mutation {mutation} survived 300 seeds")


@pytest.mark.parametrize("bug", sorted(SIM_BUGS_CAUGHT))
def test_broken_snapshot_path_is_caught_within_300_seeds(bug):
    assert set(SIM_BUGS_CAUGHT) == set(SIM_BUGS)
    for seed in range(300):
        res = run_seed(seed, 3, sim_bugs=frozenset({bug}))
        if res is not None:
            assert res[0] == SIM_BUGS_CAUGHT[bug], res[:2]
            return
    pytest.fail(f"simulator bug {bug} survived 300 seeds")


def test_no_snapshots_flag_turns_compaction_off(capsys):
    sim = Simulation(5, snapshots=False)
    stats = sim.run()
    assert "compactions" not in stats
    assert all(n.core.log.snapshot.index == 0 for n in sim.nodes.values())
    assert main(["--seeds", "2", "--sim-bug", "snapshot_short_by_one", "--reports", "1"]) == 1
    out = capsys.readouterr().out
    assert "replay: python -m raftsql.sim --seeds 1 --seed 0 --nodes 3 --sim-bug snapshot_short_by_one" in out
    with pytest.raises(SystemExit):
        main(["--no-snapshots", "--sim-bug", "snapshot_short_by_one"])


def test_a_membership_seed_replays_identically_in_another_process():
    # Seed 9 changes membership; the simulator once iterated over sets of node ids there, so
    # the schedule depended on PYTHONHASHSEED and a reported seed did not replay.
    code = (
        "from raftsql.sim.cluster import Simulation\n"
        "s = Simulation(9, snapshots=False); st = s.run()\n"
        "assert st['conf_changes'] > 0\n"
        "print(st, s.now, list(s.trace)[-5:])\n"
    )
    outs = set()
    for hashseed in ("1", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.add(proc.stdout)
    assert len(outs) == 1


def test_list_mutations_names_every_mutation(capsys):
    assert main(["--list-mutations"]) == 0
    out = capsys.readouterr().out
    for name in MUTATIONS:
        assert name in out
    for name in SIM_BUGS:
        assert name in out
    assert len(set(CAUGHT) & set(MUTATIONS)) >= 5


def test_a_seed_replays_identically():
    a, b = Simulation(42), Simulation(42)
    assert a.run() == b.run()
    assert list(a.trace) == list(b.trace)


def test_cli_reports_violation_seed_and_replay_command_and_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "raftsql.sim", "--seeds", "20", "--mutate", "no_truncate"],
        capture_output=True, text=True, timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode != 0
    assert lines[-1].startswith("seeds=20 violations=") and lines[-1] != "seeds=20 violations=0"
    assert any("VIOLATION seed=" in ln for ln in lines)
    assert any("replay: python -m raftsql.sim --seeds 1 --seed" in ln and "--mutate no_truncate" in ln for ln in lines)


def test_unknown_mutation_is_refused():
    with pytest.raises(SystemExit):
        main(["--mutate", "no_such_rule"])
