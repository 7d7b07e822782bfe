"""``hakuriver.init``: set a machine up, a default config file and systemd units.

``hakuriver.init config`` writes the commented default config (the same text
:func:`hakuriver.config.default_config_text` documents every key with), to a file or stdout.
It never overwrites a file without ``--force``: a config is something people edit.

``hakuriver.init service --host|--runner`` writes ``hakuriver-host.service`` /
``hakuriver-runner.service``. ExecStart names the console script of *this* install by its
absolute path (systemd has no PATH of the user's, and a virtual environment's scripts are
found by no PATH at all), so the unit starts exactly the code that wrote it. Unit files are
generated, not edited, so they are overwritten; what was written is printed.

The unit texts live here and nowhere else; ``deploy/systemd/`` holds copies rendered for
an install in ``/opt/hakuriver`` (a test keeps them equal).
``hakuriver.init user add|list|remove`` makes broker users (:mod:`hakuriver.admin.users`).
Exit codes: 0 done, 1 the file exists (config without ``--force``) or cannot be written.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import click

DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_CONFIG_FILE = "/etc/hakuriver/config.toml"

# The role's console script and a one-line description for its unit.
ROLES = {
    "host": ("hakuriver.host", "HakuRiver host: task ledger and queries"),
    "runner": ("hakuriver.runner", "HakuRiver runner: runs this machine's tasks"),
}

UNIT_TEMPLATE = """\
# Written by hakuriver.init; run `hakuriver.init service --{role}` again to rewrite it.
[Unit]
Description={description}
After=network-online.target rabbitmq-server.service{after}
Wants=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
Restart=on-failure
RestartSec=5
Environment=PYTHONUNBUFFERED=1
{role_settings}
[Install]
WantedBy=multi-user.target
"""

# Why these differ per role:
# - the runner runs as root: it talks to Docker, makes cgroups and systemd scopes for tasks;
# - KillMode=mixed sends SIGTERM to the runner alone, so it can record its tasks' state
#   before systemd kills what is left of its process tasks (systemd-run tasks live in
#   scopes of their own and docker tasks in containers; a restarted runner adopts those).
ROLE_SETTINGS = {
    "host": "",
    "runner": "KillMode=mixed\nTimeoutStopSec=30\n",
}


def console_script(name: str, bin_dir: str | None = None) -> list[str]:
    """The command that starts console script ``name`` of this install, as an argv."""
    if bin_dir:
        return [str(Path(bin_dir) / name)]
    # Scripts are installed next to the interpreter in a virtual environment or a
    # per-version install (pyenv, /opt/...); elsewhere (pip into /usr/local) PATH finds them.
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside.absolute())]
    found = shutil.which(name)
    if found:
        return [str(Path(found).absolute())]
    # Not installed as a script (e.g. run from a source tree): call the entry point.
    from importlib.metadata import entry_points

    target = next((ep.value for ep in entry_points(group="console_scripts") if ep.name == name), None)
    if target is None:
        raise click.ClickException(f"cannot find the {name} command of this install")
    module, _, func = target.partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def render_unit(role: str, config_file: str, node: str | None = None, bin_dir: str | None = None) -> str:
    """The text of ``hakuriver-<role>.service``."""
    script, description = ROLES[role]
    argv = console_script(script, bin_dir) + ["--config", config_file]
    if node:
        argv += ["--node", node]
    return UNIT_TEMPLATE.format(
        role=role,
        description=description,
        after=" docker.service" if role == "runner" else "",
        exec_start=_systemd_command_line(argv),
        role_settings=ROLE_SETTINGS[role],
    )


def _systemd_command_line(argv: list[str]) -> str:
    # systemd splits ExecStart like a shell does for quotes, but "%" and "$" are its own
    # specifiers and variable references: double them so paths reach the program as-is.
    return " ".join(shlex.quote(arg).replace("%", "%%").replace("$", "$$") for arg in argv)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Write a default config file or systemd units; make broker users."""


@main.command()
@click.option("-o", "--output", metavar="FILE", help="Write here instead of stdout.")
@click.option("-f", "--force", is_flag=True, help="Overwrite FILE if it exists.")
def config(output: str | None, force: bool) -> None:
    """Write the commented default config (every key, with its default)."""
    from hakuriver.config import default_config_text

    text = default_config_text()
    if output is None:
        click.echo(text, nl=False)
        return
    path = Path(output)
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; use --force to overwrite it")
    _write(path, text)
    click.echo(f"wrote {path}", err=True)


@main.command()
@click.option("--host", "roles", flag_value="host", multiple=True, help="Unit for the host service.")
@click.option("--runner", "roles", flag_value="runner", multiple=True, help="Unit for this machine's runner.")
@click.option("-o", "--output", "output_dir", metavar="DIR", default=DEFAULT_UNIT_DIR, show_default=True,
              help="Directory to write the unit files to.")
@click.option("--config", "config_file", metavar="FILE", default=DEFAULT_CONFIG_FILE, show_default=True,
              help="Config file the services read.")
@click.option("--node", metavar="NAME", help="Runner node name (default: the config's, else the hostname).")
@click.option("--bin-dir", metavar="DIR", help="Directory of the hakuriver.* commands "
              "(default: those of this install).")
def service(roles: tuple[str, ...], output_dir: str, config_file: str, node: str | None,
            bin_dir: str | None) -> None:
    """Write systemd unit files for the host and/or the runner."""
    if not roles:
        raise click.UsageError("say which unit: --host, --runner or both")
    if node and "runner" not in roles:
        raise click.UsageError("--node goes with --runner")
    config_path = str(Path(config_file).absolute())
    for role in dict.fromkeys(roles):
        path = Path(output_dir) / f"hakuriver-{role}.service"
        _write(path, render_unit(role, config_path, node if role == "runner" else None, bin_dir))
        click.echo(f"wrote {path}")
    units = " ".join(f"hakuriver-{role}" for role in dict.fromkeys(roles))
    if not Path(config_path).exists():
        click.echo(f"note: {config_path} does not exist yet; "
                   f"write it with: hakuriver.init config --output {config_path}", err=True)
    click.echo(f"then: systemctl daemon-reload && systemctl enable --now {units}", err=True)


@main.group()
def user() -> None:
    """Broker users: one per person (their identity) and per service, through rabbitmqctl."""


def _prefix_and_url(config_file: str | None) -> tuple[str, str]:
    from hakuriver.config import ConfigError, load_config

    try:
        config = load_config(config_file)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return config.broker.prefix, config.broker.url


@user.command("add")
@click.argument("name")
@click.option("--password", metavar="PW", help="Its password (default: a random one, printed).")
@click.option("--admin", is_flag=True, help="A person who may kill and read every task ([security] admins).")
@click.option("--runner", "service", flag_value="runner", help="A runner's service account.")
@click.option("--host", "service", flag_value="host", help="The host's service account.")
@click.option("--vhost", default="", help="Broker vhost (default: the config's broker URL's).")
@click.option("--config", "config_file", metavar="FILE", help="Config whose [broker] prefix to grant.")
def user_add(name: str, password: str | None, admin: bool, service: str | None, vhost: str,
             config_file: str | None) -> None:
    """Make broker user NAME with least-privilege permissions for the configured prefix."""
    from urllib.parse import unquote, urlsplit

    from hakuriver.admin import users

    if admin and service:
        raise click.UsageError("--admin is for people, not with --runner/--host")
    prefix, url = _prefix_and_url(config_file)
    parts = urlsplit(url)
    vhost = vhost or unquote(parts.path[1:]) or "/"
    try:
        password = users.add(name, password, prefix, vhost, service=service is not None)
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from None
    kind = f"{service} service account" if service else ("admin" if admin else "user")
    click.echo(f"made {kind} {name!r} for prefix {prefix!r} in vhost {vhost!r}", err=True)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    path = parts.path or "/"
    click.echo("put this in its config ([broker] url, or HAKURIVER_BROKER_URL), readable by it alone:", err=True)
    click.echo(f'[broker]\nurl = "{parts.scheme}://{name}:{password}@{host}{port}{path}"')
    if service:
        click.echo(f"and add {name!r} to [security] service_accounts of the host and every runner "
                   f"(unless they all share this one account)", err=True)
    if admin:
        click.echo(f"and add {name!r} to [security] admins of the host and every runner", err=True)


@user.command("list")
@click.option("--config", "config_file", metavar="FILE", help="Config whose [broker] prefix to list.")
def user_list(config_file: str | None) -> None:
    """The broker users made by `user add` for the configured prefix."""
    from hakuriver.admin import users

    prefix, _ = _prefix_and_url(config_file)
    try:
        found = users.accounts(prefix)
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from None
    for account in found:
        click.echo(f"{account.name}\t{'service' if account.service else 'user'}")


@user.command("remove")
@click.argument("name")
@click.option("--config", "config_file", metavar="FILE", help="Config whose [broker] prefix to look in.")
def user_remove(name: str, config_file: str | None) -> None:
    """Delete broker user NAME (only one made by `user add` for this prefix)."""
    from hakuriver.admin import users

    prefix, _ = _prefix_and_url(config_file)
    try:
        users.remove(name, prefix)
    except users.UserError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {name!r}", err=True)


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None


if __name__ == "__main__":
    main()
