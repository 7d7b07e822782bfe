"""Executors run one task each, behind one interface (:class:`~runner.executors.base.Executor`).

The runner never asks which executor it holds; :func:`runner.executors.select.executor_for`
picks one per task.
"""
