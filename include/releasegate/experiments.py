"""Experiments (A/B/n) beside releases: the champion as control and up to five arms on live traffic, judged on
declared metrics (business, resource, quality, guardrails) by analysis/experiment.py.

An experiment is a row of the releases table (state `experimenting`, its design as the policy), so it holds
the model's one release lock: no release and no other experiment moves the model's traffic meanwhile. Its
steps, each one call from the `model_experiment` DAG: open → sign the arms → start (the gateway's
experiment route, salted by the experiment's id) → look (every poll: stop the arms a guard shows clearly
worse, their traffic back to the control) → conclude (the champion alone again, the result audited and
stored in MLflow, the winner made the `challenger` for model_release). docs/experiments.md tells the story.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from releasegate import audit, release, storage
from releasegate.analysis import experiment as engine
from releasegate.analysis import labels as lab
from releasegate.analysis import sequential
from releasegate.analysis.rows import primary_values
from releasegate.backends import ArmWeight
from releasegate.contract import AuditAction, CallStatus, Mode, Outcome, RouteChange
from releasegate.errors import ReleasegateError
from releasegate.release import State
from releasegate.serving.routing import MAX_ARMS

log = logging.getLogger(__name__)
CHALLENGER_ALIAS = "challenger"  # the alias model_release takes by default: the winner is handed on under it


class DesignError(ReleasegateError, ValueError):
    """An experiment design that is missing or does not validate, or arms and weights that do not fit."""


class Source(StrEnum):
    """Where a metric's per-request value comes from."""

    conversion = "conversion"  # 1 when the request's feedback has business_value > 0, else 0
    revenue = "revenue"  # the feedback's business_value (no feedback: 0)
    revenue_per_conversion = "revenue_per_conversion"  # Σ revenue / Σ conversions (a ratio: delta method)
    accuracy = "accuracy"  # quality from the label (feedback ground_truth), as the release's primary metric
    absolute_error = "absolute_error"
    log_loss = "log_loss"
    cpu_ms = "cpu_ms"  # CPU time of the model call per row (the gateway measures it around the predict call)
    latency_ms = "latency_ms"
    error = "error"  # 1 when the arm's call failed (error, timeout)


_KIND = {
    Source.conversion: engine.MetricKind.proportion,
    Source.accuracy: engine.MetricKind.proportion,
    Source.error: engine.MetricKind.proportion,
    Source.revenue_per_conversion: engine.MetricKind.ratio,
}
_QUALITY = (Source.accuracy, Source.absolute_error, Source.log_loss)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(_Strict):
    """One declared metric: where its values come from, which way is better, its MDE, whether it decides."""

    name: str = Field(min_length=1, max_length=64)
    source: Source
    goal: engine.Goal
    mde: float = Field(gt=0, allow_inf_nan=False)
    role: engine.Role
    test: engine.Hypothesis

    @property
    def metric(self) -> engine.Metric:
        kind = _KIND.get(self.source, engine.MetricKind.mean)
        return engine.Metric(name=self.name, kind=kind, goal=self.goal, mde=self.mde, role=self.role, test=self.test)


class Cuped(_Strict):
    """CUPED: each per-request metric less θ·(x − x̄), x a numeric request feature fixed before the request was
    assigned an arm (a customer's tenure, last month's spend), θ = cov(y, x) / var(x) pooled over all arms. The
    arm − control difference keeps its expectation (x does not depend on the arm) and loses the part of its
    variance x explains (docs/experiments.md, "CUPED")."""

    covariate: str = Field(min_length=1, description="The request feature (an input column) to adjust by.")


class Design(_Strict):
    """An experiment's design file (include/policies/experiments/<name>.yaml or RELEASEGATE_POLICIES_DIR's)."""

    name: str
    description: str = ""
    alpha: float = Field(0.05, gt=0, lt=1)
    srm_p_value: float = Field(0.001, gt=0, lt=1)
    poll_seconds: float = Field(5, gt=0)
    max_seconds: float = Field(86400, gt=0)
    sample_size: int = Field(100_000, ge=10, description="Requests (all arms) where the bounds are tightest.")
    min_requests_per_arm: int = Field(100, ge=1)
    release_policy: str = "default"
    metrics: list[MetricSpec] = Field(min_length=1)
    cuped: Cuped | None = None

    @model_validator(mode="after")
    def _valid(self) -> Design:
        self.experiment()  # one deciding metric, unique names
        return self

    @property
    def deciding(self) -> MetricSpec:
        """The one metric that picks the winner (the engine's `Experiment.deciding`, with its source)."""
        return next(m for m in self.metrics if m.role is engine.Role.decide)

    def experiment(self) -> engine.Experiment:
        try:
            return engine.Experiment(
                metrics=[m.metric for m in self.metrics],
                alpha=self.alpha,
                t_opt=self.sample_size,
                srm_alarm_below=self.srm_p_value,
            )
        except ValidationError as err:
            raise ValueError("; ".join(e["msg"] for e in err.errors())) from None


def design_names(policy_dirs: list[Path] | None = None) -> list[str]:
    from releasegate import policy

    return policy.experiment_designs(policy_dirs)


def load_design(name: str, policy_dirs: list[Path] | None = None) -> Design:
    """The design `name` from the first policies folder that has experiments/<name>.yaml."""
    path = next((d / f"{name}.yaml" for d in _dirs(policy_dirs) if (d / f"{name}.yaml").is_file()), None)
    if path is None:
        raise DesignError(
            f"experiment design {name!r} not found in {', '.join(str(d) for d in _dirs(policy_dirs))} "
            f"(known: {', '.join(design_names(policy_dirs)) or 'none'})"
        )
    from releasegate import policy

    data = policy.read_named(path, "experiment design", DesignError)
    try:
        return Design.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors())
        raise DesignError(f"experiment design {path.name}: {problems}") from err


def _dirs(policy_dirs: list[Path] | None) -> list[Path]:
    if policy_dirs is None:
        from releasegate.settings import get_settings

        policy_dirs = get_settings().policy_dirs
    return [d / "experiments" for d in policy_dirs]


# --- the experiment's record ---------------------------------------------------------------------------------


class Record(BaseModel):
    """What an experiment's releases row holds as its policy: the design, the arms, when traffic started."""

    kind: Literal["experiment"] = "experiment"
    name: str  # the design's name, as a release policy's (the dashboard shows it)
    design: Design
    arms: list[ArmWeight]
    started_at: float | None = None
    shares_since: float | None = None  # the last change of the arms' shares (a stop): the SRM test counts from here

    @classmethod
    def of(cls, rel: release.Release) -> Record:
        if rel.policy.get("kind") != "experiment":
            raise DesignError(f"{rel.release_id} is a release, not an experiment")
        return cls.model_validate(rel.policy)


def is_experiment(rel: release.Release) -> bool:
    return rel.policy.get("kind") == "experiment"


class OpeningPlan(BaseModel):
    """What the deciding metric needs, planned as the experiment opens from the champion's recent traffic: the
    requests of the fixed-horizon and the sequential designs (planning.py) at the form's weights, and how long
    the model's current traffic takes to send them. `note` says it in a line, or why there is no plan."""

    metric: str
    baseline: float | None = None
    rps: float | None = None
    fixed_requests: int | None = None
    sequential_requests: int | None = None
    sequential_median_requests: int | None = None
    note: str


class ExperimentOpened(BaseModel):
    result: Literal["experiment_opened"] = "experiment_opened"
    experiment_id: str
    model: str
    control: str
    arms: list[ArmWeight]
    design: str
    plan: OpeningPlan | None = None  # what the deciding metric needs at the champion's recent traffic

    def describe(self) -> str:
        arms = ", ".join(f"v{a.version} {a.weight}%" for a in self.arms)
        return f"experiment {self.experiment_id}: {self.model} v{self.control} (control) against {arms}"


class Started(BaseModel):
    result: Literal["experiment_started"] = "experiment_started"
    experiment_id: str
    since: float
    deadline: float
    poll_seconds: float


class Look(BaseModel):
    """One look at the evidence: the engine's result, the arms stopped so far, whether the experiment is over."""

    result: Literal["experiment_look"] = "experiment_look"
    experiment_id: str
    at: float
    done: bool
    invalid: bool
    decision: engine.ExperimentResult
    stopped: list[str]  # versions whose traffic went back to the control


class Concluded(BaseModel):
    result: Literal["experiment_concluded"] = "experiment_concluded"
    experiment_id: str
    model: str
    state: State
    winner: str | None
    release_policy: str
    reason: str
    report_uri: str | None = None


def parse_arms(versions: str | list[str], weights: str | list[int] | None) -> list[tuple[str, int]]:
    """The form's arms ("3, 4") and weights ("30, 30"; empty: an equal share with the control)."""
    names = [v.strip() for v in versions.split(",")] if isinstance(versions, str) else [str(v) for v in versions]
    names = [v for v in names if v]
    if not 1 <= len(names) <= MAX_ARMS:
        raise DesignError(f"an experiment has 1-{MAX_ARMS} arms besides the champion, got {len(names)}")
    if weights is None or (isinstance(weights, str) and not weights.strip()):
        each = 100 // (len(names) + 1)
        return [(v, each) for v in names]
    try:
        shares = (
            [int(w.strip()) for w in weights.split(",") if w.strip()]
            if isinstance(weights, str)
            else [int(w) for w in weights]
        )
    except ValueError:
        raise DesignError(f"weights are whole percents separated by commas, got {weights!r}") from None
    if len(shares) != len(names):
        raise DesignError(f"{len(names)} arms but {len(shares)} weights")
    if any(not 1 <= w <= 99 for w in shares) or sum(shares) >= 100:
        raise DesignError(f"each arm's weight is 1-99 % and together under 100 % (the control's share), got {shares}")
    return list(zip(names, shares, strict=True))


def open_experiment(
    model: str,
    arms: list[tuple[str, int]],
    design_name: str,
    *,
    airflow_run_id: str | None,
    actor: str,
    is_run_alive: Callable[[str | None], bool] = lambda run_id: True,
    close_stale: Callable[[release.Release], None] | None = None,
    sample_size: int | None = None,
    max_seconds: float | None = None,
) -> ExperimentOpened:
    """Resolve the arms and the champion (the control) in the registry, take the model's release lock."""
    from releasegate import registry

    design = load_design(design_name)
    overrides = {"sample_size": sample_size or None, "max_seconds": max_seconds or None}
    design = design.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    control = registry.get_alias(model, "champion")
    if control is None:
        raise DesignError(f"{model} has no champion: an experiment compares its arms with the champion")
    resolved = [ArmWeight(version=registry.resolve_version(model, v), weight=w) for v, w in arms]
    versions = [control, *(a.version for a in resolved)]
    if len(set(versions)) != len(versions):
        raise DesignError(f"an experiment's versions must differ (the champion is v{control}), got {versions}")
    from releasegate.pipeline import _check_residency

    for arm in resolved:
        _check_residency(model, arm.version, actor)
    record = Record(name=design.name, design=design, arms=resolved)
    rel = release.open_release(
        model,
        ",".join(a.version for a in resolved),
        control,
        record.model_dump(mode="json"),
        airflow_run_id=airflow_run_id,
        actor=actor,
        is_run_alive=is_run_alive,
        close_stale=close_stale,
    )
    return ExperimentOpened(
        experiment_id=rel.release_id,
        model=model,
        control=control,
        arms=resolved,
        design=design.name,
        plan=_plan_or_why(model, control, resolved, design),
    )


def _plan_or_why(model: str, control: str, arms: list[ArmWeight], design: Design) -> OpeningPlan:
    """The opening plan; a plan that cannot be made says why and keeps no experiment from opening."""
    try:
        return opening_plan(model, control, arms, design)
    except Exception as err:  # the log unreadable, a figure out of range: the experiment still opens
        log.warning("%s: no opening plan: %s", model, err, exc_info=True)
        name = design.deciding.name
        return OpeningPlan(metric=name, note=f"no plan for {name}: {type(err).__name__}: {err}")


PLAN_WINDOW_SECONDS = 3600  # the champion's recent traffic the plan reads: its baseline and its rate


def opening_plan(
    model: str, control: str, arms: list[ArmWeight], design: Design, now: float | None = None
) -> OpeningPlan:
    """Plan the deciding metric at the champion's baseline and traffic over the last hour (planning.plan)."""
    from releasegate import planning

    spec = design.deciding
    if spec.metric.kind is engine.MetricKind.ratio:
        return OpeningPlan(metric=spec.name, note=f"no plan for {spec.name}: a ratio metric (plan its parts)")
    until = time.time() if now is None else now
    p = storage.predictions
    where = sa.and_(p.c.model == model, p.c.version == control, p.c.time >= until - PLAN_WINDOW_SECONDS)
    calls, feedback = _read_calls(where, until)
    values = per_request(calls, feedback, control, {spec.source})[spec.source.value].dropna().astype(float)
    if len(values) < sequential.MIN_UNITS:
        return OpeningPlan(
            metric=spec.name,
            note=f"no plan for {spec.name}: the champion v{control} has {len(values)} requests with a value in the "
            f"last {PLAN_WINDOW_SECONDS // 60} minutes (needs {sequential.MIN_UNITS}); `releasegate plan` takes "
            "a baseline by hand",
        )
    baseline, sd = float(values.mean()), float(values.std())
    kind = planning.MetricKind(spec.metric.kind.value)  # a proportion or a mean, as the engine judges it
    shares = [max(100 - sum(a.weight for a in arms), 0), *(a.weight for a in arms)]
    try:
        wanted = planning.Design(
            kind=kind,
            baseline=baseline,
            sd=sd if kind is planning.MetricKind.mean and sd > 0 else None,
            mde=spec.mde,
            alpha=design.alpha,
            weights=[float(w) for w in shares],
        )
    except (ValidationError, ValueError) as err:
        why = "; ".join(e["msg"] for e in err.errors()) if isinstance(err, ValidationError) else str(err)
        return OpeningPlan(metric=spec.name, baseline=baseline, note=f"no plan for {spec.name}: {why}")
    rps = planning.traffic_rate(model, PLAN_WINDOW_SECONDS)
    made = planning.plan(wanted, rps)

    def take(requests: int) -> str:
        seconds = made.seconds(requests)
        return f"{requests:,} requests" + (f" (≈ {seconds / 3600:.1f} h)" if seconds is not None else "")

    note = (
        f"{spec.name} from {baseline:.4g} by {spec.mde:g} at α {design.alpha:g} over {len(arms)} comparison(s), "
        f"power {wanted.power:g}, weights {'/'.join(str(w) for w in shares)}: fixed horizon {take(made.fixed_requests)}; "
        f"sequential {take(made.sequential_requests)}, median {take(made.sequential_median_requests)}"
        + (f", at {rps:.1f} requests/s" if rps else "")
    )
    expected = made.seconds(made.sequential_requests)
    if expected is not None and expected > design.max_seconds:
        note += f"; longer than the design's {design.max_seconds / 3600:g} h: likely to end undecided"
    return OpeningPlan(
        metric=spec.name,
        baseline=baseline,
        rps=rps,
        fixed_requests=made.fixed_requests,
        sequential_requests=made.sequential_requests,
        sequential_median_requests=made.sequential_median_requests,
        note=note,
    )


def sign_arms(experiment_id: str, actor: str = "airflow") -> list[str]:
    """Sign every arm (or verify its signature) before anything loads it; a bad one rejects the experiment."""
    from releasegate import signing

    rel = release.get(experiment_id)
    record = Record.of(rel)
    release.transition(experiment_id, State.signing, actor=actor)
    from releasegate.pipeline import sign_audited

    digests = []
    for arm in record.arms:
        try:
            digests.append(sign_audited(rel.model, arm.version, experiment_id, actor))
        except signing.SignatureError as err:
            release.transition(
                experiment_id,
                State.rejected,
                actor=actor,
                reason=f"v{arm.version}: signature check failed: {err}",
                decision=Outcome.reject,
            )
            raise
    return digests


def _backend(model: str) -> Any:
    from releasegate.pipeline import _backend as backend

    return backend(model)


def _champion_alone(rel: release.Release, actor: str) -> None:
    """The experiment's traffic back to its champion alone, audited as the experiment's end."""
    from releasegate.pipeline import _serve_alone

    assert rel.champion_version is not None  # an experiment opens with its champion
    _serve_alone(rel.model, rel.champion_version, RouteChange.experiment_ended, actor, rel.release_id)


def _set_route(rel: release.Release, record: Record, actor: str) -> None:
    assert rel.champion_version is not None  # an experiment opens with its champion
    applied = _backend(rel.model).set_route(
        rel.model, rel.champion_version, None, Mode.experiment, 0, release_id=rel.release_id, arms=record.arms
    )
    audit.append(
        actor,
        AuditAction.route,
        model=rel.model,
        version=rel.champion_version,
        release_id=rel.release_id,
        details={
            "change": RouteChange.experiment.value,
            "mode": Mode.experiment.value,
            "arms": [a.model_dump() for a in record.arms],
            "revision": applied.revision,
        },
    )


def start(experiment_id: str, actor: str = "airflow") -> Started:
    """The gateway's experiment route: the arms get their weights, the champion the rest."""
    rel = release.get(experiment_id)
    record = Record.of(rel)
    if record.started_at is None:
        _set_route(rel, record, actor)
        record = record.model_copy(update={"started_at": time.time()})
        _save(experiment_id, record)
        release.transition(experiment_id, State.experimenting, actor=actor)
    since = float(record.started_at or time.time())
    return Started(
        experiment_id=experiment_id,
        since=since,
        deadline=since + record.design.max_seconds,
        poll_seconds=record.design.poll_seconds,
    )


def _save(experiment_id: str, record: Record) -> None:
    with storage.engine().begin() as conn:
        conn.execute(
            storage.releases.update()
            .where(storage.releases.c.release_id == experiment_id)
            .values(policy=json.dumps(record.model_dump(mode="json")), updated_at=time.time())
        )


# --- the evidence --------------------------------------------------------------------------------------------


def read_requests(
    model: str, experiment_id: str, since: float, until: float, with_inputs: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The experiment's model calls (their inputs too, for CUPED) and the feedback on its requests, as logged."""
    p = storage.predictions
    where = sa.and_(
        p.c.release_id == experiment_id,
        p.c.model == model,
        p.c.mode == Mode.experiment,
        p.c.time >= since,
        p.c.time <= until,
    )
    return _read_calls(where, until, with_inputs)


def _read_calls(where: Any, until: float, with_inputs: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model calls `where` selects, and the feedback given on their requests by `until`."""
    p, f = storage.predictions, storage.feedback
    names: tuple[str, ...] = (
        "request_id",
        "time",
        "version",
        "arm",
        "served",
        "status",
        "latency_ms",
        "cpu_ms",
        "outputs",
    )
    names += ("inputs",) if with_inputs else ()
    columns = [p.c.id, *(p.c[n] for n in names)]
    fb_names = ("request_id", "time", "ground_truth", "business_value")
    feedback_q = (
        sa.select(*(f.c[n] for n in fb_names))
        .where(f.c.time <= until, f.c.request_id.in_(sa.select(p.c.request_id).where(where)))
        .order_by(f.c.time, f.c.id)
    )
    with storage.engine().connect() as conn:
        preds = pd.DataFrame(
            conn.execute(sa.select(*columns).where(where).order_by(p.c.id)).all(), columns=[c.name for c in columns]
        )
        feedback = pd.DataFrame(conn.execute(feedback_q).all(), columns=list(fb_names))
    if len(feedback):
        from releasegate import privacy

        feedback["ground_truth"] = privacy.open_truths(feedback["ground_truth"])
    return preds, feedback


def per_request(preds: pd.DataFrame, feedback: pd.DataFrame, control: str, sources: set[Source]) -> pd.DataFrame:
    """One row per request: the arm (version) it was assigned, and each source's value for it.

    A request is its arm's whatever answered it: an arm's failed call answered by the control (a fallback) is
    the arm's error. Requests without feedback have converted nothing; quality counts labelled rows only.
    """
    if preds.empty:
        computed = ["error", "latency_ms", "cpu_ms", "revenue", "conversion", *(s.value for s in _QUALITY)]
        return pd.DataFrame(columns=["request_id", "version", "time", *computed])
    calls = preds.copy()
    calls["request_id"] = calls["request_id"].astype(str)
    arm_calls = calls[calls["arm"] != "champion"]
    assigned = arm_calls.groupby("request_id")["version"].first()
    calls["assigned"] = calls["request_id"].map(assigned).fillna(control)
    own = calls[calls["version"] == calls["assigned"]].copy()
    own["error"] = (own["status"] != CallStatus.ok).astype(float)
    own["rank"] = own.groupby("request_id").cumcount()
    grouped = own.groupby("request_id")
    out = pd.DataFrame({"version": grouped["assigned"].first(), "time": grouped["time"].min()})
    out["error"] = grouped["error"].max()
    out["latency_ms"] = grouped["latency_ms"].mean()
    out["cpu_ms"] = grouped["cpu_ms"].mean()
    value = feedback.dropna(subset=["business_value"]).groupby("request_id")["business_value"].last()
    value.index = value.index.astype(str)
    out["revenue"] = out.index.map(value).astype(float)
    out["revenue"] = out["revenue"].fillna(0.0)
    out["conversion"] = (out["revenue"] > 0).astype(float)
    for source in _QUALITY:
        if source not in sources:
            continue
        by_row = _labels(feedback)
        outs = [lab.scalar(o) if ok == CallStatus.ok else None for o, ok in zip(own["outputs"], own["status"])]
        truth = [by_row.get((r, k)) for r, k in zip(own["request_id"], own["rank"], strict=True)]
        own[source.value] = primary_values(pd.Series(outs), pd.Series(truth), source.value)
        out[source.value] = own.groupby("request_id")[source.value].mean()
    return out.reset_index()


def _labels(feedback: pd.DataFrame) -> dict[tuple[str, int], Any]:
    from releasegate.analysis.rows import labels

    return dict(labels(feedback)) if len(feedback) else {}


def covariates(preds: pd.DataFrame, feature: str) -> pd.Series:
    """Per request id, the numeric value of `feature` in its first logged row (NaN where absent or not a number:
    a column the model's classification encrypts or pseudonymises is no covariate)."""
    import orjson

    first = preds.drop_duplicates("request_id")

    def value(inputs: object) -> float:
        try:
            x = orjson.loads(inputs)[feature] if isinstance(inputs, str) else None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return float("nan")
        return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else float("nan")

    return pd.Series([value(i) for i in first["inputs"]], index=first["request_id"].astype(str), dtype=float)


def cuped_adjust(requests: pd.DataFrame, x: pd.Series, design: Design) -> pd.DataFrame:
    """Each proportion and mean metric's values less θ·(x − x̄) (θ pooled over the arms); a request without the
    covariate keeps its value. Ratio metrics are left as they are (their delta-method variance has no such term)."""
    out = requests.copy()
    cov = out["request_id"].astype(str).map(x).astype(float)
    known = cov.notna()
    if known.sum() < 3 or float(cov[known].var()) == 0.0:
        return out
    centred = (cov - cov[known].mean()).where(known, 0.0)
    for spec in design.metrics:
        if spec.source is Source.revenue_per_conversion:
            continue
        y = pd.to_numeric(out[spec.source.value], errors="coerce")
        both = known & y.notna()
        if both.sum() < 3:
            continue
        theta = float(((y[both] - y[both].mean()) * centred[both]).sum() / (centred[both] ** 2).sum())
        out[spec.source.value] = y - theta * centred
    return out


def arm_stats(requests: pd.DataFrame, version: str, share: float, design: Design) -> engine.ArmStats:
    mine = requests[requests["version"] == version]
    stats: dict[str, engine.Stats] = {}
    for spec in design.metrics:
        if spec.source is Source.revenue_per_conversion:
            stats[spec.name] = engine.RatioSummary.of(mine["revenue"].to_numpy(), mine["conversion"].to_numpy())
            continue
        values = pd.to_numeric(mine[spec.source.value], errors="coerce").dropna().to_numpy(dtype=float)
        stats[spec.name] = sequential.Summary.of(values[pd.notna(values)])
    return engine.ArmStats(name=version, share=share, metrics=stats)


def assess(rel: release.Release, record: Record, until: float) -> engine.ExperimentResult:
    """The evidence up to `until`: each running arm against the control (no side effects; the dashboard's view)."""
    design = record.design
    assert rel.champion_version is not None  # an experiment opens with its champion
    since = float(record.started_at or rel.started_at)
    preds, feedback = read_requests(rel.model, rel.release_id, since, until, with_inputs=design.cuped is not None)
    sources = {m.source for m in design.metrics}
    requests = per_request(preds, feedback, rel.champion_version, sources)
    if design.cuped is not None and len(requests):
        requests = cuped_adjust(requests, covariates(preds, design.cuped.covariate), design)
    running = [a for a in record.arms if not a.stopped]
    control_share = 100 - sum(a.weight for a in running)
    control = arm_stats(requests, rel.champion_version, control_share, design)
    arms = [arm_stats(requests, a.version, a.weight, design) for a in running]
    if not running:
        return engine.ExperimentResult(
            control=control.name,
            alpha_each=design.experiment().alpha_each(len(record.arms) + 1),
            arms=[],
            srm=engine.srm_check([control], design.srm_p_value),
            winner=None,
            decided=True,
            reason="every arm stopped",
        )
    # The split is tested only since the shares last changed: before a stop, the control had less traffic.
    recent = requests[requests["time"] >= (record.shares_since or since)] if len(requests) else requests
    srm_counts = [arm_stats(recent, a.name, a.share, design) for a in (control, *arms)]
    result = engine.decide(design.experiment(), control, arms, srm_arms=srm_counts, comparisons=len(record.arms))
    if all(a.requests >= design.min_requests_per_arm for a in (control, *arms)):
        return result
    return result.model_copy(
        update={
            "winner": None,
            "decided": False,
            "reason": f"collecting: {design.min_requests_per_arm} requests per arm before any judgement",
            "arms": [r.model_copy(update={"status": engine.ArmStatus.running}) for r in result.arms],
        }
    )


def look(experiment_id: str, final: bool = False, actor: str = "airflow") -> Look:
    """One look: each running arm against the control; an arm a guard shows clearly worse is stopped now (its
    traffic back to the control, audited). Done when the engine decided, the SRM alarm rang, or `final`."""
    rel = release.get(experiment_id)
    record = Record.of(rel)
    now = time.time()
    result = assess(rel, record, now)
    if rel.terminal:  # aborted (an operator, an emergency rollback) while it ran: nothing more to change
        return Look(experiment_id=experiment_id, at=now, done=True, invalid=False, decision=result, stopped=[])
    stop = [r for r in result.arms if r.status is engine.ArmStatus.stopped]
    if stop:
        stopped_versions = {r.arm for r in stop}
        record = record.model_copy(
            update={
                "arms": [
                    a.model_copy(update={"stopped": True}) if a.version in stopped_versions else a for a in record.arms
                ],
                "shares_since": time.time(),
            }
        )
        _save(experiment_id, record)
        _set_route(rel, record, actor)
        for r in stop:
            audit.append(
                actor,
                AuditAction.experiment_arm_stopped,
                model=rel.model,
                version=r.arm,
                release_id=experiment_id,
                details=r.model_dump(mode="json"),
            )
    left = [a for a in record.arms if not a.stopped]
    invalid = result.srm.alarm
    done = invalid or final or result.decided or not left
    return Look(
        experiment_id=experiment_id,
        at=now,
        done=done,
        invalid=invalid,
        decision=result,
        stopped=[a.version for a in record.arms if a.stopped],
    )


def conclude(experiment_id: str, last: Look, actor: str = "airflow") -> Concluded:
    """The champion alone again; the result audited and stored with the control's MLflow run; the winner (if
    any) made the `challenger` for the release that follows."""
    from releasegate import registry

    rel = release.get(experiment_id)
    record = Record.of(rel)
    assert rel.champion_version is not None
    result = last.decision
    if not rel.terminal:
        _champion_alone(rel, actor)
    winner = None if last.invalid else result.winner
    audit.append(
        actor,
        AuditAction.experiment_decided,
        model=rel.model,
        version=winner,
        release_id=experiment_id,
        details={"winner": winner, "invalid": last.invalid, "result": result.model_dump(mode="json")},
    )
    state = State.invalid if last.invalid else State.concluded
    reason = result.reason if winner or last.invalid else f"no winner: {result.reason}"
    if not rel.terminal:
        rel = release.transition(experiment_id, state, actor=actor, reason=reason, decision=Outcome.conclude)
    if winner is not None:
        registry.set_alias(rel.model, CHALLENGER_ALIAS, winner)
    uri = store_report(rel, record, last)
    return Concluded(
        experiment_id=experiment_id,
        model=rel.model,
        state=rel.state,
        winner=winner,
        release_policy=record.design.release_policy,
        reason=reason,
        report_uri=uri,
    )


class Won(BaseModel):
    """A concluded experiment's winner and the control it beat, as its audited decision says."""

    experiment_id: str
    model: str
    control: str
    winner: str


def won(experiment_id: str) -> Won:
    """The winner of a concluded experiment (from its `experiment.decided` event), or DesignError saying why
    it has none to hand on."""
    if not release.ID_PATTERN.fullmatch(experiment_id):  # an id typed or sent by hand: checked before the database
        raise DesignError(f"{experiment_id[:40]!r} is not an experiment id (rel- and 12 hex digits)")
    rel = release.get(experiment_id)
    if not is_experiment(rel):
        raise DesignError(f"{experiment_id} is a release, not an experiment")
    if rel.state is not State.concluded:
        raise DesignError(f"experiment {experiment_id} is {rel.state.value}: only a concluded one has a winner")
    decided = audit.events(release_id=experiment_id, action=AuditAction.experiment_decided)
    winner = decided[-1]["details"].get("winner") if decided else None
    if winner is None or rel.champion_version is None:
        raise DesignError(f"experiment {experiment_id} concluded without a winner")
    return Won(experiment_id=experiment_id, model=rel.model, control=rel.champion_version, winner=str(winner))


def fail(experiment_id: str, reason: str, actor: str = "airflow") -> None:
    """The run errored: the champion alone again, the experiment `failed`."""
    rel = release.get(experiment_id)
    if rel.terminal:
        return
    if rel.champion_version:
        _champion_alone(rel, actor)
    release.transition(experiment_id, State.failed, actor=actor, reason=reason, decision=Outcome.fail)


def store_report(rel: release.Release, record: Record, last: Look) -> str | None:
    """The experiment's report (JSON and an HTML chart of each arm's bounds) as artifacts of the control's run."""
    from releasegate import registry

    assert rel.champion_version is not None
    folder = f"releasegate/experiments/{rel.release_id}"
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "experiment_id": rel.release_id,
            "model": rel.model,
            "control": rel.champion_version,
            "arms": [a.model_dump() for a in record.arms],
            "design": record.design.model_dump(mode="json"),
            "state": rel.state.value,
            "result": last.decision.model_dump(mode="json"),
        }
        (Path(tmp) / "experiment.json").write_text(json.dumps(report, indent=2))
        (Path(tmp) / "experiment.html").write_text(chart_html(rel.model, rel.release_id, last.decision))
        for name in ("experiment.json", "experiment.html"):
            registry.log_artifact(rel.model, rel.champion_version, Path(tmp) / name, artifact_path=folder)
    run_id = registry.client().get_model_version(rel.model, rel.champion_version).run_id
    return f"runs:/{run_id}/{folder}"


def chart_html(model: str, experiment_id: str, result: engine.ExperimentResult) -> str:
    """Each metric's always-valid interval of arm − control per arm, as a Plotly chart (one panel per metric)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [b.name for b in result.arms[0].metrics] if result.arms else []
    figure = make_subplots(rows=max(len(names), 1), cols=1, subplot_titles=names or ["no arm left"])
    for row, name in enumerate(names, start=1):
        for arm in result.arms:
            bound = next(b for b in arm.metrics if b.name == name)
            if bound.difference is None or bound.lower is None or bound.upper is None:
                continue
            figure.add_trace(
                go.Scatter(
                    x=[bound.difference],
                    y=[f"v{arm.arm} ({arm.status.value})"],
                    error_x={
                        "type": "data",
                        "symmetric": False,
                        "array": [bound.upper - bound.difference],
                        "arrayminus": [bound.difference - bound.lower],
                    },
                    mode="markers",
                    name=f"v{arm.arm}",
                    showlegend=row == 1,
                ),
                row=row,
                col=1,
            )
        figure.add_vline(x=0, line_dash="dot", row=row, col=1)
    figure.update_layout(
        title=f"{model} experiment {experiment_id}: arm − control v{result.control} (always-valid, α each "
        f"{result.alpha_each:.3g}); {result.reason}",
        height=220 * max(len(names), 1),
    )
    return str(figure.to_html(include_plotlyjs=True, full_html=True))
