"""Command-line options that every HakuRiver command shares, defined once.

click only: the client's ``--help`` must stay fast, so nothing heavier is imported here.
"""

import click

CONFIG_HELP = "Config file (default: $HAKURIVER_CONFIG, then ~/.hakuriver/config.toml)."

config_option = click.option("--config", "config_file", metavar="FILE", type=click.Path(dir_okay=False),
                             default=None, help=CONFIG_HELP)
