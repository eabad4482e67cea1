"""The simulator passes on the real core and reports violations when a rule is switched off."""

import subprocess
import sys

import pytest

from raftsql.raft.core import MUTATIONS
from raftsql.sim.cluster import Simulation
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


def test_300_seeds_without_violations(capsys):
    rc = main(["--seeds", "300", "--jobs", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "seeds=300 violations=0", "\n".join(out[-40:])
    assert rc == 0


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


def test_list_mutations_names_every_mutation(capsys):
    assert main(["--list-mutations"]) == 0
    out = capsys.readouterr().out
    for name in MUTATIONS:
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
