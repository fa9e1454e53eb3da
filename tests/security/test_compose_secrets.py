"""Compose refuses to start without its secrets, and `make secrets` makes fresh, distinct, strong ones, never twice."""

from __future__ import annotations

import base64
import re
import stat
import subprocess
from pathlib import Path

import pytest

from releasegate import signing
from tests.unit.test_compose import (
    COMPOSE_FILE,
    COMPOSE_RAW,
    MAKE_SECRETS,
    SECRETS,
    MissingVariable,
    compose,
    generated_env,
    interpolate,
    make_secrets,
    read_dotenv,
)

# What the compose file shipped before: none may come back, as a default or a literal.
OLD_DEFAULTS = (
    "change-me",
    "Jf6tV0mLzGzCm3qv3dK2sOeG1sGJ8dV2y0nq7yS1m4E=",
    "releasegate:releasegate@",
    "POSTGRES_PASSWORD: releasegate",
    "_PASSWORD:-",
    "_SECRET:-",
    "_KEY:-",
)
# Environment variables that hold a secret's value (not a path to one).
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|ADMIN_KEY")


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _dotenv_of(files: dict[str, bytes]) -> dict[str, str]:
    lines = [line for line in files[".env"].decode().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def test_compose_refuses_to_start_without_the_env():
    with pytest.raises(MissingVariable, match=r"^required variable \w+ is missing a value: run make secrets$"):
        interpolate(COMPOSE_RAW, {})


def test_no_default_secret_is_left_in_the_compose_file():
    text = COMPOSE_FILE.read_text()
    assert not [old for old in OLD_DEFAULTS if old in text]


def test_every_secret_a_service_receives_comes_from_the_env():
    secrets = {generated_env()[name] for name in SECRETS}
    password = generated_env()["POSTGRES_PASSWORD"]
    for name, service in compose()["services"].items():
        for var, value in (service.get("environment") or {}).items():
            value = str(value)
            if _SECRET_NAME.search(var) and not var.endswith(("_FILE", "_USER")):
                assert value in secrets, f"{name}: {var} is not one of the generated secrets"
            for user_password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert user_password == password, f"{name}: {var} embeds a password that is not POSTGRES_PASSWORD"
        command = " ".join(map(str, service.get("command") or []))
        for user_password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", command):
            assert user_password == password, f"{name}: its command embeds a password that is not POSTGRES_PASSWORD"


def test_make_secrets_writes_fresh_distinct_strong_values(tmp_path):
    from cryptography.fernet import Fernet

    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        make_secrets(tmp_path / run)
    one, two = read_dotenv(tmp_path / "one" / ".env"), read_dotenv(tmp_path / "two" / ".env")

    assert set(one) >= SECRETS
    values = [one[name] for name in SECRETS]
    assert len(set(values)) == len(values), "two secrets share a value"
    assert not [name for name in SECRETS if one[name] == two[name]], "a second run repeated a secret"
    for name in SECRETS - {"AIRFLOW_FERNET_KEY"}:
        assert re.fullmatch(r"[0-9a-f]{64}", one[name]), f"{name}: not 256 random bits as hex"
    fernet_key = one["AIRFLOW_FERNET_KEY"]
    assert len(base64.urlsafe_b64decode(fernet_key)) == 32
    assert Fernet(fernet_key).decrypt(Fernet(fernet_key).encrypt(b"connection")) == b"connection"
    assert stat.S_IMODE((tmp_path / "one" / ".env").stat().st_mode) == 0o600


def test_make_secrets_never_overwrites_and_adds_only_what_is_missing(tmp_path):
    make_secrets(tmp_path)
    before = _files(tmp_path)
    rerun = make_secrets(tmp_path)
    assert _files(tmp_path) == before
    assert "complete, left as it is" in rerun.stdout

    env_file = tmp_path / ".env"
    kept = [line for line in env_file.read_text().splitlines() if not line.startswith("GRAFANA_ADMIN_PASSWORD=")]
    env_file.write_text("\n".join(kept) + "\n")  # an .env from before a variable existed
    added = make_secrets(tmp_path)

    assert "added GRAFANA_ADMIN_PASSWORD" in added.stdout
    lines = env_file.read_text().splitlines()
    assert lines[: len(kept)] == kept and len(lines) == len(kept) + 1
    assert read_dotenv(env_file)["GRAFANA_ADMIN_PASSWORD"] != _dotenv_of(before)["GRAFANA_ADMIN_PASSWORD"]


def test_make_secrets_refuses_to_replace_half_of_the_tls_material(tmp_path):
    make_secrets(tmp_path)
    (tmp_path / "deploy" / "secrets" / "gateway" / "tls.crt").unlink()
    before = _files(tmp_path)

    refused = subprocess.run([str(MAKE_SECRETS), str(tmp_path)], capture_output=True, text=True)

    assert refused.returncode == 1
    assert "TLS is half there" in refused.stderr
    assert _files(tmp_path) == before


def test_make_secrets_issues_the_gateway_a_certificate_from_a_throwaway_ca(tmp_path, monkeypatch):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    monkeypatch.setenv("GATEWAY_TLS_NAMES", "models.example.com,10.0.0.5")
    make_secrets(tmp_path)
    secrets = tmp_path / "deploy" / "secrets"
    ca = x509.load_pem_x509_certificate((secrets / "ca" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((secrets / "gateway" / "tls.crt").read_bytes())

    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"gateway", "localhost", "models.example.com"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # The CA's key is gone: nothing else can be issued that the stack trusts.
    assert [p.name for p in (secrets / "ca").iterdir()] == ["ca.pem"]
    for private in (secrets / "gateway" / "tls.key", secrets / "signing" / "release.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert (secrets / ".gitignore").read_text().splitlines()[-1] == "*"


def test_make_secrets_signing_pair_signs_what_the_stack_verifies(tmp_path):
    make_secrets(tmp_path)
    secrets = tmp_path / "deploy" / "secrets"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")

    signing.sign_directory(model_dir, tmp_path / "model.sig", secrets / "signing" / "release.key")

    signing.verify_directory(model_dir, tmp_path / "model.sig", [secrets / "trusted" / "release.pub"])
    # Only the public key is in the folder every service mounts.
    assert [p.name for p in (secrets / "trusted").iterdir()] == ["release.pub"]
