"""``hakuriver.runner``: run this machine's runner until interrupted."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from hakuriver.cli_options import config_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--node", "node_name", metavar="NAME", help="Node name (overrides [node] name).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(config_file: str | None, node_name: str | None, verbose: bool) -> None:
    """Run the HakuRiver runner of this machine."""
    from hakuriver.config import ConfigError, load_config

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    try:
        config = load_config(config_file)
        if node_name:
            config.node.name = node_name
    except (ConfigError, ValueError) as exc:
        click.echo(f"hakuriver.runner: {exc}", err=True)
        sys.exit(2)
    from runner.executors.process import use_fast_child_watcher

    use_fast_child_watcher()  # pidfd instead of a thread per child, where the kernel has it
    try:
        code = asyncio.run(_serve(config))
    except ConfigError as exc:  # a setting this machine cannot honour ([node] executor)
        click.echo(f"hakuriver.runner: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


async def _serve(config) -> int:
    from hakuriver.broker import BrokerUnreachable
    from runner.runner import Runner

    runner = Runner(config)
    while True:
        try:
            await runner.start()
            break
        except BrokerUnreachable as exc:
            logging.getLogger("runner").warning("%s; retrying in 2 s", exc)
            await asyncio.sleep(2)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.stop()
    return 0
