"""The MLflow Model Registry as releasegate uses it: aliases, tags, artifacts, verified downloads.

MLflow 3: aliases (`champion`, `challenger`, `previous`) replace stages. releasegate's own
artifacts (reference data, signature bundle, reports) live under the version's source run,
in the artifact folder `releasegate/`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from releasegate.settings import Settings, get_settings

ALIASES = ("champion", "challenger", "previous")
_ALLOW_DESERIALIZATION = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


class RegistryError(LookupError):
    """A model, version or alias that the registry does not have."""


def client(settings: Settings | None = None):
    """An MlflowClient on the settings' tracking and registry URI."""
    import mlflow

    settings = settings or get_settings()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return mlflow.MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def _version(model: str, version: str, settings: Settings | None):
    from mlflow.exceptions import MlflowException

    try:
        return client(settings).get_model_version(model, str(version))
    except MlflowException as err:
        raise RegistryError(f"model {model!r} has no version {version!r} in the registry") from err


def resolve_version(model: str, version_or_alias: str, settings: Settings | None = None) -> str:
    """A version number for "3", "champion" or "@champion"; RegistryError when there is none."""
    ref = str(version_or_alias).strip().lstrip("@")
    if not ref:
        raise RegistryError(f"no version or alias given for model {model!r}")
    if ref.isdigit():
        return str(_version(model, ref, settings).version)
    version = get_alias(model, ref, settings)
    if version is None:
        _registered(model, settings)
        raise RegistryError(f"model {model!r} has no alias {ref!r}")
    return version


def _registered(model: str, settings: Settings | None):
    from mlflow.exceptions import MlflowException

    try:
        return client(settings).get_registered_model(model)
    except MlflowException as err:
        raise RegistryError(f"model {model!r} is not registered in MLflow") from err


def get_alias(model: str, alias: str, settings: Settings | None = None) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(model, alias).version)
    except MlflowException:
        return None


def set_alias(model: str, alias: str, version: str, settings: Settings | None = None) -> None:
    client(settings).set_registered_model_alias(model, alias, str(version))


def delete_alias(model: str, alias: str, settings: Settings | None = None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client(settings).delete_registered_model_alias(model, alias)
    except MlflowException:
        pass  # already gone: deleting is idempotent


def get_version_tags(model: str, version: str, settings: Settings | None = None) -> dict:
    return dict(_version(model, version, settings).tags or {})


def set_version_tags(model: str, version: str, tags: dict, settings: Settings | None = None) -> None:
    mlflow_client = client(settings)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model, str(version), key, str(value))


def get_model_tags(model: str, settings: Settings | None = None) -> dict:
    return dict(_registered(model, settings).tags or {})


def source_run(model: str, version: str, settings: Settings | None = None) -> str:
    run_id = _version(model, version, settings).run_id
    if not run_id:
        raise RegistryError(f"{model} v{version} has no source run to keep releasegate's artifacts in")
    return run_id


def log_artifact(model: str, version: str, local_path: Path | str, artifact_path: str = "releasegate",
                 settings: Settings | None = None) -> None:
    """Store a file under the version's source run (artifact folder `releasegate/...`)."""
    client(settings).log_artifact(source_run(model, version, settings), str(local_path), artifact_path)


def download_artifact(model: str, version: str, artifact_path: str, dst: Path | str | None = None,
                      settings: Settings | None = None) -> Path:
    """Download one of the version's releasegate artifacts into `dst` (a directory); returns the file's path."""
    from mlflow.exceptions import MlflowException

    dst = Path(dst or tempfile.mkdtemp(prefix="rg-artifact-"))
    dst.mkdir(parents=True, exist_ok=True)
    run_id = source_run(model, version, settings)
    try:
        path = Path(client(settings).download_artifacts(run_id, artifact_path, str(dst)))
    except (MlflowException, OSError) as err:
        raise RegistryError(f"{model} v{version} has no artifact {artifact_path!r}") from err
    if not path.exists():
        raise RegistryError(f"{model} v{version} has no artifact {artifact_path!r}")
    return path


def download_model(model: str, version: str, dst: Path | str, settings: Settings | None = None) -> Path:
    """The version's MLflow model directory (the one with MLmodel), downloaded into `dst`."""
    import mlflow.artifacts

    source = _version(model, version, settings).source
    Path(dst).mkdir(parents=True, exist_ok=True)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
    if not (path / "MLmodel").exists():
        found = next(path.rglob("MLmodel"), None)
        if found is None:
            raise RegistryError(f"{model} v{version} has no MLflow model at {source}")
        path = found.parent
    return path


def fetch_verified(model: str, version: str, settings: Settings | None = None) -> Path:
    """Download the version once into a fresh cache folder, verify its signature, return that folder.

    The caller loads the model from exactly this folder: it is never fetched again by URI
    after verification, so what runs is what was verified.
    """
    from releasegate import signing

    settings = settings or get_settings()
    version = resolve_version(model, version, settings)
    target = settings.model_cache_dir / model / f"{version}-{uuid.uuid4().hex[:8]}"
    try:
        model_dir = download_model(model, version, target / "model", settings)
        bundle = signing.download_bundle(model, version, target, settings)
        signing.verify_directory(model_dir, bundle, settings.trusted_keys, what=f"{model} v{version}")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return model_dir


@contextmanager
def _deserialization_allowed() -> Iterator[None]:
    # MLflow 3 refuses to unpickle (or un-skops) any model unless told to; we allow it only
    # for a directory whose signature we verified.
    previous = os.environ.get(_ALLOW_DESERIALIZATION)
    os.environ[_ALLOW_DESERIALIZATION] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_ALLOW_DESERIALIZATION, None)
        else:
            os.environ[_ALLOW_DESERIALIZATION] = previous


def load_pyfunc(model_dir: Path) -> Any:
    """Load a pyfunc model from a verified local directory."""
    import mlflow.pyfunc

    with _deserialization_allowed():
        return mlflow.pyfunc.load_model(str(model_dir))
