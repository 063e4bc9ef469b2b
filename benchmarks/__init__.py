"""agentd's benchmark suite (issue 5): agentd beside its peers, same machine, same run.

Run it with ``make bench`` (full), ``make bench ARGS=--quick`` or ``python -m benchmarks
--smoke``. This package must stay importable by the peers' own interpreters, which lack
agentd's dependencies: nothing here imports anything at package level.
"""
