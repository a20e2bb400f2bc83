"""``task bench``: the gateway measured against its baselines on one machine, in one run.

Entry point: ``python -m tests.bench.run``. Nothing here is collected by
pytest (no ``test_*`` modules); the benchmark is not part of ``task test``.
"""
