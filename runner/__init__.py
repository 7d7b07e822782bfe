"""The runner: one per machine. Takes tasks for its node, admits them against free
cores and memory, runs them through an executor, streams state and output back."""
