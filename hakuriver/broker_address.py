"""Broker addresses: ``[broker] url`` read into its addresses, and said to a person without
a password, with why it did not answer.

Why it exists: both connection paths (aio-pika's in :mod:`hakuriver.connection` and the
client's light one in :mod:`client.wire`) read the same comma-separated list by the same
rule, name the addresses they could not reach, and must never print a password while doing so. Standard library only, so the light command-line
path can use it without loading yarl or aio-pika.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def split_urls(text: str) -> list[str]:
    """``[broker] url``: one URL, or several separated by commas; ValueError naming a bad one."""
    urls = [part.strip() for part in text.split(",")]
    for url in urls:
        if not url:
            raise ValueError(f"empty broker address in {redact(text)!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(f"not an amqp:// or amqps:// URL: {redact(url)!r}")
    return urls


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
