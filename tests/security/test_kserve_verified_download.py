"""KServe path: a predictor serves only files that verify where they were downloaded.

releasegate verifies a temporary copy when it publishes a version; between then and a pod's start the
bucket can change. So each predictor's storage initializer is releasegate's own (`python -m
releasegate.serving.verify_dir`): it downloads the files into the model server's volume and verifies
them against the bundle whose digest the InferenceService names. These tests run that entry point on
real signed model directories, then play a whole rollout: the FAKE Kubernetes API (the project's only
fake) plays the kubelet by running the rendered init container's own command here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from releasegate import k8s, registry, signing
from releasegate.backends import DeploymentError
from releasegate.backends.kserve import KServeBackend
from tests.integration.kserve_fake_api import FakeKubernetes, Kubelet
from tests.unit.mlflow_store import MODEL, classifier, migrated_mlflow_db, register, store  # noqa: F401  (fixtures)


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _signed_version(settings, classifier) -> tuple[str, k8s.Served, str]:
    """A new signed version: (version, where it is published, the bundle's digest)."""
    version = register(settings, classifier)
    digest = signing.sign_version(MODEL, version, settings)
    return version, _published(version), digest


def _published(version: str) -> k8s.Served:
    from releasegate.backends.kserve import verified_version

    return verified_version(MODEL, version, k8s.K8sSettings(namespace="models"))


def _trust_secret(settings, directory: Path) -> Path:
    """The trusted keys as a mounted Secret looks: each key a symlink into a hidden `..data` directory."""
    data = directory / "..data"
    data.mkdir(parents=True)
    for key in settings.trusted_keys:
        shutil.copy(key, data / key.name)
        (directory / key.name).symlink_to(data / key.name)
    return directory


def _verify_dir(*args: str | Path, termination_log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "releasegate.serving.verify_dir", *map(str, args), "--termination-log", termination_log],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def signed(store, classifier, tmp_path):
    """A signed version downloaded as a pod would get it: (model directory, bundle, digest, trust directory)."""
    version, _, digest = _signed_version(store, classifier)
    model_dir = registry.download_model(MODEL, version, tmp_path / "model", settings=store)
    bundle = registry.download_artifact(
        MODEL, version, signing.BUNDLE_ARTIFACT, dst=tmp_path / "bundle", settings=store
    )
    return Path(model_dir), Path(bundle), digest, _trust_secret(store, tmp_path / "trust")


def test_the_storage_initializer_passes_a_signed_model_directory(signed, tmp_path):
    model_dir, bundle, digest, trust = signed
    out = _verify_dir(
        "--model-dir", model_dir, "--bundle", bundle, "--expect-digest", digest, "--trust-dir", trust,
        termination_log=tmp_path / "termination-log",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"{model_dir} verified against {digest}" in out.stdout
    assert not (tmp_path / "termination-log").exists()


def _serialized(model_dir: Path) -> Path:
    """The file holding the fitted model (`model.pkl`, `model.skops`, ... by MLflow's flavour)."""
    return next(p for p in model_dir.iterdir() if p.name.startswith("model."))


def _flip_a_byte(model_dir: Path) -> str:
    target = _serialized(model_dir)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return f"changed: {target.name}"


def _add_a_file(model_dir: Path) -> str:
    (model_dir / "sitecustomize.py").write_text("import os")
    return "added: sitecustomize.py"


def _remove_a_file(model_dir: Path) -> str:
    (model_dir / "MLmodel").unlink()
    return "missing: MLmodel"


@pytest.mark.parametrize("tamper", [_flip_a_byte, _add_a_file, _remove_a_file], ids=["changed", "added", "removed"])
def test_the_storage_initializer_refuses_a_tampered_model_directory(signed, tmp_path, tamper):
    model_dir, bundle, digest, trust = signed
    reason = tamper(model_dir)
    out = _verify_dir(
        "--model-dir", model_dir, "--bundle", bundle, "--expect-digest", digest, "--trust-dir", trust,
        termination_log=tmp_path / "termination-log",
    )  # fmt: skip
    assert out.returncode == 1
    # The termination message is what KServe reports as the revision's failure.
    assert reason in (tmp_path / "termination-log").read_text()


def test_the_storage_initializer_refuses_a_key_it_does_not_trust(signed, tmp_path):
    model_dir, bundle, digest, _ = signed
    _, other = signing.generate_keys(tmp_path / "other")
    trust = tmp_path / "other-trust"
    trust.mkdir()
    shutil.copy(other, trust / "other.pub")
    out = _verify_dir(
        "--model-dir", model_dir, "--bundle", bundle, "--expect-digest", digest, "--trust-dir", trust,
        termination_log=tmp_path / "termination-log",
    )  # fmt: skip
    assert out.returncode == 1
    assert "is not among the 1 trusted key(s) (other.pub)" in (tmp_path / "termination-log").read_text()


def test_another_signed_versions_files_and_bundle_are_refused(store, classifier, tmp_path):
    """Whoever can write the bucket can copy an older signed version over the published one: both verify, but
    the bundle is not the one the InferenceService names."""
    _, old, _ = _signed_version(store, classifier)
    _, _, published_digest = _signed_version(store, classifier)
    trust = _trust_secret(store, tmp_path / "trust")
    old_dir, old_bundle = _local(old.storage_uri), _local(old.bundle_uri)
    out = _verify_dir(
        "--model-dir", old_dir, "--bundle", old_bundle, "--expect-digest", published_digest, "--trust-dir", trust,
        termination_log=tmp_path / "termination-log",
    )  # fmt: skip
    assert out.returncode == 1
    assert "the signature bundle is not the one releasegate published" in (tmp_path / "termination-log").read_text()


def test_a_download_tampered_after_publication_never_becomes_ready(store, classifier, tmp_path):
    """The release verified v2 and published it; then its stored pickle changed. The pod's storage initializer
    refuses the files it downloaded, the revision fails, the readiness wait fails the release, nothing stays."""
    champion, *_ = _signed_version(store, classifier)
    candidate, published, _ = _signed_version(store, classifier)
    candidate_dir = _local(published.storage_uri)
    kubelet = Kubelet(tmp_path / "kubelet", secrets={"releasegate-trust": _trust_secret(store, tmp_path / "trust")})
    fake = FakeKubernetes(ready_after=1, kubelet=kubelet).start()
    settings = k8s.K8sSettings(namespace="models", poll_seconds=0.05, ready_timeout=120)
    try:
        backend = KServeBackend(fake.api_client(), settings)
        route = backend.set_route(MODEL, champion)  # the champion's pod verified its download and serves
        assert route.status["churn"]["ready"] == "True"
        assert kubelet.runs[-1]["exit"] == 0 and "MLmodel" in kubelet.runs[-1]["files"]

        deferred = KServeBackend(fake.api_client(), settings, wait_ready=False)
        applied = deferred.set_route(MODEL, champion, candidate, "canary", 50)  # verified at publication
        storage_uri = _published(candidate).storage_uri
        changed = _flip_a_byte(candidate_dir)  # ... then its stored model changed
        ready = deferred.readiness(applied.readiness.targets)  # the new revision's pod starts

        assert ready.state == "failed"
        assert ready.message.startswith("InferenceService churn: BlockedByFailedLoad: ModelLoadFailed - ")
        # The storage initializer's own termination message.
        assert f"refusing to serve {storage_uri}: {changed}" in ready.message
        refused = kubelet.runs[-1]
        assert refused["exit"] == 1 and refused["files"] == []  # nothing unverified left for a model server
        # KServe keeps the traffic on the champion's revision, the only one ever ready.
        assert ready.status["churn"]["latestReadyRevision"] == route.status["churn"]["latestReadyRevision"]
        assert ready.status["churn"]["traffic"] == [
            {"revision": ready.status["churn"]["latestReadyRevision"], "percent": 100}
        ]
        with pytest.raises(DeploymentError, match=f"BlockedByFailedLoad: ModelLoadFailed - .*{changed}"):
            backend.set_route(MODEL, champion, candidate, "canary", 50)
    finally:
        fake.stop()
