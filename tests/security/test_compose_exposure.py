"""What compose exposes: loopback ports, a gateway on HTTPS only, and no private signing key in a serving process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import certifi
import httpx
import pytest

from releasegate.backends.local import LocalBackend
from tests.integration.conftest import free_port
from tests.unit.test_compose import (
    COMPOSE_RAW,
    MAKE_SECRETS,
    compose,
    generated_env,
    interpolate,
    make_secrets,
    mounts,
)

SIGNING_FOLDER = "./deploy/secrets/signing"
# The one service that plays "where the model is built" (profile demo).
BUILDER = "demo-models"


def _services() -> dict:
    """The services as `docker compose` runs them beside the .env that `make secrets` writes.

    674b38f, whose compose file these tests are also run against (issue 12), had no `make secrets`: its
    services are read as compose read them there, with every variable at its default.
    """
    return (compose() if MAKE_SECRETS.exists() else interpolate(COMPOSE_RAW, {}))["services"]


def test_every_port_is_published_on_loopback_unless_told_otherwise():
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    lan = interpolate(COMPOSE_RAW, {**generated_env(), "PUBLISH_ADDRESS": "10.0.0.5"})
    assert lan["services"]["gateway"]["ports"] == ["10.0.0.5:8765:8765"]


def test_the_gateway_serves_https_only_with_the_mounted_certificate():
    gateway = _services()["gateway"]
    env = gateway["environment"]
    tls = next(
        (v for v in gateway["volumes"] if isinstance(v, dict) and v["source"] == "./deploy/secrets/gateway"), None
    )
    assert tls is not None, f"the gateway mounts no certificate: {mounts(gateway)}"
    assert tls["read_only"] and tls["bind"]["create_host_path"] is False
    assert env["RELEASEGATE_GATEWAY_TLS_CERT"] == f"{tls['target']}/tls.crt"
    assert env["RELEASEGATE_GATEWAY_TLS_KEY"] == f"{tls['target']}/tls.key"
    probe = " ".join(gateway["healthcheck"]["test"])
    assert "https://localhost:8765/readyz" in probe and "--cacert /opt/releasegate/ca/ca.pem" in probe
    for name, service in _services().items():
        url = (service.get("environment") or {}).get("RELEASEGATE_GATEWAY_URL")
        if url:
            assert url.startswith("https://gateway:"), f"{name} calls the gateway over {url}"
            assert "./deploy/secrets/ca:/opt/releasegate/ca:ro" in mounts(service), f"{name} lacks the gateway's CA"
        if name != "gateway":
            assert "./deploy/secrets/gateway" not in " ".join(mounts(service)), f"{name} mounts the gateway's key"


def test_the_trust_bundle_the_clients_use_is_the_one_airflow_init_writes():
    init = " ".join(_services()["airflow-init"]["command"])
    for name, service in _services().items():
        bundle = (service.get("environment") or {}).get("SSL_CERT_FILE")
        if bundle:
            assert f"> {bundle}" in init, f"{name} trusts {bundle}, which airflow-init does not write"
            depends = service.get("depends_on") or {}
            assert name == "airflow-init" or depends, f"{name} may start before airflow-init wrote {bundle}"


def test_no_private_signing_key_reaches_the_gateway_or_airflow():
    for name, service in _services().items():
        env = service.get("environment") or {}
        mounted = " ".join(mounts(service))
        if name == BUILDER:
            assert env.get("RELEASEGATE_SIGNING_MODE") == "sign"
            assert env["RELEASEGATE_SIGNING_KEY"].startswith("/opt/releasegate/signing/")
            assert f"{SIGNING_FOLDER}:/opt/releasegate/signing:ro" in mounted
            continue
        assert SIGNING_FOLDER not in mounted, f"{name} mounts the private signing key"
        if "RELEASEGATE_HOME" in env:
            assert env.get("RELEASEGATE_SIGNING_MODE") == "verify-only", f"{name} may sign"
            assert "./deploy/secrets/trusted:/opt/releasegate/trusted:ro" in mounted, f"{name} has no public keys"
    init = " ".join(_services()["airflow-init"]["command"])
    assert "ensure_keys" not in init, "airflow-init would make a private key in the shared volume"
    assert "if [ -e /opt/releasegate/home/keys/release.key ]" in init  # and refuses to start beside an old one


def test_a_missing_secrets_folder_stops_compose_instead_of_being_created_empty():
    for name, service in COMPOSE_RAW["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./deploy/secrets"):
                assert isinstance(volume, dict) and volume["bind"]["create_host_path"] is False, (name, volume)


@pytest.fixture
def compose_secrets(tmp_path) -> Path:
    make_secrets(tmp_path)
    return tmp_path / "deploy" / "secrets"


def test_the_gateway_serves_https_that_the_pipeline_trusts_through_the_bundle(rg_home, compose_secrets, monkeypatch):
    """The real gateway with compose's certificate; a client trusting the public roots plus the CA, as in compose."""
    port = free_port()
    log = rg_home / "gateway.log"
    env = {
        **os.environ,
        "RELEASEGATE_GATEWAY_TLS_CERT": str(compose_secrets / "gateway" / "tls.crt"),
        "RELEASEGATE_GATEWAY_TLS_KEY": str(compose_secrets / "gateway" / "tls.key"),
    }
    with open(log, "w") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "releasegate.serving", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    # What airflow-init writes: the public roots and the compose CA, then SSL_CERT_FILE for every client.
    bundle = rg_home / "trust.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + (compose_secrets / "ca" / "ca.pem").read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    try:
        deadline = time.monotonic() + 90
        while True:
            assert gateway.poll() is None, log.read_text()
            try:
                if httpx.get(f"https://localhost:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        backend = LocalBackend(gateway_url=f"https://localhost:{port}", api_key=os.environ["RELEASEGATE_ADMIN_KEY"])
        assert backend.get_route("churn") is None  # the admin API answered over verified TLS
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://localhost:{port}/healthz", verify=certifi.where(), timeout=5)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        try:
            gateway.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait()
