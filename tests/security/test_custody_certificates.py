"""Certificate mode: a model signed with a code-signing certificate verifies against the organisation's CA only."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from releasegate import signing
from releasegate.cli import main
from tests.unit.mlflow_store import (  # noqa: F401  (fixtures)
    MODEL,
    classifier,
    migrated_mlflow_db,
    register,
    store,
    stored_model_dir,
)
from tests.unit.test_signing import stored_bundle


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, signs_certificates: bool):
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(out: Path, name: str, issuer: tuple | None, usage=None) -> tuple:
    """Write `name.pem` and `name.key`: a CA when `issuer` is None, else a leaf with `usage` signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=issuer is None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage or ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """The organisation's CA with a code-signing leaf and a TLS-only leaf; another CA with its own code signer."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = tmp_path_factory.mktemp("pki")
    root = _issue(out, "root", None)
    _issue(out, "signer", root)
    _issue(out, "colleague", root)
    _issue(out, "web", root, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    other = _issue(out, "other-root", None)
    _issue(out, "stranger", other)
    return out


def _signer(settings, pki: Path, leaf: str, ca: str):
    """Where the model is built: certificate mode with `leaf`, checking its own signature against `ca`."""
    return settings.model_copy(
        update={
            "signing_key": pki / f"{leaf}.key",
            "signing_certificate": pki / f"{leaf}.pem",
            "signing_certificate_chain": [pki / f"{ca}.pem"],
            "trusted_ca": [pki / f"{ca}.pem"],
        }
    )


def _deployment(settings, pki: Path, tmp_path: Path):
    """Verify-only, no private key, trusting the organisation's CA."""
    from releasegate.settings import SigningMode

    return settings.model_copy(
        update={
            "signing_mode": SigningMode.verify_only,
            "signing_key": tmp_path / "absent.key",
            "trusted_ca": [pki / "root.pem"],
        }
    )


def test_a_model_signed_with_a_code_signing_certificate_verifies_against_the_ca(store, classifier, pki, tmp_path):
    version = register(store, classifier)
    digest = signing.sign_version(MODEL, version, _signer(store, pki, "signer", "root"))

    verified = signing.fetch_verified(MODEL, version, _deployment(store, pki, tmp_path))

    assert verified.digest == digest and (verified.path / "MLmodel").is_file()
    # The deployment checks the signature it did not make, and makes none.
    assert signing.sign_version(MODEL, version, _deployment(store, pki, tmp_path)) == digest


def test_releasegate_sign_with_a_certificate_then_verify_against_the_ca(store, classifier, pki, monkeypatch):
    version = register(store, classifier)
    runner = CliRunner()
    monkeypatch.setenv("RELEASEGATE_TRUSTED_CA", str(pki / "root.pem"))

    signed = runner.invoke(
        main,
        [
            "sign",
            f"models:/{MODEL}/{version}",
            "--private-key",
            str(pki / "signer.key"),
            "--signing-certificate",
            str(pki / "signer.pem"),
            "--certificate-chain",
            str(pki / "root.pem"),
        ],
    )
    assert signed.exit_code == 0, signed.output

    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "verify-only")
    verified = runner.invoke(main, ["verify", f"models:/{MODEL}/{version}"])
    assert verified.exit_code == 0 and verified.output.startswith("OK: churn v1 verified"), verified.output
    monkeypatch.setenv("RELEASEGATE_TRUSTED_CA", str(pki / "other-root.pem"))
    refused = runner.invoke(main, ["verify", f"models:/{MODEL}/{version}"])
    assert refused.exit_code == 1 and "does not chain to a trusted CA" in refused.output


def test_a_leaf_from_another_ca_is_refused(store, classifier, pki, tmp_path):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, _signer(store, pki, "stranger", "other-root"))

    with pytest.raises(signing.UntrustedCertificateError) as refused:
        signing.fetch_verified(MODEL, version, _deployment(store, pki, tmp_path))

    assert str(refused.value).startswith(
        "churn v1 is signed by a key that is not trusted: the signing certificate CN=stranger does not chain "
        "to a trusted CA (root.pem)"
    )
    assert isinstance(refused.value, signing.UntrustedKeyError)  # caught as any untrusted signer is


def test_a_certificate_of_the_ca_that_is_not_for_code_signing_is_refused(store, classifier, pki, tmp_path):
    version = register(store, classifier)
    with pytest.raises(
        signing.SignatureError, match="do not accept it: the signing certificate CN=web is not for code"
    ):
        signing.sign_version(MODEL, version, _signer(store, pki, "web", "root"))
    assert not signing.is_signed(MODEL, version, store)  # refused before the bundle was stored

    # Signed anyway, outside releasegate (model-signing itself accepts any digitalSignature certificate).
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    signing.sign_directory_with_certificate(
        model_dir, tmp_path / "model.sig", pki / "web.key", pki / "web.pem", [pki / "root.pem"]
    )
    with pytest.raises(signing.UntrustedCertificateError, match="CN=web is not for code signing"):
        signing.verify_directory(model_dir, tmp_path / "model.sig", [], [pki / "root.pem"])


def test_a_model_changed_after_certificate_signing_is_refused(store, classifier, pki, tmp_path):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, _signer(store, pki, "signer", "root"))
    weights = next(p for p in stored_model_dir(store, version).iterdir() if p.name.startswith("model."))
    weights.write_bytes(weights.read_bytes() + b"\0")

    with pytest.raises(signing.SignatureMismatchError, match=f"artifact changed after signing.*{weights.name}"):
        signing.fetch_verified(MODEL, version, _deployment(store, pki, tmp_path))


def test_a_bundle_whose_certificate_was_swapped_for_another_trusted_one_is_refused(store, classifier, pki, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    version = register(store, classifier)
    signing.sign_version(MODEL, version, _signer(store, pki, "signer", "root"))
    path = stored_bundle(store, version)
    bundle = json.loads(path.read_text())
    colleague = x509.load_pem_x509_certificate((pki / "colleague.pem").read_bytes())
    der = colleague.public_bytes(serialization.Encoding.DER)
    bundle["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"] = base64.b64encode(
        der
    ).decode()
    path.write_text(json.dumps(bundle))

    with pytest.raises(signing.SignatureMismatchError, match="does not verify with its certificate CN=colleague"):
        signing.fetch_verified(MODEL, version, _deployment(store, pki, tmp_path))


def test_without_a_trusted_ca_a_certificate_signature_is_refused_not_checked_against_web_roots(
    store, classifier, pki, tmp_path
):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, _signer(store, pki, "signer", "root"))
    no_ca = _deployment(store, pki, tmp_path).model_copy(update={"trusted_ca": []})

    with pytest.raises(signing.SignatureError, match=r"no trusted CA is configured \(RELEASEGATE_TRUSTED_CA\)"):
        signing.fetch_verified(MODEL, version, no_ca)


def test_a_key_that_is_not_the_certificates_cannot_sign(tmp_path, pki):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")

    with pytest.raises(signing.SignatureError, match="does not match the public key paired with the private key"):
        signing.sign_directory_with_certificate(
            model_dir, tmp_path / "model.sig", pki / "stranger.key", pki / "signer.pem", [pki / "root.pem"]
        )
    assert not (tmp_path / "model.sig").exists()


def test_key_signed_and_certificate_signed_versions_verify_side_by_side(store, classifier, pki):
    keyed, certified = register(store, classifier), register(store, classifier)
    signing.sign_version(MODEL, keyed, store)
    signing.sign_version(MODEL, certified, _signer(store, pki, "signer", "root"))
    both = store.model_copy(update={"trusted_ca": [pki / "root.pem"]})

    assert signing.fetch_verified(MODEL, keyed, both).version == keyed
    assert signing.fetch_verified(MODEL, certified, both).version == certified
