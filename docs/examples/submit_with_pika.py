"""Submit one task to HakuRiver and wait for its end, from pika: no HakuRiver code at all.

This is the worked example of docs/protocol.md; tests/test_protocol_pika.py runs it against
a real cluster. It needs only the standard library and pika (``pip install pika``).

    python submit_with_pika.py [--url URL] [--prefix hakuriver] [--target node1] -- COMMAND [ARGS...]

Like ``hakuriver.client --wait --follow``: prints the task id on stdout, then the task's stdout
and stderr on ours as they arrive, then its final state event on stderr. Exit code: 0 completed,
1 any other end, 2 unknown node, 3 no message for --timeout seconds.
"""

import argparse
import getpass
import json
import random
import socket
import sys
import time

import pika

EPOCH_MS = 1_704_067_200_000  # task ids count milliseconds from 2024-01-01 UTC
TERMINAL = {"completed", "failed", "killed", "killed_oom", "lost", "rejected"}


def new_task_id() -> int:
    """A 64-bit task id in HakuRiver's layout: 41 bits of milliseconds, then 22 random bits."""
    return ((int(time.time() * 1000) - EPOCH_MS) << 22) | random.getrandbits(22)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--prefix", default="hakuriver")
    parser.add_argument("--target", default="node1", help="NODE, NODE:NUMA, or any (the shared pool)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("command", nargs="+")
    options = parser.parse_args()
    prefix, task_id = options.prefix, new_task_id()

    connection = pika.BlockingConnection(pika.URLParameters(options.url))
    channel = connection.channel()
    channel.confirm_delivery()  # basic_publish now waits for the broker's confirm

    # 1. Subscribe first: a queue of our own on the events exchange, bound to this task's
    #    keys before the task exists, so not even a fast task's events can slip by.
    queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    for kind in ("state", "stdout", "stderr"):
        channel.queue_bind(queue, f"{prefix}.events", routing_key=f"task.{task_id}.{kind}")

    # 2. Publish the task: JSON, persistent, mandatory (an unknown node comes back), confirmed.
    node, _, numa = options.target.partition(":")
    task = {
        "v": 1, "task_id": task_id, "batch_id": task_id,
        "command": options.command[0], "args": options.command[1:],
        "target": node, "numa": int(numa) if numa else None,
        "container": None,  # None: run on the node itself; "NAME": in the environment NAME
        "cores": 1, "env": {"GREETING": "hello"},
        "user": getpass.getuser(), "submit_host": socket.gethostname(), "submitted_at": time.time(),
    }
    try:
        channel.basic_publish(
            exchange=f"{prefix}.tasks", routing_key=options.target, body=json.dumps(task).encode(),
            # user_id: who we are, as the broker checks it (it refuses any other user than the one
            # we logged in as); runners refuse a task without it, and it, not "user", is the owner.
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                            user_id=pika.URLParameters(options.url).credentials.username),
            mandatory=True)
    except pika.exceptions.UnroutableError:
        print(f"unknown node {options.target!r}: no runner has bound that key", file=sys.stderr)
        return 2
    print(task_id, flush=True)

    # 3. Wait: output chunks carry their byte offset in headers; the final state event comes
    #    after all of the task's output (the runner sends it last, on the same channel).
    written = {"stdout": 0, "stderr": 0}
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    event = None
    for method, properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=options.timeout):
        if method is None:
            print(f"no news of task {task_id} for {options.timeout:g} s", file=sys.stderr)
            return 3
        kind = method.routing_key.rsplit(".", 1)[1]
        if kind == "state":
            # One event, or a JSON array of several that a runner sent together (to every task's
            # key among them, so also other tasks' events): ours are those of our task id.
            events = json.loads(body)
            ends = [e for e in (events if isinstance(events, list) else [events])
                    if e["task_id"] == task_id and e["state"] in TERMINAL]
            if ends:
                event = ends[0]
                break
            continue
        offset = properties.headers["offset"]
        if offset <= written[kind] < offset + len(body):  # skip duplicates and anything past a gap
            streams[kind].write(body[written[kind] - offset:])
            streams[kind].flush()
            written[kind] = offset + len(body)
    channel.cancel()
    connection.close()
    print(json.dumps(event), file=sys.stderr)
    return 0 if event["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
