"""Model signing with OpenSSF model-signing and an elliptic-curve (P-256) key pair; several trusted keys (rotation).

Or, for an organisation with a CA, model-signing's certificate mode: the bundle carries the signing
certificate and its chain, and a model verifies when that chain ends at a trusted CA
(`RELEASEGATE_TRUSTED_CA`). In `verify-only` mode (`RELEASEGATE_SIGNING_MODE`) nothing here signs.

The bundle is kept beside the model, not inside it: MLflow artifact `releasegate/model.sig` of the
version's source run, its sha256 in the version tag `releasegate.signature_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from releasegate import registry
from releasegate.errors import ReleasegateError
from releasegate.settings import Settings, SigningMode, get_settings

if TYPE_CHECKING:
    from cryptography import x509
    from model_signing import hashing

BUNDLE = "model.sig"
BUNDLE_ARTIFACT = f"releasegate/{BUNDLE}"
DIGEST_TAG = "releasegate.signature_digest"

log = logging.getLogger(__name__)


class SignatureError(ReleasegateError):
    """A model that may not be used: unsigned, changed after signing, or signed by a key we do not trust."""


class NotSignedError(SignatureError):
    """There is no signature bundle."""


class UntrustedKeyError(SignatureError):
    """The bundle was made with a key that is not among the trusted public keys."""


class SignatureMismatchError(SignatureError):
    """A trusted key made the bundle, but the files (or the bundle) changed since."""


class UntrustedCertificateError(UntrustedKeyError):
    """The bundle's certificate does not chain to a trusted CA, or may not sign code."""


def generate_keys(out_dir: str | Path, name: str = "release") -> tuple[Path, Path]:
    """Write `<name>.key` (private PEM, mode 0600) and `<name>.pub` (public PEM); refuses to overwrite either."""
    out_dir = Path(out_dir)
    return _write_key_pair(out_dir / f"{name}.key", out_dir / f"{name}.pub")


def ensure_keys(settings: Settings | None = None) -> tuple[Path, Path]:
    """The settings' key pair (settings.signing_key and its `.pub`), created if absent."""
    settings = settings or get_settings()
    private, public = settings.signing_key, settings.signing_key.with_suffix(".pub")
    if settings.signing_mode is SigningMode.verify_only:
        # A deployment that only verifies holds public keys; a private key made here would be one to guard.
        raise SignatureError(
            "RELEASEGATE_SIGNING_MODE=verify-only: this deployment makes no signing key; make the pair where "
            "models are built (`releasegate keys generate`) and trust its public key here (RELEASEGATE_TRUSTED_KEYS)"
        )
    if private.exists():
        return private, public
    if public.exists():
        raise SignatureError(
            f"{public} exists but its private key {private} does not; refusing to replace a public key others may trust"
        )
    try:
        _write_key_pair(private, public)
    except FileExistsError:  # another process made the pair first
        pass
    if public not in settings.trusted_keys:
        log.warning("signing key %s: its public key %s is not among the trusted keys", private, public)
    return private, public


def sign_directory(model_dir: str | Path, signature_path: str | Path, private_key: str | Path) -> str:
    """Sign every file of `model_dir` into the bundle at `signature_path`; returns the bundle's digest."""
    from model_signing import signing

    model_dir, signature_path, private_key = Path(model_dir), Path(signature_path), Path(private_key)
    if not model_dir.is_dir():
        raise SignatureError(f"cannot sign {model_dir}: not a directory")
    if not private_key.is_file():
        raise SignatureError(f"no signing key at {private_key} (create one with `releasegate keys generate`)")
    signature_path.parent.mkdir(parents=True, exist_ok=True)
    config = signing.Config()  # type: ignore[no-untyped-call]  # model-signing's __init__ lacks "-> None"
    config.use_elliptic_key_signer(private_key=private_key).set_hashing_config(_hashing()).sign(
        model_dir, signature_path
    )
    return bundle_digest(signature_path)


def verify_directory(
    model_dir: str | Path, signature_path: str | Path, trusted_keys: list[Path], trusted_ca: list[Path] | None = None
) -> None:
    """Pass if any trusted public key verifies `model_dir` against the bundle; else a SignatureError saying why.

    A bundle made in certificate mode is verified against `trusted_ca` instead (verify_directory_with_ca).
    """
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    model_dir, signature_path = Path(model_dir), Path(signature_path)
    if not signature_path.is_file():
        raise NotSignedError(f"no signature bundle at {signature_path}")
    if not model_dir.is_dir():
        raise SignatureError(f"cannot verify {model_dir}: not a directory")
    if _bundle_certificates(signature_path):
        verify_directory_with_ca(model_dir, signature_path, trusted_ca or [])
        return
    if not trusted_keys:
        raise SignatureError("no trusted public keys are configured (RELEASEGATE_TRUSTED_KEYS)")
    fingerprints = {Path(key): _fingerprint(Path(key)) for key in trusted_keys}
    hint = _bundle_key_hint(signature_path)
    # The bundle names its key by fingerprint; a bundle without one (older format) is tried with every key.
    candidates = [key for key, print_ in fingerprints.items() if hint is None or print_ == hint]
    if hint is not None and not candidates:
        raise UntrustedKeyError(
            f"the signing key sha256:{hint[:16]}… is not among the {len(fingerprints)} "
            f"trusted key(s) ({', '.join(key.name for key in fingerprints)})"
        )
    failures: list[tuple[Path, str | None]] = []
    for key in candidates:
        config = verifying.Config()  # type: ignore[no-untyped-call]  # model-signing's __init__ lacks "-> None"
        config = config.use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing())
        try:
            config.verify(model_dir, signature_path)
            return
        except InvalidSignature:
            failures.append((key, None))
        except Exception as err:  # the library reports a file mismatch as ValueError, a broken bundle otherwise
            failures.append((key, _describe(err)))
    content_errors = [message for _, message in failures if message]
    if content_errors:
        raise SignatureMismatchError(content_errors[0])
    if hint is None:
        raise UntrustedKeyError(f"none of the {len(fingerprints)} trusted key(s) made this signature")
    # The key is ours but its signature over the payload does not hold: the bundle itself was edited.
    raise SignatureMismatchError(
        f"the bundle's signature does not verify with {candidates[0].name} (the bundle was altered)"
    )


def sign_directory_with_certificate(
    model_dir: str | Path,
    signature_path: str | Path,
    private_key: str | Path,
    signing_certificate: str | Path,
    certificate_chain: list[Path] | None = None,
) -> str:
    """Sign `model_dir` in certificate mode: the bundle carries `signing_certificate` and its chain; returns its digest.

    The key must be the certificate's (elliptic curve); the chain is the issuing CA's certificate and
    any intermediates (model-signing needs at least one).
    """
    from model_signing import signing

    model_dir, signature_path = Path(model_dir), Path(signature_path)
    private_key, signing_certificate = Path(private_key), Path(signing_certificate)
    chain = [Path(c) for c in certificate_chain or []]
    if not model_dir.is_dir():
        raise SignatureError(f"cannot sign {model_dir}: not a directory")
    for what, path in (("signing key", private_key), ("signing certificate", signing_certificate)):
        if not path.is_file():
            raise SignatureError(f"no {what} at {path}")
    if not chain:
        raise SignatureError(
            "certificate mode needs the certificate chain: the issuing CA's certificate and any intermediates"
        )
    for path in chain:
        if not path.is_file():
            raise SignatureError(f"certificate chain file {path} does not exist")
    signature_path.parent.mkdir(parents=True, exist_ok=True)
    config = signing.Config()  # type: ignore[no-untyped-call]  # model-signing's __init__ lacks "-> None"
    try:
        config.use_certificate_signer(
            private_key=private_key, signing_certificate=signing_certificate, certificate_chain=chain
        )
    except (ValueError, TypeError) as err:  # a key that is not the certificate's, not EC, or not PEM
        raise SignatureError(f"cannot sign with {signing_certificate.name} and {private_key.name}: {err}") from err
    config.set_hashing_config(_hashing()).sign(model_dir, signature_path)
    return bundle_digest(signature_path)


def verify_directory_with_ca(model_dir: str | Path, signature_path: str | Path, trusted_ca: list[Path]) -> None:
    """Pass if the bundle's certificate chains to a trusted CA, may sign code, and its key signed `model_dir`."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying
    from OpenSSL import crypto

    model_dir, signature_path = Path(model_dir), Path(signature_path)
    if not signature_path.is_file():
        raise NotSignedError(f"no signature bundle at {signature_path}")
    # model-signing falls back to the operating system's web roots when given no CA: never let it.
    if not trusted_ca:
        raise SignatureError(
            "the model is signed with a certificate, but no trusted CA is configured (RELEASEGATE_TRUSTED_CA)"
        )
    for ca in trusted_ca:
        if not Path(ca).is_file():
            raise SignatureError(f"trusted CA file {ca} does not exist")
    chain = _bundle_certificates(signature_path)
    if not chain:
        raise UntrustedCertificateError("the bundle carries no certificate (it was signed with a bare key)")
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
    except ValueError as err:
        raise SignatureMismatchError(f"the bundle's signing certificate is not readable: {err}") from err
    subject = leaf.subject.rfc4514_string()
    _require_code_signing(leaf, subject)
    config = verifying.Config()  # type: ignore[no-untyped-call]  # model-signing's __init__ lacks "-> None"
    try:
        config.use_certificate_verifier(certificate_chain=[Path(ca) for ca in trusted_ca])
    except ValueError as err:
        raise SignatureError(f"a trusted CA file is not PEM certificates: {err}") from err
    try:
        config.set_hashing_config(_hashing()).verify(model_dir, signature_path)
    except crypto.X509StoreContextError as err:
        raise UntrustedCertificateError(
            f"the signing certificate {subject} does not chain to a trusted CA "
            f"({', '.join(Path(ca).name for ca in trusted_ca)}): {err}"
        ) from err
    except InvalidSignature as err:
        raise SignatureMismatchError(
            f"the bundle's signature does not verify with its certificate {subject} (the bundle was altered)"
        ) from err
    except Exception as err:  # the library reports a file mismatch as ValueError, a broken bundle otherwise
        raise SignatureMismatchError(_describe(err)) from err


def bundle_digest(signature_path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(signature_path).read_bytes()).hexdigest()


def is_signed(model: str, version: str | int, settings: Settings | None = None) -> bool:
    """Whether the version has a signature bundle (valid or not: fetch_verified says that)."""
    return registry.has_artifact(model, version, BUNDLE_ARTIFACT, settings=settings)


_MINT = object()  # only this module holds it, so only this module makes a VerifiedModel


@dataclass(frozen=True)
class VerifiedModel:
    """A version's model directory whose every file a trusted key's signature covers: the only thing loaded.

    `registry.load_pyfunc` takes nothing else, and only `fetch_verified` (below) makes one, after it
    verified the very directory it returns.
    """

    model: str
    version: str
    path: Path
    digest: str  # the signature bundle's sha256
    mint: InitVar[object]

    def __post_init__(self, mint: object) -> None:
        if mint is not _MINT:
            raise TypeError("a VerifiedModel comes from releasegate.signing.fetch_verified, which verifies it")

    def remove(self) -> None:
        """Delete the directory (a cache entry no longer served)."""
        shutil.rmtree(self.path, ignore_errors=True)


def fetch_verified(
    model: str, version: str | int, settings: Settings | None = None, parent: Path | None = None
) -> VerifiedModel:
    """Download the version into a fresh directory (of `parent`, default the model cache) and verify it.

    On any failure the directory is removed, so nothing unverified is left to load. Raises
    SignatureError (unsigned, tampered, untrusted key) and registry.RegistryError (no such version).
    """
    settings = settings or get_settings()
    version = registry.resolve_version(model, version, settings=settings)
    parent = parent or settings.model_cache_dir / _path_safe(model)
    parent.mkdir(parents=True, exist_ok=True)
    # A fresh directory per fetch: a re-download (maybe of a changed artifact) never mixes with a verified copy.
    target = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=parent))
    digest = _download_and_verify(model, version, target, settings)
    return VerifiedModel(model, version, target, digest, _MINT)


def _download_and_verify(model: str, version: str, dst: Path, settings: Settings) -> str:
    label = f"{model} v{version}"
    try:
        if not is_signed(model, version, settings):
            raise NotSignedError(f"{label} is not signed")
        with tempfile.TemporaryDirectory(prefix="rg-bundle-") as tmp:
            bundle = registry.download_artifact(model, version, BUNDLE_ARTIFACT, dst=tmp, settings=settings)
            registry.download_model(model, version, dst, settings=settings)
            try:
                verify_directory(dst, bundle, settings.trusted_keys, settings.trusted_ca)
            except NotSignedError as err:
                raise NotSignedError(f"{label} is not signed") from err
            except UntrustedKeyError as err:  # or UntrustedCertificateError, kept as such
                raise type(err)(f"{label} is signed by a key that is not trusted: {err}") from err
            except SignatureMismatchError as err:
                raise SignatureMismatchError(
                    f"signature verification failed for {label} (artifact changed after signing?): {err}"
                ) from err
            except SignatureError as err:
                raise SignatureError(f"cannot verify {label}: {err}") from err
            digest = bundle_digest(bundle)
            recorded = registry.get_version_tags(model, version, settings=settings).get(DIGEST_TAG)
            if recorded and recorded != digest:
                # A bundle that verifies, but not this version's: another version's files and bundle copied here.
                raise SignatureMismatchError(
                    f"{label}'s signature bundle ({digest}) is not the one recorded when it was signed ({recorded}): "
                    "its files were replaced, maybe by another signed version's"
                )
            return digest
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def sign_version(
    model: str, version: str | int, settings: Settings | None = None, *, signed_before: str | None = None
) -> str:
    """Sign a registered version and store the bundle; returns its digest. A signed version is verified instead.

    Never re-signs: signing again would launder an artifact changed after the first signature, and
    a version that was signed once (its digest tag says so, or `signed_before`: the digest the audit
    log recorded, which survives someone deleting the tag too) but lost its bundle is refused, not
    signed anew. In `verify-only` mode an unsigned version is refused, whatever key files exist; with
    `signing_certificate` set it is signed in certificate mode.
    """
    settings = settings or get_settings()
    version = registry.resolve_version(model, version, settings=settings)
    label = f"{model} v{version}"
    recorded = registry.get_version_tags(model, version, settings=settings).get(DIGEST_TAG) or signed_before
    with tempfile.TemporaryDirectory(prefix="rg-sign-") as tmp:
        if is_signed(model, version, settings):
            digest = _download_and_verify(model, version, Path(tmp) / "model", settings)
        elif recorded:
            raise SignatureMismatchError(
                f"{label} was signed ({recorded}) but its signature bundle is gone: "
                f"refusing to sign it again, since its files may have changed since"
            )
        else:
            sign_where_built = f"sign it where the model is built (`releasegate sign models:/{model}/{version}`)"
            if settings.signing_mode is SigningMode.verify_only:
                raise NotSignedError(
                    f"{label} is not signed, and this deployment only verifies (RELEASEGATE_SIGNING_MODE="
                    f"verify-only): {sign_where_built}, then release it again"
                )
            if not settings.signing_key.is_file():
                raise NotSignedError(
                    f"{label} is not signed, and there is no signing key at {settings.signing_key}: "
                    f"{sign_where_built}, then release it again"
                )
            model_dir = registry.download_model(model, version, Path(tmp) / "model", settings=settings)
            bundle = Path(tmp) / BUNDLE
            if settings.signing_certificate:
                digest = sign_directory_with_certificate(
                    model_dir,
                    bundle,
                    settings.signing_key,
                    settings.signing_certificate,
                    settings.signing_certificate_chain,
                )
            else:
                digest = sign_directory(model_dir, bundle, settings.signing_key)
            try:
                verify_directory(model_dir, bundle, settings.trusted_keys, settings.trusted_ca)
            except SignatureError as err:
                # Caught now rather than at deployment: a bundle nobody trusts must not be stored as "signed".
                raise SignatureError(
                    f"signed {label} with {settings.signing_key}, but the trusted keys do not accept it: {err}"
                ) from err
            registry.log_artifact(model, version, bundle, artifact_path="releasegate", settings=settings)
            log.info("signed %s (bundle %s)", label, digest)
    if signed_before and signed_before != digest:
        raise SignatureMismatchError(
            f"{label} was signed as {signed_before} (the audit log says so), but its signature now is {digest}: "
            "refusing a version whose signature was replaced"
        )
    if recorded != digest:  # no tag yet (a version signed before tags were kept, or just now)
        registry.set_version_tags(model, version, {DIGEST_TAG: digest}, settings=settings)
    return digest


def _path_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _hashing() -> hashing.Config:
    from model_signing import hashing

    # model-signing does not skip a bundle inside the model folder by itself. Git files are not skipped
    # either: every file MLflow could load must be covered.
    config = hashing.Config()  # type: ignore[no-untyped-call]  # model-signing's __init__ lacks "-> None"
    return config.use_file_serialization().set_ignored_paths(paths=[BUNDLE], ignore_git_paths=False)


def _fingerprint(public_key: Path) -> str:
    """sha256 of the key's SubjectPublicKeyInfo PEM: how model-signing names the key inside the bundle."""
    from cryptography.hazmat.primitives import serialization

    if not public_key.is_file():
        raise SignatureError(f"trusted public key {public_key} does not exist")
    try:
        key = serialization.load_pem_public_key(public_key.read_bytes())
    except ValueError as err:
        raise SignatureError(f"trusted key {public_key} is not a PEM public key: {err}") from err
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _bundle_material(signature_path: Path) -> dict[str, Any]:
    try:
        bundle = json.loads(signature_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SignatureMismatchError(f"the signature bundle {signature_path.name} is not readable: {err}") from err
    material = bundle.get("verificationMaterial", {}) if isinstance(bundle, dict) else {}
    return material if isinstance(material, dict) else {}


def _bundle_key_hint(signature_path: Path) -> str | None:
    return (_bundle_material(signature_path).get("publicKey") or {}).get("hint") or None


def _bundle_certificates(signature_path: Path) -> list[bytes]:
    """The DER certificates of a certificate-mode bundle, signing certificate first; [] for a key-mode bundle."""
    chain = _bundle_material(signature_path).get("x509CertificateChain") or {}
    try:
        return [base64.b64decode(cert["rawBytes"]) for cert in chain.get("certificates") or []]
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # a bundle edited into another shape
        raise SignatureMismatchError(f"the signature bundle's certificate chain is not readable: {err}") from err


def _require_code_signing(certificate: x509.Certificate, subject: str) -> None:
    """model-signing accepts any certificate with digitalSignature; a CA's TLS certificates must not sign models."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CODE_SIGNING not in usages:
        raise UntrustedCertificateError(
            f"the signing certificate {subject} is not for code signing (extended key usage)"
        )


def _describe(err: Exception) -> str:
    """Which files differ, from model-signing's mismatch message (whose digests print as raw bytes)."""
    text = str(err)
    if not isinstance(err, ValueError):
        return f"{type(err).__name__}: {text}"[:500]
    parts = []
    # The differences arrive inside a list's repr, so their quotes may be backslash-escaped.
    for label, pattern in (
        ("changed", r"Hash mismatch for \\?'([^'\\]+)"),
        ("added", r"Extra files found in model \\?'[^']*\\?': ([^\"'\\\]]+)"),
        ("missing", r"Missing files in model \\?'[^']*\\?': ([^\"'\\\]]+)"),
    ):
        found = re.findall(pattern, text)
        if found:
            parts.append(f"{label}: {', '.join(found)}")
    return "; ".join(parts) if parts else text[:500]


def _write_key_pair(private: Path, public: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    private.parent.mkdir(parents=True, exist_ok=True)
    public.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    # O_EXCL: two processes creating the default pair at once must not interleave their writes.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public
