"""raftsql.testing: the test harness, kept out of the product.

Tests (tests/) and benchmarks (benchmarks/) import it; raftsql.server, raftsql.driver and the
rest of raftsql never do (tests/unit/test_imports.py checks that the product does not reach
into it). It holds what runs real node processes and breaks them, and what judges the result:

    cluster       LocalCluster: real node processes on a private loopback address; free_port
    proxy         ProxyNet: fault-injecting TCP proxies on the peer links (partitions, delays)
    clock         the LD_PRELOAD wall-clock shim (C source, compiled on first use)
    faultcluster  FaultCluster: a LocalCluster wired through a ProxyNet
    history       History (the Jepsen-style event log) and Ctx (what a run's parts share)
    workloads     register, set, read-your-writes and bank clients, each with its own check
    nemesis       the faults (kill, pause, partitions, slow links, clock, transfer,
                  membership) and the Schedule that applies them
    run           RunConfig, run() and RunReport: one fault campaign run end to end
    checker       pure consistency checkers: linearizability (Wing-Gong/Lowe), set, RYW

Importing this package imports none of its modules; import the one you need.
"""
