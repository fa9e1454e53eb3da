"""Mutual TLS: the gateway process on loopback refuses clients without a certificate from its client CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert, key=None) -> None:
    from cryptography.hazmat.primitives import serialization

    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA with a server and a client certificate, and a second CA with its own client."""
    d = tmp_path_factory.mktemp("pki")
    for ca_name, client in (("ca", "client"), ("other-ca", "stranger")):
        ca_key = _key()
        _write(d / ca_name, _cert(ca_name, ca_key, ca_name, ca_key, ca=True), ca_key)
        client_key = _key()
        _write(d / client, _cert(client, client_key, ca_name, ca_key, ca=False), client_key)
        if ca_name == "ca":
            server_key = _key()
            _write(d / "server", _cert("127.0.0.1", server_key, ca_name, ca_key, ca=False, server=True), server_key)
    return d


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def tls_gateway(pki, tmp_path_factory, request):
    """`releasegate gateway serve` with a server certificate and a client CA (no models needed), as one process
    and as two workers (each loads the certificate and the client CA)."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("tls-gateway")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        log = home / "gateway.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "releasegate"),
                    "gateway",
                    "serve",
                    "--port",
                    str(port),
                    "--tls-cert",
                    str(pki / "server.crt"),
                    "--tls-key",
                    str(pki / "server.key"),
                    "--tls-client-ca",
                    str(pki / "ca.crt"),
                    "--workers",
                    str(request.param),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                start_new_session=True,
            )
        url = f"https://127.0.0.1:{port}"
        try:
            deadline = time.time() + 90
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if httpx.get(f"{url}/healthz", verify=_client(pki, "client"), timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "gateway did not start:\n" + log.read_text()
                time.sleep(0.3)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _client(pki: Path, name: str | None) -> ssl.SSLContext:
    """A client context that trusts the gateway's CA and presents `name`'s certificate (None: no certificate)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if name is not None:
        ctx.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    return ctx


def test_client_with_a_certificate_from_the_client_ca_is_served(tls_gateway, pki):
    resp = httpx.get(f"{tls_gateway}/readyz", verify=_client(pki, "client"), timeout=10)
    assert resp.status_code == 200 and resp.json()["ready"] is True
    # mTLS authenticates the connection; the API key still decides what the caller may do.
    assert httpx.get(f"{tls_gateway}/admin/routes", verify=_client(pki, "client"), timeout=10).status_code == 401


@pytest.mark.parametrize("who", [None, "stranger"], ids=["no-certificate", "certificate-from-another-ca"])
def test_client_without_a_valid_certificate_is_refused(tls_gateway, pki, who):
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(f"{tls_gateway}/healthz", verify=_client(pki, who), timeout=10)


def test_plain_http_is_not_served(tls_gateway):
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_gateway.replace("https://", "http://") + "/healthz", timeout=5)


def test_half_configured_tls_is_refused_with_a_message(pki):
    out = subprocess.run(
        [str(Path(sys.executable).parent / "releasegate"), "gateway", "serve", "--tls-client-ca", str(pki / "ca.crt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "tls_client_ca (mutual TLS) needs tls_cert and tls_key" in out.stderr
