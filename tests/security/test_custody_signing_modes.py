"""Key custody: a verify-only deployment never signs, whatever key files it finds; models are signed where built."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from releasegate import pipeline, registry, release, signing
from releasegate.cli import main
from releasegate.release import State
from releasegate.settings import Settings, get_settings
from tests.unit.mlflow_store import MODEL, classifier, migrated_mlflow_db, register, store  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
SIGN_WHERE_BUILT = r"sign it where the model is built \(`releasegate sign models:/churn/1`\), then release it again"


def _verify_only(monkeypatch) -> Settings:
    """This home's settings as a verify-only deployment reads them: RELEASEGATE_SIGNING_MODE=verify-only."""
    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "verify-only")
    return get_settings()


def _ci_key(settings, tmp_path, monkeypatch):
    """A key pair made where models are built: the deployment trusts its public key, holds no private key."""
    private, public = signing.generate_keys(tmp_path / "ci")
    ci = settings.model_copy(update={"signing_key": private, "trusted_keys": [public]})
    deployment = _verify_only(monkeypatch).model_copy(
        update={"signing_key": tmp_path / "absent" / "release.key", "trusted_keys": [public]}
    )
    return ci, deployment


def test_verify_only_never_signs_even_with_a_key_file_present(store, classifier, monkeypatch):
    version = register(store, classifier)
    key = store.signing_key.read_bytes()  # the store fixture made a usable key pair in the home

    with pytest.raises(signing.NotSignedError) as refused:
        signing.sign_version(MODEL, version, _verify_only(monkeypatch))

    assert str(refused.value) == (
        "churn v1 is not signed, and this deployment only verifies (RELEASEGATE_SIGNING_MODE=verify-only): "
        "sign it where the model is built (`releasegate sign models:/churn/1`), then release it again"
    )
    assert not signing.is_signed(MODEL, version, store)
    assert signing.DIGEST_TAG not in registry.get_version_tags(MODEL, version, settings=store)
    assert store.signing_key.read_bytes() == key


def test_a_release_in_verify_only_mode_rejects_an_unsigned_candidate_with_the_sentence(store, classifier, monkeypatch):
    version = register(store, classifier)
    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "verify-only")
    assert store.signing_key.is_file()
    opened = pipeline.start(MODEL, version)

    result = pipeline.sign(opened.release_id)

    assert release.get(opened.release_id).state is State.rejected
    assert not signing.is_signed(MODEL, version, store)
    from releasegate.results import Rejected

    assert isinstance(result, Rejected)
    assert "this deployment only verifies" in result.reason
    assert result.reason.endswith(
        "sign it where the model is built (`releasegate sign models:/churn/1`), then release it again"
    )


def test_verify_only_releases_a_candidate_signed_where_it_was_built(store, classifier, tmp_path, monkeypatch):
    version = register(store, classifier)
    ci, deployment = _ci_key(store, tmp_path, monkeypatch)
    digest = signing.sign_version(MODEL, version, ci)  # `releasegate sign` in CI

    # The deployment verifies the CI's signature with the public key alone, and signs nothing.
    assert signing.sign_version(MODEL, version, deployment) == digest
    verified = signing.fetch_verified(MODEL, version, deployment)
    assert verified.digest == digest and (verified.path / "MLmodel").is_file()
    for name, value in {
        "RELEASEGATE_SIGNING_MODE": "verify-only",
        "RELEASEGATE_SIGNING_KEY": str(deployment.signing_key),
        "RELEASEGATE_TRUSTED_KEYS": str(deployment.trusted_keys[0]),
    }.items():
        monkeypatch.setenv(name, value)
    result = pipeline.sign(pipeline.start(MODEL, version).release_id)
    from releasegate.results import Signed

    assert result == Signed(digest=digest)


def test_sign_mode_without_a_key_says_to_sign_where_the_model_is_built(store, classifier, tmp_path):
    version = register(store, classifier)
    keyless = store.model_copy(update={"signing_key": tmp_path / "nowhere" / "release.key"})

    with pytest.raises(signing.NotSignedError, match=f"no signing key at .*release.key: {SIGN_WHERE_BUILT}$"):
        signing.sign_version(MODEL, version, keyless)
    assert not signing.is_signed(MODEL, version, store)


def test_a_verify_only_deployment_makes_no_key_pair(settings, monkeypatch):
    with pytest.raises(signing.SignatureError, match="verify-only: this deployment makes no signing key"):
        signing.ensure_keys(_verify_only(monkeypatch))
    assert not settings.signing_key.exists() and not settings.signing_key.with_suffix(".pub").exists()


def test_releasegate_sign_is_refused_in_verify_only_mode_and_signs_where_the_model_is_built(
    store, classifier, tmp_path, monkeypatch
):
    version = register(store, classifier)
    ci, _ = _ci_key(store, tmp_path, monkeypatch)
    runner = CliRunner()
    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "verify-only")

    # The home's key file is there (the store fixture made it): the deployment still signs nothing.
    refused = runner.invoke(main, ["sign", f"models:/{MODEL}/{version}"])
    assert refused.exit_code == 1, refused.output
    assert "REFUSED: churn v1 is not signed, and this deployment only verifies" in refused.output
    assert not signing.is_signed(MODEL, version, store)

    monkeypatch.setenv("RELEASEGATE_TRUSTED_KEYS", str(ci.trusted_keys[0]))
    refused = runner.invoke(main, ["sign", f"models:/{MODEL}/{version}", "--private-key", str(ci.signing_key)])
    assert refused.exit_code == 1
    assert "REFUSED: churn v1 is not signed, and this deployment only verifies" in refused.output
    assert not signing.is_signed(MODEL, version, store)

    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "sign")  # the build machine's mode (the default)
    signed = runner.invoke(main, ["sign", f"models:/{MODEL}/{version}", "--private-key", str(ci.signing_key)])
    assert signed.exit_code == 0, signed.output
    assert signed.output.startswith("churn v1 signed: sha256:")
    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "verify-only")
    from releasegate.settings import SigningMode

    assert get_settings().signing_mode is SigningMode.verify_only
    verified = runner.invoke(main, ["verify", f"models:/{MODEL}/{version}"])
    assert verified.exit_code == 0 and verified.output.startswith("OK: churn v1 verified"), verified.output


def test_the_ci_example_signs_where_the_model_is_built_and_forgets_the_key_before_the_release():
    steps = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())["jobs"]["release"]["steps"]
    runs = [step.get("run", "") for step in steps]

    def index(text: str) -> int:
        found = [i for i, run in enumerate(runs) if text in run]
        assert found, f"no step of the CI example runs {text}"
        return found[0]

    register, sign, forget, trigger = (
        index("train_and_register.py"),
        index("releasegate sign"),
        index("rm -rf"),
        index("releasegate trigger"),
    )
    assert register < sign < forget < trigger
    assert shlex.split(runs[sign]) == ["releasegate", "sign", "${{ steps.register.outputs.model_uri }}"]
    assert "model_uri=models:/" in (ROOT / "examples/train_and_register.py").read_text()
    assert steps[forget].get("if") == "always()"
    # The key setup exports only variables releasegate reads.
    from releasegate.settings import variables

    exported = set(re.findall(r"write \S+ \"\$\w+\" (RELEASEGATE_\w+)", "\n".join(runs)))
    known = {name for name, _, _ in variables(Settings)}
    assert exported and exported <= known, exported - known
