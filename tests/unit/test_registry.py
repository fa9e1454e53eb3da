"""releasegate.registry on a real MLflow store (SQLite + local artifacts) in each test's home."""

from __future__ import annotations

import pytest

from releasegate import registry, signing
from tests.unit.mlflow_store import MODEL, register, stored_model_dir


def test_versions_and_aliases_resolve(store, classifier):
    first, second = register(store, classifier), register(store, classifier)
    registry.set_alias(MODEL, "champion", first, settings=store)

    assert [registry.resolve_version(MODEL, ref, settings=store) for ref in ("1", 2, "champion", "@champion")] == [
        first,
        second,
        first,
        first,
    ]
    assert registry.get_alias(MODEL, "challenger", settings=store) is None

    registry.set_alias(MODEL, "champion", second, settings=store)
    assert registry.get_alias(MODEL, "@champion", settings=store) == second
    registry.delete_alias(MODEL, "champion", settings=store)
    registry.delete_alias(MODEL, "champion", settings=store)  # a retried task deletes it again
    assert registry.get_alias(MODEL, "champion", settings=store) is None


def test_missing_model_version_or_alias_raises_registry_error_naming_it(store, classifier):
    register(store, classifier)
    with pytest.raises(registry.RegistryError, match="model 'nope' is not in the registry"):
        registry.resolve_version("nope", "1", settings=store)
    with pytest.raises(registry.RegistryError, match=r"model 'churn' has no version 9 \(versions: 1\)"):
        registry.resolve_version(MODEL, "9", settings=store)
    with pytest.raises(registry.RegistryError, match="model 'churn' has no alias 'champion'"):
        registry.resolve_version(MODEL, "@champion", settings=store)
    with pytest.raises(registry.RegistryError, match="has no version 7"):
        registry.set_alias(MODEL, "champion", "7", settings=store)
    with pytest.raises(registry.RegistryError, match="model 'nope' is not in the registry"):
        registry.get_alias("nope", "champion", settings=store)
    with pytest.raises(LookupError):  # RegistryError is a LookupError for callers that catch those
        registry.get_model_tags("nope", settings=store)


def test_version_and_model_tags_round_trip(store, classifier):
    version = register(store, classifier)
    registry.set_version_tags(MODEL, version, {"releasegate.state": "shadow", "releasegate.step": 2}, settings=store)
    registry.client(store).set_registered_model_tag(MODEL, "releasegate.expectation_suite", "churn")

    assert registry.get_version_tags(MODEL, version, settings=store) == {
        "releasegate.state": "shadow",
        "releasegate.step": "2",
    }
    assert registry.get_model_tags(MODEL, settings=store) == {"releasegate.expectation_suite": "churn"}


def test_artifacts_are_kept_under_the_source_run_in_the_releasegate_folder(store, classifier, tmp_path):
    version = register(store, classifier)
    report = tmp_path / "verdict.json"
    report.write_text('{"decision": "promote"}')

    registry.log_artifact(MODEL, version, report, artifact_path="releasegate/releases/r1", settings=store)

    run_id = registry.client(store).get_model_version(MODEL, version).run_id
    assert registry.source_run(MODEL, version, settings=store) == run_id
    assert [a.path for a in registry.client(store).list_artifacts(run_id, "releasegate/releases/r1")] == [
        "releasegate/releases/r1/verdict.json"
    ]
    fetched = registry.download_artifact(
        MODEL, version, "releasegate/releases/r1/verdict.json", dst=tmp_path / "out", settings=store
    )
    assert fetched.read_text() == '{"decision": "promote"}'
    assert registry.has_artifact(MODEL, version, "releasegate/releases/r1/verdict.json", settings=store)


def test_artifact_outside_the_releasegate_folder_or_missing_is_refused(store, classifier, tmp_path):
    version = register(store, classifier)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="outside releasegate/"):
        registry.log_artifact(MODEL, version, tmp_path / "x.txt", artifact_path="model", settings=store)
    with pytest.raises(FileNotFoundError, match="no such file"):
        registry.log_artifact(MODEL, version, tmp_path / "absent.txt", settings=store)
    with pytest.raises(registry.RegistryError, match=r"churn v1 has no artifact 'releasegate/holdout.parquet'"):
        registry.download_artifact(MODEL, version, "releasegate/holdout.parquet", settings=store)


def test_download_model_gives_exactly_the_stored_model_directory(store, classifier, tmp_path):
    version = register(store, classifier)

    model_dir = registry.download_model(MODEL, version, tmp_path / "copy", settings=store)

    assert model_dir == tmp_path / "copy" and (model_dir / "MLmodel").is_file()
    stored = stored_model_dir(store, version)
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == sorted(
        p.relative_to(stored) for p in stored.rglob("*")
    )
    (model_dir / "stale.txt").write_text("left from an earlier download")
    assert registry.download_model(MODEL, version, model_dir, settings=store) == model_dir
    assert not (model_dir / "stale.txt").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="neither empty nor an MLflow model directory"):
        registry.download_model(MODEL, version, tmp_path / "notes", settings=store)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_fetch_verified_gives_a_fresh_loadable_directory_per_fetch(store, classifier):
    version = register(store, classifier)
    signing.sign_version(MODEL, version, store)

    first = signing.fetch_verified(MODEL, version, store)
    second = signing.fetch_verified(MODEL, "1", store)

    assert first.path != second.path
    assert first.path.parent == second.path.parent == store.model_cache_dir / MODEL
    assert first.path.name.startswith(f"{version}-") and (first.path / "MLmodel").is_file()
    assert first.digest == second.digest
    model, frame = classifier
    predictions = registry.load_pyfunc(first).predict(frame.head(20))
    assert list(predictions) == list(model.predict(frame.head(20)))


def test_a_refused_fetch_leaves_nothing_in_the_model_cache(store, classifier):
    version = register(store, classifier)
    with pytest.raises(signing.SignatureError, match="churn v1 is not signed"):
        signing.fetch_verified(MODEL, version, store)
    assert list((store.model_cache_dir / MODEL).iterdir()) == []
    with pytest.raises(registry.RegistryError, match="has no version 5"):
        signing.fetch_verified(MODEL, "5", store)
