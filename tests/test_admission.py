"""Admission rules: arrival order, bounded passing, NUMA accounting, what never fits."""

from __future__ import annotations

from hakuriver.messages import NumaNode, Task
from runner.admission import Admission, Capacity

GIB = 2**30
_next_id = iter(range(1, 10**6))


def task(cores=1.0, memory=None, numa=None) -> Task:
    i = next(_next_id)
    return Task(task_id=i, batch_id=i, command="true", target="n", cores=cores, memory=memory, numa=numa)


def admission(cores=4, memory=8 * GIB, max_bypass=16) -> Admission:
    numa = {0: NumaNode(cpus=[0, 1], memory=4 * GIB), 1: NumaNode(cpus=[2, 3], memory=4 * GIB)}
    return Admission(Capacity(cores, memory, numa), max_bypass=max_bypass)


def test_tasks_start_in_arrival_order_while_they_fit():
    a = admission()
    waiting = [task(2), task(1), task(2), task(1)]
    assert a.choose(waiting) == [waiting[0], waiting[1], waiting[3]]  # the third (2 cores) does not fit now
    assert a.cores_free == 0


def test_cores_zero_takes_no_core_and_memory_is_accounted():
    a = admission(cores=1, memory=1 * GIB)
    zero = [task(0) for _ in range(5)]
    assert a.choose(zero) == zero and a.cores_free == 1
    big, small = task(0, memory=GIB), task(0, memory=1)
    assert a.choose([big, small]) == [big]
    a.release(big)
    assert a.choose([small]) == [small]


def test_a_big_task_is_passed_only_max_bypass_times():
    a = admission(cores=2, max_bypass=3)
    big = task(2)
    a.take(task(1))  # one core busy: big does not fit
    passed = 0
    for _ in range(10):
        small = task(1)
        started = a.choose([big, small])
        if started == [small]:
            passed += 1
            a.release(small)
        else:
            assert started == []  # held for the big one
            break
    assert passed == 3


def test_numa_cores_are_accounted_per_node():
    a = admission()
    n0 = [task(1, numa=0), task(1, numa=0), task(1, numa=0)]
    assert a.choose(n0) == n0[:2]
    assert a.choose([task(1, numa=1)])  # node 1 still has room
    assert a.numa_cores_free() == {0: 0.0, 1: 1.0}


def test_what_never_fits_says_why():
    a = admission()
    assert "8 cores requested" in a.never_fits(task(8))
    assert "NUMA node 5" in a.never_fits(task(1, numa=5))
    assert "NUMA node 0 offers 2" in a.never_fits(task(3, numa=0))
    assert "memory requested" in a.never_fits(task(1, memory=9 * GIB))
    assert a.never_fits(task(4)) is None


def test_why_a_task_waits_names_the_resource_and_stays_the_same_while_it_waits():
    a = admission(cores=4, memory=8 * GIB)
    running = [task(2, memory=GIB), task(1, numa=1)]
    assert a.choose(running) == running
    cores, numa, memory = task(2), task(2, numa=1), task(1, memory=8 * GIB)
    assert a.choose([cores, numa, memory]) == []
    assert a.why_waiting(cores) == "waiting for cores: needs 2 of the node's 4, other tasks hold them"
    assert a.why_waiting(numa) == "waiting for cores on NUMA node 1: needs 2 of its 2, other tasks hold them"
    assert a.why_waiting(memory) == "waiting for memory: needs 8.0G of the node's 8.0G, other tasks hold it"
    a.take(task(1))  # one more core taken: the reasons stay the same (no event per freed or taken core)
    assert a.why_waiting(cores) == "waiting for cores: needs 2 of the node's 4, other tasks hold them"


def test_tasks_held_behind_the_oldest_say_so():
    a = admission(cores=2, max_bypass=1)
    a.take(task(1))
    big, small, after = task(2), task(1), task(1)
    assert a.choose([big, small]) == [small]  # passed once: from now on it holds the rest
    a.release(small)
    assert a.choose([big, after]) == []
    assert a.holding == big.task_id
    assert a.why_waiting(after) == f"waiting behind task {big.task_id}, which has waited longest (arrival order)"


def test_a_pass_that_stops_early_chooses_what_the_whole_pass_would():
    """choose() over WaitingTasks stops once every waiting ask is known not to fit; over a plain
    list it walks every task. Random arrivals, ends and kills, GPUs and NUMA included: the same
    tasks start, the same task is held, the same passes are counted, every time."""
    import random

    from runner.admission import WaitingTasks

    rng = random.Random(18)
    asks = [dict(cores=1.0), dict(cores=2.0), dict(cores=0.0), dict(cores=1.0, memory=3 * GIB),
            dict(cores=1.0, numa=1), dict(cores=0.5, gpu_count=1), dict(cores=1.0, gpus=[1], gpu_count=1)]
    for _round in range(40):
        capacity = Capacity(4, 8 * GIB, {0: NumaNode(cpus=[0, 1], memory=4 * GIB),
                                         1: NumaNode(cpus=[2, 3], memory=4 * GIB)}, gpus=(0, 1))
        quick, whole = Admission(capacity, max_bypass=3), Admission(capacity, max_bypass=3)
        indexed, plain, running = WaitingTasks(), [], []
        for _step in range(120):
            roll = rng.random()
            if roll < 0.55:
                i = next(_next_id)
                t = Task(task_id=i, batch_id=i, command="true", target="n", **rng.choice(asks))
                indexed.append(t)
                plain.append(t)
            elif roll < 0.9 and running:
                t = running.pop(rng.randrange(len(running)))
                quick.release(t)
                whole.release(t)
            elif plain:
                t = plain.pop(rng.randrange(len(plain)))
                indexed.remove(t)
            started = quick.choose(indexed)
            assert [t.task_id for t in started] == [t.task_id for t in whole.choose(plain)]
            assert (quick.holding, quick._bypassed) == (whole.holding, whole._bypassed)
            for t in started:
                indexed.remove(t)
                plain.remove(t)
                running.append(t)
    assert len(indexed) == len(plain) and list(indexed) == plain


def test_a_deep_queue_of_like_tasks_is_not_walked_at_every_pass():
    from runner.admission import WaitingTasks

    a = admission(cores=2)
    waiting = WaitingTasks()
    for _ in range(1000):
        waiting.append(task(1))
    started = a.choose(waiting)
    assert len(started) == 2
    for t in started:
        waiting.remove(t)
    looked = []

    class Watched(WaitingTasks):
        def __iter__(self):
            for t in super().__iter__():
                looked.append(t)
                yield t
    watched = Watched()
    for t in waiting:
        watched.append(t)
    assert a.choose(watched) == []
    assert len(looked) == 1   # the first blocked task's ask is the only one waiting
