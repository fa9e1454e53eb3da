"""Where releasegate keeps its state and what it connects to: typed, read from the environment (RELEASEGATE_*).

One class per component (this one; the gateway's `serving.config.GatewayConfig`; the kserve
backend's `k8s.K8sSettings`), each a pydantic-settings model with its defaults and descriptions in
one place. docs/operations.md's configuration table is generated from them (`releasegate settings
--markdown`), and a test fails when the two differ.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_PACKAGE_ROOT = Path(__file__).resolve().parent
# include/ holds the policies and expectation suites beside the package.
_INCLUDE = _PACKAGE_ROOT.parent
SHIPPED_POLICIES = _INCLUDE / "policies"
SHIPPED_EXPECTATIONS = _INCLUDE / "expectations"

PathList = Annotated[list[Path], NoDecode]  # os.pathsep-separated in the environment, not JSON
SpaceList = Annotated[list[str], NoDecode]  # space-separated in the environment (an Apprise URL may hold commas)
_IN_HOME = Path()  # a path default that the home decides, once the home is known


class SigningMode(StrEnum):
    """Whether this deployment may sign a candidate, or only verifies what was signed where it was built."""

    sign = "sign"
    verify_only = "verify-only"


class Settings(BaseSettings):
    """Every path, URL and key location releasegate uses."""

    model_config = SettingsConfigDict(
        env_prefix="RELEASEGATE_", env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    home: Path = Field(
        default_factory=lambda: Path.cwd() / ".releasegate",
        description="Keys, embedded databases and the model cache (default `./.releasegate`).",
    )
    db_url: str = Field(
        default="",
        description="SQLAlchemy URL of releasegate's own tables (PostgreSQL: "
        "`postgresql+psycopg://user@host/db`); default SQLite in the home.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
        description="MLflow tracking and registry; default SQLite in the home.",
    )
    mlflow_artifact_root: Path = Field(
        default=_IN_HOME,
        validation_alias=AliasChoices("RELEASEGATE_MLFLOW_ARTIFACTS"),
        description="Artifact root of experiments releasegate creates (the demo's); default `mlartifacts` in the home.",
    )
    gateway_url: str = Field(default="http://127.0.0.1:8765", description="The gateway the `local` backend drives.")
    admin_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RELEASEGATE_ADMIN_KEY"),
        description="Admin API key the pipeline uses to change routes.",
    )
    backend: str = Field(
        default="local", description="Where models without a `releasegate.backend` tag are served: `local` or `kserve`."
    )
    signing_key: Path = Field(
        default=_IN_HOME,
        description="Private key that signs models and audit heads; default `keys/release.key` in the home.",
    )
    trusted_keys: PathList = Field(
        default_factory=list,
        description="Public keys a model may be signed with (`:`-separated); default `keys/release.pub`.",
    )
    signing_mode: SigningMode = Field(
        default=SigningMode.sign,
        description="`sign`: a release signs an unsigned candidate with the signing key; `verify-only`: never signs "
        "(models are signed where they are built), an unsigned candidate is rejected.",
    )
    signing_certificate: Path | None = Field(
        default=None,
        description="X.509 certificate (PEM) of the signing key: sign in certificate mode instead of with a bare key.",
    )
    signing_certificate_chain: PathList = Field(
        default_factory=list,
        description="Intermediate CA certificates (PEM, `:`-separated) put in the bundle beside the signing certificate.",
    )
    trusted_ca: PathList = Field(
        default_factory=list,
        description="CA certificates (PEM, `:`-separated) a certificate-signed model must chain to; "
        "its certificate must allow code signing.",
    )
    audit_head: Path = Field(
        default=_IN_HOME,
        description="File the audit log's signed head is anchored in, outside the database, moved forward at every "
        "event; default `audit/head.json` in the home. Keep it where the database's users cannot write.",
    )
    audit_key: Path = Field(
        default=_IN_HOME,
        description="Private key (P-256) that signs the audit head; checking needs only the `.pub` beside it. "
        "Default the signing key; with `verify-only`, `keys/audit.key` in the home (`releasegate keys generate "
        "--name audit`).",
    )
    policy_dirs: PathList = Field(
        default_factory=list,
        validation_alias=AliasChoices("RELEASEGATE_POLICIES_DIR"),
        description="Your policy folders (`:`-separated), searched before `include/policies`.",
    )
    expectation_dirs: PathList = Field(
        default_factory=list,
        validation_alias=AliasChoices("RELEASEGATE_EXPECTATIONS_DIR"),
        description="Your expectation-suite folders (`:`-separated), searched before `include/expectations`.",
    )
    model_cache_dir: Path = Field(
        default=_IN_HOME,
        validation_alias=AliasChoices("RELEASEGATE_MODEL_CACHE"),
        description="Verified model downloads; default `models` in the home.",
    )
    feast_repo: Path | None = Field(
        default=None,
        description="Feast feature repository (the folder of its `feature_store.yaml`) the gateway looks features up "
        "in, and validation checks, for models that declare them (docs/features.md).",
    )
    apikey_pepper: str | None = Field(
        default=None,
        description="Server pepper of the API key digests; default a file "
        "`keys/apikey.pepper` in the home, made on first use.",
    )
    routing_secret: str | None = Field(
        default=None,
        description="Deployment secret keying the routing-key hash (arm assignment and `predictions.routing_key_hash`), "
        "so a logged hash of a customer id cannot be reversed by hashing candidates; default a file "
        "`keys/routing.secret` in the home, made on first use.",
    )
    pii_pepper: str | None = Field(
        default=None,
        description="Pepper of the `pseudonymise` tokens of classified input columns; default a file "
        "`keys/pii.pepper` in the home, made on first use.",
    )
    data_key_id: str = Field(
        default="k1",
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="Id of the data key `encrypt` columns are sealed with (`keys/data-<id>.key`, made on first use); "
        "a new id rotates the key, old rows keep theirs.",
    )
    encrypt_data_artifacts: bool = Field(
        default=False,
        description="Seal the reference and holdout data a version logs (`training.log_release_data`) with the "
        "current data key (AES-256-GCM), for an artifact store without encryption at rest (the local one); "
        "releasegate opens them wherever it holds the key. Where the store encrypts (S3 SSE-KMS, GCS CMEK), leave off.",
    )
    region: str = Field(
        default="local",
        description="The region this deployment's parts are in, unless one of the `*_REGION` variables says "
        "otherwise; a model tagged `releasegate.regions` is released only where every part it uses is allowed.",
    )
    gateway_region: str | None = Field(
        default=None, description="Region of the gateway (local backend); default REGION."
    )
    kserve_region: str | None = Field(default=None, description="Region of the KServe cluster; default REGION.")
    db_region: str | None = Field(
        default=None, description="Region of releasegate's database (prediction log, feedback); default REGION."
    )
    artifact_region: str | None = Field(
        default=None, description="Region of the MLflow artifact store (reports, reference data); default REGION."
    )
    alert_webhook: str | None = Field(
        default=None, description="URL the nightly evaluation and the drift watch POST their alerts to (JSON)."
    )
    airflow_url: str = Field(
        default="http://127.0.0.1:8080",
        description="Airflow's API server, for the gateway's alert receiver (and `releasegate trigger`).",
    )
    airflow_user: str | None = Field(default=None, description="Airflow user the alert receiver triggers runs as.")
    airflow_password: str | None = Field(default=None, description="That user's password.")
    airflow_token: str | None = Field(default=None, description="An Airflow API token, instead of user and password.")
    incident_webhook: str | None = Field(
        default=None,
        description="URL every incident event is POSTed to (JSON `releasegate.incident/v1`, docs/operations.md).",
    )
    incident_webhook_token: str | None = Field(
        default=None, description="Bearer token sent to the incident webhook, if it wants one."
    )
    notify_webhook: str | None = Field(
        default=None,
        description="URL every notification is POSTed to (JSON `releasegate.notification/v1`: a release's outcome, "
        'an approval requested, an emergency rollback, an incident opened; docs/operations.md, "Notifications").',
    )
    notify_webhook_token: str | None = Field(
        default=None, description="Bearer token sent to the notification webhook, if it wants one."
    )
    notify_apprise_urls: SpaceList = Field(
        default_factory=list,
        description="Apprise URLs (space-separated: `slack://…`, `msteams://…`, `mailtos://…`) every notification is "
        "also sent to; needs the `apprise` package (`pip install apache-airflow-providers-apprise`).",
    )
    notify_timeout: float = Field(default=10.0, gt=0, description="Seconds a notification target may take to answer.")
    notify_links_url: str | None = Field(
        default=None,
        description="Airflow's address as people reach it, for the run and dashboard links in notifications; "
        "default RELEASEGATE_AIRFLOW_URL.",
    )
    nightly_schedule: str | None = Field(
        default=None, description="Cron of the nightly evaluation; default the default policy's `monitoring.schedule`."
    )
    drift_watch_schedule: str | None = Field(
        default=None,
        description="Cron of the drift watch; default the default policy's `monitoring.watch.schedule`.",
    )

    @field_validator("trusted_keys", "policy_dirs", "expectation_dirs", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [Path(p).expanduser() for p in value.split(os.pathsep) if p]
        return value

    @field_validator("notify_apprise_urls", mode="before")
    @classmethod
    def _split_spaces(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("signing_certificate_chain", "trusted_ca", mode="before")
    @classmethod
    def _split_certificates(cls, value: Any) -> Any:
        return cls._split(value)

    @model_validator(mode="after")
    def _defaults_in_home(self) -> Settings:
        home = self.home = self.home.expanduser().resolve()
        self.db_url = self.db_url or f"sqlite:///{home}/releasegate.db"
        self.mlflow_tracking_uri = self.mlflow_tracking_uri or f"sqlite:///{home}/mlflow.db"
        if self.mlflow_artifact_root == _IN_HOME:
            self.mlflow_artifact_root = home / "mlartifacts"
        if self.signing_key == _IN_HOME:
            self.signing_key = home / "keys" / "release.key"
        self.trusted_keys = self.trusted_keys or [home / "keys" / "release.pub"]
        if self.audit_head == _IN_HOME:
            self.audit_head = home / "audit" / "head.json"
        if self.audit_key == _IN_HOME:
            # A verify-only deployment holds no signing key, so its audit head has a key of its own.
            verify_only = self.signing_mode is SigningMode.verify_only
            self.audit_key = home / "keys" / "audit.key" if verify_only else self.signing_key
        if self.model_cache_dir == _IN_HOME:
            self.model_cache_dir = home / "models"
        # The user's folders first, then the shipped one: a file of the same name in theirs wins.
        self.policy_dirs = _then(self.policy_dirs, SHIPPED_POLICIES)
        self.expectation_dirs = _then(self.expectation_dirs, SHIPPED_EXPECTATIONS)
        return self


def _then(own: list[Path], shipped: Path) -> list[Path]:
    return own + ([shipped] if shipped not in own else [])


def get_settings() -> Settings:
    """Settings from the current environment (read anew each call, so tests can change it)."""
    return Settings()


def variables(model: type[BaseSettings]) -> list[tuple[str, str, str]]:
    """(environment variable, default, meaning) of each field of a settings class, as the docs list them."""
    prefix = model.model_config.get("env_prefix", "")
    rows = []
    for name, field in model.model_fields.items():
        rows.append((_variable(name, field, prefix), _default(field), field.description or ""))
    return rows


def _variable(name: str, field: FieldInfo, prefix: str) -> str:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"{prefix}{name}".upper()


def _default(field: FieldInfo) -> str:
    default = field.default
    if field.default_factory is not None or default is PydanticUndefined or default in (None, "", _IN_HOME):
        return "—"
    if isinstance(default, Path) and default.is_relative_to(_INCLUDE.parent.parent):
        # A path beside the repository, as a reader's checkout has it.
        return f"`{os.path.relpath(default, _INCLUDE.parent)}`"
    return f"`{default}`"


def markdown_table() -> str:
    """The configuration table of docs/operations.md: every variable of every settings class."""
    from releasegate.k8s import K8sSettings
    from releasegate.serving.config import GatewayConfig

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for model in (Settings, GatewayConfig, K8sSettings):
        lines += [f"| `{var}` | {default} | {meaning} |" for var, default, meaning in variables(model)]
    return "\n".join(lines)


def home_secret(settings: Settings, value: str | None, name: str) -> bytes:
    """A deployment secret: `value` when set, else the file `keys/<name>` in the home, made (0600, 256 random
    bits) by the first process that needs it; a process that loses the race to make it reads the winner's."""
    if value:
        return value.encode()
    path = settings.home / "keys" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then linked into place: the file appears with its secret, never empty (a gateway's
        # workers start together, and one that read an empty file would route and hash with another secret).
        draft = path.with_name(f".{name}.{os.getpid()}.draft")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip().encode()


@contextlib.contextmanager
def environ_restored(*names: str) -> Iterator[None]:
    """The environment variables `names` as they were before the block, whatever it set or removed."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
