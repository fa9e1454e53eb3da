"""Where releasegate keeps its state, read once from the environment."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

_PACKAGE_ROOT = Path(__file__).resolve().parent
# include/ holds the policies and expectation suites beside the package.
_INCLUDE = _PACKAGE_ROOT.parent


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _search_path(variable: str, shipped: Path) -> list[Path]:
    """The user's folders (`variable`, os.pathsep-separated) first, then the shipped one: a user's file of the
    same name wins, and the shipped ones stay available."""
    own = [Path(p).expanduser() for p in (_env(variable) or "").split(os.pathsep) if p]
    return own + ([shipped] if shipped not in own else [])


class Settings(BaseModel):
    """Every path, URL and key location releasegate uses; `Settings.from_env()` reads them."""

    home: Path = Field(description="Directory for the embedded databases, keys and caches.")
    db_url: str = Field(description="SQLAlchemy URL of releasegate's own tables.")
    mlflow_tracking_uri: str
    mlflow_artifact_root: Path
    gateway_url: str = "http://127.0.0.1:8765"
    admin_api_key: str | None = None
    backend: str = Field("local", description="Where models without a `releasegate.backend` tag are served: local | kserve.")
    signing_key: Path
    trusted_keys: list[Path]
    policy_dirs: list[Path] = Field(default_factory=lambda: [_INCLUDE / "policies"],
                                    description="Where policies are looked up, first match wins.")
    expectation_dirs: list[Path] = Field(default_factory=lambda: [_INCLUDE / "expectations"],
                                         description="Where expectation suites are looked up, first match wins.")
    model_cache_dir: Path

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("RELEASEGATE_HOME", str(Path.cwd() / ".releasegate"))).resolve()
        keys = home / "keys"
        trusted = _env("RELEASEGATE_TRUSTED_KEYS")
        return cls(
            home=home,
            db_url=_env("RELEASEGATE_DB_URL", f"sqlite:///{home}/releasegate.db"),
            mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db"),
            mlflow_artifact_root=Path(_env("RELEASEGATE_MLFLOW_ARTIFACTS", str(home / "mlartifacts"))),
            gateway_url=_env("RELEASEGATE_GATEWAY_URL", "http://127.0.0.1:8765"),
            admin_api_key=_env("RELEASEGATE_ADMIN_KEY"),
            backend=_env("RELEASEGATE_BACKEND", "local"),
            signing_key=Path(_env("RELEASEGATE_SIGNING_KEY", str(keys / "release.key"))),
            trusted_keys=[Path(p) for p in trusted.split(os.pathsep)] if trusted else [keys / "release.pub"],
            policy_dirs=_search_path("RELEASEGATE_POLICIES_DIR", _INCLUDE / "policies"),
            expectation_dirs=_search_path("RELEASEGATE_EXPECTATIONS_DIR", _INCLUDE / "expectations"),
            model_cache_dir=Path(_env("RELEASEGATE_MODEL_CACHE", str(home / "models"))),
        )


def get_settings() -> Settings:
    """Settings from the current environment (read anew each call, so tests can change it)."""
    return Settings.from_env()
