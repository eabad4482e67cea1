"""python -m raftsql.sim --seeds N [--seed S] [--nodes 3|5] [--mutate NAME] [--list-mutations]
                         [--no-snapshots] [--sim-bug NAME] [--jobs N]

The last line printed is exactly `seeds=N violations=V`.
"""

from __future__ import annotations

import sys

from raftsql.sim.runner import main

if __name__ == "__main__":
    sys.exit(main())
