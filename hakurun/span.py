"""The `span:` argument syntax: parsing, validation and lazy Cartesian expansion.

hakurun and the client's `--sweep` must agree exactly on what a sweep means, so the
syntax lives here once and both call it:

- ``span:{a..b}``   the integers a to b inclusive; a > b counts down; negatives allowed.
- ``span:[x,y,z]``  the listed strings, each item trimmed of surrounding whitespace.
- Any other argument is a literal.  The combinations are the Cartesian product of the
  arguments in order, the last argument varying fastest.

``span:`` is a reserved prefix: an argument that starts with it but is neither form is an
error naming it.  A run of ``span:1 span:2 span:3`` is what an unquoted ``span:{1..3}``
becomes after the shell's brace expansion, so that case gets its own message showing the
quoting.  Every check happens in `validate` (also run by `expand` and `count` before they
return), so a bad sweep fails before anything runs.

Expansion is lazy: memory is proportional to the number of arguments and the size of the
listed spans, never to the number of combinations, because the client may sweep 100,000.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

__all__ = ["PREFIX", "SpanError", "count", "expand", "has_spans", "validate"]

PREFIX = "span:"

# Whitespace is tolerated inside the braces because a quoted argument can carry it.
_RANGE = re.compile(r"span:\{\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*\}", re.ASCII)
_LIST = re.compile(r"span:\[(.*)\]", re.DOTALL)
# What a shell leaves of a brace expression: no braces, brackets or range dots remain.
_SHELL_EXPANDED = re.compile(r"span:[^{}\[\],]*", re.DOTALL)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)

_FORMS = "expected span:{a..b} (integers a to b) or span:[x,y,...] (listed strings)"


class SpanError(ValueError):
    """A `span:` argument that is not a valid span; the message is one line for a person."""


def has_spans(args: Sequence[str]) -> bool:
    """Whether any argument uses the reserved `span:` prefix (valid or not).

    Invalid ones count too, so a caller that branches on this still reaches `validate`
    and reports the mistake instead of passing `span:...` through as a literal.
    """
    return any(arg.startswith(PREFIX) for arg in args)


def validate(args: Sequence[str]) -> None:
    """Raise SpanError for the first bad `span:` argument; return None if all are valid."""
    _parse(args)


def count(args: Sequence[str]) -> int:
    """How many combinations `expand(args)` yields, computed without expanding them."""
    total = 1
    for axis in _parse(args):
        total *= len(axis)
    return total


def expand(args: Sequence[str]) -> Iterator[list[str]]:
    """Validate `args` now, then lazily yield each combination as a fresh list of strings.

    With no spans it yields `list(args)` once.  Not a generator function itself so that a
    SpanError is raised by this call, not by the first `next()`.
    """
    return _combinations(_parse(args))


def _combinations(axes: list[Sequence]) -> Iterator[list[str]]:
    # An odometer over the axes: the last index turns fastest, carrying leftwards.
    # itertools.product would copy every axis into a tuple first, which a
    # span:{1..10000000} cannot afford.
    indices = [0] * len(axes)
    lengths = [len(axis) for axis in axes]
    while True:
        yield [str(axis[i]) for axis, i in zip(axes, indices)]
        position = len(axes) - 1
        while position >= 0:
            indices[position] += 1
            if indices[position] < lengths[position]:
                break
            indices[position] = 0
            position -= 1
        if position < 0:
            return


def _parse(args: Sequence[str]) -> list[Sequence]:
    """Turn each argument into an axis: a range for integer spans, a tuple otherwise."""
    axes: list[Sequence] = []
    for position, arg in enumerate(args):
        if not arg.startswith(PREFIX):
            axes.append((arg,))
            continue
        span_range = _RANGE.fullmatch(arg)
        if span_range:
            first, last = int(span_range.group(1)), int(span_range.group(2))
            step = 1 if last >= first else -1
            axes.append(range(first, last + step, step))
            continue
        span_list = _LIST.fullmatch(arg)
        if span_list:
            axes.append(_list_items(arg, span_list.group(1)))
            continue
        raise SpanError(_explain_bad_span(args, position))
    return axes


def _list_items(arg: str, body: str) -> tuple[str, ...]:
    if not body.strip():
        raise SpanError(f"bad span argument {arg!r}: the list has no items")
    items = tuple(item.strip() for item in body.split(","))
    if "" in items:
        # Almost always a stray or doubled comma; silently sweeping "" would hide it.
        raise SpanError(f"bad span argument {arg!r}: the list has an empty item")
    return items


def _explain_bad_span(args: Sequence[str], position: int) -> str:
    """The one-line message for a bad span, recognising the shell's brace expansion."""
    arg = args[position]
    run = _shell_expanded_run(args, position)
    if len(run) < 2:
        return f"bad span argument {arg!r}: {_FORMS}"
    values = [word[len(PREFIX):] for word in run]
    seen = " ".join(run)
    if all(_INTEGER.fullmatch(value) for value in values):
        numbers = [int(value) for value in values]
        steps = {b - a for a, b in zip(numbers, numbers[1:])}
        if steps in ({1}, {-1}):
            spelled = f"span:{{{numbers[0]}..{numbers[-1]}}}"
            return (
                f"the shell expanded {spelled} into {seen} before hakurun saw it: "
                f"quote it, '{spelled}'"
            )
    listed = f"span:[{','.join(values)}]"
    return (
        f"the shell expanded a brace expression into {seen} before hakurun saw it: "
        f"write the values as a quoted list, '{listed}'"
    )


def _shell_expanded_run(args: Sequence[str], position: int) -> list[str]:
    """The maximal run of consecutive shell-expansion leftovers around `position`."""

    def leftover(index: int) -> bool:
        return 0 <= index < len(args) and bool(_SHELL_EXPANDED.fullmatch(args[index]))

    if not leftover(position):
        return []
    start = position
    while leftover(start - 1):
        start -= 1
    end = position
    while leftover(end + 1):
        end += 1
    return list(args[start : end + 1])
