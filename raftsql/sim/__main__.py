"""python -m raftsql.sim --seeds N [--seed S] [--nodes 3|4|5] [--mutate NAME] [--list-mutations]
                         [--no-snapshots] [--sim-bug NAME] [--jobs N] [--keep-going]
                         [--check-mutations]

The run stops at the first violation (unless --keep-going) and prints its seed, invariant,
trace tail and a one-line replay command. The last line printed is exactly
`seeds=N violations=V` (N: the seeds that ran). --check-mutations runs every mutation in
turn until a seed catches it (at most --seeds seeds each) and prints the table of first
catching seeds.
"""

from __future__ import annotations

import sys

from raftsql.sim.runner import main

if __name__ == "__main__":
    sys.exit(main())
