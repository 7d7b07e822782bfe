"""The span library on its own: the syntax, the order of combinations, the errors."""

from itertools import islice

import pytest

from hakurun.span import SpanError, count, expand, has_spans, validate


def test_no_spans_yields_the_arguments_once():
    assert list(expand(["python", "s.py", "--lr", "0.1"])) == [["python", "s.py", "--lr", "0.1"]]
    assert count(["echo"]) == 1
    assert not has_spans(["echo", "spanner", "x:span:1"])


def test_integer_range_is_inclusive():
    assert list(expand(["span:{1..3}"])) == [["1"], ["2"], ["3"]]


def test_range_counts_down_and_allows_negatives():
    assert [c[0] for c in expand(["span:{2..-2}"])] == ["2", "1", "0", "-1", "-2"]
    assert [c[0] for c in expand(["span:{-1..1}"])] == ["-1", "0", "1"]
    assert list(expand(["span:{5..5}"])) == [["5"]]


def test_list_items_are_trimmed():
    assert list(expand(["span:[ small, medium ,large ]"])) == [["small"], ["medium"], ["large"]]


def test_product_in_argument_order_last_varies_fastest():
    combos = list(expand(["python", "s.py", "span:{1..3}", "--tag", "span:[A,B]"]))
    assert combos == [
        ["python", "s.py", "1", "--tag", "A"],
        ["python", "s.py", "1", "--tag", "B"],
        ["python", "s.py", "2", "--tag", "A"],
        ["python", "s.py", "2", "--tag", "B"],
        ["python", "s.py", "3", "--tag", "A"],
        ["python", "s.py", "3", "--tag", "B"],
    ]


def test_count_matches_expansion_without_expanding():
    args = ["x", "span:{1..4}", "span:[a,b,c]", "span:{10..8}"]
    assert count(args) == len(list(expand(args))) == 36
    # Far too many to build; count must be arithmetic.
    assert count(["span:{1..1000000}", "span:{1..1000000}"]) == 10**12


def test_expansion_is_lazy():
    combos = expand(["span:{1..1000000000}", "span:{1..1000}"])
    assert list(islice(combos, 3)) == [["1", "1"], ["1", "2"], ["1", "3"]]


def test_each_combination_is_a_fresh_list():
    combos = expand(["a", "span:[x,y]"])
    first = next(combos)
    first.append("mutated")
    assert next(combos) == ["a", "y"]


@pytest.mark.parametrize(
    "bad",
    ["span:", "span:{1..}", "span:{a..b}", "span:{1..3", "span:[a,b", "span:1..3", "span:{1..3..2}"],
)
def test_malformed_span_is_an_error_naming_it(bad):
    with pytest.raises(SpanError) as caught:
        validate(["echo", bad])
    message = str(caught.value)
    assert repr(bad) in message
    assert "\n" not in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("bad", ["span:[]", "span:[a,,b]", "span:[a,b,]", "span:[ ]"])
def test_empty_list_or_item_is_an_error(bad):
    with pytest.raises(SpanError, match="span"):
        validate([bad])


def test_expand_and_count_validate_before_returning():
    with pytest.raises(SpanError):
        expand(["span:{1..2}", "span:oops"])
    with pytest.raises(SpanError):
        count(["span:oops"])


def test_has_spans_includes_invalid_ones():
    assert has_spans(["echo", "span:oops"])
    assert has_spans(["echo", "span:{1..2}"])


def test_shell_brace_expansion_gets_the_quoting_hint():
    with pytest.raises(SpanError) as caught:
        validate(["python", "s.py", "span:1", "span:2", "span:3", "span:[A,B]"])
    message = str(caught.value)
    assert "shell expanded span:{1..3}" in message
    assert "quote it, 'span:{1..3}'" in message
    assert "\n" not in message


def test_shell_expanded_countdown_hint():
    with pytest.raises(SpanError, match=r"'span:\{3\.\.1\}'"):
        validate(["span:3", "span:2", "span:1"])


def test_shell_expanded_word_list_suggests_a_list():
    with pytest.raises(SpanError, match=r"'span:\[a,b\]'"):
        validate(["echo", "span:a", "span:b"])
