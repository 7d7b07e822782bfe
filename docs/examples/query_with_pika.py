"""Ask the HakuRiver host a question over AMQP RPC, from pika: no HakuRiver code at all.

The second example of docs/protocol.md (tests/test_protocol_pika.py runs it too).

    python query_with_pika.py [--url URL] [--prefix hakuriver] status TASK_ID [TASK_ID...]
    python query_with_pika.py [--url URL] [--prefix hakuriver] stdout|stderr TASK_ID

``status`` prints the host's answer as JSON; ``stdout``/``stderr`` print the task's stored
output byte for byte, page by page. Exit code: 0 answered, 1 the host said no, 3 no answer.
"""

import argparse
import base64
import json
import sys
import time
import uuid

import pika

REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's direct reply-to: no reply queue to declare


def call(channel, prefix: str, method: str, params: dict, user: str, timeout: float = 10.0):
    """One request to ``<prefix>.rpc``; returns the reply's ``result`` (raises on ``ok: false``)."""
    correlation_id = uuid.uuid4().hex
    replies = {}

    def on_reply(_channel, _method, properties, body):
        replies[properties.correlation_id] = body

    # Consume the pseudo-queue (no ack) before publishing: RabbitMQ requires it.
    tag = channel.basic_consume(REPLY_TO, on_reply, auto_ack=True)
    channel.basic_publish(
        exchange="", routing_key=f"{prefix}.rpc",
        body=json.dumps({"v": 1, "method": method, "params": params}).encode(),
        properties=pika.BasicProperties(content_type="application/json", reply_to=REPLY_TO,
                                        correlation_id=correlation_id,
                                        user_id=user,  # who asks: output only for its owner and admins
                                        expiration=str(int(timeout * 1000))),  # not answered after we gave up
        mandatory=True)  # if no host ever declared the queue: UnroutableError (confirms are on)
    deadline = time.monotonic() + timeout
    while correlation_id not in replies and time.monotonic() < deadline:
        channel.connection.process_data_events(time_limit=max(0.0, deadline - time.monotonic()))
    channel.basic_cancel(tag)
    if correlation_id not in replies:
        raise TimeoutError(f"the host did not answer {method!r} within {timeout:g} s")
    reply = json.loads(replies[correlation_id])
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return reply["result"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--prefix", default="hakuriver")
    parser.add_argument("what", choices=["status", "stdout", "stderr"])
    parser.add_argument("task_ids", nargs="+", type=int)
    options = parser.parse_args()
    parameters = pika.URLParameters(options.url)
    user = parameters.credentials.username  # the only user_id the broker lets this connection send
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        if options.what == "status":
            print(json.dumps(call(channel, options.prefix, "status", {"task_ids": options.task_ids}, user), indent=2))
        else:
            offset = 0
            while True:  # pages of at most 4 MiB until the stored size is reached
                page = call(channel, options.prefix, "output",
                            {"task_id": options.task_ids[0], "stream": options.what, "offset": offset}, user)
                data = base64.b64decode(page["data"])
                sys.stdout.buffer.write(data)
                offset += len(data)
                if offset >= page["size"]:
                    break
    except RuntimeError as exc:
        print(f"the host says: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, pika.exceptions.UnroutableError) as exc:
        print(f"no answer: {exc or 'no host serves queries'}", file=sys.stderr)
        return 3
    finally:
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
