"""HakuRiver: a task fabric for small compute clusters, over RabbitMQ.

The shared core lives here: config, the message contract, broker topology names,
task states, the ledger and the host service. Runner, client and hakurun are
sibling packages that import from it.
"""

__version__ = "0.1.0"
