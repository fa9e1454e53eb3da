"""The watch after promotion, end to end: a candidate whose errors start only once it is the champion.

A real `model_release` run (`airflow dags test`, as test_model_release runs it) on a real gateway with
real traffic releases a fault-switch version (tests/models/fault_switch.py, wrapping the demo's better
candidate) under a policy with `watch.seconds`. It passes shadow and canary with the switch off; once the
release is `watching`, the test turns the switch on (20 % of model calls fail). The watch must then roll
the release back "after promotion": traffic and the `champion` alias on the previous version (which the
gateway kept loaded: it never loads it again), the release `rolled_back`, an incident opened.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from releasegate import incidents, registry, release
from releasegate.backends.local import LocalBackend
from releasegate.contract import StageKind
from releasegate.verdict import Decision
from tests import forkserver
from tests.models import fault_switch
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
MODEL = "churn"
WATCH_SECONDS = 240  # long enough for the fault to be seen on a busy machine; a passing watch is not waited out
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


@pytest.fixture
def watched_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default policy with one canary step and a watch, from the user's own policy folder.

    Its latency allowance is wide: the fault-switch wrapper is a Python pyfunc, far slower than the
    champion's compiled scikit-learn graph, and this test is about errors, not latency.
    """
    policy = yaml.safe_load((ROOT / "include/policies/default.yaml").read_text())
    policy.update(name="watched", slices=[], watch={"seconds": WATCH_SECONDS, "min_requests": 200})
    policy["guardrails"]["latency_p99_slack_ms"] = 1000
    policy["canary"]["steps"] = [50]
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "watched.yaml").write_text(yaml.safe_dump(policy))
    monkeypatch.setenv("RELEASEGATE_POLICIES_DIR", str(folder))
    return "watched"


def _loads(log: str, version: str) -> int:
    return len(re.findall(rf"loaded {MODEL} v{version} \(signature verified", log))


def test_errors_that_start_after_promotion_roll_the_release_back(stack, watched_policy, tmp_path):
    from releasegate import signing

    champion = stack.versions["champion"]
    switch = tmp_path / "fault-on"
    faulty = fault_switch.register(MODEL, stack.versions["good"], switch, error_rate=0.2, workdir=tmp_path)
    signing.sign_version(MODEL, faulty)
    conf = json.dumps({"model_name": MODEL, "version": faulty, "policy": watched_policy})
    run = forkserver.start(
        ["airflow", "dags", "test", "model_release", "-c", conf], env=dict(os.environ), output=tmp_path / "run.log"
    )
    try:

        def watching() -> release.Release | None:
            assert run.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
            found = [r for r in release.list_releases(MODEL) if r.candidate_version == faulty]
            return found[0] if found and found[0].state is release.State.watching else None

        rel = wait_until(watching, timeout=1200, every=1, what="the release promoted and watching")
        assert registry.get_alias(MODEL, "champion") == faulty and LocalBackend().get_route(MODEL).champion_version == (
            faulty
        )
        switch.touch()
        fault_started = time.time()
        run.wait(timeout=WATCH_SECONDS + 600)
    finally:
        if run.poll() is None:
            run.kill()
    rel = release.get(rel.release_id)
    assert rel.state is release.State.rolled_back, (rel.reasons, (tmp_path / "run.log").read_text()[-4000:])
    watch = rel.verdicts[-1]
    assert watch.window.stage.kind is StageKind.watch and watch.decision is Decision.rollback, watch
    assert rel.reasons[-1].startswith("after promotion:") and "error_rate" in rel.reasons[-1], rel.reasons
    assert "error_rate" in [m.name for m in watch.metrics if m.passed is False], watch.metrics
    print(f"watch: rolled back {rel.ended_at - fault_started:.1f} s after the fault started ({watch.reason})")

    assert registry.get_alias(MODEL, "champion") == champion
    route = LocalBackend().get_route(MODEL)
    assert (route.champion_version, route.candidate_version) == (champion, None)
    # The previous champion stayed loaded through the promotion and the watch: it was loaded once, at the start.
    assert _loads(stack.log("gateway"), champion) == 1, stack.log("gateway")[-3000:]
    [opened] = [i for i in incidents.list_incidents(model=MODEL) if i.release_id == rel.release_id]
    assert opened.severity is incidents.Severity.high and "after promotion" in opened.title, opened
