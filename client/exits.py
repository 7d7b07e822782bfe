"""The exit codes of ``hakuriver.client``, shared by the command line and the session.

0 ok (with --wait: every task completed); the task's own exit code when one task failed
with one; 1 other failures (failed/killed/lost/rejected); 2 bad input (one line naming the
value, nothing sent); 3 broker or host unreachable, or --timeout passed; 141 our stdout was
closed by its reader (``| head``), as a program killed by SIGPIPE would report.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141
