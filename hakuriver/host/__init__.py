"""The host service: the one process that remembers (ledger, ingestion, queries).

Modules, one concept each:

- :mod:`~hakuriver.host.service`: the ``Host`` life cycle (connections, consumers, loops,
  offline detection) and ``main`` (the ``hakuriver.host`` command);
- :mod:`~hakuriver.host.ingest`: decoding and checking what arrives on the ledger queue;
- :mod:`~hakuriver.host.ledger`: the SQL ledger and the stored output files;
- :mod:`~hakuriver.host.queries`: the answers to RPC queries.

Nothing outside this package imports it except the tests and the benchmarks: clients and
runners need only the core (:mod:`hakuriver.messages`, :mod:`hakuriver.topology`, ...).
"""
