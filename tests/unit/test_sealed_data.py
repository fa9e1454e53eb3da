"""A version's reference and holdout data sealed at rest (RELEASEGATE_ENCRYPT_DATA_ARTIFACTS): the artifact store
holds ciphertext, releasegate reads the frames wherever the data key is held, and says so where it is not."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from releasegate import registry
from releasegate.privacy import SEALED, ClassificationError, Protector
from releasegate.settings import get_settings
from releasegate.training import log_release_data

MARKER = "784-1987-1234567-1"


def _register_with_data(settings, classifier) -> tuple[str, pd.DataFrame]:
    import mlflow
    import mlflow.sklearn

    client = registry.client(settings)
    found = client.get_experiment_by_name("sealed")
    experiment = (
        found.experiment_id
        if found
        else client.create_experiment("sealed", artifact_location=settings.mlflow_artifact_root.as_uri())
    )
    reference = classifier[1].assign(customer=[f"{MARKER}-{i}" for i in range(len(classifier[1]))])
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.sklearn.log_model(
            classifier[0], name="model", registered_model_name="churn", pip_requirements=["scikit-learn"]
        )
        log_release_data(reference, reference.assign(label=1))
    return str(info.registered_model_version), reference


def test_sealed_data_is_ciphertext_in_the_store_and_a_frame_to_releasegate(store, classifier, monkeypatch):
    monkeypatch.setenv("RELEASEGATE_ENCRYPT_DATA_ARTIFACTS", "true")
    version, reference = _register_with_data(store, classifier)

    run = registry.client(store).get_run(registry.source_run("churn", version, store))
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "releasegate"
    for name in ("reference.parquet", "holdout.parquet"):
        raw = (stored / name).read_bytes()
        assert raw.startswith(SEALED) and b"PAR1" not in raw and MARKER.encode() not in raw
    got = registry.read_frame("churn", version, "releasegate/reference.parquet", dst=store.home / "r", settings=store)
    pd.testing.assert_frame_equal(got, reference)


def test_plain_data_still_reads_and_a_deployment_without_the_key_is_told_which(store, classifier, monkeypatch):
    version, _ = _register_with_data(store, classifier)  # the default: not sealed
    got = registry.read_frame("churn", version, "releasegate/holdout.parquet", dst=store.home / "h", settings=store)
    assert list(got["label"].unique()) == [1]

    monkeypatch.setenv("RELEASEGATE_ENCRYPT_DATA_ARTIFACTS", "true")
    sealed_version, _ = _register_with_data(store, classifier)
    (store.home / "keys" / "data-k1.key").unlink()  # another deployment: its own data key
    with pytest.raises(ClassificationError, match="does not open with data key 'k1'"):
        registry.read_frame(
            "churn", sealed_version, "releasegate/holdout.parquet", dst=store.home / "x", settings=store
        )
    monkeypatch.setenv("RELEASEGATE_DATA_KEY_ID", "k2")  # and one that never had a key k1
    (store.home / "keys" / "data-k1.key").unlink()
    with pytest.raises(ClassificationError, match="data key 'k1', which this deployment does not hold"):
        registry.read_frame(
            "churn", sealed_version, "releasegate/holdout.parquet", dst=store.home / "y", settings=get_settings()
        )


def test_a_changed_byte_is_refused(settings):
    protector = Protector.of(settings)
    sealed = bytearray(protector.seal(b"holdout rows"))
    assert protector.unseal(bytes(sealed)) == b"holdout rows"
    sealed[-1] ^= 1
    with pytest.raises(ClassificationError, match="changed, or another key"):
        protector.unseal(bytes(sealed))
