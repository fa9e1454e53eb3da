"""releasegate.signing: sign, verify, refuse (unsigned, tampered, untrusted key), rotation, never re-sign."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from releasegate import registry, signing
from tests.unit.mlflow_store import MODEL, register, stored_model_dir


def stored_bundle(settings, version: str) -> Path:
    """The bundle file as the store keeps it on disk."""
    run = registry.client(settings).get_run(registry.source_run(MODEL, version, settings))
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / signing.BUNDLE_ARTIFACT


def tamper(settings, version: str) -> str:
    """Change one byte of the stored serialized model; returns the file's name."""
    target = next(p for p in stored_model_dir(settings, version).iterdir() if p.name.startswith("model."))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target.name


def test_generate_keys_writes_a_p256_pair_and_refuses_to_overwrite(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = signing.generate_keys(tmp_path / "keys", name="ci")

    assert (private.name, public.name) == ("ci.key", "ci.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key.curve, ec.SECP256R1)
    assert serialization.load_pem_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    before = private.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        signing.generate_keys(tmp_path / "keys", name="ci")
    assert private.read_bytes() == before


def test_ensure_keys_creates_the_default_pair_once(settings):
    private, public = signing.ensure_keys(settings)
    assert private == settings.signing_key and public in settings.trusted_keys
    content = private.read_bytes()
    assert signing.ensure_keys(settings) == (private, public) and private.read_bytes() == content


def test_signed_version_verifies(store, classifier):
    version = register(store, classifier)
    assert not signing.is_signed(MODEL, version, store)

    digest = signing.sign_version(MODEL, version, store)

    assert digest.startswith("sha256:") and signing.is_signed(MODEL, version, store)
    assert registry.get_version_tags(MODEL, version, settings=store)[signing.DIGEST_TAG] == digest
    assert (signing.fetch_verified(MODEL, version, store).path / "MLmodel").is_file()


def test_tampered_model_is_refused(store, classifier):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, store)
    changed = tamper(store, version)

    with pytest.raises(signing.SignatureMismatchError) as refused:
        signing.fetch_verified(MODEL, version, store)
    message = str(refused.value)
    assert message.startswith("signature verification failed for churn v1 (artifact changed after signing?): ")
    assert changed in message


def test_file_added_after_signing_is_refused(store, classifier):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, store)
    (stored_model_dir(store, version) / "code").mkdir()
    (stored_model_dir(store, version) / "code" / "hook.py").write_text("import os\n")

    with pytest.raises(signing.SignatureMismatchError, match=r"artifact changed after signing\?.*hook\.py"):
        signing.fetch_verified(MODEL, version, store)


def test_altered_bundle_is_refused(store, classifier):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, store)
    path = stored_bundle(store, version)
    bundle = json.loads(path.read_text())
    envelope = bundle["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["note"] = "edited"  # any change to the signed statement
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    path.write_text(json.dumps(bundle))

    with pytest.raises(signing.SignatureMismatchError, match="signature verification failed for churn v1"):
        signing.fetch_verified(MODEL, version, store)


def test_unsigned_version_is_refused(store, classifier):
    version = register(store, classifier)
    with pytest.raises(signing.NotSignedError, match=r"^churn v1 is not signed$"):
        signing.fetch_verified(MODEL, version, store)


def test_version_signed_by_an_untrusted_key_is_refused(store, classifier, tmp_path):
    version = register(store, classifier)
    rogue_key, rogue_pub = signing.generate_keys(tmp_path / "rogue")
    signing.sign_version(
        MODEL, version, store.model_copy(update={"signing_key": rogue_key, "trusted_keys": [rogue_pub]})
    )

    with pytest.raises(signing.UntrustedKeyError, match="^churn v1 is signed by a key that is not trusted"):
        signing.fetch_verified(MODEL, version, store)


def test_any_trusted_key_verifies_during_rotation(store, classifier, tmp_path):
    old_version, new_version = register(store, classifier), register(store, classifier)
    signing.sign_version(MODEL, old_version, store)  # the default (old) key
    new_key, new_pub = signing.generate_keys(tmp_path / "rotated")
    rotated = store.model_copy(update={"signing_key": new_key, "trusted_keys": [*store.trusted_keys, new_pub]})

    signing.sign_version(MODEL, new_version, rotated)

    assert (signing.fetch_verified(MODEL, new_version, rotated).path / "MLmodel").is_file()
    assert (signing.fetch_verified(MODEL, old_version, rotated).path / "MLmodel").is_file()
    retired = rotated.model_copy(update={"trusted_keys": [new_pub]})  # the old key is no longer trusted
    with pytest.raises(signing.UntrustedKeyError):
        signing.fetch_verified(MODEL, old_version, retired)


def test_sign_version_is_idempotent(store, classifier):
    version = register(store, classifier)
    digest = signing.sign_version(MODEL, version, store)
    bundle = stored_bundle(store, version).read_bytes()

    # ECDSA signatures are randomized: the same digest means the bundle was verified, not made again.
    assert signing.sign_version(MODEL, "1", store) == digest
    assert stored_bundle(store, version).read_bytes() == bundle


def test_sign_version_never_resigns_a_tampered_version(store, classifier):
    version = register(store, classifier)
    digest = signing.sign_version(MODEL, version, store)
    bundle = stored_bundle(store, version).read_bytes()
    tamper(store, version)
    # Losing the digest tag must not make the version look unsigned (and so signable) again.
    registry.client(store).delete_model_version_tag(MODEL, version, signing.DIGEST_TAG)

    with pytest.raises(signing.SignatureMismatchError, match="artifact changed after signing"):
        signing.sign_version(MODEL, version, store)

    assert stored_bundle(store, version).read_bytes() == bundle
    assert signing.DIGEST_TAG not in registry.get_version_tags(MODEL, version, settings=store)
    assert digest.startswith("sha256:")


def test_a_version_whose_bundle_was_deleted_after_signing_is_refused_not_signed_again(store, classifier):
    version = register(store, classifier)
    digest = signing.sign_version(MODEL, version, store)
    tamper(store, version)
    stored_bundle(store, version).unlink()  # whoever changed the model also removed the evidence
    with pytest.raises(signing.SignatureError, match=f"was signed \\({digest}\\) but its signature bundle is gone"):
        signing.sign_version(MODEL, version, store)
    assert not signing.is_signed(MODEL, version, store)


def test_only_the_signing_module_makes_a_verified_model(store, classifier):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, store)
    verified = signing.fetch_verified(MODEL, version, store)
    with pytest.raises(TypeError, match="comes from releasegate.signing.fetch_verified"):
        signing.VerifiedModel(MODEL, version, verified.path, verified.digest, object())
    verified.remove()
    assert not verified.path.exists()


def test_signing_with_a_key_nobody_trusts_stores_no_bundle(store, classifier, tmp_path):
    version = register(store, classifier)
    other_key, _ = signing.generate_keys(tmp_path / "other")

    with pytest.raises(signing.SignatureError, match="the trusted keys do not accept it"):
        signing.sign_version(MODEL, version, store.model_copy(update={"signing_key": other_key}))

    assert not signing.is_signed(MODEL, version, store)


def test_a_bundle_inside_the_model_directory_is_not_part_of_the_signed_content(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    (model_dir / "model.pkl").write_bytes(b"weights")
    private, public = signing.generate_keys(tmp_path / "keys")

    signing.sign_directory(model_dir, model_dir / signing.BUNDLE, private)

    signing.verify_directory(model_dir, model_dir / signing.BUNDLE, [public])
    (model_dir / "model.pkl").write_bytes(b"weightz")
    with pytest.raises(signing.SignatureMismatchError, match="model.pkl"):
        signing.verify_directory(model_dir, model_dir / signing.BUNDLE, [public])


def test_a_missing_trusted_key_file_is_named(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    private, _ = signing.generate_keys(tmp_path / "keys")
    signing.sign_directory(model_dir, tmp_path / "model.sig", private)

    with pytest.raises(signing.SignatureError, match="trusted public key .*gone.pub does not exist"):
        signing.verify_directory(model_dir, tmp_path / "model.sig", [tmp_path / "gone.pub"])
