"""TLS to the broker (hakuriver/tls.py): ``amqps://`` with the broker's certificate verified.

A private RabbitMQ node with a TLS listener that demands a client certificate, certificates
made with openssl for this session (tests/pki.py), the real host, runner and CLI.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from hakuriver.config import BrokerConfig, ConfigError
from hakuriver.tls import client_ssl_context, describe_failure, uses_tls
from harness.local_cluster import BIN, Cluster, wait_until
from pki import make_pki
from private_broker import RABBIT_BIN, PrivateBroker


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, pki):
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.fail(f"RabbitMQ is not installed ({RABBIT_BIN}/rabbitmq-server missing); run .ci/ensure-services")
    broker = PrivateBroker(tmp_path_factory.mktemp("tls-rabbit"), tls=(pki.ca, pki.server_cert, pki.server_key))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def tls_url(broker: PrivateBroker, host: str = "localhost") -> str:
    return f"amqps://guest:guest@{host}:{broker.tls_port}/"


def tls_keys(pki, ca=None) -> dict[str, str]:
    return {"ca_file": str(ca or pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}


# -- the context, as a pure function ---------------------------------------------------------


def test_no_context_for_plain_amqp_and_a_verifying_one_for_amqps(pki):
    assert client_ssl_context(BrokerConfig(url="amqp://guest:guest@127.0.0.1:5672/")) is None
    assert uses_tls("amqp://a/, amqps://b/") and not uses_tls("amqp://a/,amqp://b/")
    context = client_ssl_context(BrokerConfig(url="amqps://broker/", **tls_keys(pki)))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    system = client_ssl_context(BrokerConfig(url="amqps://broker/"))    # no ca_file: the system's CAs
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname


def test_tls_files_that_cannot_be_used_are_config_errors(pki, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        BrokerConfig(url="amqps://broker/", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="key_file is set but cert_file is not"):
        BrokerConfig(url="amqps://broker/", key_file=str(pki.client_key))
    not_a_cert = tmp_path / "not-a-cert.pem"
    not_a_cert.write_text("hello\n")
    with pytest.raises(ConfigError, match="broker.ca_file.*not-a-cert.pem"):
        client_ssl_context(BrokerConfig(url="amqps://broker/", ca_file=str(not_a_cert)))
    with pytest.raises(ConfigError, match="broker.cert_file.*client.pem with key .*ca.key"):
        client_ssl_context(BrokerConfig(url="amqps://broker/", cert_file=str(pki.client_cert),
                                        key_file=str(pki.ca.with_suffix(".key"))))   # not its key


def test_a_tls_failure_is_found_behind_the_wrapping_error():
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    verify.verify_message, verify.verify_code = "unable to get local issuer certificate", 20
    try:
        try:
            raise verify
        except OSError as exc:
            raise ConnectionError(*exc.args) from exc
    except ConnectionError as wrapped:
        assert describe_failure(wrapped) == ("TLS: the broker's certificate was refused: "
                                             "unable to get local issuer certificate "
                                             "(is [broker] ca_file the CA that signed it?)")
    assert describe_failure(ConnectionRefusedError(111, "Connection refused")) is None


# -- a real cluster over amqps:// ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, tls_broker, pki):
    c = Cluster(tmp_path_factory.mktemp("tls-cluster"), ["tls1"], broker_url=tls_url(tls_broker),
                broker=tls_keys(pki))
    try:
        yield c.start()
    finally:
        c.stop()


def client(c: Cluster, *args: str, **broker_env: str) -> subprocess.CompletedProcess:
    env = {**c.env, **{f"HAKURIVER_BROKER_{key.upper()}": value for key, value in broker_env.items()}}
    return subprocess.run([str(BIN / "hakuriver.client"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_a_task_round_trip_over_amqps(tls_cluster, tls_broker):
    done = tls_cluster.cli("--wait", "--target", "tls1", "--", "echo", "over TLS")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.decode().strip()
    assert tls_cluster.cli_ok("--stdout", task_id) == "over TLS\n"
    assert tls_cluster.task(task_id)["state"] == "completed"
    # every connection of the cluster is a TLS one: the broker says so
    listed = tls_broker.ctl("list_connections", "client_properties", "ssl", "--quiet", "--no-table-headers")
    assert listed.returncode == 0, listed.stderr
    ours = [line for line in listed.stdout.splitlines() if "hakuriver" in line]
    assert any("hakuriver-host" in line for line in ours) and any("hakuriver.runner tls1" in line for line in ours)
    assert ours and all(line.rstrip().endswith("true") for line in ours), ours


def test_a_broker_certificate_from_an_unknown_ca_is_refused(tls_cluster, tls_broker, pki):
    for ca_file in (str(pki.rogue_ca), ""):   # another CA, and the system's CAs
        refused = client(tls_cluster, "--list-nodes", ca_file=ca_file)
        assert refused.returncode == 3, (ca_file, refused.stderr)
        assert refused.stderr.count("\n") == 1 and refused.stdout == ""
        # OpenSSL's words: the broker sends its CA along, which then is an untrusted self-signed one
        assert refused.stderr == (f"hakuriver.client: broker unreachable at amqps://guest:***@localhost:"
                                  f"{tls_broker.tls_port}/: TLS: the broker's certificate was refused: "
                                  "self-signed certificate in certificate chain "
                                  "(is [broker] ca_file the CA that signed it?)\n"), refused.stderr


def test_a_broker_reached_by_another_name_than_its_certificates_is_refused(tls_cluster, tls_broker):
    refused = client(tls_cluster, "--list-nodes", url=tls_url(tls_broker, "127.0.0.1"))
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.endswith(
        "TLS: the broker's certificate was refused: IP address mismatch, certificate is not valid for "
        "'127.0.0.1' (the URL's host must be a name the certificate gives)\n"), refused.stderr


def test_a_client_without_the_certificate_the_broker_demands_is_refused(tls_cluster):
    refused = client(tls_cluster, "--list-nodes", cert_file="", key_file="")
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.startswith("hakuriver.client: broker unreachable at amqps://") and \
        refused.stderr.count("\n") == 1, refused.stderr


def test_a_ca_file_that_is_no_certificate_is_exit_2(tls_cluster, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    result = client(tls_cluster, "--list-nodes", ca_file=str(bad))
    assert result.returncode == 2
    assert result.stderr == (f"hakuriver.client: bad value for 'broker.ca_file': {str(bad)!r} is no readable "
                             "CA certificate file (no certificate or crl found)\n"), result.stderr
    missing = client(tls_cluster, "--list-nodes", ca_file=str(tmp_path / "missing.pem"))
    assert missing.returncode == 2 and "broker.ca_file" in missing.stderr and "no such file" in missing.stderr


def test_the_dashboard_sign_in_is_checked_over_amqps(tls_cluster):
    def login(password: str) -> int:
        request = urllib.request.Request(f"{tls_cluster.web_url}/api/login", method="POST",
                                         data=json.dumps({"user": "guest", "password": password}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
    def health() -> bool:
        try:
            with urllib.request.urlopen(f"{tls_cluster.web_url}/api/health", timeout=5):
                return True
        except OSError:
            return False
    wait_until(health, 30, "the dashboard answering")
    assert login("guest") == 200       # the broker took guest/guest over TLS, with the host's [broker] keys
    assert login("wrong") == 401
