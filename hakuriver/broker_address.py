"""How a broker address is said to a person: without its password, and why it did not answer.

Why it exists: both connection paths (aio-pika's in :mod:`hakuriver.connection` and the
client's light one in :mod:`client.wire`) name the addresses they could not reach, and must
never print a password while doing so. Standard library only, so the light command-line
path can use it without loading yarl or aio-pika.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def redact(url: str) -> str:
    """The URL without its password, for messages a person reads."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def unreachable_message(urls: list[str], exc: BaseException, why: str | None = None) -> str:
    """One line: which addresses did not answer, and ``why`` (else the error itself)."""
    where = ", ".join(redact(u) for u in urls)
    return f"broker unreachable at {where}: {why or exc or type(exc).__name__}"
