"""The kserve backend end to end: real MLflow store, real sink process, real Airflow runs; a FAKE Kubernetes API.

No cluster runs on this machine, so the Kubernetes API server is the fake in kserve_fake_api.py (a
Starlette app on a loopback port that records every request; the only fake in this project). The
traffic that KServe's data plane would carry is played from that fake's state: each request goes to
a revision drawn from the InferenceService's reported traffic split (and to the shadow when the
VirtualService mirrors), the revision's version of the real model answers, and the request and
response CloudEvents KServe's logger would send are posted to the real sink, with labels as feedback.

Tests run in file order on one module stack: refusal of an unsigned version, then two Airflow runs
(a promotion, and a rollback of the worse candidate in shadow: readiness waits in the triggerer,
verdicts on the sink's rows), then the pipeline-level cases that the DAG's tasks call (rollback from
a shadow and from a canary, not ready for too long, a failed revision, 409 on apply).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from releasegate.backends.kserve import ReadinessState
from releasegate.contract import AuditAction, Mode, RouteChange, Stage
from releasegate.release import State
from releasegate.verdict import Decision
from tests import forkserver
from tests.factories import SHADOW as SHADOW_STAGE
from tests.factories import canary, verdict
from tests.integration.conftest import ROOT, Stack, free_port
from tests.integration.kserve_fake_api import FakeKubernetes
from tests.require import require

MODEL = "churn"
pytestmark = pytest.mark.integration

IS, SHADOW, VS, DR = (
    ("InferenceService", "churn"),
    ("InferenceService", "churn-shadow"),
    ("VirtualService", "churn-entry"),
    ("DestinationRule", "churn-shadow"),
)


def apply_is(version: str, canary: int | None = None, name: str = "churn") -> tuple:
    return ("apply", "InferenceService", name, version, canary)


def apply_vs(mirror: bool = False) -> tuple:
    return ("apply", "VirtualService", "churn-entry", "mirror 100%" if mirror else "no mirror")


def shadow_sequence(champion: str, candidate: str) -> list[tuple]:
    return [
        apply_is(champion),
        apply_is(candidate, name="churn-shadow"),
        ("apply", "DestinationRule", "churn-shadow"),
        apply_vs(mirror=True),
    ]


REMOVE_SHADOW = [("delete", "InferenceService", "churn-shadow"), ("delete", "DestinationRule", "churn-shadow")]


def _policy(tmp: Path) -> Path:
    """default.yaml plus `kserve-test`: one 50 % canary step and wider margins, so a run needs less traffic."""
    policies = tmp / "policies"
    policies.mkdir()
    default = ROOT / "include" / "policies" / "default.yaml"
    (policies / "default.yaml").write_text(default.read_text())
    pol = yaml.safe_load(default.read_text())
    pol.update(
        {
            "name": "kserve-test",
            "description": "short kserve test release",
            "poll_seconds": 2,
            "max_extensions": 0,
            "slices": [],
        }
    )
    pol["shadow"].update({"max_window_seconds": 400, "min_samples": 150, "min_agreement": 0.7})
    pol["canary"].update({"steps": [50], "max_window_seconds": 400, "min_samples": 150})
    pol["primary"]["margin"] = 0.06
    # The played data plane times whole batches on a shared machine: latency is not what these tests judge (a CI run
    # on a busy machine rolled back on it even at 6x the champion's p99), so no candidate request is ever too slow.
    pol["guardrails"]["latency_p99_margin"] = 5.0
    pol["guardrails"]["latency_p99_slack_ms"] = 600_000.0
    (policies / "kserve-test.yaml").write_text(yaml.safe_dump(pol))
    return policies


class DataPlane:
    """KServe's data plane played from the fake cluster: revision per request, mirror, logger events, labels."""

    def __init__(self, fake: FakeKubernetes, sink_url: str, rps: float = 120):
        self.fake, self.sink_url, self.rps = fake, sink_url, rps
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.models: dict[str, object] = {}
        self.sent = self.errors = 0

    def _split(self) -> tuple[list[tuple[str, int]], str | None]:
        """[(version, percent)] of the champion InferenceService, and the shadow's version if mirrored."""
        with self.fake.lock:
            state = self.fake.isvc.get(("models", "churn"))
            obj = self.fake.objects.get(("inferenceservices", "models", "churn"))
            if state is None or obj is None:
                return [], None
            status = self.fake._with_status(("inferenceservices", "models", "churn"), obj, read=False)
            versions = {r[0]: r[3] for r in state.revisions}
            split = [
                (versions[t["revisionName"]], t["percent"])
                for t in status["status"]["components"]["predictor"]["traffic"]
                if t["percent"]
            ]
            vs = self.fake.objects.get(("virtualservices", "models", "churn-entry"))
            mirrored = vs is not None and "mirror" in vs["spec"]["http"][0]
            shadow = self.fake.objects.get(("inferenceservices", "models", "churn-shadow"))
            shadow_version = (
                shadow["metadata"]["annotations"]["releasegate.io/version"] if mirrored and shadow else None
            )
        return split, shadow_version

    def _model(self, version: str):
        if version not in self.models:
            from releasegate import registry, signing

            self.models[version] = registry.load_pyfunc(signing.fetch_verified(MODEL, version))
        return self.models[version]

    async def _run(self) -> None:
        import aiohttp
        import pandas as pd

        from releasegate.demo import data

        frame = data.generate(20_000, seed=5)
        rows, labels = frame[data.FEATURES].to_dict(orient="records"), frame[data.LABEL].tolist()
        draw = random.Random(3)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
            start, n = time.time(), 0
            while not self.stop.is_set():
                split, shadow = self._split()
                calls: dict[str, list[tuple[str, dict]]] = {}  # version -> [(request id, row)]
                feedback = []
                # A loaded machine may fall behind: drop the backlog rather than send it in one burst.
                target = int((time.time() - start) * self.rps)
                due, n = min(target - n, int(self.rps)), target
                for k in range(max(0, due) if split else 0):
                    i, request_id = draw.randrange(len(rows)), f"k-{n}-{k}-{draw.getrandbits(32):08x}"
                    versions = [draw.choices([v for v, _ in split], weights=[p for _, p in split])[0]]
                    for version in versions + ([shadow] if shadow else []):
                        calls.setdefault(version, []).append((request_id, rows[i]))
                    feedback.append({"request_id": request_id, "ground_truth": int(labels[i])})
                pending = [self._call(client, version, batch, pd) for version, batch in calls.items()]
                if feedback:
                    pending.append(
                        _send(client.post(f"{self.sink_url}/feedback", json=feedback, headers=peer(FEEDBACK_ACCOUNT)))
                    )
                for result in await asyncio.gather(*pending):
                    self.sent += 1
                    self.errors += result >= 300
                await asyncio.sleep(0.05)

    async def _call(self, client, version: str, batch: list[tuple[str, dict]], pd) -> int:
        """One predict call per version for the batch (as a model server batches), then each request's two events."""
        t0 = time.time()
        outputs = self._model(version).predict(pd.DataFrame([row for _, row in batch]))
        t1 = time.time()
        values = outputs.tolist() if hasattr(outputs, "tolist") else list(outputs)
        url = f"{self.sink_url}/events?model={MODEL}&version={version}"
        posts = []
        for (request_id, row), value in zip(batch, values):
            request = {
                "inputs": [
                    {"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64", "data": [v]}
                    for k, v in row.items()
                ]
            }
            response = {
                "model_name": MODEL,
                "outputs": [{"name": "predict", "shape": [1], "datatype": "INT64", "data": [int(value)]}],
            }
            # The agent's workers send in any order; the sink pairs them either way.
            posts.append(_send(client.post(url, data=json.dumps(request), headers=_ce("request", request_id, t0))))
            posts.append(_send(client.post(url, data=json.dumps(response), headers=_ce("response", request_id, t1))))
        return max(await asyncio.gather(*posts), default=0)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


async def _send(coro) -> int:
    try:
        resp = await coro
        await resp.read()
        return resp.status
    except Exception:  # counted, the analysis sees the gap
        return 599


# The service accounts the sink admits by default in namespace `models`: the predictors' and the feedback one.
PREDICTOR_ACCOUNT, FEEDBACK_ACCOUNT = "models/default", "models/releasegate-feedback"


def peer(account: str) -> dict:
    """The X-Forwarded-Client-Cert the sink's Istio sidecar appends for a caller of this service account."""
    namespace, name = account.split("/")
    return {
        "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/models/sa/releasegate-sink;"
        f"URI=spiffe://cluster.local/ns/{namespace}/sa/{name}"
    }


def _ce(kind: str, request_id: str, when: float) -> dict:
    return {
        **peer(PREDICTOR_ACCOUNT),
        "ce-specversion": "1.0",
        "ce-id": request_id,
        "ce-source": "http://localhost:9081/",
        "ce-type": f"org.kubeflow.serving.inference.{kind}",
        "ce-inferenceservicename": "churn",
        "ce-namespace": "models",
        "ce-component": "predictor",
        "ce-time": datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z"),
        "content-type": "application/json",
    }


@pytest.fixture(scope="module")
def kstack(tmp_path_factory, airflow_env):
    """Demo models (champion signed, backend tag kserve), the fake API with the champion deployed, the sink."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("kserve")
    fake = FakeKubernetes(ready_after=2).start()
    sink_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_POLICIES_DIR", str(_policy(home)))
        mp.setenv("RELEASEGATE_K8S_NAMESPACE", "models")
        mp.setenv("RELEASEGATE_K8S_READY_TIMEOUT", "60")
        mp.setenv("RELEASEGATE_K8S_POLL_SECONDS", "0.3")
        mp.setenv("RELEASEGATE_K8S_STORAGE_REWRITE", f"file://{home}/mlartifacts=s3://mlflow")
        mp.setenv(
            "AIRFLOW_CONN_KUBERNETES_DEFAULT",
            json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": fake.kubeconfig()}}),
        )
        from releasegate import registry, signing, storage
        from releasegate.backends import kserve
        from releasegate.demo import models
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        stack = Stack(home, dict(os.environ))
        stack.versions = models.register_demo_models(settings, model_name=MODEL)
        signing.sign_version(MODEL, stack.versions["champion"])
        registry.client().set_registered_model_tag(MODEL, "releasegate.backend", "kserve")
        kserve.use_api_client(fake.api_client)
        stack.fake = fake
        stack.sink_url = f"http://127.0.0.1:{sink_port}"
        sink = stack.start("sink", [sys.executable, "-m", "releasegate.serving.kserve_sink", "--port", str(sink_port)])
        deadline = time.time() + 60
        while True:
            assert sink.poll() is None, stack.log("sink")
            try:
                if httpx.get(f"{stack.sink_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "sink did not start:\n" + stack.log("sink")
            time.sleep(0.3)
        route = kserve.KServeBackend().set_route(MODEL, stack.versions["champion"])
        assert route.readiness is None and fake.calls == [apply_is(stack.versions["champion"]), apply_vs()]
        try:
            yield stack
        finally:
            kserve.use_api_client(None)
            stack.stop("sink")
            fake.stop()
            storage.dispose_all()


def run_release(version: str, policy: str = "kserve-test") -> str:
    conf = json.dumps({"model_name": MODEL, "version": version, "policy": policy})
    out = forkserver.run(["airflow", "dags", "test", "model_release", "-c", conf], env=dict(os.environ), timeout=900)
    finished = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if "DagRun Finished" in line]
    assert finished, out.stdout[-3000:] + out.stderr[-3000:]
    return finished[-1]


def newest_release(version: str):
    from releasegate import release

    return next(r for r in release.list_releases(MODEL) if r.candidate_version == version)


def test_an_unsigned_version_is_never_published(kstack):
    from releasegate.backends import SignatureRefused
    from releasegate.backends.kserve import KServeBackend

    kstack.fake.calls.clear()
    unsigned = kstack.versions["bad"]
    with pytest.raises(SignatureRefused, match=f"refusing to publish churn v{unsigned}: .*not signed"):
        KServeBackend().set_route(MODEL, kstack.versions["champion"], unsigned, Mode.shadow)
    assert kstack.fake.calls == []  # nothing reached the cluster


def test_an_experiment_with_an_unsigned_arm_is_never_published(kstack):
    """Every arm is verified before anything is applied (here `bad` is not signed yet: tests run in file order)."""
    from releasegate.backends import ArmWeight, SignatureRefused
    from releasegate.backends.kserve import KServeBackend

    kstack.fake.calls.clear()
    unsigned = kstack.versions["bad"]
    with pytest.raises(SignatureRefused, match=f"refusing to publish churn v{unsigned}: .*not signed"):
        KServeBackend().set_route(
            MODEL,
            kstack.versions["champion"],
            None,
            Mode.experiment,
            0,
            "exp-0",
            [ArmWeight(version=unsigned, weight=20)],
        )
    assert kstack.fake.calls == []


def test_release_dag_promotes_on_kserve_with_the_exact_applies(kstack):
    from releasegate import audit, registry
    from releasegate.backends.kserve import KServeBackend

    good, champion = kstack.versions["good"], kstack.versions["champion"]
    kstack.fake.calls.clear()
    with DataPlane(kstack.fake, kstack.sink_url) as plane:
        run_release(good)
    rel = newest_release(good)
    assert rel.state.value == "promoted", (rel.reasons, plane.sent, plane.errors, kstack.log("sink"))
    assert [v.window.stage for v in rel.verdicts] == [Stage.shadow(), Stage.canary(1, 50)]
    assert kstack.fake.calls == [
        *shadow_sequence(champion, good),  # shadow: mirror to the candidate
        apply_is(good, 50),
        apply_vs(),
        *REMOVE_SHADOW,  # canary 50 %
        apply_is(good),
        apply_vs(),  # promote: the default moves to the new revision
    ]
    assert registry.get_alias(MODEL, "champion") == good
    route = KServeBackend().get_route(MODEL)
    assert route.champion_version == good and route.mode is Mode.single
    assert route.status["traffic"] == [{"revision": route.status["latestReadyRevision"], "percent": 100}]
    # KServe splits per request: the canary's SRM was counted in requests (every request its own unit here).
    canary = rel.verdicts[-1]
    assert sum(canary.srm.counts.values()) == sum(arm.requests for arm in canary.samples.values())
    # The status read back from the cluster is in the release's audit trail, per stage.
    ready = [e["details"] for e in audit.events(release_id=rel.release_id) if e["action"] == AuditAction.serving_ready]
    assert len(ready) == 2 and ready[0]["status"]["churn-shadow"]["ready"] == "True"
    assert ready[1]["status"]["churn"]["traffic"][0]["percent"] == 50


def test_release_dag_rolls_back_on_kserve_with_the_exact_applies(kstack):
    from releasegate import registry

    # Against whichever version is champion now (the promotion test's candidate, unless that release failed).
    bad, champion = kstack.versions["bad"], registry.get_alias(MODEL, "champion")
    kstack.fake.calls.clear()
    with DataPlane(kstack.fake, kstack.sink_url):
        run_release(bad)
    rel = newest_release(bad)
    assert rel.state.value == "rolled_back", rel.reasons
    assert "accuracy" in rel.reasons[-1] or "agree" in rel.reasons[-1]  # caught on the sink's rows, in shadow
    assert kstack.fake.calls == [*shadow_sequence(champion, bad), apply_is(champion), apply_vs(), *REMOVE_SHADOW]


def _open_to_validating(version: str) -> str:
    """A signed `version`'s release moved straight to `validating` (its validation is not what these tests are about)."""
    from releasegate import pipeline, release, signing

    signing.sign_version(MODEL, version)
    rid = pipeline.start(MODEL, version, "kserve-test", actor="test").release_id
    for to in (State.signing, State.validating):
        release.transition(rid, to, actor="test")
    return rid


def test_rollback_from_a_shadow_removes_the_mirror_and_the_shadow(kstack):
    from releasegate import pipeline, registry, release

    champion, candidate = registry.get_alias(MODEL, "champion"), kstack.versions["bad"]
    rid = _open_to_validating(candidate)
    kstack.fake.calls.clear()
    pipeline.route(rid, 0, actor="test")
    release.record_verdict(rid, verdict(SHADOW_STAGE, Decision.rollback), actor="test")
    assert pipeline.rollback(rid, actor="test").state is State.rolled_back
    assert kstack.fake.calls == [*shadow_sequence(champion, candidate), apply_is(champion), apply_vs(), *REMOVE_SHADOW]


def test_rollback_from_a_canary_sets_it_to_zero_then_restores_the_champion(kstack):
    from releasegate import pipeline, registry, release

    champion, candidate = registry.get_alias(MODEL, "champion"), kstack.versions["bad"]
    rid = _open_to_validating(candidate)
    kstack.fake.calls.clear()
    pipeline.route(rid, 0, actor="test")
    release.record_verdict(rid, verdict(SHADOW_STAGE, Decision.promote), actor="test")
    pipeline.route(rid, 1, actor="test")
    release.record_verdict(rid, verdict(canary(50, 1), Decision.rollback), actor="test")
    assert pipeline.rollback(rid, actor="test").state is State.rolled_back
    assert kstack.fake.calls == [
        *shadow_sequence(champion, candidate),
        apply_is(candidate, 50),
        apply_vs(),
        *REMOVE_SHADOW,
        apply_is(candidate, 0),  # all traffic back on the previous revision at once
        apply_is(champion, 0),  # the champion's spec, at 0 % until its revision is ready
        apply_is(champion),
        apply_vs(),
    ]
    status = kstack.fake._with_status(
        ("inferenceservices", "models", "churn"),
        kstack.fake.objects[("inferenceservices", "models", "churn")],
        read=False,
    )
    predictor = status["status"]["components"]["predictor"]
    versions = {r[0]: r[3] for r in kstack.fake.isvc[("models", "churn")].revisions}
    assert [(versions[t["revisionName"]], t["percent"]) for t in predictor["traffic"]] == [(champion, 100)]


def test_not_ready_for_too_long_fails_the_release_and_restores_the_champion(kstack, monkeypatch):
    from releasegate import pipeline, registry
    from releasegate.backends import DeploymentError

    monkeypatch.setenv("RELEASEGATE_K8S_READY_TIMEOUT", "1.5")
    champion, candidate = registry.get_alias(MODEL, "champion"), kstack.versions["bad"]
    rid = _open_to_validating(candidate)
    kstack.fake.never_ready.add("churn-shadow")
    kstack.fake.calls.clear()
    try:
        with pytest.raises(DeploymentError, match=r"not ready after 1.5s: churn-shadow: not Ready"):
            pipeline.route(rid, 0, actor="test")
        summary = pipeline.finish(rid, actor="test", pipeline_failed=True)
    finally:
        kstack.fake.never_ready.clear()
    assert summary.state is State.failed
    assert kstack.fake.calls == [*shadow_sequence(champion, candidate), apply_is(champion), apply_vs(), *REMOVE_SHADOW]


def test_a_failed_revision_is_reported_and_the_champion_restored(kstack):
    from releasegate import pipeline, registry, release
    from releasegate.backends import DeploymentError

    champion, candidate = registry.get_alias(MODEL, "champion"), kstack.versions["bad"]
    rid = _open_to_validating(candidate)
    release.transition(rid, State.shadow, actor="test")
    release.record_verdict(rid, verdict(SHADOW_STAGE, Decision.promote), actor="test")
    kstack.fake.failing_versions.add(candidate)
    kstack.fake.calls.clear()
    try:
        with pytest.raises(DeploymentError, match="BlockedByFailedLoad: ModelLoadFailed - revision churn-predictor-"):
            pipeline.route(rid, 1, actor="test")
        assert pipeline.finish(rid, actor="test", pipeline_failed=True).state is State.failed
    finally:
        kstack.fake.failing_versions.clear()
    assert kstack.fake.calls == [
        apply_is(candidate, 50),
        apply_vs(),
        apply_is(candidate, 0),
        apply_is(champion, 0),
        apply_is(champion),
        apply_vs(),
    ]


def test_a_409_on_apply_is_an_error_and_nothing_is_forced(kstack):
    from releasegate import registry
    from releasegate.backends import DeploymentError
    from releasegate.backends.kserve import KServeBackend

    champion = registry.get_alias(MODEL, "champion")
    kstack.fake.conflicts.add("churn-entry")
    kstack.fake.calls.clear()
    try:
        with pytest.raises(
            DeploymentError, match=r"applying virtualservices/churn-entry failed \(409\): conflict"
        ) as err:
            KServeBackend().set_route(MODEL, champion)
    finally:
        kstack.fake.conflicts.clear()
    assert err.value.status == 409
    assert kstack.fake.calls == [apply_is(champion), apply_vs()]


def test_an_emergency_rollback_of_a_kserve_model_goes_to_kserve_not_the_local_gateway(kstack):
    """The model's backend tag decides where traffic goes back: no gateway runs here, so a call to it would fail."""
    from releasegate import audit, pipeline, registry

    champion = registry.get_alias(MODEL, "champion")
    registry.set_alias(MODEL, "previous", kstack.versions["champion"])
    kstack.fake.calls.clear()
    result = pipeline.emergency_rollback(MODEL, "the new champion mislabels a whole region", actor="test")
    assert result.champion == kstack.versions["champion"] and result.rolled_back_from == champion
    assert kstack.fake.calls == [apply_is(kstack.versions["champion"]), apply_vs()]  # no shadow left to remove
    event = [e for e in audit.events(model=MODEL) if e["action"] == AuditAction.route][-1]
    assert event["details"]["change"] == RouteChange.emergency_rollback


# -- experiments (A/B/n) ---------------------------------------------------------------------------------------


def arm_is(version: str) -> tuple:
    return apply_is(version, name=f"churn-arm-{version}")


def apply_weights(**weights: int) -> tuple:
    return ("apply", "VirtualService", "churn-entry", "weights " + " ".join(f"{k}={v}" for k, v in weights.items()))


def _experiment_versions() -> tuple[str, str, str]:
    """The champion now and the two other demo versions (signed) as the arms."""
    from releasegate import registry, signing

    champion = registry.get_alias(MODEL, "champion")
    a, b = sorted((v for v in ("1", "2", "3") if v != champion), key=int)
    for version in (a, b):
        signing.sign_version(MODEL, version)
    return champion, a, b


def _labelled_by_the_sink(kstack, version: str) -> dict:
    """Post request/response events of `version` to the real sink until one's row is labelled from the current
    route (the sink caches a model's route for 2 s); that row."""
    import sqlalchemy as sa

    from releasegate import storage
    from tests.waiting import wait_until

    sent: list[str] = []
    request = {"inputs": [{"name": "tenure", "shape": [1], "datatype": "FP64", "data": [3.0]}]}
    response = {"model_name": MODEL, "outputs": [{"name": "predict", "shape": [1], "datatype": "INT64", "data": [1]}]}

    def labelled() -> dict | None:
        request_id = f"exp-{version}-{len(sent)}-{random.getrandbits(32):08x}"
        url, now = f"{kstack.sink_url}/events?model={MODEL}&version={version}", time.time()
        for kind, body in (("request", request), ("response", response)):
            assert httpx.post(url, content=json.dumps(body), headers=_ce(kind, request_id, now)).status_code == 202
        sent.append(request_id)
        p = storage.predictions
        with storage.engine().connect() as conn:
            rows = conn.execute(sa.select(p).where(p.c.request_id.in_(sent), p.c.mode == Mode.experiment)).all()
        return dict(rows[0]._mapping) if rows else None

    return wait_until(labelled, timeout=60, every=0.5, what=f"an experiment row of v{version} from the sink")


def test_an_experiment_runs_each_arm_in_its_own_inference_service_behind_istio_weights(kstack):
    """The champion's InferenceService is the control, each arm gets one of its own (verified as a candidate is), and
    once they are all ready the ingress gateway's Lua filter keeps each customer on one arm, which the entry
    VirtualService routes on (its weights for requests the filter did not see). What the fake cannot show: Istio
    and Envoy themselves (it stores the objects as applied; tests/envoy_lua.py runs the filter's Lua in LuaJIT and
    picks the route as Istio documents it)."""
    from releasegate import k8s, signing
    from releasegate.backends import ArmWeight
    from releasegate.backends.kserve import KServeBackend
    from tests.envoy_lua import LuaFilter, routed_host

    require(None if k8s.schemas_available() else "CRD schemas not found (see ../shared/k8s-schemas/README.md)")
    champion, a, b = _experiment_versions()
    kstack.fake.calls.clear()
    backend = KServeBackend()
    assert backend.validate  # each manifest was checked against the pinned CRD schemas before its apply
    applied = backend.set_route(
        MODEL,
        champion,
        None,
        Mode.experiment,
        0,
        "exp-1",
        [ArmWeight(version=a, weight=30), ArmWeight(version=b, weight=20)],
    )
    assert kstack.fake.calls == [
        apply_is(champion),
        arm_is(a),
        arm_is(b),
        # only once all three are ready: the sticky assignment, then the routes that follow it
        ("apply", "EnvoyFilter", "churn-arms"),
        apply_weights(**{"churn": 50, f"churn-arm-{a}": 30, f"churn-arm-{b}": 20}),
    ]
    assert applied.mode is Mode.experiment and applied.readiness is None
    assert {n: st["ready"] for n, st in applied.status.items()} == {
        "churn": "True",
        f"churn-arm-{a}": "True",
        f"churn-arm-{b}": "True",
    }
    objects = kstack.fake.objects
    stored_docs = {}
    for key in (
        ("inferenceservices", "models", f"churn-arm-{a}"),
        ("virtualservices", "models", "churn-entry"),
        ("envoyfilters", "istio-system", "churn-arms"),  # in the ingress gateway's namespace
    ):
        stored = {k: v for k, v in objects[key].items() if k != "status"}
        stored["metadata"] = {k: v for k, v in stored["metadata"].items() if k not in ("generation", "uid")}
        k8s.validate(stored)
        stored_docs[key[0]] = stored
    # Through the filter and the routes as applied: each customer on one arm, in the weights' shares.
    lua, entry = LuaFilter(stored_docs["envoyfilters"]), stored_docs["virtualservices"]
    host, keys = entry["spec"]["hosts"][0], [f"customer-{i}" for i in range(3000)]
    reached = [routed_host(entry, lua.request({":authority": host, "X-Routing-Key": k})) for k in keys]
    assert reached == [routed_host(entry, lua.request({":authority": host, "X-Routing-Key": k})) for k in keys]
    shares = {h.split("-predictor")[0]: reached.count(h) / len(keys) for h in set(reached)}
    assert shares == pytest.approx({"churn": 0.5, f"churn-arm-{a}": 0.3, f"churn-arm-{b}": 0.2}, abs=0.04)
    # The arm's pods download and verify its own version against the bundle releasegate verified at publication.
    arm = objects[("inferenceservices", "models", f"churn-arm-{a}")]
    [init] = arm["spec"]["predictor"]["initContainers"]
    args = dict(zip(init["args"][::2], init["args"][1::2], strict=True))
    assert args["--expect-digest"] == arm["metadata"]["annotations"]["releasegate.io/signature-digest"]
    assert args["--expect-digest"] == signing.sign_version(MODEL, a)  # the digest of a's bundle
    assert arm["metadata"]["labels"]["releasegate.io/role"] == "experiment"
    assert arm["spec"]["predictor"]["logger"]["url"].endswith(f"/events?model=churn&version={a}")
    route = backend.get_route(MODEL)
    assert (route.mode, route.champion_version, route.release_id) == (Mode.experiment, champion, "exp-1")
    assert route.arms == [ArmWeight(version=a, weight=30), ArmWeight(version=b, weight=20)]
    assert {n: st["weight"] for n, st in route.status.items()} == {
        "churn": 50,
        f"churn-arm-{a}": 30,
        f"churn-arm-{b}": 20,
    }
    # The sink labels an arm's logged requests as the gateway does: the experiment's, arm `candidate`.
    row = _labelled_by_the_sink(kstack, a)
    assert (row["version"], row["arm"], row["release_id"], row["served"]) == (a, "candidate", "exp-1", True)
    row = _labelled_by_the_sink(kstack, champion)
    assert (row["version"], row["arm"], row["release_id"]) == (champion, "champion", "exp-1")


def test_a_stopped_arm_sends_its_share_to_the_control_and_keeps_running(kstack):
    """Stopping arm b: weight 0, its 20 % to the control; no InferenceService changes (no new revision)."""
    from releasegate.backends import ArmWeight
    from releasegate.backends.kserve import KServeBackend

    champion, a, b = _experiment_versions()
    generations = {
        k: o["metadata"]["generation"] for k, o in kstack.fake.objects.items() if k[0] == "inferenceservices"
    }
    kstack.fake.calls.clear()
    arms = [ArmWeight(version=a, weight=30), ArmWeight(version=b, weight=20, stopped=True)]
    KServeBackend().set_route(MODEL, champion, None, Mode.experiment, 0, "exp-1", arms)
    assert kstack.fake.calls == [
        apply_is(champion),
        arm_is(a),
        arm_is(b),
        ("apply", "EnvoyFilter", "churn-arms"),  # b's buckets now name the control
        apply_weights(**{"churn": 70, f"churn-arm-{a}": 30, f"churn-arm-{b}": 0}),
    ]
    assert generations == {
        k: o["metadata"]["generation"] for k, o in kstack.fake.objects.items() if k[0] == "inferenceservices"
    }
    route = KServeBackend().get_route(MODEL)
    assert route.arms == arms and route.status[f"churn-arm-{b}"]["weight"] == 0


def test_ending_an_experiment_returns_the_host_to_the_champion_then_removes_the_arms(kstack):
    from releasegate.backends.kserve import KServeBackend

    champion, a, b = _experiment_versions()
    kstack.fake.calls.clear()
    KServeBackend().set_route(MODEL, champion)
    assert kstack.fake.calls == [
        apply_is(champion),
        apply_vs(),  # all traffic to the champion first
        ("delete", "EnvoyFilter", "churn-arms"),
        ("delete", "InferenceService", f"churn-arm-{a}"),
        ("delete", "InferenceService", f"churn-arm-{b}"),
    ]
    assert not [k for k in kstack.fake.objects if "-arm" in k[2]]
    route = KServeBackend().get_route(MODEL)
    assert (route.mode, route.champion_version, route.arms) == (Mode.single, champion, None)


def test_an_experiment_whose_arm_never_gets_ready_leaves_no_arm_behind(kstack, monkeypatch):
    """The weights are never applied, and the arms started for it are deleted: traffic stays on the champion."""
    from releasegate.backends import ArmWeight, DeploymentError
    from releasegate.backends.kserve import KServeBackend

    monkeypatch.setenv("RELEASEGATE_K8S_READY_TIMEOUT", "1.5")
    champion, a, b = _experiment_versions()
    kstack.fake.never_ready.add(f"churn-arm-{b}")
    kstack.fake.calls.clear()
    try:
        with pytest.raises(DeploymentError, match=f"not ready after 1.5s: churn-arm-{b}: not Ready"):
            KServeBackend().set_route(
                MODEL,
                champion,
                None,
                Mode.experiment,
                0,
                "exp-2",
                [ArmWeight(version=a, weight=10), ArmWeight(version=b, weight=10)],
            )
    finally:
        kstack.fake.never_ready.clear()
    assert kstack.fake.calls == [
        apply_is(champion),
        arm_is(a),
        arm_is(b),
        ("delete", "InferenceService", f"churn-arm-{a}"),
        ("delete", "InferenceService", f"churn-arm-{b}"),
    ]
    assert KServeBackend().get_route(MODEL).mode is Mode.single


def test_a_bad_experiment_route_is_refused_before_the_cluster_sees_it(kstack):
    from releasegate.backends import ArmWeight, DeploymentError
    from releasegate.backends.kserve import KServeBackend

    champion, a, b = _experiment_versions()
    kstack.fake.calls.clear()
    backend = KServeBackend()
    with pytest.raises(DeploymentError, match="the arms' weights add up to 100"):
        backend.set_route(
            MODEL,
            champion,
            None,
            Mode.experiment,
            0,
            "exp-3",
            [ArmWeight(version=a, weight=60), ArmWeight(version=b, weight=40)],
        )
    with pytest.raises(DeploymentError, match="needs the experiment's id as release_id"):
        backend.set_route(MODEL, champion, None, Mode.experiment, 0, None, [ArmWeight(version=a, weight=10)])
    with pytest.raises(DeploymentError, match="arms apply to mode 'experiment' only"):
        backend.set_route(MODEL, champion, a, Mode.canary, 10, "rel-x", [ArmWeight(version=b, weight=10)])
    assert kstack.fake.calls == []


def test_the_readiness_trigger_answers_ready_failed_or_timeout(monkeypatch):
    """Airflow's side on its own (no DAG run): the trigger polls the fake API through KubernetesHook's ApiClient."""
    from releasegate import k8s
    from releasegate_airflow.kubernetes import InferenceServiceReadyTrigger

    fake = FakeKubernetes(ready_after=1).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RG_TEST_CLUSTER",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": fake.kubeconfig()}}),
    )
    fake._apply(
        ("inferenceservices", "models", "churn"),
        k8s.inference_service(
            MODEL, k8s.Served("2", "s3://mlflow/m", "sha256:0", "s3://mlflow/releasegate/model.sig"), k8s.K8sSettings()
        ),
    )

    def first_event(timeout: float) -> dict:
        trigger = InferenceServiceReadyTrigger(
            "models", [{"name": "churn", "generation": 1, "canary_percent": None}], "rg_test_cluster", timeout, 0.1
        )

        async def run():
            async for event in trigger.run():
                return event.payload

        return asyncio.run(run())

    try:
        fake.never_ready.add("churn")
        event = first_event(timeout=0.5)
        assert event["state"] == ReadinessState.timeout and event["message"] == "not ready after 0.5s: churn: not Ready"
        fake.never_ready.clear()
        event = first_event(timeout=10)
        assert event["state"] == ReadinessState.ready and event["status"]["churn"]["traffic"][0]["percent"] == 100
        fake.failing_versions.add("2")
        event = first_event(timeout=10)
        assert event["state"] == ReadinessState.failed and "BlockedByFailedLoad: ModelLoadFailed" in event["message"]
    finally:
        fake.stop()
