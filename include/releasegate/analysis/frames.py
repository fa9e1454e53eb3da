"""The pure core of the analysis: logged predictions and feedback of one window in, a Verdict out.

Checks, each with an always-valid confidence sequence (sequential.py) at level alpha / k, where k
counts the checks of the stage (Bonferroni: error rate, latency, primary, + agreement in shadow,
+ the slice family when the policy names slices; inside that family Holm across slices):

- error rate, candidate − champion (status != ok; the candidate's own failures, fallbacks included),
  worse beyond `guardrails.error_rate_margin` (absolute);
- latency: "candidate p99 ≤ limit", the limit being the larger of (1 + latency_p99_margin) × and
  + latency_p99_slack_ms over the champion's p99, is exactly "at most 1% of candidate requests are
  slower than that limit", so we bound the share of slower candidate requests
  and compare it with 1%. The limit uses the champion's p99 in the same window (a plug-in; the
  champion's p99 rests on many more rows than the 1% share does);
- primary metric from feedback labels, candidate − champion, non-inferiority margin;
- shadow only: agreement share of the two arms' outputs against `shadow.min_agreement`.

Sample ratio mismatch (canary): routing keys per arm against the weight, a sequential test (srm.py),
so the DAG may run it at every poll; an alarm makes the verdict `invalid`.

Futility: once a full window has passed, a check whose bound, projected to the end of the allowed
extensions with the current sd and an estimate one standard error better than now, would still not
clear its limit rolls back at once: extending cannot decide for the candidate (a planned look; never
earlier, where estimates are too noisy).

Shadow pairs the arms on the same requests; canary compares disjoint requests with AIPW contrasts.
A canary verdict is computed from `CanaryStats` alone (counts, sums and sums of squares of the
contrasts, the p99s), so the decision benchmark runs this very code on simulated running sums.
Requests are the units: with sticky routing a customer's requests are correlated, which the bounds
ignore (fine while customers send few requests per window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import orjson
import pandas as pd

from releasegate.analysis import labels as lab
from releasegate.analysis import sequential, srm
from releasegate.analysis.verdict import (ArmSamples, Decision, MetricResult, PolicyRef, SliceResult, Verdict,
                                          Window)
from releasegate.policy import Inconclusive, Policy

PREDICTION_COLUMNS = ("request_id", "time", "arm", "routing_key_hash", "fallback", "outputs", "latency_ms", "status")
FEEDBACK_COLUMNS = ("request_id", "time", "ground_truth")
ARMS = ("champion", "candidate")

SLOW_SHARE = 0.01  # p99: the share of requests allowed above the latency limit
MIN_P99_ROWS = 100  # a p99 from fewer rows is just the maximum


@dataclass(frozen=True)
class _Check:
    name: str
    kind: str
    margin: float
    limit: float
    higher_is_better: bool
    support: tuple[float, float] | None = None  # the range the estimate cannot leave


def analyse_frames(preds: pd.DataFrame, feedback: pd.DataFrame, stage: str, policy: Policy,
                   candidate_weight: int = 0, window: Window | tuple[float, float] | None = None,
                   window_closed: bool = False, srm_unit: str = "routing_keys") -> Verdict:
    """Decide one stage from its logged rows (columns as in storage.predictions / storage.feedback).

    srm_unit: what the backend assigns to an arm, "routing_keys" (the gateway's sticky keys) or "requests" (KServe).
    """
    mode, weight = _stage(stage, candidate_weight)
    _require(preds, PREDICTION_COLUMNS + (("inputs",) if policy.slices else ()), "predictions")
    _require(feedback, FEEDBACK_COLUMNS, "feedback")
    window = _window(window, preds, stage)
    rows = _rows(preds, _labels(feedback), policy)
    if mode == "canary":
        return verdict_from_stats(canary_stats(rows, policy, weight), stage, policy, window, window_closed,
                                  srm_unit=srm_unit)
    alpha = _alpha(policy, mode)
    return _verdict(_Shadow(rows, policy, alpha, _grow(policy, mode, window, window_closed)), stage, policy,
                    window, window_closed)


def frame_stats(preds: pd.DataFrame, feedback: pd.DataFrame, policy: Policy, weight: int) -> CanaryStats:
    """A canary step's sufficient statistics from its logged rows (what analyse_frames decides a canary on)."""
    _require(preds, PREDICTION_COLUMNS + (("inputs",) if policy.slices else ()), "predictions")
    _require(feedback, FEEDBACK_COLUMNS, "feedback")
    return canary_stats(_rows(preds, _labels(feedback), policy), policy, weight)


def verdict_from_stats(stats: CanaryStats, stage: str, policy: Policy, window: Window | tuple[float, float],
                       window_closed: bool = False, srm_unit: str = "routing_keys") -> Verdict:
    """Decide a canary stage from its sufficient statistics: analyse_frames' canary path and the benchmark's."""
    mode, weight = _stage(stage, stats.weight)
    if mode != "canary":
        raise ValueError(f"CanaryStats decide canary stages only, got stage {stage!r}")
    window = _window(window, None, stage)
    analysis = _Canary(stats, policy, _alpha(policy, mode), _grow(policy, mode, window, window_closed, stats),
                       srm_unit=srm_unit)
    return _verdict(analysis, stage, policy, window, window_closed)


def _alpha(policy: Policy, mode: str) -> float:
    """alpha / k, k the checks of the stage (Bonferroni): error rate, latency, primary, + agreement, + slices."""
    return policy.alpha / (3 + (mode == "shadow" and policy.agreement_checked) + bool(policy.slices))


def _grow(policy: Policy, mode: str, window: Window, window_closed: bool, stats: CanaryStats | None = None
          ) -> float | None:
    """How much the sample may still grow by the end of the canary; None where futility is not judged.

    Futility is judged only at planned looks: once the last step (or the shadow) has run a full
    window with extensions left, and when an earlier canary step's window closes, where what the
    remaining steps and extensions could still add is counted in windows of time (a pessimistic
    count: later steps route more traffic to the candidate). Earlier estimates are too noisy to
    give up on; at the last look of the last step the policy's inconclusive rule decides.
    """
    seconds = policy.shadow.max_window_seconds if mode == "shadow" else policy.canary.max_window_seconds
    extensions = policy.max_extensions if policy.inconclusive == Inconclusive.extend else 0
    steps = policy.canary.steps
    if mode == "canary" and stats is not None and stats.weight in steps[:-1]:
        if not window_closed:
            return None
        done = len(stats.carried) + 1  # windows behind this look: the earlier steps and this one
        remaining = len(steps) - 1 - steps.index(stats.weight) + extensions
        return (done + remaining) / done
    elapsed = window.end - window.start
    if window_closed or elapsed < seconds or extensions == 0:
        return None
    grow = seconds * (1 + extensions) / elapsed
    return grow if grow > 1 else None


def _verdict(analysis, stage: str, policy: Policy, window: Window, window_closed: bool) -> Verdict:
    metrics = analysis.metrics()
    slices = analysis.slices(analysis.alpha) if policy.slices else []
    srm_result = analysis.srm()
    decision, reason = _decide(analysis, metrics, slices, srm_result, stage, window_closed)
    return Verdict(decision=decision, reason=reason, window=window, samples=analysis.samples(), metrics=metrics,
                   srm=srm_result, slices=slices, policy=PolicyRef(name=policy.name, digest=policy.digest))


# -- input ------------------------------------------------------------------------------------------------------


def _stage(stage: str, candidate_weight: int) -> tuple[str, int]:
    if stage == "shadow":
        return "shadow", 0
    if stage.startswith("canary-") and stage.removeprefix("canary-").isdigit():
        staged = int(stage.removeprefix("canary-"))
        if candidate_weight and candidate_weight != staged:
            raise ValueError(f"stage {stage!r} disagrees with candidate_weight={candidate_weight}")
        if not 0 < staged < 100:
            raise ValueError(f"canary weight must be between 1 and 99, got stage {stage!r}")
        return "canary", staged
    raise ValueError(f"stage must be 'shadow' or 'canary-<weight>', got {stage!r}")


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns))
        raise ValueError(f"{what} frame lacks column(s) {', '.join(missing)} (has: {have})")


def _window(window, preds: pd.DataFrame | None, stage: str) -> Window:
    if isinstance(window, Window):
        return window if window.stage else window.model_copy(update={"stage": stage})
    if window is None and preds is not None:
        times = preds["time"] if len(preds) else pd.Series([0.0])
        return Window(start=float(times.min()), end=float(times.max()), stage=stage)
    start, end = window
    return Window(start=float(start), end=float(end), stage=stage)


def _labels(feedback: pd.DataFrame) -> dict[tuple[str, int], lab.Scalar]:
    """(request_id, row of the request) → label, the latest feedback winning."""
    out: dict[tuple[str, int], lab.Scalar] = {}
    parsed: dict = {}  # few distinct label texts: parse each once
    for request_id, truth in feedback.sort_values("time", kind="stable")[["request_id", "ground_truth"]].itertuples(
            index=False):
        if truth not in parsed:
            parsed[truth] = lab.per_row(truth)
        for rank, label in enumerate(parsed[truth]):
            if label is not None:
                out[(str(request_id), rank)] = label
    return out


def _rows(preds: pd.DataFrame, labels: dict, policy: Policy) -> pd.DataFrame:
    """One row per (request, input row, arm) with parsed output, label, error flag and slice values."""
    df = preds.sort_values(["time"] + (["id"] if "id" in preds.columns else []), kind="stable").copy()
    unknown = set(df["arm"].unique()) - set(ARMS)
    if unknown:
        raise ValueError(f"predictions have unknown arm(s) {sorted(unknown)}; expected champion or candidate")
    df["request_id"] = df["request_id"].astype(str)
    # A request with several input rows logs one row per input row and arm, in order.
    df["rank"] = df.groupby(["request_id", "arm"]).cumcount()
    df["error"] = df["status"] != "ok"
    df["fallback"] = df["fallback"].fillna(False).astype(bool)
    parsed: dict = {}  # outputs repeat a handful of texts: parse each once
    df["out"] = [(parsed[o] if o in parsed else parsed.setdefault(o, lab.scalar(o))) if ok else None
                 for o, ok in zip(df["outputs"], ~df["error"])]
    df["label"] = [labels.get(key) for key in zip(df["request_id"], df["rank"])]
    df["latency_ms"] = pd.to_numeric(df["latency_ms"], errors="coerce")
    df["value"] = _primary_values(df["out"], df["label"], policy.primary.metric)
    if policy.slices:
        # Slices only look at labelled rows: parse just their inputs.
        records = {i: _record(df.at[i, "inputs"]) for i in df.index[df["label"].notna()]}
        for feature in policy.slices:
            df[f"slice:{feature}"] = pd.Series({i: _feature(r, feature) for i, r in records.items()}, dtype=object)
    return df.drop(columns=[c for c in ("outputs", "inputs") if c in df.columns]).reset_index(drop=True)


def _record(inputs) -> dict | None:
    if not isinstance(inputs, (str, bytes)):
        return inputs if isinstance(inputs, dict) else None
    try:
        record = orjson.loads(inputs)
    except orjson.JSONDecodeError:
        return None
    if isinstance(record, list) and len(record) == 1:
        record = record[0]
    return record if isinstance(record, dict) else None


def _feature(record: dict | None, feature: str) -> str | None:
    value = None if record is None else record.get(feature)
    return None if value is None else str(value)


def _primary_values(outs: pd.Series, truth: pd.Series, metric: str) -> list[float | None]:
    """Per-row primary metric; None where the row has no label or no usable output."""
    values: list[float | None] = []
    for out, label in zip(outs, truth):
        if label is None or out is None:
            values.append(None if label is None else (0.0 if metric == "accuracy" else None))
        elif metric == "accuracy":
            values.append(float(out == label))
        elif isinstance(out, str) or isinstance(label, str):
            raise ValueError(f"primary metric {metric} needs numeric outputs and labels, got {out!r} and {label!r}")
        elif metric == "absolute_error":
            values.append(abs(out - label))
        elif metric == "squared_error":
            values.append((out - label) ** 2)
        else:  # log_loss: binary labels, the output is the probability of class 1
            if not 0 <= out <= 1 or label not in (0.0, 1.0):
                raise ValueError(f"log_loss needs the probability of class 1 as output and a 0/1 label, "
                                 f"got {out!r} and {label!r}")
            p = min(max(out, 1e-15), 1 - 1e-15)
            values.append(-math.log(p if label == 1.0 else 1 - p))
    return values


# -- the two designs --------------------------------------------------------------------------------------------


class _Stage:
    mode: str
    rows: pd.DataFrame
    policy: Policy
    alpha: float

    def checks(self) -> dict[str, _Check]:
        g, p = self.policy.guardrails, self.policy.primary
        checks = {
            "error_rate": _Check("error_rate", "guardrail", g.error_rate_margin, g.error_rate_margin,
                                 higher_is_better=False, support=(-1.0, 1.0)),
            # The share of candidate requests slower than (1 + margin) × the champion's p99, against 1%.
            "latency_p99": _Check("latency_p99", "guardrail", SLOW_SHARE, SLOW_SHARE, higher_is_better=False,
                                  support=(0.0, 1.0)),
            p.metric: _Check(p.metric, "primary", p.margin,
                             -p.margin if p.metric == "accuracy" else p.margin,
                             higher_is_better=p.metric == "accuracy",
                             support=(-1.0, 1.0) if p.metric == "accuracy" else None),
        }
        return checks

    def arm_rows(self, arm: str) -> pd.DataFrame:
        return self.rows[self.rows["arm"] == arm]

    def latency(self, check: _Check, t_opt: float) -> MetricResult:
        champion = self.arm_rows("champion")["latency_ms"].dropna().to_numpy()
        candidate = self.candidate_rows()["latency_ms"].dropna().to_numpy()
        if len(champion) < MIN_P99_ROWS:
            return _undecided(check, self.alpha, len(candidate),
                              f"{len(champion)} champion latencies, {MIN_P99_ROWS} needed for its p99")
        p99_champion = float(np.quantile(champion, 0.99))
        limit_ms = self.policy.guardrails.latency_limit_ms(p99_champion)
        p99_candidate = float(np.quantile(candidate, 0.99)) if len(candidate) else float("nan")
        detail = f"{self.policy.guardrails.latency_limit_text(p99_champion)}; candidate p99 {p99_candidate:.1f} ms"
        return _metric(check, (candidate > limit_ms).astype(float), self.alpha, t_opt, detail, grow=self.grow,
                       min_n=self.policy.shadow.min_samples)

    def candidate_rows(self) -> pd.DataFrame:
        return self.arm_rows("candidate")


class _Shadow(_Stage):
    """Both arms answered the same requests: per-request differences."""

    mode = "shadow"

    def __init__(self, rows: pd.DataFrame, policy: Policy, alpha: float, grow: float | None = None):
        self.rows, self.policy, self.alpha, self.grow = rows, policy, alpha, grow
        champion = rows[rows["arm"] == "champion"]
        candidate = rows[rows["arm"] == "candidate"]
        cols = ["request_id", "rank", "time", "routing_key_hash", "error", "out", "value", "label"]
        slice_cols = [c for c in rows.columns if c.startswith("slice:")]
        self.pairs = champion[cols + slice_cols].merge(candidate[["request_id", "rank", "error", "out", "value"]],
                                                       on=["request_id", "rank"], suffixes=("_b", "_c"))
        labelled = self.pairs["label"].notna() & self.pairs["value_c"].notna() & self.pairs["value_b"].notna()
        self.labelled = self.pairs[labelled & ~self.pairs["error_c"] & ~self.pairs["error_b"]]
        self.t_opt = policy.shadow.min_samples

    def metrics(self) -> list[MetricResult]:
        checks = self.checks()
        pairs = self.pairs
        err = pairs["error_c"].astype(float) - pairs["error_b"].astype(float)
        metric = self.policy.primary.metric
        primary = self.labelled["value_c"].astype(float) - self.labelled["value_b"].astype(float)
        checked = [
            _metric(checks["error_rate"], err, self.alpha, self.t_opt,
                    f"candidate {pairs['error_c'].mean() if len(pairs) else 0:.2%} vs champion "
                    f"{pairs['error_b'].mean() if len(pairs) else 0:.2%} on {len(pairs):,} paired requests",
                    grow=self.grow),
            self.latency(checks["latency_p99"], self.t_opt),
            _metric(checks[metric], primary, self.alpha, self.t_opt,
                    _series_detail(metric, self.labelled["value_c"], self.labelled["value_b"], "labelled paired"),
                    grow=self.grow),
        ]
        return checked + ([self.agreement()] if self.policy.agreement_checked else [])

    def agreement(self) -> MetricResult:
        """The share of requests both arms answer alike: the same label, or a regressor's values within the tolerance."""
        both_ok = self.pairs[~self.pairs["error_c"] & ~self.pairs["error_b"]]
        tolerance = self.policy.shadow.agreement_tolerance if self.policy.regression else None
        if tolerance is None:
            agree = np.array([c is not None and c == b for c, b in zip(both_ok["out_c"], both_ok["out_b"])],
                             dtype=float)
            alike = ""
        else:
            agree = np.array([isinstance(c, float) and isinstance(b, float) and abs(c - b) <= tolerance
                              for c, b in zip(both_ok["out_c"], both_ok["out_b"])], dtype=float)
            alike = f" within {tolerance:g}"
        m = self.policy.shadow.min_agreement
        return _metric(_Check("agreement", "agreement", m, m, higher_is_better=True, support=(0.0, 1.0)), agree,
                       self.alpha, self.t_opt,
                       f"the arms agree{alike} on {agree.mean() if len(agree) else 0:.1%} of {len(agree):,} requests",
                       grow=self.grow)

    def enough(self) -> bool:
        return len(self.labelled) >= self.policy.shadow.min_samples

    def progress(self) -> str:
        return f"{len(self.labelled):,} of {self.policy.shadow.min_samples:,} labelled shadow requests"

    def population(self) -> str:
        return f"{len(self.labelled):,} labelled shadow requests"

    def slices(self, alpha: float) -> list[SliceResult]:
        min_n = _slice_min(self.policy.shadow.min_samples)
        groups = []
        for feature in self.policy.slices:
            for value, part in self.labelled.groupby(f"slice:{feature}", sort=True):
                diff = part["value_c"].astype(float) - part["value_b"].astype(float)
                groups.append((feature, str(value), diff.to_numpy(), len(part) >= min_n,
                               {arm: ArmSamples(requests=part["request_id"].nunique(),
                                                routing_keys=part["routing_key_hash"].nunique(),
                                                labelled=len(part), errors=0) for arm in ARMS},
                               _series_detail(self.policy.primary.metric, part["value_c"], part["value_b"],
                                            "labelled paired"), min_n))
        return _slice_results(groups, self.checks()[self.policy.primary.metric], alpha, min_n)

    def srm(self):
        return None

    def samples(self) -> dict[str, ArmSamples]:
        out = {}
        for arm in ARMS:
            part = self.arm_rows(arm)
            out[arm] = ArmSamples(requests=part["request_id"].nunique(),
                                  routing_keys=part["routing_key_hash"].nunique(),
                                  labelled=part.loc[part["label"].notna(), "request_id"].nunique(),
                                  errors=int(part["error"].sum()))
        return out


@dataclass(frozen=True)
class SliceStats:
    """One slice's sufficient statistics: the primary metric's contrasts and the labelled rows per arm."""

    feature: str
    value: str
    contrasts: sequential.Summary
    labelled: dict[str, int]
    routing_keys: dict[str, int]
    means: dict[str, float | None]  # the primary metric's mean per arm


@dataclass(frozen=True)
class CanaryStats:
    """All a canary verdict is computed from; `canary_stats` builds it from logged rows, the benchmark by simulation."""

    weight: int
    arms: dict[str, ArmSamples]  # requests, routing keys, labelled and errored rows per arm
    rows: dict[str, int]  # analysed rows per arm (the units of the error-rate contrasts)
    error: sequential.Summary  # AIPW contrasts of the error flag, all rows in time order
    primary: sequential.Summary  # AIPW contrasts of the primary metric, labelled usable rows in time order
    primary_means: dict[str, float | None]
    champion_latencies: int
    p99: dict[str, float]  # per arm, nan without rows
    slow: sequential.Summary | None  # candidate rows slower than the latency limit (None: champion p99 unknown)
    candidate_latencies: int
    slices: tuple[SliceStats, ...] = ()
    # Set when earlier canary steps' evidence is carried in (see `carry`): this step's own counts (its
    # SRM and its minimum sample are judged on them) and the weights of the earlier steps.
    step_arms: dict[str, ArmSamples] | None = None
    carried: tuple[int, ...] = ()

    @property
    def own_arms(self) -> dict[str, ArmSamples]:
        return self.step_arms if self.step_arms is not None else self.arms


def carry(earlier: CanaryStats, current: CanaryStats) -> CanaryStats:
    """The current step's statistics with the earlier steps' evidence added in.

    The AIPW contrasts of each step use that step's own (known, fixed in advance) assignment
    probability, so they stay unbiased for candidate − champion across a change of weight, and the
    sums of contrasts from consecutive steps form one sequence: the asymptotic confidence sequence
    allows a predictable, time-varying propensity (Waudby-Smith et al. 2024, §3). Pooling lets a
    low-traffic 5 % step hand its evidence on instead of having to decide alone. The latency check
    adds up each step's share of requests over that step's own limit; SRM and the minimum sample stay
    per step.
    """

    def add_arms(a: dict[str, ArmSamples], b: dict[str, ArmSamples]) -> dict[str, ArmSamples]:
        return {arm: ArmSamples(**{f: getattr(a[arm], f) + getattr(b[arm], f) for f in ArmSamples.model_fields})
                for arm in ARMS}

    def pooled_means(a: dict, na: dict, b: dict, nb: dict) -> dict[str, float | None]:
        out = {}
        for arm in ARMS:
            n = na[arm] + nb[arm]
            out[arm] = ((a[arm] or 0.0) * na[arm] + (b[arm] or 0.0) * nb[arm]) / n if n else None
        return out

    slices = {(s.feature, s.value): s for s in earlier.slices}
    merged = []
    for s in current.slices:
        e = slices.pop((s.feature, s.value), None)
        if e is not None:
            s = SliceStats(feature=s.feature, value=s.value, contrasts=e.contrasts + s.contrasts,
                           labelled={a: e.labelled[a] + s.labelled[a] for a in ARMS},
                           routing_keys={a: e.routing_keys[a] + s.routing_keys[a] for a in ARMS},
                           means=pooled_means(e.means, e.labelled, s.means, s.labelled))
        merged.append(s)
    merged.extend(slices.values())
    merged.sort(key=lambda s: (s.feature, s.value))
    labelled = {"earlier": {a: earlier.arms[a].labelled for a in ARMS},
                "current": {a: current.arms[a].labelled for a in ARMS}}
    slow = current.slow if earlier.slow is None else earlier.slow if current.slow is None else earlier.slow + current.slow
    return CanaryStats(
        weight=current.weight, arms=add_arms(earlier.arms, current.arms),
        rows={a: earlier.rows[a] + current.rows[a] for a in ARMS},
        error=earlier.error + current.error, primary=earlier.primary + current.primary,
        primary_means=pooled_means(earlier.primary_means, labelled["earlier"], current.primary_means,
                                   labelled["current"]),
        champion_latencies=earlier.champion_latencies + current.champion_latencies, p99=current.p99, slow=slow,
        candidate_latencies=earlier.candidate_latencies + current.candidate_latencies, slices=tuple(merged),
        step_arms=current.own_arms, carried=earlier.carried + (earlier.weight,))


def canary_stats(rows: pd.DataFrame, policy: Policy, weight: int) -> CanaryStats:
    """Reduce a canary window's rows (one per request, input row and arm) to its sufficient statistics."""
    propensity = weight / 100
    candidate_ids = set(rows.loc[rows["arm"] == "candidate", "request_id"])
    on_champion = rows["arm"] == "champion"
    # The champion answering for a failed candidate is the candidate arm's request: keep it there,
    # as an error, if the candidate's own row is missing.
    orphan = on_champion & rows["fallback"] & ~rows["request_id"].isin(candidate_ids)
    rows = rows.copy()
    rows.loc[orphan, ["arm", "error", "out", "value", "latency_ms"]] = ["candidate", True, None, None, np.nan]
    keep = ~(on_champion & rows["request_id"].isin(candidate_ids))
    rows = rows[keep].sort_values(["time", "request_id", "rank"], kind="stable").reset_index(drop=True)
    usable = rows["label"].notna() & ~rows["error"] & rows["value"].notna()
    labelled = rows[usable]

    def contrasts(frame: pd.DataFrame, column: str) -> sequential.Summary:
        treated = (frame["arm"] == "candidate").to_numpy()
        return sequential.Summary.of(
            sequential.aipw_contrasts(frame[column].astype(float).to_numpy(), treated, propensity))

    def per_arm(frame: pd.DataFrame) -> dict[str, int]:
        counts = frame["arm"].value_counts()
        return {arm: int(counts.get(arm, 0)) for arm in ARMS}

    def means(frame: pd.DataFrame) -> dict[str, float | None]:
        by_arm = frame.groupby("arm")["value"].mean()
        return {arm: (float(by_arm[arm]) if arm in by_arm.index else None) for arm in ARMS}

    n_labelled = per_arm(labelled)
    arms = {arm: ArmSamples(requests=int(part["request_id"].nunique()),
                            routing_keys=int(part["routing_key_hash"].nunique()),
                            labelled=n_labelled[arm], errors=int(part["error"].sum()))
            for arm in ARMS for part in [rows[rows["arm"] == arm]]}
    champion = rows.loc[rows["arm"] == "champion", "latency_ms"].dropna().to_numpy()
    candidate = rows.loc[rows["arm"] == "candidate", "latency_ms"].dropna().to_numpy()
    p99 = {"champion": float(np.quantile(champion, 0.99)) if len(champion) else float("nan"),
           "candidate": float(np.quantile(candidate, 0.99)) if len(candidate) else float("nan")}
    slow = None
    if len(champion) >= MIN_P99_ROWS:
        limit_ms = policy.guardrails.latency_limit_ms(p99["champion"])
        slow = sequential.Summary.of((candidate > limit_ms).astype(float))
    slices = []
    for feature in policy.slices:
        for value, part in labelled.groupby(f"slice:{feature}", sort=True):
            slices.append(SliceStats(
                feature=feature, value=str(value), contrasts=contrasts(part, "value"), labelled=per_arm(part),
                routing_keys={arm: int(part.loc[part["arm"] == arm, "routing_key_hash"].nunique()) for arm in ARMS},
                means=means(part)))
    return CanaryStats(
        weight=weight, arms=arms, rows=per_arm(rows), error=contrasts(rows, "error"),
        primary=contrasts(labelled, "value"), primary_means=means(labelled),
        champion_latencies=len(champion), p99=p99, slow=slow, candidate_latencies=len(candidate),
        slices=tuple(slices))


class _Canary(_Stage):
    """Disjoint requests per arm, assigned with probability weight %: AIPW contrasts, from CanaryStats only."""

    mode = "canary"

    def __init__(self, stats: CanaryStats, policy: Policy, alpha: float, grow: float | None = None,
                 srm_unit: str = "routing_keys"):
        if srm_unit not in ("routing_keys", "requests"):
            raise ValueError(f"srm_unit must be routing_keys or requests, got {srm_unit!r}")
        self.stats, self.policy, self.alpha, self.weight, self.grow = stats, policy, alpha, stats.weight, grow
        self.srm_unit = srm_unit
        propensity = stats.weight / 100
        self.t_opt = policy.canary.min_samples / min(propensity, 1 - propensity)

    def metrics(self) -> list[MetricResult]:
        s = self.stats
        checks = self.checks()
        metric = self.policy.primary.metric
        g = self.policy.guardrails
        rate = {arm: s.arms[arm].errors / s.rows[arm] if s.rows[arm] else 0.0 for arm in ARMS}
        err_ok = min(s.rows.values()) >= sequential.MIN_UNITS
        primary_ok = min(a.labelled for a in s.arms.values()) >= sequential.MIN_UNITS
        if s.slow is None:
            latency = _undecided(checks["latency_p99"], self.alpha, s.candidate_latencies,
                                 f"{s.champion_latencies} champion latencies, {MIN_P99_ROWS} needed for its p99")
        else:
            latency = _metric(checks["latency_p99"], s.slow, self.alpha, self.policy.canary.min_samples,
                              f"{g.latency_limit_text(s.p99['champion'])}; candidate p99 {s.p99['candidate']:.1f} ms",
                              grow=self.grow, min_n=self.policy.canary.min_samples)
        return [
            _metric(checks["error_rate"], s.error, self.alpha, self.t_opt,
                    f"candidate {rate['candidate']:.2%} vs champion {rate['champion']:.2%}", arms_ok=err_ok,
                    grow=self.grow),
            latency,
            _metric(checks[metric], s.primary, self.alpha, self.t_opt,
                    _arms_detail(metric, s.primary_means["candidate"], s.arms["candidate"].labelled,
                                 s.primary_means["champion"], s.arms["champion"].labelled, "labelled"),
                    arms_ok=primary_ok, grow=self.grow),
        ]

    def labelled_per_arm(self) -> dict[str, int]:
        return {arm: self.stats.arms[arm].labelled for arm in ARMS}

    def enough(self) -> bool:
        # Each step needs its own minimum sample: carried evidence decides the bounds, not the step's exposure.
        return min(a.labelled for a in self.stats.own_arms.values()) >= self.policy.canary.min_samples

    @property
    def last_step(self) -> bool:
        """Is this the policy's last canary step (the one that promotes)? Unknown weights count as last."""
        steps = self.policy.canary.steps
        return self.weight not in steps[:-1]

    def progress(self) -> str:
        n = {arm: a.labelled for arm, a in self.stats.own_arms.items()}
        return (f"{n['candidate']:,} candidate and {n['champion']:,} champion labelled canary-{self.weight} "
                f"requests of {self.policy.canary.min_samples:,} per arm")

    def population(self) -> str:
        n = self.labelled_per_arm()
        steps = " → ".join(str(w) for w in (*self.stats.carried, self.weight))
        return (f"{sum(n.values()):,} labelled canary requests at {steps} % ({n['candidate']:,} candidate, "
                f"{n['champion']:,} champion)")

    def slices(self, alpha: float) -> list[SliceResult]:
        min_n = _slice_min(self.policy.canary.min_samples)
        groups = []
        for sl in self.stats.slices:
            samples = {arm: ArmSamples(requests=sl.labelled[arm], labelled=sl.labelled[arm],
                                       routing_keys=sl.routing_keys[arm]) for arm in ARMS}
            detail = _arms_detail(self.policy.primary.metric, sl.means["candidate"], sl.labelled["candidate"],
                                  sl.means["champion"], sl.labelled["champion"], "labelled")
            groups.append((sl.feature, sl.value, sl.contrasts, min(sl.labelled.values()) >= min_n, samples,
                           detail, min_n))
        return _slice_results(groups, self.checks()[self.policy.primary.metric], alpha, min_n)

    def srm(self):
        keys = {arm: getattr(self.stats.own_arms[arm], self.srm_unit) for arm in ARMS}
        return srm.check(keys, self.weight, self.policy.srm_p_value)

    def samples(self) -> dict[str, ArmSamples]:
        return dict(self.stats.arms)


# -- metrics, slices, decision ----------------------------------------------------------------------------------


def _slice_min(stage_min: int) -> int:
    """A slice is decided from a quarter of the stage's minimum sample (never below the CS burn-in)."""
    return max(sequential.MIN_UNITS, stage_min // 4)


def _arms_detail(metric: str, mean_c: float | None, n_c: int, mean_b: float | None, n_b: int, what: str) -> str:
    if not n_c or not n_b or mean_c is None or mean_b is None:
        return f"{n_c:,} candidate and {n_b:,} champion {what} requests"
    return f"{metric}: candidate {mean_c:.3f} vs champion {mean_b:.3f} on {n_c:,} / {n_b:,} {what} requests"


def _series_detail(metric: str, candidate, champion, what: str) -> str:
    c = pd.Series(candidate, dtype=float)
    b = pd.Series(champion, dtype=float)
    return _arms_detail(metric, float(c.mean()) if len(c) else None, len(c), float(b.mean()) if len(b) else None,
                        len(b), what)


def _undecided(check: _Check, alpha: float, n: int, detail: str, estimate: float | None = None) -> MetricResult:
    return MetricResult(name=check.name, kind=check.kind, estimate=estimate, lower=None, upper=None,
                        margin=check.margin, passed=None, detail=detail, limit=check.limit,
                        higher_is_better=check.higher_is_better, alpha=alpha, n=n)


def _metric(check: _Check, values, alpha: float, t_opt: float, detail: str, arms_ok: bool = True,
            grow: float | None = None, min_n: int = 0) -> MetricResult:
    """The check's always-valid bounds and pass/fail; `grow` (see _grow) also judges futility.

    `min_n`: the check decides nothing on fewer units (a latency share from the first few hundred requests
    of a busy machine measures the machine, not the model).
    """
    x = sequential.summary(values)
    if x.n < min_n:
        return _undecided(check, alpha, x.n, f"{detail}; {x.n:,} of the {min_n:,} requests it needs to decide",
                          x.mean if x.n else None)
    bound = sequential.confidence_sequence(x, alpha, t_opt) if arms_ok else None
    if bound is not None and check.support is not None:
        # Intersecting with the known range keeps coverage and reads better than a −0.1% share.
        lo, hi = check.support
        bound = replace(bound, lower=max(bound.lower, lo), upper=min(bound.upper, hi))
    if bound is None:
        return _undecided(check, alpha, x.n, f"{detail}; fewer than {sequential.MIN_UNITS} units per arm to bound",
                          x.mean if x.n else None)
    if check.higher_is_better:
        passed = True if bound.lower > check.limit else False if bound.upper < check.limit else None
    else:
        passed = True if bound.upper < check.limit else False if bound.lower > check.limit else None
    p = sequential.p_value(x, check.limit, "below" if check.higher_is_better else "above", alpha, t_opt)
    futile = False
    if passed is None and grow is not None:
        # Conditional futility: even if the truth were one standard error better than the estimate, the
        # bound at the end of the allowed extensions would not clear the limit, so extending cannot decide
        # for the candidate. (The bare estimate would give up on half the candidates that need them.)
        half = bound.sd * sequential.radius(int(bound.n * grow), alpha, t_opt)
        se = bound.sd / math.sqrt(bound.n)
        futile = (bound.estimate + se - half <= check.limit) if check.higher_is_better else \
            (bound.estimate - se + half >= check.limit)
    return MetricResult(name=check.name, kind=check.kind, estimate=bound.estimate, lower=bound.lower,
                        upper=bound.upper, margin=check.margin, passed=passed, detail=detail, limit=check.limit,
                        higher_is_better=check.higher_is_better, alpha=alpha, n=bound.n, p_value=p, futile=futile)


def _slice_results(groups: list, check: _Check, alpha: float, min_n: int) -> list[SliceResult]:
    """The primary check per slice: bounds at alpha / m (Bonferroni), regressions by Holm at alpha across m slices."""
    m = max(len(groups), 1)
    decided = [g for g in groups if g[3]]
    pvals = np.array([sequential.p_value(g[2], check.limit, "below" if check.higher_is_better else "above",
                                         alpha / m, min_n) for g in decided])
    holm = _holm(pvals, m)
    results = []
    j = 0
    for feature, value, values, is_decided, samples, detail, _ in groups:
        if not is_decided:
            x = sequential.summary(values)
            metric = _undecided(check, alpha / m, x.n, f"{detail}; too few for a decision ({min_n} per arm)",
                                x.mean if x.n else None)
        else:
            metric = _metric(check, values, alpha / m, min_n, detail)
            regressed = holm[j] <= alpha
            passed = False if regressed else (True if metric.passed else None)
            metric = metric.model_copy(update={"passed": passed, "p_value": float(holm[j])})
            j += 1
        results.append(SliceResult(feature=feature, value=value, samples=samples, metrics=[metric]))
    return results


def _holm(p: np.ndarray, m: int) -> np.ndarray:
    """Holm-adjusted p-values for the decided slices; undecided ones count in m with p = 1."""
    if not len(p):
        return p
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(len(p)))))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def _decide(analysis, metrics: list[MetricResult], slices: list[SliceResult], srm_result, stage: str,
            window_closed: bool) -> tuple[Decision, str]:
    if srm_result is not None and srm_result.alarm:
        c = srm_result.counts
        return Decision.invalid, (
            f"invalid: sample ratio mismatch: {c['candidate']:,} candidate vs {c['champion']:,} champion routing keys "
            f"where {srm_result.expected['candidate']:.0%} / {srm_result.expected['champion']:.0%} was expected "
            f"(sequential test, always-valid p = {srm_result.p_value:.2g} < {analysis.policy.srm_p_value:g}); "
            f"the split itself is broken")
    failed = [m for m in metrics if m.passed is False]
    if failed:
        first = failed[0]
        also = f"; also {', '.join(_name(m) for m in failed[1:])}" if len(failed) > 1 else ""
        return Decision.rollback, f"rollback: {_sentence(first, analysis, stage)}{also}"
    regressed = [s for s in slices if s.metrics and s.metrics[0].passed is False]
    if regressed:
        s = regressed[0]
        n = sum(a.labelled for a in s.samples.values()) if analysis.mode == "canary" else s.metrics[0].n
        also = (f"; also {', '.join(f'{r.feature}={r.value}' for r in regressed[1:])}" if len(regressed) > 1 else "")
        return Decision.rollback, (f"rollback: in slice {s.feature}={s.value}, "
                                   f"{_sentence(s.metrics[0], analysis, stage, n=n)} "
                                   f"(Holm-adjusted p = {s.metrics[0].p_value:.2g}){also}")
    summary = "; ".join(_short(m) for m in metrics)
    futile = [m for m in metrics if m.futile]
    if futile:
        return Decision.rollback, (
            f"rollback: after a full window, at the current estimates not even the canary time still allowed would show "
            f"{' and '.join(_name(m) for m in futile)} within the limit ({'; '.join(_short(m) for m in futile)})")
    if analysis.enough() and all(m.passed for m in metrics):
        return Decision.promote, f"promote: on {analysis.population()} every check clears its limit: {summary}"
    pending = [m for m in metrics if not m.passed]
    waiting = "" if analysis.enough() else f"{analysis.progress()}; "
    undecided = f"undecided: {'; '.join(_short(m) for m in pending)}" if pending else "every check clears its limit"
    if window_closed and analysis.mode == "canary" and not analysis.last_step:
        return Decision.continue_, (f"continue: the canary-{analysis.weight} window closed with no check failed "
                                    f"({waiting}{undecided}); its evidence carries into the next step")
    if window_closed:
        return Decision.inconclusive, f"inconclusive: the window closed with {waiting}{undecided}"
    return Decision.continue_, f"continue: {waiting}{undecided}"


def _name(m: MetricResult) -> str:
    return "share over the latency limit" if m.name == "latency_p99" else m.name.replace("_", " ")


def _num(x: float | None, share: bool = False, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = round(x, 3) + 0.0  # + 0.0 turns −0.0 into 0.0
    text = f"{x:.1%}" if share else (f"{x:+.3f}" if signed else f"{x:.3f}")
    return text.replace("-", "−")


def _is_share(m: MetricResult) -> bool:
    return m.name in ("latency_p99", "agreement")


def _limit(m: MetricResult) -> str:
    if m.limit is None:
        return "n/a"
    return f"{m.limit * 100:g}%" if _is_share(m) else f"{m.limit:+g}".replace("-", "−")


def _short(m: MetricResult) -> str:
    share = _is_share(m)
    side = ">" if m.higher_is_better else "<"
    bounds = (f"{_num(m.lower, share, not share)} … {_num(m.upper, share, not share)}"
              if m.lower is not None else "not bounded yet")
    return f"{_name(m)} {_num(m.estimate, share, not share)} ({bounds}; needs {side} {_limit(m)})"


def _sentence(m: MetricResult, analysis, stage: str, n: int | None = None) -> str:
    level = f"{(1 - (m.alpha or 0)) * 100:.4g}%"
    share = _is_share(m)
    bounds = f"always-valid {level} bounds {_num(m.lower, share, not share)} … {_num(m.upper, share, not share)}"
    if m.name == "latency_p99":
        return (f"{_num(m.estimate, True)} of candidate requests are slower than the latency limit ({bounds}), "
                f"above the {_limit(m)} allowed, on {m.n:,} candidate requests in {stage}: {m.detail}")
    if m.kind == "agreement":
        return (f"the arms agree on {_num(m.estimate, True)} of requests ({bounds}), below the required "
                f"{_limit(m)}, on {m.n:,} shadow requests")
    where = "below" if m.higher_is_better else "above"
    population = analysis.population() if m.kind == "primary" else f"{m.n:,} {stage} requests"
    if n is not None:
        population = f"{n:,} labelled {stage} requests in that slice"
    return (f"{_name(m)} of candidate − champion is {_num(m.estimate)} ({bounds}), {where} the {_limit(m)} "
            f"margin, on {population}")
