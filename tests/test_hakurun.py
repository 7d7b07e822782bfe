"""The real `hakurun` console script, run as a process: targets, order, output, exit codes."""

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest


def _console_script() -> str:
    # Prefer the script installed beside this interpreter over a PATH shim.
    beside = Path(sys.executable).parent / "hakurun"
    found = str(beside) if beside.exists() else shutil.which("hakurun")
    assert found, "the hakurun console script is not installed (pip install -e .)"
    return found


HAKURUN = _console_script()


def hakurun(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HAKURUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def _write(path: Path, source: str, executable: bool = False) -> Path:
    path.write_text(textwrap.dedent(source))
    if executable:
        path.chmod(0o755)
    return path


def _unique_module_name() -> str:
    return f"hk_mod_{uuid.uuid4().hex[:8]}"


# --- the seed guide's commands ----------------------------------------------------------


def test_python_script_runs_six_combinations_in_order(workdir):
    _write(workdir / "script.py", "import sys\nprint(*sys.argv[1:])\n")
    result = hakurun("python", "script.py", "span:{1..3}", "span:[A,B]", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 A", "1 B", "2 A", "2 B", "3 A", "3 B"]
    assert "hakurun: 6 runs, 6 ok, 0 failed" in result.stderr


def test_parallel_python_script_runs_all_six(workdir):
    _write(workdir / "script.py", "import sys\nprint(*sys.argv[1:])\n")
    result = hakurun("--parallel", "python", "script.py", "span:{1..3}", "span:[A,B]", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["1 A", "1 B", "2 A", "2 B", "3 A", "3 B"]


def test_echo_passes_options_after_target_through_for_bash(workdir):
    result = hakurun(
        "echo", "hakuriver.client", "--target", "node1", "--", "python", "script.py",
        "span:{1..3}", "span:[A,B]", cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"hakuriver.client --target node1 -- python script.py {i} {p}"
        for i in (1, 2, 3)
        for p in ("A", "B")
    ]


def test_hakurun_options_after_target_are_not_read(workdir):
    result = hakurun("echo", "--parallel", "--max-workers", "3", "--help", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "--parallel --max-workers 3 --help\n"


# --- spans on the command line ----------------------------------------------------------


def test_countdown_and_trimming(workdir):
    result = hakurun("echo", "span:{1..-1}", "span:[ x , y ]", cwd=workdir)
    assert result.stdout.splitlines() == ["1 x", "1 y", "0 x", "0 y", "-1 x", "-1 y"]


def test_bad_span_is_named_and_nothing_runs(workdir):
    marker = workdir / "ran"
    result = hakurun("touch", str(marker), "span:[a,b]", "span:{1..x}", cwd=workdir)
    assert result.returncode == 2
    assert "span:{1..x}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_unquoted_brace_span_through_a_real_shell_shows_quoting(workdir):
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run(
        [bash, "-c", f"{HAKURUN} echo span:{{1..3}} 'span:[A,B]'"],
        cwd=workdir, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "the shell expanded span:{1..3}" in result.stderr
    assert "quote it, 'span:{1..3}'" in result.stderr


# --- targets ----------------------------------------------------------------------------


def test_module_target_runs_with_python_m(workdir):
    name = _unique_module_name()
    _write(workdir / f"{name}.py", """\
        import sys
        print(__spec__.name, *sys.argv[1:])
    """)
    result = hakurun(name, "span:[a,b]", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{name} a", f"{name} b"]


def test_function_target_gets_string_arguments(workdir):
    name = _unique_module_name()
    _write(workdir / f"{name}.py", """\
        def show(*args):
            print("called", *(f"{type(a).__name__}:{a}" for a in args))
            return "returned " + "-".join(args)
    """)
    result = hakurun(f"{name}:show", "span:{1..2}", "x", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "called str:1 str:x", "returned 1-x",
        "called str:2 str:x", "returned 2-x",
    ]


def test_function_target_exception_counts_as_failure(workdir):
    name = _unique_module_name()
    _write(workdir / f"{name}.py", """\
        def check(value):
            if value == "bad":
                raise ValueError("bad value")
    """)
    result = hakurun(f"{name}:check", "span:[ok,bad,ok]", cwd=workdir)
    assert result.returncode == 1
    assert "ValueError: bad value" in result.stderr
    assert "3 runs, 2 ok, 1 failed" in result.stderr


def test_executable_path_that_looks_like_a_module_runs_as_executable(workdir):
    # tool.py is importable as `tool`, but ./tool.py and `python tool.py` are executables.
    _write(workdir / "tool.py", """\
        #!/usr/bin/env python3
        import sys
        print("module" if __spec__ is not None else "script", *sys.argv[1:])
    """, executable=True)
    by_path = hakurun("./tool.py", "span:[p]", cwd=workdir)
    by_python = hakurun("python", "tool.py", "span:[q]", cwd=workdir)
    as_module = hakurun("tool", "span:[r]", cwd=workdir)
    assert by_path.stdout == "script p\n", by_path.stderr
    assert by_python.stdout == "script q\n", by_python.stderr
    assert as_module.stdout == "module r\n", as_module.stderr


def test_unknown_target_is_a_usage_error(workdir):
    result = hakurun(f"no_such_thing_{uuid.uuid4().hex[:8]}", cwd=workdir)
    assert result.returncode == 2
    assert "no_such_thing_" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- exit codes and summary -------------------------------------------------------------


def test_exit_code_is_the_number_of_failures(workdir):
    result = hakurun("sh", "-c", 'exit "$1"', "sh", "span:[0,3,0,1,3]", cwd=workdir)
    assert result.returncode == 3
    assert "hakurun: 5 runs, 2 ok, 3 failed (exit codes: 1, 3 x2)" in result.stderr
    assert "failed (exit 1): sh -c 'exit \"$1\"' sh 1" in result.stderr


def test_failure_count_is_capped_at_125(workdir):
    result = hakurun("false", "span:{1..130}", cwd=workdir)
    assert result.returncode == 125
    assert "130 runs, 0 ok, 130 failed" in result.stderr


def test_parallel_failures_are_counted(workdir):
    result = hakurun("--parallel", "--max-workers", "3", "sh", "-c", 'exit "$1"', "sh", "span:[0,2,0,2]", cwd=workdir)
    assert result.returncode == 2
    assert "4 runs, 2 ok, 2 failed (exit codes: 2 x2)" in result.stderr


def test_all_ok_exits_zero_with_summary(workdir):
    result = hakurun("true", "span:{1..4}", cwd=workdir)
    assert result.returncode == 0
    assert result.stderr.strip() == "hakurun: 4 runs, 4 ok, 0 failed"


# --- command line -----------------------------------------------------------------------


def test_help(workdir):
    result = hakurun("--help", cwd=workdir)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: hakurun [--parallel] [--max-workers N] TARGET ARGS...")
    assert "span:{a..b}" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--parallel"],
        ["--bogus", "echo"],
        ["--parallel", "--max-workers", "0", "echo"],
        ["--parallel", "--max-workers", "many", "echo"],
        ["--max-workers", "2", "echo"],
        ["span:[echo,printf]", "x"],
    ],
)
def test_bad_usage_is_one_line_and_exit_2(workdir, args):
    result = hakurun(*args, cwd=workdir)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hakurun: ")


# --- parallel output --------------------------------------------------------------------


def test_parallel_output_lines_are_never_mixed(workdir):
    # Each run writes long lines in several flushed pieces to both streams, ending with
    # a partial line; any interleaving inside a line would break the pattern below.
    _write(workdir / "noisy.py", """\
        import sys
        run = sys.argv[1]
        for i in range(150):
            for stream in (sys.stdout, sys.stderr):
                for piece in range(4):
                    stream.write(run * 700)
                    stream.flush()
                stream.write(f":{run}:{i}\\n")
                stream.flush()
        sys.stdout.write("tail-" + run)
    """)
    runs = "abcdefgh"
    result = hakurun(
        "--parallel", "--max-workers", "4", "python", "noisy.py", f"span:[{','.join(runs)}]",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    whole_line = re.compile(r"([a-h])\1{2799}:\1:(\d+)")
    for stream_text in (result.stdout, result.stderr.replace("hakurun: 8 runs, 8 ok, 0 failed\n", "")):
        seen = {run: [] for run in runs}
        for line in stream_text.splitlines():
            if line.startswith("tail-"):
                continue
            match = whole_line.fullmatch(line)
            assert match, f"mixed or broken line: {line[:80]}...{line[-40:]}"
            seen[match.group(1)].append(int(match.group(2)))
        assert all(numbers == list(range(150)) for numbers in seen.values())
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("tail-")) == [
        f"tail-{run}" for run in runs
    ]


# --- stopping ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--parallel"]])
def test_sigint_stops_running_children(workdir, mode):
    process = subprocess.Popen(
        [HAKURUN, *mode, "sh", "-c", 'echo "$$"; exec sleep 60', "sh", "span:{1..2}"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=30), "the child never started"
        child_pid = int(process.stdout.readline())
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 128 + signal.SIGINT
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
        assert "stopped by SIGINT" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
