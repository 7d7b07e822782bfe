"""GPU allocation and admission, called directly: exclusive GPUs, fair order, a task waiting
for GPUs that does not hold back CPU-only tasks, what each kind of task is told, the
``[node] gpus`` setting, and what the client refuses before sending."""

from __future__ import annotations

import pytest

from client.cli import UsageError, _validate
from client.options import parse
from hakuriver.config import parse_gpu_setting
from hakuriver.messages import Gpu, Task
from runner.admission import Admission, Capacity, never_fits
from runner.gpus import Inventory
from runner.peers import NodeView, pool_refusal

_ids = iter(range(1, 10**6))


def task(**fields) -> Task:
    fields.setdefault("target", "node1")
    if fields.get("gpus") is not None:
        fields.setdefault("gpu_count", len(fields["gpus"]))
    return Task(task_id=next(_ids), batch_id=0, command="true", **fields)


def admission(gpus=(0, 1), cores=4, **kwargs) -> Admission:
    return Admission(Capacity(cores, 1 << 30, gpus=tuple(gpus)), **kwargs)


def test_named_gpus_are_exclusive_and_the_other_gpu_stays_free():
    adm = admission()
    first, second, beside = task(gpus=[1]), task(gpus=[1]), task(gpus=[0])
    assert adm.choose([first, second, beside]) == [first, beside]
    assert adm.allocated == {first.task_id: [1], beside.task_id: [0]}
    assert adm.why_waiting(second) == "waiting for GPU 1: another task holds it"
    adm.release(first)
    assert adm.choose([second]) == [second] and adm.allocated[second.task_id] == [1]


def test_gpus_n_takes_the_lowest_free_ones():
    adm = admission((0, 1, 2))
    one = task(gpus=[0])
    adm.choose([one])
    two = task(gpu_count=2)
    assert adm.choose([two]) == [two] and adm.allocated[two.task_id] == [1, 2]
    more = task(gpu_count=1)
    assert adm.choose([more]) == [] and adm.why_waiting(more).startswith("waiting for GPUs: needs 1 of the node's 3")


def test_a_task_waiting_for_gpus_does_not_hold_back_cpu_only_tasks_even_when_it_waited_longest():
    adm = admission((0,), max_bypass=1)
    adm.choose([holder := task(gpus=[0])])
    old = task(gpu_count=1, cores=1)
    assert adm.choose([old, task(cores=1)])   # passes it once: now it has waited longest
    cpu, gpu = task(cores=1), task(gpu_count=1)
    assert adm.choose([old, gpu, cpu]) == [cpu]   # the CPU-only task starts; the younger GPU task does not
    assert adm.holding == old.task_id
    hog = task(cores=2)   # would take the cores the held task needs once its GPU is free
    assert adm.choose([old, hog]) == []
    adm.release(holder)
    assert adm.choose([old, gpu]) == [old]


def test_an_adopted_task_gets_its_stored_gpus_back():
    adm = admission()
    adopted = task(gpu_count=1)
    adm.take(adopted, gpus=[1])
    assert adm.free_gpus() == [0]
    assert adm.choose([t := task(gpus=[1])]) == [] and adm.why_waiting(t) == "waiting for GPU 1: another task holds it"


def test_a_node_never_runs_gpus_it_lacks_and_the_pool_says_so():
    cap = Capacity(4, 1 << 30, gpus=(0, 1))
    assert never_fits(task(gpus=[7]), cap) == "the node has no GPU 7 (it has 0, 1)"
    assert never_fits(task(gpu_count=3), cap) == "3 GPUs requested; the node has 2"
    nodes = [NodeView("a", Capacity(4, 1 << 30, gpus=(0,)), frozenset()),
             NodeView("b", Capacity(4, 1 << 30), frozenset())]
    assert pool_refusal(task(target="any", gpu_count=1), nodes) is None
    assert pool_refusal(task(target="any", gpu_count=2), nodes) == (
        "no online node can run it: 2 GPUs requested; the most any online node has is 1")


def test_host_tasks_see_their_gpus_by_uuid_or_by_pci_index():
    declared = Inventory("0,1")
    assert declared.host_env([1]) == {"HAKURIVER_GPUS": "1", "CUDA_VISIBLE_DEVICES": "1",
                                      "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert declared.host_env(None)["CUDA_VISIBLE_DEVICES"] == ""
    assert Inventory("none").host_env(None) == {}
    known = Inventory("none")
    known.gpus = [Gpu(index=0, uuid="GPU-aaaa"), Gpu(index=1, uuid="GPU-bbbb")]
    assert known.host_env([1, 0]) == {"HAKURIVER_GPUS": "1,0", "CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa"}
    assert known.device_ids([1]) == ["GPU-bbbb"] and declared.device_ids([1]) == ["1"]


@pytest.mark.parametrize("text, parsed", [("auto", "auto"), ("none", "none"), ("0,1", [0, 1]), (" 2 , 3 ", [2, 3])])
def test_the_gpus_setting(text, parsed):
    assert parse_gpu_setting(text) == parsed


@pytest.mark.parametrize("text", ["", "all", "0,,1", "-1", "0,0", "gpu0"])
def test_a_bad_gpus_setting_is_refused_by_name(text):
    with pytest.raises(ValueError, match="invalid gpus"):
        parse_gpu_setting(text)


def _options(**given):
    """The options the parser hands ``_validate`` for a command line giving only ``given``."""
    options = parse(["--", "true"])
    options.update(given)
    return options


@pytest.mark.parametrize("given, says", [
    ({"gpus": "0"}, "invalid --gpus '0'"), ({"gpus": "x"}, "invalid --gpus 'x'"),
    ({"gpus": "2", "targets": ("node1::0",)}, "--gpus 2 disagrees with --target 'node1::0' (1 GPU ids)"),
    ({"targets": ("node1::0,0",)}, "GPU 0 given twice"), ({"targets": ("node1::",)}, "GPU ids"),
    ({"gpus": "1", "list_nodes": True, "command": ()}, "--gpus does not go with --list-nodes"),
])
def test_the_command_line_refuses_bad_gpu_requests(given, says):
    with pytest.raises(UsageError, match=None) as caught:
        _validate(_options(**given))
    assert says in str(caught.value)


def test_gpus_agreeing_with_ids_is_accepted():
    request = _validate(_options(gpus="2", targets=("node1::0,1",)))
    assert request.gpus == 2 and request.targets == ["node1::0,1"]
