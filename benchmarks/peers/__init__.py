"""The host beside its peers (bare rpyc, XML-RPC, Pyro5, gRPC, a raw socket) in one run.

    .venv/bin/python -m benchmarks.peers            # full run (~12 minutes)
    .venv/bin/python -m benchmarks.peers --quick    # under 2 minutes

Modules: ``servers`` (each system's server, run in its own process), ``clients`` (each
system's client, with the same operations), ``workloads`` (bounded loops: small calls, bulk,
idle connections), ``report`` (tables, ratios, targets, JSON, chart), ``run`` (the command).
See docs/performance.md for what each figure means and what limits it.
"""
