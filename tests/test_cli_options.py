"""The client's option parser (client/options.py): argv in, options or one UsageError out.

Why it exists: the parser replaced click for ``hakuriver.client`` and must keep its grammar
(options first, ``--`` and the first plain word end them, the command keeps its own ``--flags``,
``--opt=value``, ``--health [NODE]``), while a bad word becomes one line naming it. It is a pure
function, so these cases call it directly; tests/test_cli.py runs the real command.
"""

from __future__ import annotations

import pytest

from client.options import BARE, GROUPS, OPTIONS, UsageError, help_text, parse


def test_nothing_given_is_every_option_empty():
    options = parse([])
    assert options["command"] == [] and options["help"] is False
    assert options["targets"] == () and options["wait"] is False and options["cores"] is None
    assert options["health"] is None and options["timeout"] is None


def test_double_dash_ends_the_options_and_the_command_keeps_its_own_flags():
    options = parse(["--target", "node1", "--wait", "--", "python", "train.py", "--wait", "--", "-h"])
    assert options["targets"] == ("node1",) and options["wait"] is True
    assert options["command"] == ["python", "train.py", "--wait", "--", "-h"]
    assert options["help"] is False


def test_the_first_plain_word_starts_the_command_and_everything_after_is_its():
    options = parse(["--cores", "2", "ls", "-la", "--json", "--target", "x"])
    assert options["cores"] == "2"
    assert options["command"] == ["ls", "-la", "--json", "--target", "x"]
    assert options["as_json"] is False and options["targets"] == ()


def test_a_lone_dash_is_a_word_not_an_option():
    assert parse(["-", "x"])["command"] == ["-", "x"]


def test_equals_and_space_forms_give_the_same_value():
    assert parse(["--memory=8G", "--", "true"])["memory"] == parse(["--memory", "8G", "--", "true"])["memory"] == "8G"
    assert parse(["--env=A=b=c", "--", "true"])["envs"] == ("A=b=c",)  # only the first '=' splits


def test_a_value_option_takes_the_next_word_whatever_it_looks_like():
    assert parse(["--retries", "-1", "--", "true"])["retries"] == "-1"
    options = parse(["--target", "--", "true"])  # '--' is the value here, as click had it
    assert options["targets"] == ("--",) and options["command"] == ["true"]


def test_repeatable_options_keep_every_value_in_order_and_single_ones_the_last():
    options = parse(["--target", "b", "--target", "a", "--cores", "1", "--cores", "3", "--", "true"])
    assert options["targets"] == ("b", "a") and options["cores"] == "3"


@pytest.mark.parametrize("argv, node, command", [
    (["--health"], BARE, []),
    (["--health", "node1"], "node1", []),
    (["--health=node2"], "node2", []),
    (["--health", "--json"], BARE, []),
    (["--health", "--"], BARE, []),
    (["--health", "node1", "extra"], "node1", ["extra"]),
])
def test_health_takes_a_node_only_when_the_next_word_is_not_an_option(argv, node, command):
    options = parse(argv)
    assert options["health"] == node and options["command"] == command


def test_timeout_is_a_number():
    assert parse(["--wait", "--timeout", "2.5", "--", "true"])["timeout"] == 2.5
    assert parse(["--wait", "--timeout=1e1", "--", "true"])["timeout"] == 10.0


@pytest.mark.parametrize("argv, says", [
    (["--bogus", "--", "true"], "no such option '--bogus'"),
    (["--targ", "node1"], "(did you mean --target"),
    (["-x"], "no such option '-x'"),
    (["--bogus=1"], "no such option '--bogus'"),
    (["--target"], "--target needs a value (NODE[:NUMA][::GPUS])"),
    (["--wait", "--cores"], "--cores needs a value"),
    (["--wait=yes", "--", "true"], "--wait takes no value (got '--wait=yes')"),
    (["--wait", "--timeout", "soon", "--", "true"], "invalid --timeout 'soon'"),
    (["--help", "--bogus"], "no such option '--bogus'"),  # a word nobody knows is an error even with --help
])
def test_bad_usage_is_one_usage_error_naming_the_word(argv, says):
    with pytest.raises(UsageError) as caught:
        parse(argv)
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["--timeout", "x", "--help"], ["--cores", "2", "-h"]])
def test_help_wins_over_values_it_does_not_convert(argv):
    assert parse(argv)["help"] is True


def test_help_after_the_command_belongs_to_the_command():
    options = parse(["--", "grep", "--help"])
    assert options["help"] is False and options["command"] == ["grep", "--help"]


def test_help_text_lists_every_option_once_with_its_help():
    text = help_text()
    flat = " ".join(text.split())  # the help of each option, whatever the wrapping
    for name, option in OPTIONS.items():
        if name not in ("-h", "--help"):
            assert text.count(f"\n  {name} {option.metavar}".rstrip()) == 1, name
        assert option.help in flat, name
    assert text.count("\n  -h, --help ") == 1
    assert [heading for heading, _ in GROUPS] == [line[:-1] for line in text.splitlines()
                                                  if line.endswith(":") and not line.startswith(" ")]
    assert max(len(line) for line in text.splitlines()) <= 80
