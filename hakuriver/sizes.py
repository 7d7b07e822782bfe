"""Memory sizes as people write them: ``512M``, ``8G``, ``1.5G``, ``8GiB``, ``2T``.

Units are binary (like Docker and systemd): ``1K`` is 1024 bytes. A bare number is bytes.
"""

import re

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes for ``text``; ValueError naming the text if it is not a size."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"invalid size {text!r} (use e.g. 512M, 8G, 1.5G, 8GiB or bytes)")
    number, unit = match.groups()
    value = int(float(number) * 1024 ** _UNITS[unit.upper()])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be more than 0 bytes")
    return value


def format_size(value: int | None) -> str:
    """A short human form of a byte count (``8.0G``); ``-`` for none."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")
