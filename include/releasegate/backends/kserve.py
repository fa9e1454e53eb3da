"""The `kserve` backend: a KServe InferenceService per model, an Istio VirtualService mirror for shadows.

It drives the cluster through a `kubernetes` ApiClient (Airflow's comes from the cncf-kubernetes
provider's KubernetesHook, see plugins/releasegate_airflow/kubernetes.py) with server-side apply
(field manager `releasegate`, never forced: a field another manager owns is a 409 and an error).

| route | objects |
|---|---|
| single (champion) | InferenceService `<m>` at the champion, VirtualService `<m>-entry`; no shadow objects |
| shadow | + InferenceService `<m>-shadow` (candidate, RawDeployment), DestinationRule `<m>-shadow`, VS mirror 100 % |
| canary w | InferenceService `<m>` at the candidate with canaryTrafficPercent w (KServe keeps the rest on the previous revision) |
| promote | InferenceService `<m>` at the candidate without canaryTrafficPercent: the new revision takes the default |
| rollback | canaryTrafficPercent 0 (traffic back on the previous revision at once), then the champion's spec at 0 % until
its revision is ready, then without canaryTrafficPercent |
| experiment | + InferenceService `<m>-arm-<version>` per arm; once all are ready, EnvoyFilter `<m>-arms` on the ingress
gateway (sticky arm by routing key, in a header), then the VS: a route per running arm and the control on that header,
and weights for requests without it: control `<m>` (with stopped arms' shares), each arm its weight (a stopped arm 0) |
| back to single | VS to `<m>` alone, then the EnvoyFilter and the arms' InferenceServices deleted |

A version is verified (signature, trusted key) before its storage URI is published in a manifest, and
again in every pod: the predictor's storage initializer is releasegate's (`serving.verify_dir`), which
serves nothing that does not verify against the bundle published here.
Knative splits a canary per request, so `assignment` is "request": the analysis counts SRM in requests. An
experiment's customer is kept on one arm by the ingress gateway's Lua filter, which hashes the routing key into the
gateway's bucket layout, with a hash of its own (docs/kubernetes.md, "What KServe can and cannot promise").
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from releasegate import k8s
from releasegate.backends import Applied, ArmWeight, DeploymentError, SignatureRefused
from releasegate.contract import Mode
from releasegate.results import ReadinessWait

if TYPE_CHECKING:
    from kubernetes.client import ApiClient
    from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

# A custom resource's (group, version, plural).
Kind: TypeAlias = tuple[str, str, str]
FIELD_MANAGER = "releasegate"
ISVC: Kind = ("serving.kserve.io", "v1beta1", "inferenceservices")
VS: Kind = ("networking.istio.io", "v1", "virtualservices")
DR: Kind = ("networking.istio.io", "v1", "destinationrules")
EF: Kind = ("networking.istio.io", "v1alpha3", "envoyfilters")
_FAILED_TRANSITIONS = {"BlockedByFailedLoad", "InvalidSpec"}


class ReadinessState(StrEnum):
    ready = "ready"
    pending = "pending"
    failed = "failed"
    timeout = "timeout"  # still pending when the wait's time ran out


@dataclass(frozen=True)
class Readiness:
    """What the cluster says about the InferenceServices a route change is waiting for."""

    state: ReadinessState
    message: str
    status: dict[str, Any]  # name -> summary (revisions, traffic, url)


class KServeBackend:
    """Sets a model's split by applying KServe and Istio objects; reads the split back from their status."""

    assignment = "request"  # Knative picks a canary's revision per request (an experiment's arm is sticky)

    def __init__(
        self,
        api_client: ApiClient | None = None,
        settings: k8s.K8sSettings | None = None,
        *,
        wait_ready: bool = True,
        validate: bool | None = None,
    ) -> None:
        from kubernetes import client

        self.settings = settings or k8s.K8sSettings.from_env()
        self.api_client = api_client or default_api_client()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.wait_ready = wait_ready
        # Validate before every apply where the pinned schemas are at hand (tests, CI); a cluster checks anyway.
        self.validate = k8s.schemas_available(self.settings.schemas_dir) if validate is None else validate

    # -- the Backend interface -------------------------------------------------------------------------------

    def set_route(
        self,
        model: str,
        champion_version: str,
        candidate_version: str | None = None,
        mode: Mode = Mode.single,
        candidate_weight: int = 0,
        release_id: str | None = None,
        arms: list[ArmWeight] | None = None,
    ) -> Applied:
        """Apply the split; with wait_ready, return once the InferenceServices are ready, else a `readiness` to wait on."""
        mode = Mode(mode)
        if mode is Mode.experiment:
            return self._set_experiment(model, str(champion_version), release_id, arms)
        if arms:
            raise DeploymentError(f"arms apply to mode {Mode.experiment.value!r} only, got them with {mode.value!r}")
        if mode is not Mode.single and candidate_version is None:
            raise DeploymentError(f"a {mode.value} route needs a candidate version")
        if mode is Mode.canary and not 0 < int(candidate_weight) < 100:
            raise DeploymentError(f"a canary weight must be 1-99, got {candidate_weight}")
        champion_version, candidate_version = (
            str(champion_version),
            None if candidate_version is None else str(candidate_version),
        )
        name = k8s.k8s_name(model)
        s = self.settings
        current = self._get(ISVC, name)
        previous_arms = self._arms(model)
        waits: list[dict[str, Any]] = []
        if mode is Mode.single:
            champion = self._served(model, champion_version, current)
            on, percent = _serving(current)
            if current is not None and percent is not None and on != champion_version:
                # Rollback: traffic back on the previous rolled-out revision now, then restore the champion's
                # spec at 0 % and move the default only once its revision is ready (the default is the latest
                # *ready* revision, which until then would be the candidate's).
                assert on is not None  # releasegate's InferenceServices carry their version's annotation
                self._apply(
                    ISVC,
                    k8s.inference_service(
                        model,
                        self._served(model, on, current),
                        s,
                        canary_traffic_percent=0,
                        release_id=release_id,
                        champion_version=champion_version,
                    ),
                )
                gen = self._apply(
                    ISVC, k8s.inference_service(model, champion, s, canary_traffic_percent=0, release_id=release_id)
                )
                self._wait([{"name": name, "generation": gen, "canary_percent": 0}])
            gen = self._apply(ISVC, k8s.inference_service(model, champion, s, release_id=release_id))
            waits.append({"name": name, "generation": gen, "canary_percent": None})
            self._apply(VS, k8s.virtual_service(model, s, release_id=release_id))
            self._remove_shadow(name)
            self._end_experiment(model, previous_arms)
        elif mode is Mode.shadow:
            assert candidate_version is not None  # a shadow or canary route without one was refused above
            champion = self._served(model, champion_version, current)
            candidate = self._served(model, candidate_version, self._get(ISVC, f"{name}-shadow"))
            gen = self._apply(ISVC, k8s.inference_service(model, champion, s, release_id=release_id))
            waits.append({"name": name, "generation": gen, "canary_percent": None})
            gen = self._apply(ISVC, k8s.inference_service(model, candidate, s, shadow=True, release_id=release_id))
            waits.append({"name": f"{name}-shadow", "generation": gen, "canary_percent": None})
            self._apply(DR, k8s.destination_rule(model, s))
            self._apply(VS, k8s.virtual_service(model, s, mirror_percent=100, release_id=release_id))
            self._end_experiment(model, previous_arms)
        else:
            assert candidate_version is not None  # a shadow or canary route without one was refused above
            candidate = self._served(model, candidate_version, current)
            gen = self._apply(
                ISVC,
                k8s.inference_service(
                    model,
                    candidate,
                    s,
                    canary_traffic_percent=int(candidate_weight),
                    release_id=release_id,
                    champion_version=champion_version,
                ),
            )
            waits.append({"name": name, "generation": gen, "canary_percent": int(candidate_weight)})
            self._apply(VS, k8s.virtual_service(model, s, release_id=release_id))
            self._remove_shadow(name)
            self._end_experiment(model, previous_arms)
        route = Applied(
            model=model,
            champion_version=champion_version,
            candidate_version=candidate_version if mode is not Mode.single else None,
            mode=mode,
            candidate_weight=int(candidate_weight) if mode is Mode.canary else 0,
            release_id=release_id,
        )
        _record_route(route)
        if not self.wait_ready:
            return route.model_copy(update={"readiness": ReadinessWait(namespace=s.namespace, targets=waits)})
        ready = self._wait(waits)
        return route.model_copy(
            update={"revision": ready.status[name].get("latestReadyRevision"), "status": ready.status}
        )

    def _set_experiment(
        self, model: str, champion_version: str, release_id: str | None, arms: list[ArmWeight] | None
    ) -> Applied:
        """The champion's InferenceService as the control, one per arm, then the entry VirtualService's weights."""
        from pydantic import ValidationError

        from releasegate.serving.routing import ArmSpec, RouteSpec

        try:  # the gateway's own rules for an experiment route: arms, weights, distinct versions, an id
            spec = RouteSpec(
                champion_version=champion_version,
                candidate_version=None,
                mode=Mode.experiment,
                candidate_weight=0,
                release_id=release_id,
                arms=[ArmSpec.model_validate(a.model_dump()) for a in arms or ()],
            )
            routes = [k8s.ArmRoute.of(model, a.version, a.weight, a.stopped) for a in spec.arms or ()]
        except (ValidationError, k8s.ManifestError) as err:
            raise DeploymentError(f"refusing the experiment route of {model}: {err}") from err
        name, s = k8s.k8s_name(model), self.settings
        previous_arms = self._arms(model)
        # Every version verified before anything is applied: one refused arm leaves the cluster as it was.
        control = self._served(model, champion_version, self._get(ISVC, name))
        served = [self._served(model, arm.version, self._get(ISVC, arm.name)) for arm in routes]
        waits = [
            {
                "name": name,
                "generation": self._apply(ISVC, k8s.inference_service(model, control, s, release_id=release_id)),
                "canary_percent": None,
            }
        ]
        for arm, version in zip(routes, served, strict=True):
            doc = k8s.inference_service(model, version, s, experiment_arm=True, release_id=release_id)
            waits.append({"name": arm.name, "generation": self._apply(ISVC, doc), "canary_percent": None})
        entry = k8s.virtual_service(model, s, release_id=release_id, experiment=routes)
        assert spec.release_id is not None  # an experiment route without its id was refused above
        sticky = k8s.arms_filter(model, s, spec.release_id, routes)
        route = Applied(
            model=model,
            champion_version=champion_version,
            candidate_version=None,
            mode=Mode.experiment,
            candidate_weight=0,
            release_id=release_id,
            arms=[ArmWeight(version=a.version, weight=a.weight, stopped=a.stopped) for a in routes],
        )
        stale = [a for a in previous_arms if a.name not in {r.name for r in routes}]
        if not self.wait_ready:
            # The caller waits on the readiness; until then a starting arm's share of the requests fails (the
            # experiments module does not take this path: it waits here).
            self._apply(EF, sticky)  # before the routes that match its header: a caller cannot pick an arm
            self._apply(VS, entry)
            self._remove_shadow(name)
            self._remove_arms(stale)
            _record_route(route)
            return route.model_copy(update={"readiness": ReadinessWait(namespace=s.namespace, targets=waits)})
        # Weights only once every arm is ready, so no share of the traffic goes to an arm still starting.
        try:
            ready = self._wait(waits)
        except DeploymentError:
            # The VirtualService does not name the new arms yet, so a later route change could not find them.
            self._remove_arms([r for r in routes if r.name not in {a.name for a in previous_arms}])
            raise
        self._apply(EF, sticky)
        self._apply(VS, entry)
        self._remove_shadow(name)
        self._remove_arms(stale)
        _record_route(route)
        return route.model_copy(
            update={"revision": ready.status[name].get("latestReadyRevision"), "status": ready.status}
        )

    def get_route(self, model: str) -> Applied | None:
        """The split the InferenceServices' status reports, with the versions from their annotations (an
        experiment's arms from the entry VirtualService's)."""
        name = k8s.k8s_name(model)
        current = self._get(ISVC, name)
        if current is None:
            return None
        on, percent = _serving(current)
        arms = self._arms(model)
        if arms:
            entry = self._get(VS, f"{name}-entry") or {}
            status = {name: _summary(current)}
            for arm in arms:
                obj = self._get(ISVC, arm.name)
                status[arm.name] = _summary(obj) if obj is not None else {"missing": True}
            weighted = [r for r in entry.get("spec", {}).get("http") or [] if r.get("name") == "predict"]
            for destination in (weighted or [{}])[0].get("route") or []:
                host = ((destination.get("headers") or {}).get("request") or {}).get("set", {}).get("Host", "")
                target = host.split(".", 1)[0].removesuffix("-predictor")
                if target in status:
                    status[target]["weight"] = destination.get("weight")
            annotations = entry.get("metadata", {}).get("annotations") or {}
            return Applied(
                model=model,
                champion_version=on or "",
                candidate_version=None,
                mode=Mode.experiment,
                candidate_weight=0,
                release_id=annotations.get("releasegate.io/release-id") or None,
                arms=[ArmWeight(version=a.version, weight=a.weight, stopped=a.stopped) for a in arms],
                status=status,
            )
        shadow = self._get(ISVC, f"{name}-shadow")
        previous = (current.get("metadata", {}).get("annotations") or {}).get("releasegate.io/champion-version")
        release_id = (current.get("metadata", {}).get("annotations") or {}).get("releasegate.io/release-id") or None
        summary = _summary(current)
        if shadow is not None:
            return Applied(
                model=model,
                champion_version=on or "",
                mode=Mode.shadow,
                candidate_weight=0,
                candidate_version=_serving(shadow)[0],
                release_id=release_id,
                status=summary,
            )
        if percent is None:
            return Applied(
                model=model,
                champion_version=on or "",
                candidate_version=None,
                mode=Mode.single,
                candidate_weight=0,
                release_id=release_id,
                status=summary,
            )
        return Applied(
            model=model,
            champion_version=previous or "",
            candidate_version=on,
            mode=Mode.canary,
            candidate_weight=percent,
            release_id=release_id,
            status=summary,
        )

    # -- readiness --------------------------------------------------------------------------------------------

    def readiness(self, targets: list[dict[str, Any]]) -> Readiness:
        """ready when every target's status is for the applied generation and Ready; failed on a failed revision."""
        status: dict[str, Any] = {}
        pending: list[str] = []
        for target in targets:
            obj = self._get(ISVC, target["name"])
            if obj is None:
                return Readiness(ReadinessState.failed, f"InferenceService {target['name']} disappeared", status)
            summary = status[target["name"]] = _summary(obj)
            failure = _failure(obj)
            if failure:
                return Readiness(ReadinessState.failed, f"InferenceService {target['name']}: {failure}", status)
            st = obj.get("status") or {}
            if st.get("observedGeneration", 0) < target["generation"]:
                pending.append(
                    f"{target['name']}: status is for generation {st.get('observedGeneration', 0)}, "
                    f"not yet {target['generation']}"
                )
            elif _condition(obj, "Ready") != "True":
                pending.append(f"{target['name']}: not Ready")
            elif target.get("canary_percent") and summary.get("latestReadyRevision") != summary.get(
                "latestCreatedRevision"
            ):
                pending.append(f"{target['name']}: revision {summary.get('latestCreatedRevision')} not ready")
        if pending:
            return Readiness(ReadinessState.pending, "; ".join(pending), status)
        return Readiness(ReadinessState.ready, "ready", status)

    def _wait(self, targets: list[dict[str, Any]]) -> Readiness:
        deadline = time.monotonic() + self.settings.ready_timeout
        while True:
            ready = self.readiness(targets)
            if ready.state is ReadinessState.ready:
                return ready
            if ready.state is ReadinessState.failed:
                raise DeploymentError(ready.message)
            if time.monotonic() >= deadline:
                raise DeploymentError(f"not ready after {self.settings.ready_timeout:g}s: {ready.message}")
            time.sleep(self.settings.poll_seconds)

    # -- the API ----------------------------------------------------------------------------------------------

    def _get(self, kind: Kind, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        group, version, plural = kind
        try:
            obj = self.custom.get_namespaced_custom_object(group, version, self.settings.namespace, plural, name)
            return cast("dict[str, Any]", obj)
        except ApiException as err:
            if err.status == 404:
                return None
            raise _error(f"reading {plural}/{name}", err) from err

    def _apply(self, kind: Kind, doc: dict[str, Any]) -> int:
        """Server-side apply; returns the object's generation after it."""
        from kubernetes.client.exceptions import ApiException

        if self.validate:
            try:
                k8s.validate(doc, self.settings.schemas_dir)
            except k8s.ManifestError as err:
                raise DeploymentError(f"refusing to apply an invalid manifest: {err}") from err
        group, version, plural = kind
        name = doc["metadata"]["name"]
        try:
            out = self.custom.patch_namespaced_custom_object(
                group,
                version,
                doc["metadata"].get("namespace") or self.settings.namespace,
                plural,
                name,
                doc,
                field_manager=FIELD_MANAGER,
                force=False,
                _content_type="application/apply-patch+yaml",
            )
        except ApiException as err:
            raise _error(f"applying {plural}/{name}", err) from err
        return int((out.get("metadata") or {}).get("generation") or 0)

    def _delete(self, kind: Kind, name: str, namespace: str | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        group, version, plural = kind
        try:
            self.custom.delete_namespaced_custom_object(
                group, version, namespace or self.settings.namespace, plural, name
            )
        except ApiException as err:
            if err.status != 404:
                raise _error(f"deleting {plural}/{name}", err) from err

    def _remove_shadow(self, name: str) -> None:
        if self._get(ISVC, f"{name}-shadow") is not None:
            self._delete(ISVC, f"{name}-shadow")
        if self._get(DR, f"{name}-shadow") is not None:
            self._delete(DR, f"{name}-shadow")

    def _arms(self, model: str) -> list[k8s.ArmRoute]:
        """The experiment arms the model's entry VirtualService was last applied with ([] outside an experiment)."""
        entry = self._get(VS, f"{k8s.k8s_name(model)}-entry")
        try:
            return [
                k8s.ArmRoute.of(model, a["version"], a["weight"], a.get("stopped", False))
                for a in k8s.experiment_arms(entry)
            ]
        except (k8s.ManifestError, KeyError, TypeError) as err:
            raise DeploymentError(
                f"the entry VirtualService of {model} names unreadable experiment arms: {err}"
            ) from err

    def _remove_arms(self, arms: list[k8s.ArmRoute]) -> None:
        """Delete arms' InferenceServices; called after the VirtualService sends them no traffic."""
        for arm in arms:
            self._delete(ISVC, arm.name)

    def _end_experiment(self, model: str, arms: list[k8s.ArmRoute]) -> None:
        """After the entry VirtualService left an experiment: its sticky-assignment filter, then its arms."""
        if arms:
            self._delete(EF, f"{k8s.k8s_name(model)}-arms", self.settings.ingress_namespace)
        self._remove_arms(arms)

    def _served(self, model: str, version: str, current: dict[str, Any] | None) -> k8s.Served:
        """The version as a manifest names it; verified first unless `current` already serves it (verified then).

        Either way each pod verifies again what it downloads, against the digest named here.
        """
        on = (current or {}).get("spec", {}).get("predictor", {}).get("model", {})
        annotations = ((current or {}).get("metadata") or {}).get("annotations") or {}
        digest, bundle_uri = (
            annotations.get("releasegate.io/signature-digest", ""),
            annotations.get("releasegate.io/signature-uri", ""),
        )
        if annotations.get("releasegate.io/version") == version and on.get("storageUri") and digest and bundle_uri:
            return k8s.Served(version, on["storageUri"], digest, bundle_uri)
        return verified_version(model, version, self.settings)


def verified_version(model: str, version: str, settings: k8s.K8sSettings) -> k8s.Served:
    """Verify the version's signature (as `releasegate verify` does), then name its stored files and bundle for KServe.

    SignatureRefused for an unsigned, tampered or untrusted version.
    """
    from releasegate import registry, signing

    try:
        with tempfile.TemporaryDirectory(prefix="rg-k8s-verify-") as tmp:
            digest = signing.fetch_verified(model, version, parent=Path(tmp)).digest
    except signing.SignatureError as err:
        raise SignatureRefused(f"refusing to publish {model} v{version}: {err}") from err
    mlflow_client = registry.client()
    uri = mlflow_client.get_model_version_download_uri(model, version)
    run_artifacts = mlflow_client.get_run(registry.source_run(model, version)).info.artifact_uri
    bundle_uri = f"{run_artifacts.rstrip('/')}/{signing.BUNDLE_ARTIFACT}"
    return k8s.Served(version, k8s.storage_uri(uri, settings), digest, k8s.storage_uri(bundle_uri, settings))


_api_client_factory: Callable[[], ApiClient] | None = None


def use_api_client(factory: Callable[[], ApiClient] | None) -> None:
    """Make `factory()` the source of ApiClients (the Airflow plugin installs KubernetesHook's); None resets."""
    global _api_client_factory
    _api_client_factory = factory


def default_api_client() -> ApiClient:
    """The installed factory's ApiClient, else in-cluster service account, else the local kubeconfig."""
    from kubernetes import client, config

    if _api_client_factory is not None:
        return _api_client_factory()
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _error(what: str, err: ApiException) -> DeploymentError:
    try:
        message = json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError, AttributeError):
        message = err.reason
    if err.status == 409:
        message = (
            f"conflict: another field manager owns what releasegate applies ({message}); releasegate never "
            f"forces an apply - settle who manages this object, then retry"
        )
    return DeploymentError(f"{what} failed ({err.status}): {message}", err.status)


def _serving(obj: dict[str, Any] | None) -> tuple[str | None, int | None]:
    """(version in the spec, canaryTrafficPercent or None) of an InferenceService."""
    if obj is None:
        return None, None
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return annotations.get("releasegate.io/version"), obj.get("spec", {}).get("predictor", {}).get(
        "canaryTrafficPercent"
    )


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cast("str | None", cond.get("status"))
    return None


def _failure(obj: dict[str, Any]) -> str | None:
    st = obj.get("status") or {}
    model = st.get("modelStatus") or {}
    if model.get("transitionStatus") in _FAILED_TRANSITIONS:
        info = model.get("lastFailureInfo") or {}
        return f"{model['transitionStatus']}: {info.get('reason', 'unknown reason')}" + (
            f" - {info['message']}" if info.get("message") else ""
        )
    for cond in st.get("conditions") or []:
        if cond.get("status") == "False" and cond.get("reason") in ("RevisionFailed", "RevisionMissing"):
            return f"{cond['type']} {cond['reason']}: {cond.get('message', '')}".rstrip(": ")
    return None


def _summary(obj: dict[str, Any]) -> dict[str, Any]:
    st = obj.get("status") or {}
    predictor = (st.get("components") or {}).get("predictor") or {}
    return {
        "url": st.get("url"),
        "observedGeneration": st.get("observedGeneration"),
        "ready": _condition(obj, "Ready"),
        "latestCreatedRevision": predictor.get("latestCreatedRevision"),
        "latestReadyRevision": predictor.get("latestReadyRevision"),
        "previousRolledoutRevision": predictor.get("previousRolledoutRevision"),
        "traffic": [
            {"revision": t.get("revisionName"), "percent": t.get("percent")} for t in predictor.get("traffic") or []
        ],
    }


def _record_route(route: Applied) -> None:
    """Keep the split in `routes`, as the gateway does: the logger sink labels rows (arm, mode, release) from it."""
    import sqlalchemy as sa

    from releasegate import storage

    table = storage.routes
    values: dict[str, object] = {
        "champion_version": route.champion_version,
        "candidate_version": route.candidate_version,
        "mode": route.mode.value,
        "candidate_weight": route.candidate_weight,
        "release_id": route.release_id,
        "arms": [a.model_dump() for a in route.arms] if route.arms else None,
    }
    with storage.engine().begin() as conn:
        current = conn.execute(
            sa.select(table.c.revision).where(table.c.model == route.model).with_for_update()
        ).scalar()
        values |= {"updated_at": time.time(), "revision": (current or 0) + 1}
        if current is None:
            conn.execute(table.insert().values(model=route.model, **values))
        else:
            conn.execute(table.update().where(table.c.model == route.model).values(**values))
