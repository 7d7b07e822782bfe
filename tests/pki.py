"""Certificates for TLS tests, made with the openssl command line in a temporary directory.

Why it exists: the TLS tests need what a lab admin would make: a CA, a broker certificate it
signs, a client certificate it signs, and a second CA (a client that trusts only that one
must refuse the broker). Each test session makes its own; nothing is read from or written to the
machine's trust store.

    pki = make_pki(tmp_dir)    # pki.ca, pki.server_cert, pki.server_key, pki.client_cert, ...

The broker's certificate names ``localhost`` only (DNS), so connecting to ``127.0.0.1`` is a
host name mismatch: the wrong-host-name test needs no second certificate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# EC keys: made in milliseconds, where RSA keys take a noticeable time on a busy machine
KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
DAYS = "2"


@dataclass(frozen=True)
class Pki:
    ca: Path             # the trusted CA's certificate
    server_cert: Path    # the broker's, for DNS:localhost, signed by ca
    server_key: Path
    client_cert: Path    # a client's, signed by ca
    client_key: Path
    rogue_ca: Path       # another CA: a client that trusts only it must refuse the broker


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def _make_ca(root: Path, name: str) -> tuple[Path, Path]:
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    _openssl("req", "-x509", *KEY, "-keyout", key.name, "-out", cert.name, "-days", DAYS,
             "-subj", f"/CN=HakuRiver test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)
    return cert, key


def _issue(root: Path, name: str, ca: tuple[Path, Path], common_name: str, extensions: str) -> tuple[Path, Path]:
    cert, key, request, ext = root / f"{name}.pem", root / f"{name}.key", root / f"{name}.csr", root / f"{name}.ext"
    ext.write_text(extensions + "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid\n")
    _openssl("req", *KEY, "-keyout", key.name, "-out", request.name, "-subj", f"/CN={common_name}", cwd=root)
    _openssl("x509", "-req", "-in", request.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
             "-out", cert.name, "-days", DAYS, "-extfile", ext.name, cwd=root)
    key.chmod(0o600)
    return cert, key


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(root, "ca")
    rogue = _make_ca(root, "rogue-ca")
    server_ext = "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
    server = _issue(root, "server", ca, "localhost", server_ext)
    client = _issue(root, "client", ca, "hakuriver-client",
                    "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
               rogue_ca=rogue[0])
