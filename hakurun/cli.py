"""The `hakurun` command: run TARGET once per combination of its `span:` arguments.

    hakurun [--parallel] [--max-workers N] TARGET ARGS...

Design choices that a user can observe (also printed by `hakurun --help`):

- Options are read only before TARGET; everything from TARGET on is passed through
  untouched except that `span:` arguments expand (see hakurun.span).
- TARGET is resolved once, before anything runs, in this order:
    1. contains "/"                  -> an executable path (./script.py, /usr/bin/env)
    2. MODULE:FUNC (dotted names)    -> a function, called in a fresh `python -c` worker
    3. a name found on PATH          -> that executable (echo, python, hakuriver.client)
    4. a file of that name in cwd    -> that file as an executable
    5. an importable dotted name     -> a module, run as `sys.executable -m MODULE`
                                        (cwd is on the search path, as for `python -m`)
  Anything else is a usage error.  TARGET itself may not be a span.
- A function target runs in its own Python process per combination (not in-process) so
  that a crash, `sys.exit` or stray output from one call cannot take down or garble the
  others, and so `--parallel` treats it like any command.  It gets the expanded arguments
  as strings; a return value other than None is printed; an exception exits 1.
- Sequential runs inherit stdin/stdout/stderr and are started with os.posix_spawn (no
  shell, no subprocess machinery) to keep per-run overhead near a bare spawn.
- Parallel runs get stdin from /dev/null and their stdout/stderr through pipes; one
  loop forwards only complete lines (a run's trailing partial line is ended with a
  newline when it exits), so two runs never share a line.  Each run gets its own process
  group so one Ctrl-C reaches every run exactly once, through hakurun.  Sequential runs
  share hakurun's process group (they may need the terminal), and hakurun also passes
  the signal on, which covers a SIGINT/SIGTERM sent to hakurun alone.  Runs still alive
  5 s later are killed.
- Exit status: 0 if every run exited 0, else the number of failed runs capped at 125
  (126 and up mean "cannot execute", "not found" and signals to shells).  2 is also a
  usage error.  Interrupted by a signal: 128 + the signal number.  A one-line summary
  always goes to stderr, with one line per failed run as it finishes.

Imports stay to the standard library's light modules; subprocess and selectors load only
for --parallel.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence

from hakurun import span

HELP = """\
usage: hakurun [--parallel] [--max-workers N] TARGET ARGS...

Run TARGET once for every combination of its span: arguments, the last varying fastest.

spans:
  span:{a..b}        integers a to b inclusive (a > b counts down; negatives allowed)
  span:[x,y,z]       the listed strings, each trimmed of whitespace
  Quote spans in the shell ('span:{1..3}'): bash and zsh expand an unquoted {1..3}.

TARGET, resolved in this order:
  path/with/slash    an executable path (./script.py)
  module:func        a Python function, called with the expanded arguments as strings
                     in a fresh Python process per run; a non-None result is printed
  NAME on PATH       an executable (echo, python, hakuriver.client)
  FILE in cwd        that file as an executable
  module             an importable Python module, run as `python -m module`

options (read only before TARGET; everything after it is passed through):
  --parallel         run combinations concurrently, keeping output lines whole
  --max-workers N    at most N concurrent runs with --parallel (default: CPU count)
  -h, --help         show this help and exit

exit status: 0 if all runs succeeded, else the number of failed runs capped at 125;
2 for a usage error; 128+N when stopped by signal N.  A summary goes to stderr.

example:
  hakurun echo hakuriver.client --target node1 -- python s.py 'span:{1..3}' 'span:[A,B]' | bash
"""

# Beyond this many bytes without a newline a parallel run's output is forwarded anyway
# (ended with a newline) rather than buffered without bound.
_MAX_PARTIAL_LINE = 1 << 20

_FAILED_RUNS_EXIT_CAP = 125

# Runs the function target inside a worker Python: argv is MODULE FUNC ARGS...
_CALL_FUNCTION = """\
import importlib, sys
_module, _name, *_args = sys.argv[1:]
sys.argv = [_module + ":" + _name, *_args]
_target = importlib.import_module(_module)
for _part in _name.split("."):
    _target = getattr(_target, _part)
_result = _target(*_args)
if _result is not None:
    print(_result)
"""


class UsageError(Exception):
    """Bad command line; reported as one line on stderr with exit status 2."""


class Stopped(Exception):
    """hakurun received SIGINT/SIGTERM/SIGHUP; carries the signal to pass on."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_command_line(arguments)
        if options is None:
            sys.stdout.write(HELP)
            return 0
        launcher = resolve_target(options.command[0])
        # Validates every span before anything runs.
        combinations = span.expand(options.command)
        total = span.count(options.command)
    except (UsageError, span.SpanError) as error:
        _say(f"hakurun: {error}")
        return 2

    tally = Tally(total)
    running: dict[int, Sequence[str]] = {}
    previous_handlers = _raise_on_stop_signals()
    try:
        if options.parallel:
            _run_parallel(launcher, combinations, options.max_workers, tally, running)
        else:
            _run_sequential(launcher, combinations, tally, running)
    except Stopped as stop:
        _restore_handlers(previous_handlers)
        _stop_children(running, stop.signum, own_groups=options.parallel)
        tally.report(interrupted_by=stop.signum)
        return 128 + stop.signum
    _restore_handlers(previous_handlers)
    tally.report()
    return tally.exit_code()


# --- command line ---------------------------------------------------------------------


class Options:
    def __init__(self, parallel: bool, max_workers: int, command: list[str]) -> None:
        self.parallel = parallel
        self.max_workers = max_workers
        self.command = command


def parse_command_line(arguments: list[str]) -> Options | None:
    """Options up to the first non-option (TARGET); None means --help was asked for."""
    parallel = False
    max_workers: int | None = None
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument in ("-h", "--help"):
            return None
        if argument == "--parallel":
            parallel = True
        elif argument == "--max-workers" or argument.startswith("--max-workers="):
            if argument == "--max-workers":
                index += 1
                if index == len(arguments):
                    raise UsageError("--max-workers needs a number")
                value = arguments[index]
            else:
                value = argument.partition("=")[2]
            max_workers = _positive_int(value)
        elif argument == "--":
            index += 1
            break
        elif argument.startswith("-"):
            raise UsageError(f"unknown option {argument!r} (options go before TARGET; see --help)")
        else:
            break
        index += 1
    command = arguments[index:]
    if not command:
        raise UsageError("no TARGET given (usage: hakurun [--parallel] [--max-workers N] TARGET ARGS...)")
    if max_workers is not None and not parallel:
        raise UsageError("--max-workers only applies with --parallel")
    if command[0].startswith(span.PREFIX):
        raise UsageError(f"TARGET {command[0]!r} cannot be a span; put spans in ARGS")
    return Options(parallel, max_workers or os.cpu_count() or 1, command)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"--max-workers must be a positive integer, not {value!r}")
    return number


# --- targets ----------------------------------------------------------------------------


class Launcher:
    """How to start one run: the file to execute and the argv before the swept args."""

    def __init__(self, path: str, argv_prefix: list[str]) -> None:
        self.path = path
        self.argv_prefix = argv_prefix

    def argv(self, combination: list[str]) -> list[str]:
        # combination[0] is TARGET itself, already folded into argv_prefix.
        return self.argv_prefix + combination[1:]


def resolve_target(target: str) -> Launcher:
    """Decide what TARGET is, in the documented order; UsageError if it is nothing."""
    if "/" in target:
        return Launcher(target, [target])
    module, colon, function = target.partition(":")
    if colon:
        if _is_dotted_name(module) and _is_dotted_name(function):
            if not _module_exists(module):
                raise UsageError(f"TARGET {target!r}: no importable module {module!r}")
            return Launcher(sys.executable, [sys.executable, "-c", _CALL_FUNCTION, module, function])
    from shutil import which

    executable = which(target)
    if executable:
        return Launcher(executable, [target])
    if os.path.isfile(target):
        # Checked before the module lookup so `script.py` is never imported as `script`.
        return Launcher(os.path.join(".", target), [target])
    if _is_dotted_name(target) and _module_exists(target):
        return Launcher(sys.executable, [sys.executable, "-m", target])
    raise UsageError(
        f"TARGET {target!r} is not an executable on PATH, a file, an importable module or module:function"
    )


def _is_dotted_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _module_exists(name: str) -> bool:
    """Whether `python -m name` (run from cwd) could import it.

    find_spec imports parent packages of a dotted name, which is what `python -m` would
    do anyway; a failure there means the module cannot be run either.
    """
    from importlib.util import find_spec

    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return find_spec(name) is not None
    except Exception:
        return False
    finally:
        sys.path.remove(cwd)


# --- outcomes ---------------------------------------------------------------------------


class Tally:
    """Counts runs and failures, reports each failure and the final summary on stderr."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.finished = 0
        self.failure_codes: list[int] = []

    def record(self, combination: Sequence[str], exit_code: int) -> None:
        self.finished += 1
        if exit_code != 0:
            self.failure_codes.append(exit_code)
            _say(f"hakurun: failed ({_describe(exit_code)}): {_shell_words(combination)}")

    def could_not_start(self, combination: Sequence[str], error: OSError) -> None:
        # 127/126 follow the shell: "not found" and "found but cannot execute".
        self.finished += 1
        self.failure_codes.append(127 if isinstance(error, FileNotFoundError) else 126)
        _say(f"hakurun: could not start ({error.strerror}): {_shell_words(combination)}")

    def exit_code(self) -> int:
        return min(len(self.failure_codes), _FAILED_RUNS_EXIT_CAP)

    def report(self, interrupted_by: int | None = None) -> None:
        failed = len(self.failure_codes)
        runs = "run" if self.finished == 1 else "runs"
        line = f"hakurun: {self.finished} {runs}, {self.finished - failed} ok, {failed} failed"
        if failed:
            line += f" (exit codes: {_summarise_codes(self.failure_codes)})"
        if interrupted_by is not None:
            line += (
                f"; stopped by {signal.Signals(interrupted_by).name} "
                f"after {self.finished} of {self.total}"
            )
        _say(line)


def _describe(exit_code: int) -> str:
    if exit_code < 0:
        return f"killed by {_signal_name(-exit_code)}"
    return f"exit {exit_code}"


def _summarise_codes(codes: list[int]) -> str:
    counts: dict[int, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    parts = []
    for code in sorted(counts, key=lambda c: (c < 0, abs(c))):
        name = _signal_name(-code) if code < 0 else str(code)
        parts.append(name if counts[code] == 1 else f"{name} x{counts[code]}")
    return ", ".join(parts)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _shell_words(words: Sequence[str]) -> str:
    from shlex import join

    return join(words)


def _say(line: str) -> None:
    """One whole line to stderr in a single write, so it never splits a run's line."""
    _write_all(2, (line + "\n").encode(errors="replace"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- signals ----------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_on_stop_signals() -> dict[int, object]:
    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    previous = {}
    for signum in _STOP_SIGNALS:
        previous[signum] = signal.signal(signum, stop)
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _stop_children(running: dict[int, Sequence[str]], signum: int, own_groups: bool) -> None:
    """Pass the signal on, give runs a moment to exit, then kill what remains."""
    import time

    def send(pid: int, which: int) -> None:
        try:
            if own_groups:
                os.killpg(pid, which)
            else:
                os.kill(pid, which)
        except ProcessLookupError:
            pass

    for pid in running:
        send(pid, signum)
    deadline = time.monotonic() + 5.0
    remaining = set(running)
    while remaining and time.monotonic() < deadline:
        for pid in list(remaining):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                remaining.discard(pid)
        if remaining:
            time.sleep(0.02)  # polling a handful of pids while shutting down
    for pid in remaining:
        send(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


# --- sequential -------------------------------------------------------------------------


def _run_sequential(
    launcher: Launcher,
    combinations: Iterator[list[str]],
    tally: Tally,
    running: dict[int, Sequence[str]],
) -> None:
    # Python ignores SIGPIPE; posix_spawn keeps ignored signals ignored across exec, so
    # reset it (and SIGXFSZ) or `hakurun yes | head` would never end.
    defaults = (signal.SIGPIPE, signal.SIGXFSZ)
    environment = os.environ
    for combination in combinations:
        try:
            pid = os.posix_spawn(
                launcher.path, launcher.argv(combination), environment, setsigdef=defaults
            )
        except OSError as error:
            tally.could_not_start(combination, error)
            continue
        running[pid] = combination
        _, status = os.waitpid(pid, 0)
        del running[pid]
        tally.record(combination, os.waitstatus_to_exitcode(status))


# --- parallel ---------------------------------------------------------------------------


def _run_parallel(
    launcher: Launcher,
    combinations: Iterator[list[str]],
    max_workers: int,
    tally: Tally,
    running: dict[int, Sequence[str]],
) -> None:
    """One select loop owns every child's pipes and is the only writer to stdout/stderr,
    so forwarding whole lines needs no lock and one write per batch of lines."""
    import selectors
    import subprocess

    selector = selectors.DefaultSelector()
    streams_open: dict[int, int] = {}  # pid -> pipes not yet at EOF
    children: dict[int, subprocess.Popen] = {}
    sink = _LineSink()

    def start(combination: list[str]) -> None:
        try:
            child = subprocess.Popen(
                launcher.argv(combination),
                executable=launcher.path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
            )
        except OSError as error:
            tally.could_not_start(combination, error)
            return
        running[child.pid] = combination
        children[child.pid] = child
        streams_open[child.pid] = 2
        for pipe, destination in ((child.stdout, 1), (child.stderr, 2)):
            selector.register(pipe, selectors.EVENT_READ, (child.pid, destination, bytearray()))

    pending = iter(combinations)
    exhausted = False
    while True:
        while not exhausted and len(children) < max_workers:
            combination = next(pending, None)
            if combination is None:
                exhausted = True
            else:
                start(combination)
        if not children:
            return
        for key, _ in selector.select():
            pid, destination, partial = key.data
            # Once our reader is gone, closing the child's pipe too lets it see SIGPIPE
            # as it would have writing there directly, instead of running on unheard.
            chunk = b"" if destination in sink.closed else os.read(key.fd, 65536)
            if chunk:
                partial += chunk
                cut = partial.rfind(b"\n") + 1
                if cut:
                    sink.write(destination, partial[:cut])
                    del partial[:cut]
                elif len(partial) > _MAX_PARTIAL_LINE:
                    sink.write(destination, bytes(partial) + b"\n")
                    partial.clear()
                continue
            if partial:
                sink.write(destination, bytes(partial) + b"\n")
            selector.unregister(key.fileobj)
            key.fileobj.close()
            streams_open[pid] -= 1
            if streams_open[pid] == 0:
                exit_code = children.pop(pid).wait()
                del streams_open[pid]
                tally.record(running.pop(pid), exit_code)


class _LineSink:
    """Writes whole-line batches; after stdout's reader goes away, drops stdout quietly."""

    def __init__(self) -> None:
        self.closed: set[int] = set()

    def write(self, fd: int, data: bytes) -> None:
        if fd in self.closed:
            return
        try:
            _write_all(fd, data)
        except BrokenPipeError:
            self.closed.add(fd)
