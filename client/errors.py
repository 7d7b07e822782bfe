"""What can go wrong in a client invocation besides the broker itself: one exception per answer.

Why it exists: both ways the client talks to the broker (the aio-pika API of :mod:`client.api`
and the light command-line path of :mod:`client.quick`) refuse the same things in the same
words, and the command line maps each to one exit code (:mod:`client.exits`). Plain
exceptions, no imports: the light path must not load the broker library to name them.
"""


class BadRequest(Exception):
    """Bad input found only with the broker's help (unknown node, NUMA id, a task over a
    bound or bigger than any node); exit code 2."""


class NotYours(Exception):
    """The task belongs to someone else and we are no admin (``task 123 belongs to alice``); exit code 1."""


class WrongState(Exception):
    """A control that does not fit the task's state now (pausing a task that does not run);
    nothing was sent; exit code 1."""
