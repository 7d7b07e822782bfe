"""TLS to the broker: the one place an ``ssl.SSLContext`` for ``amqps://`` is made.

Why it exists: every process that talks to RabbitMQ (client, runner, host, the dashboard's
sign-in check, and the command-line AMQP path of the client) must verify the broker the same
way, from the same ``[broker]`` keys: the server's certificate against ``ca_file`` (or the
system's trusted CAs when it is empty) and its host name against the URL's, plus an optional
client certificate (``cert_file``, ``key_file``) for brokers that ask for one. Plain
``amqp://`` URLs get no context at all.

    context = client_ssl_context(config.broker)      # None for amqp://
    await aio_pika.connect_robust(url, ssl_context=context)

A file that cannot be read or is no certificate is a :class:`~hakuriver.config.ConfigError`
naming the key and the file (exit code 2 on the command line); a broker whose certificate
does not verify is a connection failure, which :func:`describe_failure` words for a person.
"""

from __future__ import annotations

import re
import ssl
from typing import TYPE_CHECKING

from yarl import URL

from hakuriver.config import ConfigError

if TYPE_CHECKING:
    from hakuriver.config import BrokerConfig

NAME_MISMATCH = {62, 64}   # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
NAME_HINT = "the URL's host must be a name the certificate gives"
CA_HINT = "is [broker] ca_file the CA that signed it?"


def uses_tls(url_text: str) -> bool:
    """Does ``[broker] url`` (one URL or several, comma-separated) name an ``amqps://`` address?"""
    return any(URL(part.strip()).scheme == "amqps" for part in url_text.split(",") if part.strip())


def client_ssl_context(broker: BrokerConfig) -> ssl.SSLContext | None:
    """The context for connecting to ``broker``: None for amqp:// URLs, else one that verifies
    the server's certificate (against ``ca_file``, or the system store when it is empty) and its
    host name, and presents ``cert_file``/``key_file`` when set."""
    if not uses_tls(broker.url):
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=broker.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"bad value for 'broker.ca_file': {broker.ca_file!r} is no readable CA "
                          f"certificate file ({_reason(exc)})") from None
    # create_default_context already requires a verified certificate and a matching host
    # name; said again so no later edit can quietly weaken it.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if broker.cert_file:
        try:
            context.load_cert_chain(broker.cert_file, broker.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            files = broker.cert_file + (f" with key {broker.key_file}" if broker.key_file else "")
            raise ConfigError(f"bad value for 'broker.cert_file': {files!r} is no readable certificate "
                              f"and key ({_reason(exc)})") from None
    return context


def describe_failure(exc: BaseException) -> str | None:
    """A TLS failure behind a connection error, in one line for a person; None if it was none.

    aiormq wraps the handshake's ``ssl.SSLError`` into its own connection error, keeping the
    original as the cause; this looks through that chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            hint = NAME_HINT if current.verify_code in NAME_MISMATCH else CA_HINT
            why = (current.verify_message or _reason(current)).rstrip(".")
            return f"TLS: the broker's certificate was refused: {why} ({hint})"
        if isinstance(current, ssl.SSLError):
            return f"TLS handshake failed: {_reason(current)}"
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    """OpenSSL's words without its decorations: "[X509: CODE] what happened (_ssl.c:123)" -> "what happened"."""
    text = getattr(exc, "strerror", None) or (str(exc.args[-1]) if exc.args else "") or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(text).split()))
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
