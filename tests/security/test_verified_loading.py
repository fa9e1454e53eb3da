"""Hole 1, unverified code execution next to the signing key: only the bytes a signature covers are ever loaded.

The attack: whoever can write the artifact store edits a version's stored model so that loading it unpickles
a payload (here one that writes a marker file). At 674b38f the release validated the candidate, and the
nightly evaluation scored the champion, from a fresh download that nothing verified, so the payload ran in
the worker that holds the signing key; the sign step downloaded the model a second time, so the bytes it
signed were not the bytes validation had run; and deleting a signed version's bundle made it signable again.
Here the payload never runs and each attack ends in a refusal.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from releasegate import pipeline, registry, release, signing
from tests.unit.mlflow_store import MODEL, classifier, migrated_mlflow_db, register, store, stored_model_dir  # noqa: F401  (fixtures)


class _Payload:
    """A pickle that runs code when it is loaded: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def plant_payload(model_dir: Path, marker: Path) -> None:
    """What the attacker does to a stored model: its sklearn flavour now loads `model.pkl`, a payload."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    sklearn_flavour, pyfunc = mlmodel["flavors"]["sklearn"], mlmodel["flavors"]["python_function"]
    (model_dir / sklearn_flavour["pickled_model"]).unlink()
    (model_dir / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    sklearn_flavour.update(pickled_model="model.pkl", serialization_format="cloudpickle")
    pyfunc["model_path"] = "model.pkl"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _stored_bundle(settings, version: str, model: str = MODEL) -> Path:
    run = registry.client(settings).get_run(registry.source_run(model, version, settings))
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / signing.BUNDLE_ARTIFACT


@pytest.fixture
def released(store, classifier):
    """A signed champion and a signed candidate with its labelled holdout, as a release validates them."""
    champion, candidate = register(store, classifier), register(store, classifier)
    for version in (champion, candidate):
        signing.sign_version(MODEL, version, store)
    registry.client(store).set_registered_model_tag(MODEL, "releasegate.label", "label")
    estimator, frame = classifier
    holdout = frame.assign(label=estimator.predict(frame))
    path = store.home / "holdout.parquet"
    holdout.to_parquet(path)
    registry.log_artifact(MODEL, candidate, path, artifact_path="releasegate", settings=store)
    return champion, candidate, holdout


@pytest.mark.parametrize("load_path", ["offline validation", "nightly evaluation"])
def test_a_model_changed_after_signing_is_refused_before_its_payload_runs(store, released, load_path):
    champion, candidate, holdout = released
    marker = store.home / "payload-ran"
    target = candidate if load_path == "offline validation" else champion
    plant_payload(stored_model_dir(store, target), marker)

    outcome: object
    try:
        if load_path == "offline validation":
            from releasegate import validation

            outcome = validation.validate_candidate(MODEL, candidate, champion, "default", settings=store)
        else:
            from releasegate import nightly

            outcome = nightly._scored_holdout(MODEL, champion, holdout, store)  # the nightly run's one model load
    except Exception as err:
        outcome = err

    assert not marker.exists(), f"{load_path} unpickled {MODEL} v{target}'s changed files: the payload ran"
    if load_path == "offline validation":
        assert not outcome.passed
        assert any("signature verification failed" in reason for reason in outcome.reasons), outcome.reasons
    else:
        assert isinstance(outcome, signing.SignatureMismatchError), outcome


def test_a_version_whose_bundle_was_deleted_after_signing_is_refused_not_signed_again(store, classifier):
    version = register(store, classifier)
    digest = signing.sign_version(MODEL, version, store)
    marker = store.home / "payload-ran"
    plant_payload(stored_model_dir(store, version), marker)
    _stored_bundle(store, version).unlink()  # the evidence goes with the change

    with pytest.raises(signing.SignatureError, match="signature bundle is gone"):
        signing.sign_version(MODEL, version, store)  # what the release's sign step calls

    assert not signing.is_signed(MODEL, version, store), "the changed files were signed anew"
    assert registry.get_version_tags(MODEL, version, settings=store)[signing.DIGEST_TAG] == digest
    assert not marker.exists()


def test_one_signed_versions_files_and_bundle_copied_over_another_are_refused(store, classifier):
    """Whoever writes the artifact store copies version A (signed, verifiable) over version B: B's own
    recorded digest does not match, so B is refused rather than served as A's bytes."""
    import shutil

    first = register(store, classifier)
    estimator, frame = classifier
    second = register(store, (estimator, frame.assign(**{frame.columns[0]: frame[frame.columns[0]] * 2})))
    signing.sign_version(MODEL, first, store)
    recorded = signing.sign_version(MODEL, second, store)
    target = stored_model_dir(store, second)
    shutil.rmtree(target)
    shutil.copytree(stored_model_dir(store, first), target)
    shutil.copyfile(_stored_bundle(store, first), _stored_bundle(store, second))

    with pytest.raises(signing.SignatureMismatchError, match="not the one recorded when it was signed"):
        signing.fetch_verified(MODEL, second, store)
    with pytest.raises(signing.SignatureMismatchError):
        signing.sign_version(MODEL, second, store)
    assert registry.get_version_tags(MODEL, second, settings=store)[signing.DIGEST_TAG] == recorded


# --- the release's own steps: what validation runs is what the signature covers --------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's champion (signed by an earlier release, aliased) and its good and bad candidates (unsigned)."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("rg-verified-loading")
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from releasegate.demo import models
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        versions = models.register_demo_models(settings, model_name=MODEL)
        signing.sign_version(MODEL, versions["champion"], settings)
        yield settings, versions


@pytest.fixture
def demo_release(demo, tmp_path, monkeypatch):
    """The demo's store, with a release database of this test's own (one release per model at a time)."""
    from releasegate import storage

    settings, versions = demo
    monkeypatch.setenv("RELEASEGATE_DB_URL", f"sqlite:///{tmp_path}/releasegate.db")
    monkeypatch.setenv("RELEASEGATE_AUDIT_HEAD", str(tmp_path / "audit-head.json"))
    yield settings, versions
    storage.dispose_all()


def _open(settings, candidate: str) -> str:
    pipeline.start(MODEL, candidate)
    return registry.get_version_tags(MODEL, candidate, settings=settings)["releasegate.release_id"]


def _run_sign_and_validate(release_id: str, between=None) -> None:
    """The release's sign and validate steps, in the order its state machine takes them (a step it is not at is
    skipped); `between` runs once, right after the first step that moved the release."""
    for step in (pipeline.sign, pipeline.validate, pipeline.sign):
        before = release.get(release_id).state
        step(release_id)
        if between is not None and release.get(release_id).state != before:
            between()
            between = None


def _signed_by(settings, directory: Path, versions) -> str | None:
    """Which of `versions` has a stored bundle that verifies `directory` now; None if none does."""
    for version in versions:
        if not signing.is_signed(MODEL, version, settings):
            continue
        with tempfile.TemporaryDirectory(prefix="rg-test-bundle-") as tmp:
            bundle = registry.download_artifact(MODEL, version, signing.BUNDLE_ARTIFACT, dst=tmp, settings=settings)
            try:
                signing.verify_directory(directory, bundle, settings.trusted_keys)
            except signing.SignatureError:
                continue
        return version
    return None


def test_validation_loads_only_files_the_stored_signature_covers(demo_release, monkeypatch):
    settings, versions = demo_release
    candidate = versions["good"]
    loads: list[str | None] = []
    load_pyfunc = registry.load_pyfunc

    def checked_load(verified, *args, **kwargs):
        # At the moment of loading: which stored bundle covers the very directory being loaded?
        loads.append(_signed_by(settings, Path(getattr(verified, "path", verified)), [candidate, versions["champion"]]))
        return load_pyfunc(verified, *args, **kwargs)

    monkeypatch.setattr(registry, "load_pyfunc", checked_load)
    _run_sign_and_validate(_open(settings, candidate))

    assert None not in loads, f"validation loaded files no stored signature covered (loads: {loads})"
    assert candidate in loads, f"validation never ran the candidate (loads: {loads})"


def test_files_swapped_between_the_sign_and_validate_steps_are_never_run_nor_signed(demo_release):
    settings, versions = demo_release
    candidate = versions["bad"]
    marker = settings.home / "payload-ran"
    release_id = _open(settings, candidate)

    _run_sign_and_validate(release_id, between=lambda: plant_payload(stored_model_dir(settings, candidate), marker))

    assert not marker.exists(), "the swapped files were unpickled"
    # What was signed is what validation ran: the files the store holds now carry no signature.
    with pytest.raises(signing.SignatureMismatchError):
        signing.verify_directory(
            stored_model_dir(settings, candidate), _stored_bundle(settings, candidate), settings.trusted_keys
        )
    rel = release.get(release_id)
    assert rel.state is release.State.rejected, rel.state
    assert "signature verification failed" in " ".join(rel.reasons), rel.reasons


def test_deleting_the_bundle_and_the_digest_tag_does_not_make_a_released_version_signable_again(demo_release):
    """With registry write access the attacker also deletes the digest tag; the release's sign step still
    knows the version was signed, from the (anchored) audit log, and refuses it. Last: it spoils the
    module's good candidate."""
    settings, versions = demo_release
    first = _open(settings, versions["good"])
    _run_sign_and_validate(first)
    marker = settings.home / "payload-ran"
    plant_payload(stored_model_dir(settings, versions["good"]), marker)
    _stored_bundle(settings, versions["good"]).unlink()
    registry.client(settings).delete_model_version_tag(MODEL, versions["good"], signing.DIGEST_TAG)
    release.transition(first, release.State.aborted, actor="test")

    again = _open(settings, versions["good"])
    outcome = pipeline.sign(again)
    assert release.get(again).state is release.State.rejected, outcome
    assert "signature bundle is gone: refusing to sign it again" in " ".join(release.get(again).reasons)
    assert not signing.is_signed(MODEL, versions["good"], settings), "the changed files were signed anew"
    assert not marker.exists()
