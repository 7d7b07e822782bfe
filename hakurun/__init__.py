"""hakurun: run a command once per combination of its `span:` arguments.

The package holds two things: `hakurun.span`, the span syntax library that the client's
`--sweep` shares, and `hakurun.cli`, the `hakurun` command.  This file stays empty of
imports on purpose so `hakurun --help` and `import hakurun.span` start fast.
"""
