"""KServe / Istio manifests for the `kserve` backend: settings, rendering from include/k8s/, validation.

Manifests are Jinja2 templates rendered from the release (never string concatenation) and parsed
back into dicts; `validate` checks them against the CRDs' openAPIV3Schema (KServe InferenceService,
Istio VirtualService / DestinationRule / EnvoyFilter / PeerAuthentication / AuthorizationPolicy) and core kinds
against the Kubernetes client's models.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import yaml
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from releasegate.contract import Mode, StageKind

if TYPE_CHECKING:
    import jinja2

_INCLUDE = Path(__file__).resolve().parent.parent
TEMPLATES = _INCLUDE / "k8s"
# The pinned CRD copies live beside the repository (see their README for source and version).
DEFAULT_SCHEMAS = _INCLUDE.parent.parent / "shared" / "k8s-schemas"
CRD_FILES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve.serving.kserve.io_inferenceservices.yaml",
    ("networking.istio.io/v1", "VirtualService"): "istio.crd-all.gen.yaml",
    ("networking.istio.io/v1", "DestinationRule"): "istio.crd-all.gen.yaml",
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): "istio.crd-all.gen.yaml",
    ("security.istio.io/v1", "PeerAuthentication"): "istio.crd-all.gen.yaml",
    ("security.istio.io/v1", "AuthorizationPolicy"): "istio.crd-all.gen.yaml",
}
# Where the predictor's storage initializer puts the model (KServe's own path, which MLServer reads) and
# finds the trust material.
MODEL_DIR = "/mnt/models"
TRUST_DIR = "/etc/releasegate/trust"
_ACCOUNT = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
# KServe derives Service and host names from the InferenceService's, so it must be a DNS-1035 label
# short enough to take the "-shadow-predictor" suffix.
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 63 - len("-shadow-predictor")
# An experiment arm's InferenceService is `<model>-arm-<version>`; its Knative revisions add "-predictor-00001".
_MAX_ARM_NAME = 63 - len("-predictor-00001")


class ManifestError(ValueError):
    """A manifest that does not validate, or a name or setting that cannot make one; the message says where."""


class K8sSettings(BaseSettings):
    """Where and how the kserve backend deploys (RELEASEGATE_K8S_*)."""

    model_config = SettingsConfigDict(env_prefix="RELEASEGATE_K8S_", env_ignore_empty=True, extra="ignore")

    namespace: str = Field(default="models", description="Namespace of the models' InferenceServices.")
    sink_url: str = Field(
        default="",
        description="The logger sink's URL; default the `releasegate-sink` Service's `/events` in the namespace.",
    )
    host: str = Field(
        default="{model}.models.example.com", description="Entry host of a model; {model} is its k8s name."
    )
    gateway: str = Field(
        default="knative-serving/knative-ingress-gateway",
        description="The Istio gateway the entry VirtualService binds to.",
    )
    ingress_namespace: str = Field(
        default="istio-system",
        description="Namespace of the Istio ingress gateway's pods (an experiment's sticky-assignment EnvoyFilter "
        "goes there).",
    )
    ingress_selector: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"istio": "ingressgateway"},
        description="Labels of the Istio ingress gateway's pods, `key=value,...` (the EnvoyFilter's workloadSelector); "
        "default `istio=ingressgateway`.",
    )
    local_gateway: str = Field(
        default="knative-local-gateway.istio-system.svc.cluster.local",
        description="Where the champion's Knative route is reached from the mesh.",
    )
    service_account: str | None = Field(
        default=None, description="Predictor service account with read access to the artifact store."
    )
    image: str = Field(
        default="releasegate:latest",
        description="The releasegate image: each predictor's storage initializer (download and verify) runs it.",
    )
    trust_secret: str = Field(
        default="releasegate-trust",
        description="Secret in the namespace holding what predictors verify with: trusted public keys, and "
        "trusted CA certificates as `*.crt`.",
    )
    storage_secret: str | None = Field(
        default=None,
        description="Secret whose keys become the storage initializer's environment (e.g. `AWS_ACCESS_KEY_ID`, "
        "`AWS_SECRET_ACCESS_KEY`, `MLFLOW_S3_ENDPOINT_URL`); none: the service account's own access.",
    )
    trust_domain: str = Field(default="cluster.local", description="The mesh's trust domain (Istio SPIFFE identities).")
    sink_event_accounts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Service accounts (`namespace/name`, comma-separated) whose pods may post logger events to the "
        "sink; default the predictors' (`RELEASEGATE_K8S_SERVICE_ACCOUNT`, else `default`) in the namespace.",
    )
    sink_feedback_accounts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Service accounts (`namespace/name`, comma-separated) that may post labels to the sink's "
        "`/feedback`; default `releasegate-feedback` in the namespace.",
    )
    sink_max_body_bytes: int = Field(
        default=1_048_576, gt=0, description="Largest event or feedback body the sink takes (larger: 413)."
    )
    sink_queue_bytes: int = Field(
        default=64 * 1_048_576,
        gt=0,
        description="Event bytes the sink holds while its database is slow or down (more: 503, counted).",
    )
    sink_pending_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds the sink waits for a request's response before writing the request as an error.",
    )
    storage_rewrite: Annotated[tuple[str, str] | None, NoDecode] = Field(
        default=None,
        description="`FROM=TO`: rewrite MLflow artifact URIs into ones the storage initializer reads "
        "(e.g. `mlflow-artifacts:/=s3://mlflow/`).",
    )
    conn_id: str = Field(
        default="kubernetes_default", description="Airflow connection naming the cluster (KubernetesHook)."
    )
    ready_timeout: float = Field(default=600.0, description="Seconds a route change may take to become ready.")
    poll_seconds: float = Field(default=5.0, description="Seconds between readiness looks.")
    min_replicas: int = Field(default=1, description="Predictor replicas kept running.")
    routing_key_header: str = Field(default="X-Routing-Key", description="Header the logger keeps as the routing key.")
    schemas_dir: Path = Field(
        default=DEFAULT_SCHEMAS,
        validation_alias=AliasChoices("RELEASEGATE_K8S_SCHEMAS"),
        description="The pinned CRD schemas manifests are validated against.",
    )

    @field_validator("storage_rewrite", mode="before")
    @classmethod
    def _from_to(cls, value: object) -> object:
        if isinstance(value, str):
            if "=" not in value:
                raise ValueError(f"RELEASEGATE_K8S_STORAGE_REWRITE must be FROM=TO, got {value!r}")
            return tuple(value.split("=", 1))
        return value

    @field_validator("ingress_selector", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [part.strip() for part in value.split(",") if part.strip()]
            if not pairs or any("=" not in pair for pair in pairs):
                raise ValueError(f"RELEASEGATE_K8S_INGRESS_SELECTOR must be key=value[,key=value], got {value!r}")
            return dict(pair.split("=", 1) for pair in pairs)
        return value

    @field_validator("sink_event_accounts", "sink_feedback_accounts", mode="before")
    @classmethod
    def _accounts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for account in value if isinstance(value, list) else []:
            if not isinstance(account, str) or not _ACCOUNT.match(account):
                raise ValueError(f"a service account must be `namespace/name`, got {account!r}")
        return value

    @model_validator(mode="after")
    def _sink(self) -> K8sSettings:
        self.sink_url = self.sink_url or f"http://releasegate-sink.{self.namespace}.svc.cluster.local/events"
        self.sink_event_accounts = self.sink_event_accounts or [f"{self.namespace}/{self.service_account or 'default'}"]
        self.sink_feedback_accounts = self.sink_feedback_accounts or [f"{self.namespace}/releasegate-feedback"]
        return self

    def principals(self, accounts: list[str]) -> list[str]:
        """Istio principals (`<trust domain>/ns/<namespace>/sa/<name>`) of `namespace/name` service accounts."""
        out = []
        for account in accounts:
            namespace, name = account.split("/", 1)
            out.append(f"{self.trust_domain}/ns/{namespace}/sa/{name}")
        return out

    @classmethod
    def from_env(cls) -> K8sSettings:
        try:
            return cls()
        except ValidationError as err:
            raise ManifestError(str(err)) from err


def k8s_name(model: str) -> str:
    """The Kubernetes name of a registered model: lower-cased, '_' and '.' as '-'; ManifestError if still invalid."""
    name = model.lower().replace("_", "-").replace(".", "-")
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        raise ManifestError(
            f"model name {model!r} gives {name!r}, not a valid InferenceService name (a DNS-1035 "
            f"label: lower-case letters, digits and '-', starting with a letter, at most {_MAX_NAME} "
            f"characters)"
        )
    return name


def arm_name(model: str, version: str) -> str:
    """The InferenceService name of an experiment arm: `<model>-arm-<version>`; ManifestError if not a valid one."""
    name = f"{k8s_name(model)}-arm-{str(version).lower().replace('_', '-').replace('.', '-')}"
    if not _NAME.match(name) or len(name) > _MAX_ARM_NAME:
        raise ManifestError(
            f"{model} v{version} gives the experiment arm name {name!r}, not a valid InferenceService name (a "
            f"DNS-1035 label of at most {_MAX_ARM_NAME} characters: lower-case letters, digits and '-')"
        )
    return name


def predictor_host(name: str, settings: K8sSettings) -> str:
    """The cluster-local host of an InferenceService's predictor, which Knative's local gateway routes by."""
    return f"{name}-predictor.{settings.namespace}.svc.cluster.local"


def storage_uri(download_uri: str, settings: K8sSettings) -> str:
    """The URI KServe's storage initializer fetches: MLflow's artifact URI, its prefix rewritten if configured."""
    if settings.storage_rewrite:
        old, new = settings.storage_rewrite
        if download_uri.startswith(old):
            return new + download_uri[len(old) :]
    return download_uri


@dataclass(frozen=True)
class Served:
    """One version as an InferenceService serves it: its files, and the signature bundle they must verify against."""

    version: str
    storage_uri: str
    digest: str  # sha256 of the bundle releasegate verified at publication
    bundle_uri: str


@functools.lru_cache(maxsize=1)
def _jinja() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def render(template: str, **values: Any) -> list[dict[str, Any]]:
    """Render include/k8s/<template> with `values` and parse every YAML document in it."""
    text = _jinja().get_template(template).render(**values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def logger_url(settings: K8sSettings, model: str, version: str) -> str:
    """The sink URL a revision's logger posts to; the query names the registered model and the version."""
    from urllib.parse import urlencode

    sep = "&" if "?" in settings.sink_url else "?"
    return f"{settings.sink_url}{sep}{urlencode({'model': model, 'version': version})}"


def inference_service(
    model: str,
    served: Served,
    settings: K8sSettings,
    *,
    shadow: bool = False,
    experiment_arm: bool = False,
    canary_traffic_percent: int | None = None,
    release_id: str | None = None,
    champion_version: str | None = None,
) -> dict[str, Any]:
    """The InferenceService serving `served`: the model's own, its `-shadow` one in RawDeployment mode, or an
    experiment arm's `-arm-<version>` one (Knative, like the model's own).

    `champion_version`: the version the rest of a canary's traffic stays on (default: `served`'s). The
    predictor's storage initializer is releasegate's: it downloads the files and verifies them against
    the bundle of digest `served.digest`, so a pod serves only what verifies there.
    """
    if canary_traffic_percent is not None and not 0 <= canary_traffic_percent <= 100:
        raise ManifestError(f"canaryTrafficPercent must be 0-100, got {canary_traffic_percent}")
    if not served.digest.startswith("sha256:") or not served.bundle_uri:
        raise ManifestError(
            f"{model} v{served.version} has no signature bundle to verify against (digest {served.digest!r}, "
            f"bundle {served.bundle_uri!r}): refusing a predictor that could not verify what it serves"
        )
    if shadow and experiment_arm:
        raise ManifestError("an InferenceService is a shadow or an experiment arm, not both")
    name = k8s_name(model)
    if shadow:
        name, role = f"{name}-shadow", StageKind.shadow.value
    elif experiment_arm:
        name, role = arm_name(model, served.version), Mode.experiment.value
    else:
        role = "serving"
    [doc] = render(
        "inferenceservice.yaml.j2",
        name=name,
        model=model,
        namespace=settings.namespace,
        role=role,
        version=served.version,
        champion_version=champion_version or served.version,
        digest=served.digest,
        release_id=release_id,
        raw_deployment=shadow,
        min_replicas=settings.min_replicas,
        service_account=settings.service_account,
        canary_traffic_percent=canary_traffic_percent,
        logger_url=logger_url(settings, model, served.version),
        metadata_headers=[settings.routing_key_header],
        storage_uri=served.storage_uri,
        bundle_uri=served.bundle_uri,
        image=settings.image,
        trust_secret=settings.trust_secret,
        storage_secret=settings.storage_secret,
        model_dir=MODEL_DIR,
        trust_dir=TRUST_DIR,
    )
    return doc


def virtual_service(
    model: str,
    settings: K8sSettings,
    *,
    mirror_percent: float = 0.0,
    release_id: str | None = None,
    experiment: list[ArmRoute] | None = None,
) -> dict[str, Any]:
    """The entry VirtualService: all traffic to the model's InferenceService, mirrored to the shadow when asked;
    or, given an `experiment`'s arms, split by weight between the control (the model's InferenceService, with
    the stopped arms' shares) and the arms' InferenceServices (a stopped arm at weight 0)."""
    name = k8s_name(model)
    destinations: list[dict[str, Any]] = [{"host": predictor_host(name, settings), "weight": None}]
    arms: list[dict[str, Any]] = []
    sticky: list[dict[str, str]] = []
    if experiment is not None:
        if mirror_percent:
            raise ManifestError("an experiment's VirtualService splits traffic; it mirrors none")
        nominal = [a.weight for a in experiment]
        if not experiment or any(not 1 <= w <= 99 for w in nominal) or sum(nominal) >= 100:
            raise ManifestError(
                f"an experiment needs 1 or more arms of 1-99 % each, leaving the control some traffic; got {nominal}"
            )
        control = 100 - sum(a.weight for a in experiment if not a.stopped)
        destinations = [{"host": predictor_host(name, settings), "weight": control}] + [
            {"host": predictor_host(a.name, settings), "weight": 0 if a.stopped else a.weight} for a in experiment
        ]
        arms = [{"version": a.version, "weight": a.weight, "stopped": a.stopped} for a in experiment]
        # The sticky routes: the arm the ingress gateway's Lua filter (arms_filter) named for the request.
        sticky = [{"name": "control", "value": CONTROL, "host": predictor_host(name, settings)}] + [
            {"name": a.name, "value": a.version, "host": predictor_host(a.name, settings)}
            for a in experiment
            if not a.stopped
        ]
    [doc] = render(
        "virtualservice.yaml.j2",
        name=name,
        namespace=settings.namespace,
        host=settings.host.format(model=name),
        gateway=settings.gateway,
        local_gateway=settings.local_gateway,
        destinations=destinations,
        mirror_percent=float(mirror_percent),
        release_id=release_id,
        arms_annotation=ARMS_ANNOTATION,
        arms=json.dumps(arms, separators=(",", ":")) if arms else None,
        sticky=sticky,
        arm_header=ARM_HEADER,
    )
    return doc


ARM_HEADER = "x-releasegate-arm"  # the arm the ingress gateway's Lua filter chose (Envoy's header names: lower case)
CONTROL = "control"  # its value for the control


def arms_filter(model: str, settings: K8sSettings, release_id: str, experiment: list[ArmRoute]) -> dict[str, Any]:
    """The EnvoyFilter that keeps an experiment's customer on one arm: a Lua filter on the ingress gateway
    (include/k8s/arms.lua) hashes the experiment's salt and the routing key (`routing_key_header`) to a
    bucket and names the arm in ARM_HEADER, which the entry VirtualService's sticky routes match. Salted
    with the model and the experiment's id, as the gateway's assignment is (routing.salted)."""
    from releasegate.serving.routing import experiment_salt

    name = k8s_name(model)
    config = {
        "host": settings.host.format(model=name).lower(),
        "salt": experiment_salt(model, release_id),
        "header": ARM_HEADER,
        "key_header": settings.routing_key_header.lower(),
        "arms": [{"version": a.version, "weight": a.weight, "stopped": a.stopped} for a in experiment],
    }
    source = f"CONFIG = {_lua(config)}\n" + (TEMPLATES / "arms.lua").read_text()
    [doc] = render(
        "envoyfilter.yaml.j2",
        name=name,
        namespace=settings.ingress_namespace,
        selector=settings.ingress_selector,
        release_id=release_id,
        source=source,
    )
    return doc


def _lua(value: object) -> str:
    """A Lua literal of a JSON-like value (bytes outside printable ASCII, quotes and backslashes as Lua's
    three-digit decimal escapes, so no text can end the literal early)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return (
            '"'
            + "".join(f"\\{b:03d}" if b < 32 or b > 126 or chr(b) in '"\\' else chr(b) for b in value.encode())
            + '"'
        )
    if isinstance(value, list):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


@dataclass(frozen=True)
class ArmRoute:
    """An experiment arm as the entry VirtualService routes to it: its InferenceService, version and weight."""

    name: str
    version: str
    weight: int  # its percent of the traffic while it runs
    stopped: bool = False  # its traffic goes to the control

    @classmethod
    def of(cls, model: str, version: str, weight: int, stopped: bool = False) -> ArmRoute:
        return cls(arm_name(model, version), str(version), int(weight), bool(stopped))


ARMS_ANNOTATION = "releasegate.io/arms"


def experiment_arms(virtual_service: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The arms (version, weight, stopped) an entry VirtualService was applied with; [] outside an experiment."""
    annotations = ((virtual_service or {}).get("metadata") or {}).get("annotations") or {}
    try:
        arms = json.loads(annotations.get(ARMS_ANNOTATION) or "[]")
    except ValueError as err:
        raise ManifestError(f"the VirtualService's {ARMS_ANNOTATION} annotation is not JSON: {err}") from err
    return arms if isinstance(arms, list) else []


def destination_rule(model: str, settings: K8sSettings, *, max_requests: int = 100) -> dict[str, Any]:
    """Connection caps for the mirrored traffic to the shadow InferenceService."""
    [doc] = render(
        "destinationrule.yaml.j2",
        name=k8s_name(model),
        namespace=settings.namespace,
        shadow_max_connections=max_requests,
        shadow_max_pending=max_requests,
        shadow_max_requests=max_requests,
    )
    return doc


def sink_manifests(
    namespace: str,
    image: str,
    db_secret: str = "releasegate-db",
    replicas: int = 2,
    settings: K8sSettings | None = None,
) -> list[dict[str, Any]]:
    """The logger sink: Deployment and Service, and the Istio policies that let only the models' and the feedback
    service accounts reach it (STRICT mTLS, then an AuthorizationPolicy per path).

    The sink checks the same accounts itself (its environment is rendered from the same settings).
    """
    settings = settings or K8sSettings(namespace=namespace)
    return render(
        "sink.yaml.j2",
        namespace=namespace,
        image=image,
        db_secret=db_secret,
        replicas=replicas,
        event_principals=settings.principals(settings.sink_event_accounts),
        feedback_principals=settings.principals(settings.sink_feedback_accounts),
        env={
            "RELEASEGATE_K8S_NAMESPACE": namespace,
            "RELEASEGATE_K8S_TRUST_DOMAIN": settings.trust_domain,
            "RELEASEGATE_K8S_SINK_EVENT_ACCOUNTS": ",".join(settings.sink_event_accounts),
            "RELEASEGATE_K8S_SINK_FEEDBACK_ACCOUNTS": ",".join(settings.sink_feedback_accounts),
            "RELEASEGATE_K8S_SINK_MAX_BODY_BYTES": str(settings.sink_max_body_bytes),
            "RELEASEGATE_K8S_SINK_QUEUE_BYTES": str(settings.sink_queue_bytes),
            "RELEASEGATE_K8S_SINK_PENDING_SECONDS": f"{settings.sink_pending_seconds:g}",
        },
    )


# -- validation ------------------------------------------------------------------------------------------------


def schemas_available(schemas_dir: Path | None = None) -> bool:
    directory = schemas_dir or K8sSettings.from_env().schemas_dir
    return all((directory / f).is_file() for f in set(CRD_FILES.values()))


@functools.lru_cache(maxsize=8)
def _crd_schema(schemas_dir: Path, api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    path = schemas_dir / CRD_FILES[(api_version, kind)]
    if not path.is_file():
        raise ManifestError(f"no CRD schema for {kind} at {path} (see ../shared/k8s-schemas/README.md)")
    with path.open() as fh:
        for doc in yaml.load_all(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if (
                doc
                and doc.get("kind") == "CustomResourceDefinition"
                and doc["spec"]["group"] == group
                and doc["spec"]["names"]["kind"] == kind
            ):
                for v in doc["spec"]["versions"]:
                    if v["name"] == version:
                        # openAPIV3Schema is an object's schema, and _strict keeps a node's kind.
                        schema = cast("dict[str, Any]", _strict(v["schema"]["openAPIV3Schema"]))
                        # The API server accepts these at the root of every kind, listed in the CRD or not.
                        root = {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                        }
                        schema["properties"] = root | schema.get("properties", {})
                        return schema
    raise ManifestError(f"{path} has no CRD for {kind} {api_version}")


def _strict(schema: object) -> object:
    """The schema with unknown fields refused, as `kubectl apply --validate=strict` refuses them.

    The API server would silently prune an unknown (e.g. misspelled) field; a manifest test must catch it.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: (_strict(v) if k in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not") else v)
        for k, v in schema.items()
    }
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def validate(doc: dict[str, Any], schemas_dir: Path | None = None) -> None:
    """Raise ManifestError naming every violation of the kind's schema (CRD openAPIV3Schema or core model)."""
    import jsonschema

    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    if not name or (not _NAME.match(name) and kind in ("InferenceService", "Service")):
        raise ManifestError(f"{kind} has no valid metadata.name: {name!r}")
    where = f"{kind} {name}"
    if (api_version, kind) in CRD_FILES:
        schema = _crd_schema(Path(schemas_dir or K8sSettings.from_env().schemas_dir), api_version, kind)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
        if errors:
            raise ManifestError(
                f"{where} does not match its CRD schema: "
                + "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10])
            )
        return
    _validate_core(doc, where)


def _validate_core(doc: dict[str, Any], where: str) -> None:
    """Core kinds against the typed models of the `kubernetes` client (generated from the API's OpenAPI spec)."""
    from kubernetes import client

    group_version, kind = doc["apiVersion"], doc["kind"]
    prefix = "V1" if group_version in ("v1", "apps/v1") else None
    cls = getattr(client, f"{prefix}{kind}", None) if prefix else None
    if cls is None:
        raise ManifestError(f"{where}: no schema known for {group_version} {kind}")
    problems: list[str] = []
    _check_model(doc, cls.__name__, kind, problems)
    if not problems:
        try:  # the models' setters refuse a missing required field
            client.ApiClient()._ApiClient__deserialize(doc, cls.__name__)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ManifestError(f"{where} does not match the Kubernetes API: " + "; ".join(problems[:10]))


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": (int, float),
    "datetime": str,
    "date": str,
}


def _check_model(value: object, type_name: str, path: str, problems: list[str]) -> None:
    from kubernetes import client

    if type_name.startswith("list["):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check_model(item, type_name[5:-1], f"{path}[{i}]", problems)
        return
    if type_name.startswith(("dict(", "dict[")):  # the client spells it both ways across versions
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object")
            return
        for k, v in value.items():
            _check_model(v, inner, f"{path}.{k}", problems)
        return
    if type_name == "object":
        return
    if type_name in _SCALARS:
        # int-or-string fields (ports, quantities) are typed `object` or `str` in the client.
        if not isinstance(value, _SCALARS[type_name]) or (type_name == "int" and isinstance(value, bool)):
            problems.append(f"{path}: expected {type_name}, got {type(value).__name__}")
        return
    cls = getattr(client, type_name)
    if not isinstance(value, dict):
        problems.append(f"{path}: expected an object ({type_name})")
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            problems.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        _check_model(item, cls.openapi_types[by_json[key]], f"{path}.{key}", problems)
