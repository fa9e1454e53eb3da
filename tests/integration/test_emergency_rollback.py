"""emergency_rollback end to end: the DAG run (`airflow dags test`) against a real MLflow store, gateway and traffic.

The situation: v2 was promoted over v1 (so `previous` is v1) and a release of v3 is in canary
when v2 turns out to hurt users.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import sqlalchemy as sa

from releasegate import audit, pipeline, registry, release, signing, storage
from releasegate.backends.local import LocalBackend

MODEL = "churn"
REASON = "v2 answers 30% of one region wrong since 09:00"
pytestmark = pytest.mark.integration


def served_versions(since: float) -> set[str]:
    """Versions whose answers went to callers after `since` (the prediction log is written in batches)."""
    with storage.engine().connect() as conn:
        rows = conn.execute(sa.select(storage.predictions.c.version).distinct().where(
            storage.predictions.c.model == MODEL, storage.predictions.c.served.is_(True),
            storage.predictions.c.time > since))
        return {str(r.version) for r in rows}


@pytest.fixture(scope="module")
def promoted_with_canary(stack):
    """v2 champion over previous v1, all traffic on it, and an open release of v3 at 25 %."""
    v1, v2, v3 = stack.versions["champion"], stack.versions["good"], stack.versions["bad"]
    for version in (v2, v3):
        signing.sign_version(MODEL, version)
    LocalBackend().set_route(MODEL, v2)
    registry.set_alias(MODEL, "previous", v1)
    registry.set_alias(MODEL, "champion", v2)
    opened = pipeline.start(MODEL, v3, actor="test")
    LocalBackend().set_route(MODEL, v2, v3, "canary", 25, release_id=opened["release_id"])
    return {"v1": v1, "v2": v2, "v3": v3, "release_id": opened["release_id"]}


def test_dag_puts_the_previous_champion_back_and_aborts_the_open_release(stack, promoted_with_canary):
    v1, v2 = promoted_with_canary["v1"], promoted_with_canary["v2"]
    rel_id = promoted_with_canary["release_id"]
    conf = {"model_name": MODEL, "reason": REASON, "category": "wrong predictions", "release_id": rel_id}
    out = subprocess.run(["airflow", "dags", "test", "emergency_rollback", "-c", json.dumps(conf)],
                         env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert "state=success" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    switched = time.time()

    route = LocalBackend().get_route(MODEL)
    assert (route["champion_version"], route["candidate_version"], route["mode"]) == (v1, None, "single")
    assert registry.get_alias(MODEL, "champion") == v1
    assert registry.get_alias(MODEL, "previous") == v1  # a second rollback cannot jump back to v2
    assert registry.get_version_tags(MODEL, v2)["releasegate.emergency_rollback"] == REASON
    rel = release.get(rel_id)
    assert rel.state is release.State.aborted and REASON in rel.reasons[-1]
    event = [e for e in audit.events(model=MODEL) if e["action"] == "emergency_rollback"][-1]
    assert event["actor"].startswith("airflow")
    assert event["details"]["reason"] == REASON and event["details"]["category"] == "wrong predictions"
    assert (event["details"]["from_version"], event["details"]["to_version"]) == (v2, v1)
    assert event["details"]["aborted_release"]["release_id"] == rel_id
    assert audit.verify().ok
    # Live traffic is answered by v1 alone once the route flipped (the log flushes within seconds).
    time.sleep(4)
    assert served_versions(switched) == {v1}


def test_a_repeat_changes_nothing_and_bad_requests_say_why(stack, promoted_with_canary):
    v1 = promoted_with_canary["v1"]
    again = pipeline.emergency_rollback(MODEL, REASON, actor="cli:test")
    assert again["champion"] == v1 and again["rolled_back_from"] == v1 and again["aborted_release"] is None
    assert registry.get_alias(MODEL, "champion") == v1

    with pytest.raises(ValueError, match="at least 10 characters"):
        pipeline.emergency_rollback(MODEL, "oops", actor="cli:test")
    with pytest.raises(registry.RegistryError):
        pipeline.emergency_rollback("no-such-model", REASON, actor="cli:test")
    registry.delete_alias(MODEL, "previous")
    with pytest.raises(release.ReleaseError, match="no `previous` alias"):
        pipeline.emergency_rollback(MODEL, REASON, actor="cli:test")
