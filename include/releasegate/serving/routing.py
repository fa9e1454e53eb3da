"""Routes and the sticky assignment of a request to the champion or the candidate arm."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, model_validator

from releasegate.contract import Mode
from releasegate.settings import home_secret

if TYPE_CHECKING:
    from releasegate.settings import Settings

# A version number (nine digits are plenty; the registry's database refuses numbers beyond its integers) or an
# alias ("@champion"), in the characters MLflow allows; the OpenAPI document states the same patterns.
VERSION_PATTERN = r"^(?:[0-9]{1,9}|@?[A-Za-z0-9_.-]*[A-Za-z_.-][A-Za-z0-9_.-]*)$"
# A model name in a path: no control characters, no leading or trailing space (1-200 characters, checked apart).
MODEL_NAME_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$"
# A request id a caller gives (1-64 characters): no control characters, NUL above all, which PostgreSQL refuses
# in text and which would fail the log's insert of every row in its batch.
REQUEST_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,64}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def valid_request_id(request_id: str) -> bool:
    return _REQUEST_ID.fullmatch(request_id) is not None  # not match: its `$` passes a trailing newline


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def logged_request_id(request_id: str) -> str:
    """The id a request is logged, and its feedback joined, under: the caller's own when it is a valid one; else
    (an Open Inference Protocol body's id may be any string) its first 16 characters without control characters,
    `#`, and 32 hex digits of its SHA-256, so the same id always logs the same way and a person can still find it.
    """
    if _REQUEST_ID.fullmatch(request_id) is not None:
        return request_id
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{_CONTROL.sub('', request_id)[:16]}#{digest}"


def valid_model_name(model: str) -> bool:
    return 0 < len(model) <= 200 and _MODEL_NAME.fullmatch(model) is not None


# An experiment's arms besides the control (the champion): the "champion and up to 5 candidates".
MAX_ARMS = 5


class ArmSpec(BaseModel, extra="forbid"):
    """One arm of an experiment route besides the control: its version and its percent of the traffic.

    A stopped arm keeps its place in the bucket ranges, so that no other customer changes arm; its
    requests go to the control (docs/decisions.md, "Experiments (A/B/n)").
    """

    version: str = Field(min_length=1, max_length=50, pattern=VERSION_PATTERN)
    weight: int = Field(ge=1, le=99)
    stopped: bool = False


class RouteSpec(BaseModel, extra="forbid"):
    """The body of PUT /admin/routes/{model}: which versions serve and how traffic splits."""

    champion_version: str = Field(min_length=1, max_length=50, pattern=VERSION_PATTERN)
    candidate_version: str | None = Field(None, min_length=1, max_length=50, pattern=VERSION_PATTERN)
    mode: Mode = Mode.single
    candidate_weight: int = Field(0, ge=0, le=100)
    release_id: str | None = Field(None, max_length=64)
    arms: list[ArmSpec] | None = Field(None, min_length=1, max_length=MAX_ARMS)

    @model_validator(mode="after")
    def _consistent(self) -> RouteSpec:
        if self.mode is Mode.experiment:
            return self._experiment()
        if self.arms is not None:
            raise ValueError(f"arms apply to mode '{Mode.experiment}' only, got them with mode '{self.mode}'")
        if self.mode is Mode.single and self.candidate_version is not None:
            raise ValueError(
                f"mode '{Mode.single}' takes no candidate_version (use '{Mode.shadow}' or '{Mode.canary}')"
            )
        if self.mode is not Mode.single and self.candidate_version is None:
            raise ValueError(f"mode '{self.mode}' needs a candidate_version")
        if self.mode is not Mode.canary and self.candidate_weight != 0:
            raise ValueError(
                f"candidate_weight applies to mode '{Mode.canary}' only, got {self.candidate_weight} "
                f"with mode '{self.mode}'"
            )
        if self.candidate_version is not None and self.candidate_version == self.champion_version:
            raise ValueError(f"candidate_version equals champion_version ({self.champion_version})")
        return self

    def _experiment(self) -> RouteSpec:
        if not self.arms:
            raise ValueError(f"mode '{Mode.experiment}' needs arms (1-{MAX_ARMS} besides the champion)")
        if self.candidate_version is not None or self.candidate_weight != 0:
            raise ValueError(f"mode '{Mode.experiment}' takes arms, not candidate_version or candidate_weight")
        if not self.release_id:
            raise ValueError(f"mode '{Mode.experiment}' needs the experiment's id as release_id (it salts the split)")
        versions = [self.champion_version, *(a.version for a in self.arms)]
        if len(set(versions)) != len(versions):
            raise ValueError(f"an experiment's versions must differ, got {versions}")
        total = sum(a.weight for a in self.arms)
        if total >= 100:
            raise ValueError(f"the arms' weights add up to {total}: the control (champion) needs some traffic")
        return self

    @property
    def control_weight(self) -> int:
        """The champion's percent of the traffic in an experiment, stopped arms' shares included."""
        return 100 - sum(a.weight for a in self.arms or () if not a.stopped)


class Route(RouteSpec):
    """A stored route: the spec plus its model, revision and write time."""

    model: str
    revision: int
    updated_at: float

    @property
    def versions(self) -> list[str]:
        arms = [a.version for a in self.arms or ()]
        return [v for v in (self.champion_version, self.candidate_version, *arms) if v is not None]


def routing_secret(settings: Settings) -> bytes:
    """The deployment's routing secret ($RELEASEGATE_ROUTING_SECRET, else `keys/routing.secret` in the home)."""
    return home_secret(settings, settings.routing_secret, "routing.secret")


@functools.lru_cache(maxsize=8)
def _keyed(secret: bytes) -> hmac.HMAC:
    return hmac.new(secret, digestmod=hashlib.sha256)  # copied per key: the key schedule is done once


def key_digest(model: str, routing_key: str, secret: bytes) -> str:
    """HMAC-SHA256 of "<model>:<routing key>" under the deployment's routing secret, hex: the one hash both the
    arm bucket and the logged key hash come from. Keyed, so that the logged hash of a phone or ID number cannot
    be reversed by hashing every candidate number; uniform all the same, so the buckets split as before."""
    keyed = _keyed(secret).copy()
    keyed.update(f"{model}:{routing_key}".encode())
    return keyed.hexdigest()


def salted(route: RouteSpec, model: str) -> str:
    """What the assignment hash is salted with: the model, and in an experiment also the experiment's id, so that
    the customers of one experiment's candidate arm are not again the candidate arm of the next one."""
    return experiment_salt(model, route.release_id) if route.mode is Mode.experiment else model


def experiment_salt(model: str, experiment_id: str | None) -> str:
    """An experiment's salt (also the KServe ingress filter's, k8s.arms_filter)."""
    return f"{model}#{experiment_id}"


def bucket(model: str, routing_key: str, secret: bytes) -> int:
    """0-99, fixed for a (model, routing key): the same customer always lands on the same arm."""
    return int(key_digest(model, routing_key, secret), 16) % 100


def routing_key_hash(model: str, routing_key: str, secret: bytes) -> str:
    """What the prediction log stores instead of the key itself (16 hex chars)."""
    return key_digest(model, routing_key, secret)[:16]


def sample_bucket(request_id: str) -> int:
    """0-999 from the request id, so analyses can read a uniform sample by range."""
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) % 1000


def choose_arm(route: RouteSpec, digest: str) -> str:
    """'candidate' or 'champion' for a request whose key_digest is `digest` (shadow serves the champion)."""
    if route.mode is Mode.canary and int(digest, 16) % 100 < route.candidate_weight:
        return "candidate"
    return "champion"


def choose_experiment_arm(route: RouteSpec, digest: str) -> int | None:
    """The index in route.arms of the arm a request whose (experiment-salted) key_digest is `digest` goes to, or
    None for the control. Arm i holds the buckets after the arms before it, stopped or not, so that stopping
    one arm moves only its own customers (to the control)."""
    point = int(digest, 16) % 100
    start = 0
    for index, arm in enumerate(route.arms or ()):
        if start <= point < start + arm.weight:
            return None if arm.stopped else index
        start += arm.weight
    return None
