"""Airflow side of the kserve backend: the cluster's ApiClient from a connection, and the readiness wait.

The ApiClient comes from the cncf-kubernetes provider's KubernetesHook, so an Airflow connection
(RELEASEGATE_K8S_CONN_ID, default `kubernetes_default`) names the cluster: in-cluster service account,
a kubeconfig path or an inline kubeconfig. Importing this module installs that source for
releasegate's kserve backend in the process (worker or triggerer) that imports it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from releasegate.backends.kserve import ReadinessState
from releasegate_airflow import xcom
from releasegate_airflow.triggers import trigger_event

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from releasegate.backends.kserve import KServeBackend


def api_client(conn_id: str | None = None) -> ApiClient:
    """A `kubernetes` ApiClient for the cluster the Airflow connection names."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    from releasegate.k8s import K8sSettings

    return KubernetesHook(conn_id=conn_id or K8sSettings.from_env().conn_id).get_conn()


def install() -> None:
    """Make KubernetesHook's ApiClient the one releasegate's kserve backend uses in this process."""
    from releasegate.backends import kserve

    kserve.use_api_client(api_client)


install()


class InferenceServiceReadyTrigger(BaseTrigger):
    """Poll the InferenceServices a route change applied until they are ready, failed, or the timeout passes.

    Runs in the triggerer: no worker slot is held while Knative starts pods and KServe loads the model.
    """

    def __init__(
        self,
        namespace: str,
        targets: list[dict[str, Any]],
        conn_id: str,
        timeout: float,
        poll_seconds: float,
        started: float | None = None,
    ):
        super().__init__()  # type: ignore[no-untyped-call]  # Airflow leaves BaseTrigger.__init__ unannotated
        self.namespace = namespace
        self.targets = targets
        self.conn_id = conn_id
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.started = time.time() if started is None else started

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "namespace": self.namespace,
                "targets": self.targets,
                "conn_id": self.conn_id,
                "timeout": self.timeout,
                "poll_seconds": self.poll_seconds,
                "started": self.started,
            },
        )

    def _backend(self) -> KServeBackend:
        from releasegate.backends.kserve import KServeBackend
        from releasegate.k8s import K8sSettings

        settings = K8sSettings.from_env().model_copy(update={"namespace": self.namespace})
        return KServeBackend(api_client(self.conn_id), settings, validate=False)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        backend = await asyncio.to_thread(self._backend)
        while True:
            try:
                ready = await asyncio.to_thread(backend.readiness, self.targets)
            except Exception as err:  # the API itself failing is an answer too: say which
                yield trigger_event({"state": ReadinessState.failed, "message": f"{type(err).__name__}: {err}"})
                return
            if ready.state in (ReadinessState.ready, ReadinessState.failed):
                yield trigger_event(
                    {"state": ready.state, "message": ready.message, "status": ready.status, "at": time.time()}
                )
                return
            if time.time() - self.started >= self.timeout:
                yield trigger_event(
                    {
                        "state": ReadinessState.timeout,
                        "status": ready.status,
                        "message": f"not ready after {self.timeout:g}s: {ready.message}",
                    }
                )
                return
            self.log.info("waiting for %s: %s", ", ".join(t["name"] for t in self.targets), ready.message)
            await asyncio.sleep(self.poll_seconds)


class ReadinessWaitOperator(BaseOperator):
    """Wait (deferred) until the route's InferenceServices serve it; pass the route on with its window starting then.

    A backend that was ready at once (the local gateway) hands over no `readiness`: nothing to wait for.
    """

    template_fields = ("release", "route")
    ui_color = "#d6eaf8"

    def __init__(self, *, release: Any, route: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.release = release
        self.route = route

    def execute(self, context: Context) -> dict[str, Any] | None:
        from releasegate.k8s import K8sSettings
        from releasegate.results import Routed

        route = xcom.pull(Routed, self.route)
        if route.readiness is None:
            return xcom.push(route)
        settings = K8sSettings.from_env()
        self.defer(
            trigger=InferenceServiceReadyTrigger(
                namespace=route.readiness.namespace,
                targets=route.readiness.targets,
                conn_id=settings.conn_id,
                timeout=settings.ready_timeout,
                poll_seconds=settings.poll_seconds,
            ),
            method_name="execute_complete",
        )
        return None

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from releasegate import audit
        from releasegate.contract import AuditAction
        from releasegate.results import Opened, Routed

        release, route = xcom.pull(Opened, self.release), xcom.pull(Routed, self.route)
        ready = event["state"] == ReadinessState.ready
        # The cluster's own account of the split (revisions, traffic, url) goes into the release's audit trail.
        audit.append(
            "airflow",
            AuditAction.serving_ready if ready else AuditAction.serving_not_ready,
            model=release.model,
            version=release.candidate,
            release_id=release.release_id,
            details={k: v for k, v in event.items() if k != "at"},
        )
        if not ready:
            # The run's finish task then restores the champion and closes the release as failed.
            raise AirflowFailException(f"the candidate's InferenceService did not become ready: {event['message']}")
        return xcom.push(
            route.model_copy(update={"readiness": None, "since": event["at"], "serving_status": event["status"]})
        )
