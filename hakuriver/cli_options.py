"""Command-line options that every HakuRiver command shares, defined once.

The click commands (hakuriver.host, runner, docker) take ``--config`` through :func:`config_option`.
``hakuriver.client`` does not use click (its start-up would pay ~30 ms for it): its own option
table (:mod:`client.options`) takes only :data:`CONFIG_HELP` from here, so this module imports
click only when a click command asks for the option.
"""

CONFIG_HELP = "Config file (default: $HAKURIVER_CONFIG, then ~/.hakuriver/config.toml)."


def config_option(command):
    """``@config_option``: the ``--config FILE`` option of a click command."""
    import click

    return click.option("--config", "config_file", metavar="FILE", type=click.Path(dir_okay=False),
                        default=None, help=CONFIG_HELP)(command)
