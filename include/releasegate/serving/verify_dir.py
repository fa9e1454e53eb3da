"""The predictor's storage initializer: fetch a version's files and its signature bundle, verify them, or fail.

KServe runs this as each InferenceService's `storage-initializer` init container (see
include/k8s/inferenceservice.yaml.j2): it downloads the files into the volume the model server
then mounts read-only, and checks them as `releasegate verify` does (model-signing bundle, trusted
keys or CA certificates from a mounted Secret). The bundle must also be the very one releasegate
verified when it published the version (`--expect-digest`), so a bucket writer cannot swap in the
files and bundle of another signed version. Any refusal exits non-zero with the reason in the
termination message: the model server never starts and KServe reports the revision as failed.

    python -m releasegate.serving.verify_dir --storage-uri s3://mlflow/1/<run>/artifacts/model \\
        --bundle-uri s3://mlflow/1/<run>/artifacts/releasegate/model.sig --expect-digest sha256:... \\
        --model-dir /mnt/models --trust-dir /etc/releasegate/trust

With `--bundle` instead of `--bundle-uri` it verifies a directory already on disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from releasegate import signing

TERMINATION_LOG = Path("/dev/termination-log")
_MESSAGE_LIMIT = 4096  # what the kubelet keeps of a termination message
_STAGING = ".releasegate-download"


class DownloadError(signing.SignatureError):
    """The files or the bundle could not be fetched: nothing was verified, so nothing may be served."""


def trust_material(trust_dir: Path) -> tuple[list[Path], list[Path]]:
    """(trusted public keys, trusted CA certificates) of a mounted Secret: `*.crt` files are CA certificates."""
    if not trust_dir.is_dir():
        raise signing.SignatureError(f"no trust material at {trust_dir} (is the Secret mounted?)")
    # A mounted Secret's files are symlinks into hidden `..data` directories: the dot skips those.
    files = sorted(p for p in trust_dir.iterdir() if not p.name.startswith(".") and p.is_file())
    return [p for p in files if p.suffix != ".crt"], [p for p in files if p.suffix == ".crt"]


def verify_dir(model_dir: Path, bundle: Path, trust_dir: Path, expect_digest: str) -> str:
    """Pass when `bundle` is the published one and a trusted key or CA verifies every file of `model_dir` with it.

    Returns the bundle's digest; raises signing.SignatureError (or a subclass) saying why not.
    """
    if not bundle.is_file():
        raise signing.NotSignedError(f"no signature bundle at {bundle}")
    digest = signing.bundle_digest(bundle)
    if digest != expect_digest:
        raise signing.SignatureMismatchError(
            f"the signature bundle is not the one releasegate published (it is {digest}, the InferenceService "
            f"names {expect_digest}): the stored bundle was replaced"
        )
    keys, cas = trust_material(trust_dir)
    signing.verify_directory(model_dir, bundle, keys, trusted_ca=cas)
    return digest


def download(storage_uri: str, bundle_uri: str, model_dir: Path, scratch: Path) -> Path:
    """Fetch the bundle into `scratch` and the version's files into `model_dir` (emptied first); returns the bundle."""
    import mlflow

    try:
        bundle = Path(mlflow.artifacts.download_artifacts(artifact_uri=bundle_uri, dst_path=str(scratch)))
    except Exception as err:  # MLflow raises its own, boto3's or OSError by store: all mean "not fetched"
        raise DownloadError(f"could not download the signature bundle {bundle_uri}: {err}") from err
    model_dir.mkdir(parents=True, exist_ok=True)
    _empty(model_dir)
    # Staged inside the volume (a mount point, so it cannot be replaced whole), then moved up by rename.
    staging = model_dir / _STAGING
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=storage_uri, dst_path=str(staging)))
    except Exception as err:
        _empty(model_dir)
        raise DownloadError(f"could not download the model files {storage_uri}: {err}") from err
    if not local.is_dir():
        _empty(model_dir)
        raise DownloadError(f"{storage_uri} is a file, not a model directory")
    for child in list(local.iterdir()):
        child.rename(model_dir / child.name)
    shutil.rmtree(staging)
    return bundle


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _report(message: str, termination_log: Path) -> None:
    print(f"releasegate storage initializer: REFUSED: {message}", file=sys.stderr)
    try:
        termination_log.write_text(message[:_MESSAGE_LIMIT])
    except OSError:  # not in a pod: stderr has it
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m releasegate.serving.verify_dir", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="the model server's directory")
    parser.add_argument("--trust-dir", type=Path, required=True, help="trusted public keys and `*.crt` CAs")
    parser.add_argument("--expect-digest", required=True, help="sha256:… of the bundle releasegate published")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="a bundle on disk: verify --model-dir as it is")
    source.add_argument("--bundle-uri", help="download the bundle (and, with --storage-uri, the files) first")
    parser.add_argument("--storage-uri", help="where the version's files are (MLflow artifact URI)")
    parser.add_argument("--termination-log", type=Path, default=TERMINATION_LOG)
    args = parser.parse_args(argv)
    if args.bundle_uri and not args.storage_uri:
        parser.error("--bundle-uri needs --storage-uri")
    with tempfile.TemporaryDirectory(prefix="rg-bundle-") as scratch:
        try:
            bundle = args.bundle or download(args.storage_uri, args.bundle_uri, args.model_dir, Path(scratch))
            digest = verify_dir(args.model_dir, bundle, args.trust_dir, args.expect_digest)
        except signing.SignatureError as err:
            if args.bundle_uri and args.model_dir.is_dir():
                _empty(args.model_dir)  # nothing unverified stays where a model server could read it
            _report(f"refusing to serve {args.storage_uri or args.model_dir}: {err}", args.termination_log)
            return 1
    print(f"releasegate storage initializer: {args.model_dir} verified against {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
