"""Model signing with OpenSSF model-signing and an elliptic-curve (P-256) key pair.

The bundle is kept beside the model, not inside it: MLflow artifact `releasegate/model.sig`
of the version's source run, and its digest in the version tag `releasegate.signature_digest`.
Several public keys may be trusted at once (key rotation).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from releasegate.settings import Settings, get_settings

BUNDLE = "model.sig"
BUNDLE_ARTIFACT = f"releasegate/{BUNDLE}"
DIGEST_TAG = "releasegate.signature_digest"

log = logging.getLogger(__name__)


class SignatureError(Exception):
    """A model that is unsigned, changed after signing, or signed by a key we do not trust."""


def generate_keys(out_dir: Path, name: str = "release") -> tuple[Path, Path]:
    """Write `<name>.key` (private, mode 0600) and `<name>.pub`; refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a key")
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def ensure_keys(settings: Settings | None = None) -> tuple[Path, Path]:
    """The default key pair of the settings, created if absent (the demo and first use)."""
    settings = settings or get_settings()
    private = settings.signing_key
    public = private.with_suffix(".pub")
    if not private.exists():
        generate_keys(private.parent, private.stem)
    return private, public


def _hashing(model_dir: Path):
    from model_signing import hashing

    # The library does not skip a bundle inside the model folder by itself.
    return hashing.Config().set_ignored_paths(paths=[BUNDLE], ignore_git_paths=True)


def sign_directory(model_dir: Path, signature_path: Path, private_key: Path) -> None:
    from model_signing import signing

    (signing.Config().use_elliptic_key_signer(private_key=Path(private_key))
     .set_hashing_config(_hashing(model_dir)).sign(Path(model_dir), Path(signature_path)))


def verify_directory(model_dir: Path, signature_path: Path, trusted_keys: list[Path], what: str = "the model") -> None:
    """Pass if any trusted key verifies the folder against the bundle; else SignatureError saying why."""
    from model_signing import verifying

    if not Path(signature_path).exists():
        raise SignatureError(f"{what} is not signed")
    keys = [Path(k) for k in trusted_keys if Path(k).exists()]
    if not keys:
        raise SignatureError(f"no trusted public key found (looked for {', '.join(map(str, trusted_keys))})")
    key_errors, content_errors = [], []
    for key in keys:
        try:
            (verifying.Config().use_elliptic_key_verifier(public_key=key)
             .set_hashing_config(_hashing(model_dir)).verify(Path(model_dir), Path(signature_path)))
            return
        except Exception as err:  # the library raises ValueError and crypto errors alike
            text = str(err)
            if "key mismatch" in text.lower() or "public key" in text.lower():
                key_errors.append(key.name)
            else:
                content_errors.append(_changed_files(text) or text[:300])
    if content_errors:
        raise SignatureError(f"signature verification failed for {what}: the artifact changed after signing "
                             f"({content_errors[0]})")
    raise SignatureError(f"{what} is signed by a key that is not trusted (tried {', '.join(key_errors)})")


def _changed_files(text: str) -> str:
    changed = re.findall(r"Hash mismatch for '([^']+)'", text)
    extra = re.findall(r"[Ee]xtra files?.*?\[([^\]]*)\]", text)
    missing = re.findall(r"[Mm]issing files?.*?\[([^\]]*)\]", text)
    parts = ([f"changed: {', '.join(changed)}"] if changed else []) + \
            ([f"added: {extra[0]}"] if extra else []) + ([f"missing: {missing[0]}"] if missing else [])
    return "; ".join(parts)


def download_bundle(model: str, version: str, dst: Path, settings: Settings | None = None) -> Path:
    """The version's signature bundle, or SignatureError if it has none."""
    from releasegate import registry

    try:
        return registry.download_artifact(model, version, BUNDLE_ARTIFACT, dst=dst, settings=settings)
    except registry.RegistryError as err:
        raise SignatureError(f"{model} v{version} is not signed (no {BUNDLE_ARTIFACT})") from err


def is_signed(model: str, version: str, settings: Settings | None = None) -> bool:
    from releasegate import registry

    return DIGEST_TAG in registry.get_version_tags(model, version, settings)


def sign_version(model: str, version: str, settings: Settings | None = None) -> str:
    """Sign a registered version and store the bundle; a signed version is verified instead.

    Never re-signs: signing again would launder an artifact changed after the first signature.
    """
    from releasegate import registry

    settings = settings or get_settings()
    version = registry.resolve_version(model, version, settings)
    if is_signed(model, version, settings):
        registry.fetch_verified(model, version, settings)
        return registry.get_version_tags(model, version, settings)[DIGEST_TAG]
    if not settings.signing_key.exists():
        raise SignatureError(f"no signing key at {settings.signing_key} (run `releasegate keys generate`)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = registry.download_model(model, version, Path(tmp) / "model", settings)
        bundle = Path(tmp) / BUNDLE
        sign_directory(model_dir, bundle, settings.signing_key)
        # Check against the trusted keys now, so a key that is not trusted fails here and not at deployment.
        verify_directory(model_dir, bundle, settings.trusted_keys, what=f"{model} v{version}")
        digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
        registry.log_artifact(model, version, bundle, artifact_path="releasegate", settings=settings)
    registry.set_version_tags(model, version, {DIGEST_TAG: digest}, settings)
    log.info("signed %s v%s (bundle sha256 %s)", model, version, digest[:16])
    return digest
