"""Command-line options that the click commands (hakuriver.host, runner, docker) share, defined once.

``hakuriver.client`` does not use click (its start-up would pay ~30 ms for it); its ``--config``
is in :mod:`client.options`, with the same help text.
"""

import click

CONFIG_HELP = "Config file (default: $HAKURIVER_CONFIG, then ~/.hakuriver/config.toml)."

config_option = click.option("--config", "config_file", metavar="FILE", type=click.Path(dir_okay=False),
                             default=None, help=CONFIG_HELP)
