"""A FAKE Kubernetes API server for the kserve backend tests: the only fake in this project.

No cluster runs on this machine, so this Starlette app on a loopback port implements just the
endpoints the backend calls (GET, server-side-apply PATCH and DELETE of namespaced custom
objects), records every request, and plays KServe's controller in a few lines: a spec change
makes a new revision, a revision becomes ready after a number of reads, and the traffic follows
canaryTrafficPercent the way KServe documents it. Istio is not played: a VirtualService is stored
as applied (the tests read its weights and mirror from what was applied). Knobs make it answer not-ready forever, report
a failed revision, or refuse an apply with 409.

With a `Kubelet`, it also plays the kubelet for each new revision's `storage-initializer`: it runs
the init container's own command on this machine (volumes mapped to local directories), and the
revision fails the way KServe reports it (BlockedByFailedLoad / ModelLoadFailed, the container's
termination message) when that command exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

KINDS = {
    "inferenceservices": "InferenceService",
    "virtualservices": "VirtualService",
    "destinationrules": "DestinationRule",
    "envoyfilters": "EnvoyFilter",
}


@dataclass
class _Isvc:
    # [name, spec key, reads until ready, version, storage-initializer outcome (None: not run yet)]
    revisions: list = field(default_factory=list)
    rolled_out: str | None = None


@dataclass
class Kubelet:
    """Runs a revision's `storage-initializer` here: emptyDir volumes are fresh directories, Secrets the given ones."""

    workdir: Path
    secrets: dict[str, Path] = field(default_factory=dict)  # Secret name -> a directory of its keys
    runs: list[dict] = field(default_factory=list)  # every run: revision, exit code, message, files served

    def run(self, revision: str, predictor: dict) -> dict:
        [container] = [c for c in predictor.get("initContainers", []) if c["name"] == "storage-initializer"]
        volumes = {v["name"]: v for v in predictor.get("volumes", [])}
        local: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                local[mount["mountPath"]] = self.workdir / revision / mount["name"]
                local[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
            elif volume["secret"]["secretName"] in self.secrets:
                local[mount["mountPath"]] = self.secrets[volume["secret"]["secretName"]]
            else:  # a pod whose Secret is missing never starts
                return {"exit": None, "message": f"secret {volume['secret']['secretName']!r} not found"}

        def here(arg: str) -> str:
            for path, directory in local.items():
                if arg == path or arg.startswith(path + "/"):
                    return str(directory) + arg[len(path) :]
            return arg

        termination = self.workdir / revision / "termination-log"
        termination.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable if c == "python" else c for c in container["command"]]
        out = subprocess.run(
            [*command, *map(here, container.get("args", [])), "--termination-log", str(termination)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        message = termination.read_text() if termination.exists() else ""
        if out.returncode and not message:  # terminationMessagePolicy: FallbackToLogsOnError
            message = "\n".join((out.stdout + out.stderr).splitlines()[-20:])
        model_dir = local.get("/mnt/models")
        served = sorted(str(f.relative_to(model_dir)) for f in model_dir.rglob("*") if f.is_file()) if model_dir else []
        outcome = {"revision": revision, "exit": out.returncode, "message": message, "files": served}
        self.runs.append(outcome)
        return outcome


class FakeKubernetes:
    """State and request log of the fake API server; `calls` are the mutating requests in order."""

    def __init__(self, ready_after: int = 1, kubelet: Kubelet | None = None):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.isvc: dict[tuple[str, str], _Isvc] = {}
        self.calls: list[tuple] = []
        self.requests: list[tuple[str, str]] = []
        self.ready_after = ready_after
        self.never_ready: set[str] = set()  # InferenceService names that stay not-ready
        self.failing_versions: set[str] = set()  # versions whose revision fails to load
        self.conflicts: set[str] = set()  # object names whose apply answers 409
        self.kubelet = kubelet
        self.lock = threading.Lock()
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    # -- the app --------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        path = "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"
        return Starlette(routes=[Route(path, self.handle, methods=["GET", "PATCH", "DELETE"])])

    async def handle(self, request: Request):
        p = request.path_params
        key = (p["plural"], p["namespace"], p["name"])
        body = await request.body()
        if self.kubelet is not None and request.method == "GET" and p["plural"] == "inferenceservices":
            await asyncio.to_thread(self._start_pods, (p["namespace"], p["name"]))
        with self.lock:
            self.requests.append((request.method, request.url.path))
            if request.method == "GET":
                obj = self.objects.get(key)
                if obj is None:
                    return _status(404, "NotFound", f'{p["plural"]} "{p["name"]}" not found')
                return JSONResponse(self._with_status(key, obj))
            if request.method == "DELETE":
                self.calls.append(("delete", KINDS[p["plural"]], p["name"]))
                if self.objects.pop(key, None) is None:
                    return _status(404, "NotFound", f'{p["plural"]} "{p["name"]}" not found')
                self.isvc.pop((p["namespace"], p["name"]), None)
                return _status(200, "", "deleted")
            content_type = request.headers.get("content-type", "")
            if content_type != "application/apply-patch+yaml":
                return _status(
                    415, "UnsupportedMediaType", f"this fake takes server-side apply only, got {content_type}"
                )
            if request.query_params.get("fieldManager") != "releasegate" or request.query_params.get("force") == "true":
                return _status(422, "Invalid", "apply must name fieldManager=releasegate and not force")
            doc = json.loads(body)
            self.calls.append(_describe(p["plural"], doc))
            if p["name"] in self.conflicts:
                return _status(
                    409,
                    "Conflict",
                    f'Apply failed with 1 conflict: conflict with "kubectl-edit" using '
                    f"{p['group']}/{p['version']}: .spec.predictor.canaryTrafficPercent",
                )
            return JSONResponse(self._apply(key, doc))

    def _apply(self, key, doc: dict) -> dict:
        old = self.objects.get(key)
        generation = (old or {}).get("metadata", {}).get("generation", 0)
        if old is None or old.get("spec") != doc.get("spec"):
            generation += 1
        obj = {**doc, "metadata": {**doc["metadata"], "generation": generation, "uid": f"uid-{key[2]}"}}
        self.objects[key] = obj
        if key[0] == "inferenceservices":
            state = self.isvc.setdefault((key[1], key[2]), _Isvc())
            predictor = dict(doc["spec"]["predictor"])
            predictor.pop("canaryTrafficPercent", None)
            spec_key = json.dumps(predictor, sort_keys=True)
            if not state.revisions or state.revisions[-1][1] != spec_key:
                name = f"{key[2]}-predictor-{len(state.revisions) + 1:05d}"
                state.revisions.append(
                    [
                        name,
                        spec_key,
                        self.ready_after,
                        doc["metadata"]["annotations"].get("releasegate.io/version"),
                        None,
                    ]
                )
        return self._with_status(key, obj, read=False)

    def _start_pods(self, isvc: tuple[str, str]) -> None:
        """The kubelet's part: each revision's storage-initializer runs once, before the revision can be ready."""
        with self.lock:
            state = self.isvc.get(isvc)
            todo = [rev for rev in (state.revisions if state else []) if rev[4] is None]
        for rev in todo:
            outcome = self.kubelet.run(rev[0], json.loads(rev[1]))
            with self.lock:
                rev[4] = outcome

    def _init_failed(self, rev: list) -> str | None:
        """The storage-initializer's termination message when it failed (KServe reports it as the load failure)."""
        if self.kubelet is None or rev[4] is None or rev[4]["exit"] in (0, None):
            return None
        return rev[4]["message"]

    def _startable(self, rev: list) -> bool:
        return self.kubelet is None or (rev[4] is not None and rev[4]["exit"] == 0)

    def _with_status(self, key, obj: dict, read: bool = True) -> dict:
        if key[0] != "inferenceservices":
            return obj
        state = self.isvc[(key[1], key[2])]
        name = key[2]
        for rev in state.revisions:
            if (
                read
                and rev[2] > 0
                and name not in self.never_ready
                and rev[3] not in self.failing_versions
                and self._startable(rev)
            ):
                rev[2] -= 1
        ready = [
            r
            for r in state.revisions
            if r[2] == 0 and name not in self.never_ready and r[3] not in self.failing_versions and self._startable(r)
        ]
        latest, latest_ready = state.revisions[-1], (ready[-1] if ready else None)
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        traffic = []
        if latest_ready is not None:
            if canary is None or state.rolled_out is None:
                state.rolled_out = latest_ready[0]
                traffic = [{"revisionName": latest_ready[0], "percent": 100, "latestRevision": True}]
            else:
                traffic = [
                    {"revisionName": latest_ready[0], "percent": canary, "latestRevision": True, "tag": "latest"},
                    {"revisionName": state.rolled_out, "percent": 100 - canary, "tag": "prev"},
                ]
                if latest_ready[0] == state.rolled_out:
                    traffic = [{"revisionName": state.rolled_out, "percent": 100}]
        status: dict = {
            "observedGeneration": obj["metadata"]["generation"],
            "url": f"http://{name}.{key[1]}.example.com",
            "components": {
                "predictor": {
                    "latestCreatedRevision": latest[0],
                    "latestReadyRevision": latest_ready[0] if latest_ready else None,
                    "previousRolledoutRevision": state.rolled_out,
                    "traffic": traffic,
                }
            },
        }
        is_ready = latest is latest_ready
        init_failure = self._init_failed(latest)
        if latest[3] in self.failing_versions or init_failure is not None:
            status["modelStatus"] = {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {
                    "reason": "ModelLoadFailed",
                    "message": init_failure
                    if init_failure is not None
                    else f"revision {latest[0]} could not load the model",
                },
            }
            status["conditions"] = [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "RevisionFailed",
                    "message": f"Revision {latest[0]} failed with message: ModelLoadFailed",
                }
            ]
        else:
            status["conditions"] = [{"type": "Ready", "status": "True" if is_ready else "Unknown"}]
        return {**obj, "status": status}

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> FakeKubernetes:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "fake Kubernetes API did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_client(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def kubeconfig(self) -> dict:
        """A kubeconfig naming this server (for an Airflow kubernetes connection)."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }


def _describe(plural: str, doc: dict) -> tuple:
    """An apply as the tests compare it: kind, name and the fields that say what traffic does."""
    kind, name = KINDS[plural], doc["metadata"]["name"]
    spec = doc.get("spec", {})
    if plural == "inferenceservices":
        return (
            "apply",
            kind,
            name,
            doc["metadata"]["annotations"]["releasegate.io/version"],
            spec["predictor"].get("canaryTrafficPercent"),
        )
    if plural == "virtualservices":
        weights = [
            f"{d['headers']['request']['set']['Host'].split('.')[0].removesuffix('-predictor')}={d['weight']}"
            for d in next(r for r in spec["http"] if r.get("name") == "predict")["route"]
            if "weight" in d
        ]
        if weights:  # an experiment: each InferenceService (by its predictor's Host) and its weight
            return ("apply", kind, name, "weights " + " ".join(weights))
        mirror = spec["http"][0].get("mirrorPercentage", {}).get("value")
        return ("apply", kind, name, f"mirror {mirror:g}%" if mirror else "no mirror")
    return ("apply", kind, name)


def _status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure" if code >= 400 else "Success",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status_code=code,
    )
