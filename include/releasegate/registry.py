"""The MLflow Model Registry as releasegate uses it: versions, aliases, tags, per-version artifacts, verified downloads.

MLflow is imported inside the functions: the DAG processor and the gateway import this module, and
importing mlflow costs seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from releasegate.settings import Settings, get_settings

if TYPE_CHECKING:
    import mlflow
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

    from releasegate.signing import VerifiedModel

ARTIFACT_ROOT = "releasegate"
_ALLOW_DESERIALIZATION = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
_env_lock = threading.Lock()
_allowing = 0  # loads inside _deserialization_allowed
_previous: str | None = None  # the operator's setting, put back when the last of them ends


class RegistryError(LookupError):
    """A registered model, version, alias or artifact that does not exist."""


def client(settings: Settings | None = None) -> mlflow.MlflowClient:
    """An MlflowClient on settings.mlflow_tracking_uri (also made the process's tracking and registry URI)."""
    import mlflow

    uri = (settings or get_settings()).mlflow_tracking_uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # progress bars flood the task logs
    # Fluent calls (mlflow.artifacts, mlflow.pyfunc) read the global URIs, so they follow the client.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_version(model: str, version_or_alias: str | int, settings: Settings | None = None) -> str:
    """The version number a reference names: "3", "champion" or "@champion"; RegistryError if there is none."""
    ref = str(version_or_alias).strip().removeprefix("@")
    if not ref:
        raise RegistryError(f"empty version or alias for model {model!r}")
    if ref.isdigit():
        return str(_model_version(model, ref, settings).version)
    version = get_alias(model, ref, settings=settings)
    if version is None:
        aliases = ", ".join(sorted(_registered_model(model, settings).aliases or {})) or "none"
        raise RegistryError(f"model {model!r} has no alias {ref!r} (aliases: {aliases})")
    return version


def get_alias(model: str, alias: str, settings: Settings | None = None) -> str | None:
    """The version an alias points at, None if the alias is not set; RegistryError if the model does not exist."""
    aliases = _registered_model(model, settings).aliases or {}
    version = aliases.get(alias.removeprefix("@"))
    return None if version is None else str(version)


def set_alias(model: str, alias: str, version: str | int, settings: Settings | None = None) -> None:
    """Point `alias` at an existing version (moving it if it pointed elsewhere)."""
    version = str(_model_version(model, str(version), settings).version)
    client(settings).set_registered_model_alias(model, alias.removeprefix("@"), version)


def delete_alias(model: str, alias: str, settings: Settings | None = None) -> None:
    """Remove an alias; removing one that is not set is not an error (tasks are retried)."""
    _registered_model(model, settings)
    client(settings).delete_registered_model_alias(model, alias.removeprefix("@"))


def get_version_tags(model: str, version: str | int, settings: Settings | None = None) -> dict[str, str]:
    return dict(_model_version(model, str(version), settings).tags or {})


def set_version_tags(
    model: str, version: str | int, tags: Mapping[str, object], settings: Settings | None = None
) -> None:
    """Set (or overwrite) version tags; values are stored as strings."""
    version = str(_model_version(model, str(version), settings).version)
    mlflow_client = client(settings)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model, version, key, str(value))


def get_model_tags(model: str, settings: Settings | None = None) -> dict[str, str]:
    return dict(_registered_model(model, settings).tags or {})


def source_run(model: str, version: str | int, settings: Settings | None = None) -> str:
    """The id of the run that produced the version: where its releasegate artifacts live."""
    run_id = _model_version(model, str(version), settings).run_id
    if not run_id:
        raise RegistryError(f"{model} v{version} has no source run, so it has nowhere to keep releasegate artifacts")
    return run_id


def has_artifact(model: str, version: str | int, artifact_path: str, settings: Settings | None = None) -> bool:
    """Whether the version's source run has this artifact file (e.g. "releasegate/model.sig")."""
    artifact_path = artifact_path.strip("/")
    folder = artifact_path.rpartition("/")[0] or None
    listed = client(settings).list_artifacts(source_run(model, version, settings), folder)
    return any(info.path == artifact_path and not info.is_dir for info in listed)


def log_artifact(
    model: str,
    version: str | int,
    local_path: str | Path,
    artifact_path: str = ARTIFACT_ROOT,
    settings: Settings | None = None,
) -> None:
    """Store a file (or a directory's contents) under the version's source run, in `releasegate/...`."""
    local_path = Path(local_path)
    if not local_path.exists():
        raise FileNotFoundError(f"cannot log {local_path}: no such file or directory")
    artifact_path = artifact_path.strip("/")
    # The run's other artifacts belong to whoever trained the model; releasegate writes only its own folder.
    if artifact_path != ARTIFACT_ROOT and not artifact_path.startswith(ARTIFACT_ROOT + "/"):
        raise ValueError(f"artifact_path {artifact_path!r} is outside {ARTIFACT_ROOT}/")
    run_id = source_run(model, version, settings)
    mlflow_client = client(settings)
    if local_path.is_dir():
        mlflow_client.log_artifacts(run_id, str(local_path), artifact_path)
    else:
        mlflow_client.log_artifact(run_id, str(local_path), artifact_path)


def download_artifact(
    model: str, version: str | int, artifact_path: str, dst: str | Path | None = None, settings: Settings | None = None
) -> Path:
    """Download one artifact of the version's source run (e.g. "releasegate/holdout.parquet"); returns its local path."""
    import mlflow
    from mlflow.exceptions import MlflowException

    settings = settings or get_settings()
    run_id = source_run(model, version, settings)
    if not has_artifact(model, version, artifact_path, settings):
        raise RegistryError(f"{model} v{version} has no artifact {artifact_path!r} (run {run_id})")
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="rg-artifact-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=settings.mlflow_tracking_uri
        )
    except MlflowException as err:
        raise RegistryError(
            f"could not download {artifact_path!r} of {model} v{version} (run {run_id}): {err.message}"
        ) from err
    return Path(local)


def read_frame(
    model: str, version: str | int, artifact_path: str, dst: str | Path, settings: Settings | None = None
) -> pd.DataFrame:
    """A version's data artifact (e.g. "releasegate/holdout.parquet") as a DataFrame, opened first when it was
    logged sealed (RELEASEGATE_ENCRYPT_DATA_ARTIFACTS)."""
    import io

    import pandas as pd

    from releasegate import privacy

    data = download_artifact(model, version, artifact_path, dst=dst, settings=settings).read_bytes()
    if privacy.is_sealed(data):
        data = privacy.Protector.of(settings or get_settings()).unseal(data)
    return pd.read_parquet(io.BytesIO(data))


def download_model(model: str, version: str | int, dst: str | Path, settings: Settings | None = None) -> Path:
    """Download the version's MLflow model directory so that `dst` itself is it (has MLmodel); returns dst.

    `dst` may be absent, empty, or an earlier model download (replaced whole, so no stale file stays).
    """
    import mlflow

    settings = settings or get_settings()
    dst = Path(dst)
    if dst.exists() and not _replaceable(dst):
        raise FileExistsError(
            f"cannot download {model} v{version} into {dst}: it exists and is neither empty "
            f"nor an MLflow model directory"
        )
    version = str(_model_version(model, str(version), settings).version)
    # The stored artifact location, not models:/name/version: that URI adds a registered_model_meta file
    # that is not in the store, and the signature must cover exactly the stored files.
    uri = client(settings).get_model_version_download_uri(model, version)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dst.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(staging), tracking_uri=settings.mlflow_tracking_uri
            )
        )
        if not (local / "MLmodel").is_file():
            raise RegistryError(f"{model} v{version} at {uri} is not an MLflow model directory (no MLmodel file)")
        if dst.exists():
            if not _replaceable(dst):
                raise FileExistsError(f"{dst} changed while {model} v{version} was downloading")
            shutil.rmtree(dst)
        local.replace(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def load_pyfunc(verified: VerifiedModel) -> Any:
    """Load a verified model directory as a pyfunc model: nothing unverified is ever loaded."""
    import mlflow.pyfunc

    if not (verified.path / "MLmodel").is_file():
        raise FileNotFoundError(f"{verified.path} is not an MLflow model directory (no MLmodel file)")
    with _deserialization_allowed():
        return mlflow.pyfunc.load_model(str(verified.path))


@contextmanager
def _deserialization_allowed() -> Iterator[None]:
    # An operator may forbid MLflow's unpickling (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false); a directory
    # whose signature we verified is the exception that switch exists for. Counted, not held: the gateway
    # loads several models at once, and a lock around the whole load would queue them one by one.
    global _allowing, _previous
    with _env_lock:
        if _allowing == 0:
            _previous = os.environ.get(_ALLOW_DESERIALIZATION)
            os.environ[_ALLOW_DESERIALIZATION] = "true"
        _allowing += 1
    try:
        yield
    finally:
        with _env_lock:
            _allowing -= 1
            if _allowing == 0:
                if _previous is None:
                    os.environ.pop(_ALLOW_DESERIALIZATION, None)
                else:
                    os.environ[_ALLOW_DESERIALIZATION] = _previous


def _registered_model(model: str, settings: Settings | None) -> RegisteredModel:
    from mlflow.exceptions import MlflowException

    try:
        return client(settings).get_registered_model(model)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model {model!r} is not in the registry") from err
        raise


def _model_version(model: str, version: str, settings: Settings | None) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    if not str(version).isdigit():
        raise RegistryError(f"{version!r} is not a version number of model {model!r} (use resolve_version for aliases)")
    try:
        return client(settings).get_model_version(model, str(version))
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        _registered_model(model, settings)  # names the model as missing if it is
        versions = client(settings).search_model_versions(f"name='{model}'")
        known = ", ".join(sorted((str(mv.version) for mv in versions), key=int)) or "none"
        raise RegistryError(f"model {model!r} has no version {version} (versions: {known})") from err


def _replaceable(path: Path) -> bool:
    return path.is_dir() and ((path / "MLmodel").is_file() or not any(path.iterdir()))
