"""Shared fixtures: every test gets its own RELEASEGATE_HOME (SQLite databases, keys, MLflow store)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# plugins/ is on Airflow's path in a deployment; the tests put it there the same way.
sys.path.insert(0, str(ROOT / "plugins"))


# `make test TEST_WORKERS=2` runs the suite on both cores (pytest-xdist). A unit of work is a test module, since its
# module-scoped fixture (a fleet, a served model, Airflow) is built once, and tests/system as a whole, since
# its modules share one session-scoped stack: built on two workers it would be built twice. xdist's
# `--dist loadgroup` would say so with marks, but with pytest 9 it no longer renames the tests it groups, so
# the units are drawn here, with xdist's own scheduler by scope. The slowest units go first (the fleet alone
# takes a quarter of the run), so that the two workers finish together rather than one waiting on a unit that
# started last. Not yet the default: two runs so each failed tests that pass in one process (docs/architecture.md).
SLOWEST_FIRST = ("tests/integration/test_your_model.py", "tests/system")


def _unit(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    return "tests/system" if path.startswith("tests/system/") else path


# Importing feast sets PROMETHEUS_MULTIPROC_DIR for the whole process: every gateway a test starts afterwards would
# put its metrics in feast's directory (one test module importing feast at its top failed 16 tests of a CI run
# that way). Modules are imported at collection, so the collection is where that is caught.
_METRICS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def pytest_collection_finish(session: pytest.Session) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != _METRICS_DIR:
        raise pytest.UsageError(
            "a test module changed PROMETHEUS_MULTIPROC_DIR while it was imported: import feast through "
            "releasegate.feast_import.load(), which leaves the environment as it was"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "numprocesses", None):
        return  # one process: the collection's own order
    rank = {unit: i for i, unit in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: the order within a unit holds


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        """xdist's scheduling by scope, with this suite's units as the scopes, in the collection's order."""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # the order above, not the most tests first
    return ByUnit(config, log)


def _point_env_at(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELEASEGATE_HOME", str(home))
    monkeypatch.setenv("RELEASEGATE_DB_URL", f"sqlite:///{home}/releasegate.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    monkeypatch.setenv("RELEASEGATE_MLFLOW_ARTIFACTS", str(home / "mlartifacts"))
    monkeypatch.setenv("RELEASEGATE_ADMIN_KEY", "rg-test-admin-key-0123456789abcdef")
    # One gateway process: the tests count per-process state (requests in flight, a breaker, a slot's queue);
    # tests/integration/test_gateway_workers.py starts several.
    monkeypatch.setenv("RELEASEGATE_GATEWAY_WORKERS", "1")
    for name in (
        "RELEASEGATE_SIGNING_KEY",
        "RELEASEGATE_TRUSTED_KEYS",
        "RELEASEGATE_GATEWAY_URL",
        "RELEASEGATE_SIGNING_MODE",
        "RELEASEGATE_TRUSTED_CA",
        "RELEASEGATE_SIGNING_CERTIFICATE",
        "RELEASEGATE_SIGNING_CERTIFICATE_CHAIN",
        "RELEASEGATE_POLICIES_DIR",
        "RELEASEGATE_EXPECTATIONS_DIR",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def rg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty releasegate home for one test."""
    from releasegate import storage

    home = tmp_path / "rg"
    home.mkdir()
    _point_env_at(home, monkeypatch)
    yield home
    storage.dispose_all()


@pytest.fixture
def settings(rg_home):
    from releasegate.settings import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict:
    """Environment for Airflow processes and dag.test(): a private AIRFLOW_HOME on SQLite, migrated once."""
    import subprocess

    home = tmp_path_factory.mktemp("airflow")
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            # Named outright: Airflow's configuration derives the default from AIRFLOW_HOME only once per process.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "plugins"), os.environ.get("PYTHONPATH")])),
        }
    )
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([str(bin_dir / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    return env
