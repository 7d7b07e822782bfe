"""The options of ``hakuriver.client``: one table, and the parser and ``--help`` made from it.

Why it exists: the client's command line used to be declared with click, and importing click
was ~30 ms of every command (a submit's whole start-up is ~150 ms, the goal 120 ms; issue
18). The client's grammar is small and fixed, so it is written out here once: :data:`OPTIONS`
says each option's name, where its value goes (``dest``, the names :mod:`client.cli` reads),
its kind and its help; :func:`parse` and :func:`help_text` both read that table, so an option
cannot be parsed one way and documented another. The other commands (hakuriver.host, runner,
init, docker) keep click: their start-up is not on anyone's hot path.

The grammar is click's, as the client had it: options come first; ``--`` ends them, and so
does the first word that is not an option (it starts the COMMAND, and everything after it
belongs to the command, ``--flags`` included); ``--opt value`` and ``--opt=value``; a value
option takes the next word whatever it looks like; the last of a repeated single-value option
wins; ``--health`` takes a NODE only if the next word does not look like an option. What
differs is the error: one line naming the bad word, instead of click's Usage/Error block.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from hakuriver import bounds
from hakuriver.cli_options import CONFIG_HELP

FLAG = "flag"              # --wait: True when given
VALUE = "value"            # --cores N: the text (the last one if given twice)
NUMBER = "number"          # --timeout SECONDS: a float
REPEATED = "repeated"      # --target NODE (repeatable): a tuple of texts, in order
OPTIONAL = "optional"      # --health [NODE]: the text, or BARE when given without one

BARE = "*"                 # what an OPTIONAL option holds when given without a value
PROG = "hakuriver.client"


class UsageError(Exception):
    """Bad input found before anything is sent; exit code 2."""


class Option(NamedTuple):
    name: str
    dest: str
    kind: str
    metavar: str
    help: str


# (heading, options) in the order --help shows them
GROUPS: list[tuple[str, list[Option]]] = [
    ("Submitting (the options before -- COMMAND)", [
        Option("--target", "targets", REPEATED, "NODE[:NUMA][::GPUS]",
               "Node to run on (repeatable: one task per target); 'any' or none: the shared pool. "
               "NODE::0,1 takes exactly those GPUs."),
        Option("--gpus", "gpus", VALUE, "N", "Any N free GPUs (on the target node, or on a pool node that has them)."),
        Option("--container", "container", VALUE, "NAME",
               "Container environment; NULL runs on the host. Default from config."),
        Option("--cores", "cores", VALUE, "N", "Cores for the task (0 = no CPU limit)."),
        Option("--memory", "memory", VALUE, "SIZE", "Memory limit: 512M, 8G, 1.5G, 8GiB, 2T (binary units)."),
        Option("--env", "envs", REPEATED, "KEY=VALUE", "Environment variable (repeatable)."),
        Option("--mount", "mounts", REPEATED, "HOST:CONTAINER[:ro]", "Extra mount (repeatable)."),
        Option("--privileged", "privileged", FLAG, "", "Ask for a privileged container."),
        Option("--retries", "retries", VALUE, "N", f"Run a task that ends failed or lost again, up to N more times "
                                                   f"(0 to {bounds.MAX_RETRIES}; default 0)."),
        Option("--retry-delay", "retry_delay", VALUE, "SECONDS",
               f"With --retries: wait this long before each new attempt (default {bounds.DEFAULT_RETRY_DELAY_S:g})."),
        Option("--after", "afters", REPEATED, "ID[,ID...]",
               "Hold the task until every listed task completed (repeatable); if one ends otherwise, it never runs."),
        Option("--sweep", "sweep", FLAG, "",
               "Expand span:{a..b} / span:[x,y] in the command: one task per combination."),
    ]),
    ("Waiting", [
        Option("--wait", "wait", FLAG, "", "Wait for every task; exit with the outcome."),
        Option("--follow", "follow", FLAG, "", "With --wait or --stdout/--stderr: stream output live."),
        Option("--timeout", "timeout", NUMBER, "SECONDS", "With --wait: give up after this long (exit 3)."),
    ]),
    ("Queries and control (one at a time)", [
        Option("--status", "status_ids", REPEATED, "ID", "Show a task's status (repeatable)."),
        Option("--stdout", "stdout_id", VALUE, "ID", "Print a task's stdout (on our stdout)."),
        Option("--stderr", "stderr_id", VALUE, "ID", "Print a task's stderr (on our stdout too)."),
        Option("--attempt", "attempt", VALUE, "K",
               "With --stdout/--stderr: the output of attempt K of a retried task (default: the last)."),
        Option("--kill", "kill_id", VALUE, "ID", "Kill a task (running, waiting, or not recorded yet)."),
        Option("--pause", "pause_id", VALUE, "ID", "Pause a running task's whole process tree (keeps its resources)."),
        Option("--resume", "resume_id", VALUE, "ID", "Resume a paused task."),
        Option("--list-tasks", "list_tasks", FLAG, "", "List tasks, newest first."),
        Option("--list-nodes", "list_nodes", FLAG, "", "List nodes with resources and health."),
        Option("--health", "health", OPTIONAL, "[NODE]", "Health of all nodes (or one) and of the host."),
    ]),
    ("Filters of --list-tasks", [
        Option("--state", "state", VALUE, "STATE", "Only this state."),
        Option("--node", "node", VALUE, "NODE", "Only this node."),
        Option("--batch", "batch", VALUE, "BATCH", "Only this batch."),
        Option("--user", "user", VALUE, "NAME", "Only tasks of this user (its broker user name)."),
        Option("--mine", "mine", FLAG, "", "Only my tasks (those of my broker user)."),
        Option("--limit", "limit", VALUE, "N", f"At most N (default 50, at most {bounds.MAX_LIST_LIMIT})."),
        Option("--before", "before", VALUE, "ID", "Only tasks older than ID (the next page)."),
    ]),
    ("Other", [
        Option("--json", "as_json", FLAG, "", "Machine-readable output."),
        Option("--config", "config_file", VALUE, "FILE", CONFIG_HELP),
        Option("-h", "help", FLAG, "", "Show this message and exit."),
        Option("--help", "help", FLAG, "", "Show this message and exit."),
    ]),
]
OPTIONS: dict[str, Option] = {option.name: option for _, group in GROUPS for option in group}
EMPTY = {FLAG: False, VALUE: None, NUMBER: None, REPEATED: (), OPTIONAL: None}

USAGE = f"Usage: {PROG} [OPTIONS] [--] [COMMAND [ARGS]...]"
DESCRIPTION = f"""Run COMMAND on a HakuRiver node, or query and control tasks.

  {PROG} --target node1 --cores 4 --memory 8G -- python train.py
  TASK=$({PROG} --wait --target node1 -- make test)
  {PROG} --stdout $TASK"""


def parse(argv: list[str]) -> dict[str, Any]:
    """The options in ``argv`` (the words after the program's name), by ``dest``, with every option
    not given at its empty value, and ``command``: the words of the COMMAND (a list, maybe empty).

    Raises :class:`UsageError` naming the bad word. When ``help`` is set, values are not converted
    (``--timeout x --help`` shows the help, as it did under click)."""
    values: dict[str, Any] = {option.dest: EMPTY[option.kind] for option in OPTIONS.values()}
    values["command"] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            values["command"] = argv[i:]
            break
        if word[:1] != "-" or word == "-":
            values["command"] = argv[i - 1:]
            break
        name, equals, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        option = OPTIONS.get(name)
        if option is None:
            raise UsageError(f"no such option {name!r}{_did_you_mean(name)}")
        if option.kind == FLAG:
            if equals:
                raise UsageError(f"{name} takes no value (got {word!r})")
            values[option.dest] = True
            continue
        if equals:
            value = inline
        elif option.kind == OPTIONAL:
            # click's rule: a next word that looks like an option is not the value
            if i < len(argv) and not (argv[i][:1] == "-" and len(argv[i]) > 1):
                value = argv[i]
                i += 1
            else:
                value = BARE
        elif i < len(argv):
            value = argv[i]
            i += 1
        else:
            raise UsageError(f"{name} needs a value ({option.metavar})")
        if option.kind == REPEATED:
            values[option.dest] += (value,)
        else:
            values[option.dest] = value
    if not values["help"]:
        for option in OPTIONS.values():
            if option.kind == NUMBER and values[option.dest] is not None:
                values[option.dest] = _number(option, values[option.dest])
    return values


def _number(option: Option, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"invalid {option.name} {text!r} (a number of {option.metavar.lower()})") from None


def _did_you_mean(name: str) -> str:
    import difflib  # only on this error path: a few milliseconds nobody else should pay

    close = difflib.get_close_matches(name, list(OPTIONS), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else f"; see {PROG} --help"


def help_text(width: int = 80) -> str:
    """``--help``: usage, description, then the options group by group, made from :data:`GROUPS`."""
    import textwrap

    column = 32  # option and metavar (as click laid them out); longer ones put their help on the next line
    lines = [USAGE, "", textwrap.indent(DESCRIPTION, "  ")]
    for heading, group in GROUPS:
        lines += ["", f"{heading}:"]
        for option in group:
            if option.name == "-h":
                continue
            left = "  -h, --help" if option.name == "--help" else f"  {option.name} {option.metavar}".rstrip()
            wrapped = textwrap.wrap(option.help, max(width - column, 30))
            if len(left) + 2 <= column:
                lines.append(left.ljust(column) + wrapped[0])
                wrapped = wrapped[1:]
            else:
                lines.append(left)
            lines += [" " * column + line for line in wrapped]
    return "\n".join(lines) + "\n"
