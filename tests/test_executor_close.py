"""The executor interface's ``close``: a no-op by default, and called for every executor when the runner stops."""

import uuid

from hakuriver.config import Config
from runner.executors.base import Executor
from runner.executors.process import ProcessExecutor
from runner.runner import Runner


class _Closing(ProcessExecutor):
    """A real process executor that also says whether it was closed."""

    closed = 0

    async def close(self) -> None:
        self.closed += 1
        await super().close()


async def test_the_runner_closes_each_executor_once_when_it_stops(tmp_path):
    config = Config()
    config.paths.state_dir = str(tmp_path / "state")
    config.node.name = "node-close"
    executor = _Closing(cgroup_parent=f"hk-test-{uuid.uuid4().hex[:8]}")
    runner = Runner(config, executors={"process": executor})
    await runner.stop()
    assert executor.closed == 1
    executor.cgroups.remove_parent()


async def test_close_is_part_of_the_interface_and_a_no_op_by_default():
    assert "close" in vars(Executor)
    await ProcessExecutor(cgroup_root="/nonexistent").close()  # nothing to release; never raises
