"""Hole 6, the model cache never cleaned: route churn and failing loads must not fill the gateway's disk.

Each load verifies a fresh copy of the version in the model cache. At 674b38f nothing removed that copy
when the version was unloaded or when its load failed, so an admin flipping routes, or a stored route
whose version fails to load (retried by every replica's poller), left one more directory each time until
the disk was full. The attack here is that churn, on the real gateway: afterwards the cache holds only the
directories of the versions served, and `releasegate_gateway_model_cache_bytes` reports its size.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from releasegate import storage
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
CACHE_MODEL = "gw-cache"  # a model of its own, so the churn changes no route the other tests use


class Constant:
    """A model that answers 0 per row."""

    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


class BrokenOnLoad:
    """A correctly signed model whose loading fails every time."""

    def load_context(self, context):
        raise RuntimeError("this version cannot load")

    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


@pytest.fixture(scope="module")
def cache_versions(security_gateway) -> dict[str, str]:
    """Two working versions of CACHE_MODEL and one that fails to load, all signed."""
    import cloudpickle
    import mlflow

    from releasegate import signing
    from tests.integration.test_gateway import _frame

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the gateway unpickles these classes
    experiment = mlflow.get_experiment_by_name("gateway-test").experiment_id
    versions = {}
    for role, cls in (("a", Constant), ("b", Constant), ("broken", BrokenOnLoad)):
        methods = {name: value for name, value in vars(cls).items() if not name.startswith("__")}
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=type(cls.__name__, (mlflow.pyfunc.PythonModel,), methods)(),
                registered_model_name=CACHE_MODEL,
                input_example=_frame(3, seed=1)[0],
                pip_requirements=["mlflow"],
            )
        versions[role] = str(info.registered_model_version)
        signing.sign_version(CACHE_MODEL, versions[role], security_gateway.settings)
    return versions


def _put(gw, champion: str, candidate: str | None = None):
    body = {"champion_version": champion, "candidate_version": candidate}
    body |= {"mode": "canary", "candidate_weight": 50} if candidate else {"mode": "single"}
    return gw.client.put(f"/admin/routes/{CACHE_MODEL}", json=body, timeout=120)


def _cached(gw) -> list[str]:
    """The version of each directory in CACHE_MODEL's part of the model cache (named `<version>-<random>`)."""
    root = gw.settings.model_cache_dir / CACHE_MODEL
    return sorted(entry.name.split("-", 1)[0] for entry in root.iterdir()) if root.is_dir() else []


def _holds_only(gw, *versions: str | None) -> None:
    expected = sorted(v for v in versions if v)
    wait_until(lambda: _cached(gw) == expected, timeout=20, what=f"the cache holding only {expected} ({_cached(gw)})")


def _disk_use(root: Path) -> int:
    """Bytes the files under `root` take on disk (as `du` counts them)."""
    total = 0
    for folder, _, files in os.walk(root):
        total += sum(os.lstat(os.path.join(folder, name)).st_blocks * 512 for name in files)
    return total


def _cache_bytes(gw) -> float | None:
    found = re.search(r"^releasegate_gateway_model_cache_bytes (\S+)$", gw.client.get("/metrics").text, re.M)
    return float(found.group(1)) if found else None


def _gauge_settles(gw) -> float:
    """The cache gauge once it equals the cache's real disk use (it is measured after each load and unload)."""
    root = gw.settings.model_cache_dir
    wait_until(
        lambda: _cache_bytes(gw) == _disk_use(root),
        timeout=20,
        what=f"releasegate_gateway_model_cache_bytes ({_cache_bytes(gw)}) equal to the cache's size",
    )
    return _disk_use(root)


def test_route_changes_leave_only_the_served_versions_in_the_cache(security_gateway, cache_versions):
    gw, a, b = security_gateway, cache_versions["a"], cache_versions["b"]
    for _ in range(3):
        for champion, candidate in ((a, None), (b, None), (a, b), (b, None)):
            resp = _put(gw, champion, candidate)
            assert resp.status_code == 200, resp.text
            _holds_only(gw, champion, candidate)
    assert _put(gw, a).status_code == 200
    _holds_only(gw, a)


def test_failed_loads_leave_nothing_behind_and_the_cache_gauge_stays_put(security_gateway, cache_versions):
    gw, a, broken = security_gateway, cache_versions["a"], cache_versions["broken"]
    assert _put(gw, a).status_code == 200
    wait_until(lambda: a in _cached(gw), timeout=20, what=f"v{a} in the cache")
    cached, size = _cached(gw), _disk_use(gw.settings.model_cache_dir)
    try:
        for _ in range(5):  # an admin retrying a route whose version does not load
            resp = _put(gw, a, broken)
            assert resp.status_code == 422 and "could not load" in resp.json()["error"], resp.text
            _holds_only(gw, *cached)
        table = storage.routes
        for _ in range(3):  # a stored route the poller retries (another replica, or the database, wrote it)
            failures = gw.metric("releasegate_gateway_route_load_failures_total", model=CACHE_MODEL)
            with storage.engine(gw.settings.db_url).begin() as conn:
                conn.execute(
                    table.update()
                    .where(table.c.model == CACHE_MODEL)
                    .values(
                        champion_version=broken,
                        candidate_version=None,
                        mode="single",
                        candidate_weight=0,
                        revision=table.c.revision + 1,
                        updated_at=time.time(),
                    )
                )
            wait_until(
                lambda f=failures: gw.metric("releasegate_gateway_route_load_failures_total", model=CACHE_MODEL) > f,
                timeout=20,
                what="the stored route tried and failed",
            )
            _holds_only(gw, *cached)
        assert cached == [a]  # and nothing but the served version was there to begin with
        assert _gauge_settles(gw) == size
    finally:
        assert _put(gw, a).status_code == 200  # a newer route that loads: the failed one is no longer retried
