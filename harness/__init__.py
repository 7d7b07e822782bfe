"""Real-process harnesses shared by the tests and the benchmarks (not installed with the package).

:mod:`harness.local_cluster` starts a host and runners under a private broker prefix. It lives
beside ``tests/`` and ``bench/`` rather than in either, so both import it the same way (the
repository root is on ``sys.path`` in the editable install and under pytest).
"""
