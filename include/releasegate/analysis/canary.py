"""A canary step: disjoint requests per arm, assigned with probability weight %, compared by AIPW contrasts.

A canary verdict is computed from `CanaryStats` alone (counts, sums and sums of squares of the
contrasts, the p99s), so the decision benchmark runs this very code on simulated running sums.
Requests are the units: with sticky routing a customer's requests are correlated, which the bounds
ignore (fine while customers send few requests per window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from releasegate.analysis import checks as ck
from releasegate.analysis import sequential, srm
from releasegate.analysis.checks import SliceGroup, StageChecks
from releasegate.contract import ARMS, Arm, StageKind
from releasegate.policy import Policy
from releasegate.verdict import SRM, ArmSamples, MetricResult, SliceResult


@dataclass(frozen=True)
class SliceStats:
    """One slice's sufficient statistics: the primary metric's contrasts and the labelled rows per arm."""

    feature: str
    value: str
    contrasts: sequential.Summary
    labelled: dict[Arm, int]
    routing_keys: dict[Arm, int]
    means: dict[Arm, float | None]  # the primary metric's mean per arm


@dataclass(frozen=True)
class CanaryStats:
    """All a canary verdict is computed from; `canary_stats` builds it from logged rows, the benchmark by simulation."""

    weight: int
    arms: dict[Arm, ArmSamples]  # requests, routing keys, labelled and errored rows per arm
    rows: dict[Arm, int]  # analysed rows per arm (the units of the error-rate contrasts)
    error: sequential.Summary  # AIPW contrasts of the error flag, all rows in time order
    primary: sequential.Summary  # AIPW contrasts of the primary metric, labelled usable rows in time order
    primary_means: dict[Arm, float | None]
    champion_latencies: int
    p99: dict[Arm, float]  # per arm, nan without rows
    # AIPW contrasts of "slower than the latency limit" (None: the champion's p99 is not known yet).
    slow: sequential.Summary | None
    candidate_latencies: int
    slices: tuple[SliceStats, ...] = ()
    # Set when earlier canary steps' evidence is carried in (see `carry`): this step's own counts (its
    # SRM and its minimum sample are judged on them) and the weights of the earlier steps.
    step_arms: dict[Arm, ArmSamples] | None = None
    carried: tuple[int, ...] = ()

    @property
    def own_arms(self) -> dict[Arm, ArmSamples]:
        return self.step_arms if self.step_arms is not None else self.arms


def carry(earlier: CanaryStats, current: CanaryStats) -> CanaryStats:
    """The current step's statistics with the earlier steps' evidence added in.

    The AIPW contrasts of each step use that step's own (known, fixed in advance) assignment
    probability, so they stay unbiased for candidate − champion across a change of weight, and the
    sums of contrasts from consecutive steps form one sequence: the asymptotic confidence sequence
    allows a predictable, time-varying propensity (Waudby-Smith et al. 2024, §3). Pooling lets a
    low-traffic 5 % step hand its evidence on instead of having to decide alone. The latency check
    adds up each step's contrasts over that step's own limit; SRM and the minimum sample stay per step.
    """

    def add_arms(a: dict[Arm, ArmSamples], b: dict[Arm, ArmSamples]) -> dict[Arm, ArmSamples]:
        return {
            arm: ArmSamples(**{f: getattr(a[arm], f) + getattr(b[arm], f) for f in ArmSamples.model_fields})
            for arm in ARMS
        }

    def pooled_means(
        a: dict[Arm, float | None], na: dict[Arm, int], b: dict[Arm, float | None], nb: dict[Arm, int]
    ) -> dict[Arm, float | None]:
        out: dict[Arm, float | None] = {}
        for arm in ARMS:
            n = na[arm] + nb[arm]
            out[arm] = ((a[arm] or 0.0) * na[arm] + (b[arm] or 0.0) * nb[arm]) / n if n else None
        return out

    slices = {(s.feature, s.value): s for s in earlier.slices}
    merged = []
    for s in current.slices:
        e = slices.pop((s.feature, s.value), None)
        if e is not None:
            s = SliceStats(
                feature=s.feature,
                value=s.value,
                contrasts=e.contrasts + s.contrasts,
                labelled={a: e.labelled[a] + s.labelled[a] for a in ARMS},
                routing_keys={a: e.routing_keys[a] + s.routing_keys[a] for a in ARMS},
                means=pooled_means(e.means, e.labelled, s.means, s.labelled),
            )
        merged.append(s)
    merged.extend(slices.values())
    merged.sort(key=lambda s: (s.feature, s.value))
    slow = (
        current.slow if earlier.slow is None else earlier.slow if current.slow is None else earlier.slow + current.slow
    )
    return CanaryStats(
        weight=current.weight,
        arms=add_arms(earlier.arms, current.arms),
        rows={a: earlier.rows[a] + current.rows[a] for a in ARMS},
        error=earlier.error + current.error,
        primary=earlier.primary + current.primary,
        primary_means=pooled_means(
            earlier.primary_means,
            {a: earlier.arms[a].labelled for a in ARMS},
            current.primary_means,
            {a: current.arms[a].labelled for a in ARMS},
        ),
        champion_latencies=earlier.champion_latencies + current.champion_latencies,
        p99=current.p99,
        slow=slow,
        candidate_latencies=earlier.candidate_latencies + current.candidate_latencies,
        slices=tuple(merged),
        step_arms=current.own_arms,
        carried=earlier.carried + (earlier.weight,),
    )


def canary_stats(rows: pd.DataFrame, policy: Policy, weight: int) -> CanaryStats:
    """Reduce a canary window's rows (one per request, input row and arm) to its sufficient statistics."""
    propensity = weight / 100
    candidate_ids = set(rows.loc[rows["arm"] == Arm.candidate, "request_id"])
    on_champion = rows["arm"] == Arm.champion
    # The champion answering for a failed candidate is the candidate arm's request: keep it there,
    # as an error, if the candidate's own row is missing.
    orphan = on_champion & rows["fallback"] & ~rows["request_id"].isin(candidate_ids)
    rows = rows.copy()
    rows.loc[orphan, ["arm", "error", "out", "value", "latency_ms"]] = [Arm.candidate.value, True, None, None, np.nan]
    keep = ~(on_champion & rows["request_id"].isin(candidate_ids))
    rows = rows[keep].sort_values(["time", "request_id", "rank"], kind="stable").reset_index(drop=True)
    usable = rows["label"].notna() & ~rows["error"] & rows["value"].notna()
    labelled = rows[usable]

    def contrasts(frame: pd.DataFrame, column: str) -> sequential.Summary:
        treated = (frame["arm"] == Arm.candidate).to_numpy()
        return sequential.Summary.of(
            sequential.aipw_contrasts(frame[column].astype(float).to_numpy(), treated, propensity)
        )

    def per_arm(frame: pd.DataFrame) -> dict[Arm, int]:
        counts = frame["arm"].value_counts()
        return {arm: int(counts.get(arm, 0)) for arm in ARMS}

    def means(frame: pd.DataFrame) -> dict[Arm, float | None]:
        by_arm = frame.groupby("arm")["value"].mean()
        return {arm: (float(by_arm[arm]) if arm in by_arm.index else None) for arm in ARMS}

    n_labelled = per_arm(labelled)
    arms = {
        arm: ArmSamples(
            requests=int(part["request_id"].nunique()),
            routing_keys=int(part["routing_key_hash"].nunique()),
            labelled=n_labelled[arm],
            errors=int(part["error"].sum()),
        )
        for arm in ARMS
        for part in [rows[rows["arm"] == arm]]
    }
    timed = rows[rows["latency_ms"].notna()]
    champion = timed.loc[timed["arm"] == Arm.champion, "latency_ms"].to_numpy()
    candidate = timed.loc[timed["arm"] == Arm.candidate, "latency_ms"].to_numpy()
    p99 = {
        Arm.champion: float(np.quantile(champion, 0.99)) if len(champion) else float("nan"),
        Arm.candidate: float(np.quantile(candidate, 0.99)) if len(candidate) else float("nan"),
    }
    slow = None
    if len(champion) >= ck.MIN_P99_ROWS:
        # Both arms' share over the same limit: a stall of the whole gateway slows both and cancels out.
        limit_ms = policy.guardrails.latency_limit_ms(p99[Arm.champion])
        timed = timed.assign(slow=(timed["latency_ms"] > limit_ms).astype(float))
        slow = contrasts(timed, "slow")
    slices = []
    for feature in policy.slices:
        for value, part in labelled.groupby(f"slice:{feature}", sort=True):
            slices.append(
                SliceStats(
                    feature=feature,
                    value=str(value),
                    contrasts=contrasts(part, "value"),
                    labelled=per_arm(part),
                    routing_keys={arm: int(part.loc[part["arm"] == arm, "routing_key_hash"].nunique()) for arm in ARMS},
                    means=means(part),
                )
            )
    return CanaryStats(
        weight=weight,
        arms=arms,
        rows=per_arm(rows),
        error=contrasts(rows, "error"),
        primary=contrasts(labelled, "value"),
        primary_means=means(labelled),
        champion_latencies=len(champion),
        p99=p99,
        slow=slow,
        candidate_latencies=len(candidate),
        slices=tuple(slices),
    )


class CanaryAnalysis:
    """A canary step's checks, from its CanaryStats only."""

    kind = StageKind.canary

    def __init__(
        self,
        stats: CanaryStats,
        policy: Policy,
        alpha: float,
        grow: float | None = None,
        srm_unit: srm.Unit = srm.Unit.routing_keys,
    ):
        self.stats, self.policy, self.alpha, self.weight, self.grow = stats, policy, alpha, stats.weight, grow
        self.srm_unit = srm_unit
        self.checks = StageChecks.of(policy)
        propensity = stats.weight / 100
        self.t_opt = policy.canary.min_samples / min(propensity, 1 - propensity)

    def metrics(self) -> list[MetricResult]:
        s = self.stats
        metric = self.policy.primary.metric
        g = self.policy.guardrails
        rate = {arm: s.arms[arm].errors / s.rows[arm] if s.rows[arm] else 0.0 for arm in ARMS}
        err_ok = min(s.rows.values()) >= sequential.MIN_UNITS
        primary_ok = min(a.labelled for a in s.arms.values()) >= sequential.MIN_UNITS
        minimum = self.policy.canary.min_samples
        if s.slow is None:
            latency = ck.undecided(
                self.checks.latency,
                self.alpha,
                s.candidate_latencies,
                f"{s.champion_latencies} champion latencies, {ck.MIN_P99_ROWS} needed for its p99",
            )
        elif s.candidate_latencies < minimum:
            # A latency share from the first few hundred candidate requests measures the machine, not the model.
            latency = ck.undecided(
                self.checks.latency,
                self.alpha,
                s.candidate_latencies,
                f"{s.candidate_latencies:,} of the {minimum:,} candidate requests it needs to decide",
                s.slow.mean,
            )
        else:
            latency = ck.metric(
                self.checks.latency,
                s.slow,
                self.alpha,
                self.t_opt,
                f"{g.latency_limit_text(s.p99[Arm.champion])}; candidate p99 {s.p99[Arm.candidate]:.1f} ms",
                grow=self.grow,
            )
        return [
            ck.metric(
                self.checks.error_rate,
                s.error,
                self.alpha,
                self.t_opt,
                f"candidate {rate[Arm.candidate]:.2%} vs champion {rate[Arm.champion]:.2%}",
                arms_ok=err_ok,
                grow=self.grow,
            ),
            latency,
            ck.metric(
                self.checks.primary,
                s.primary,
                self.alpha,
                self.t_opt,
                ck.arms_detail(
                    metric,
                    s.primary_means[Arm.candidate],
                    s.arms[Arm.candidate].labelled,
                    s.primary_means[Arm.champion],
                    s.arms[Arm.champion].labelled,
                    "labelled",
                ),
                arms_ok=primary_ok,
                grow=self.grow,
            ),
        ]

    def enough(self) -> bool:
        # Each step needs its own minimum sample: carried evidence decides the bounds, not the step's exposure.
        return min(a.labelled for a in self.stats.own_arms.values()) >= self.policy.canary.min_samples

    def progress(self) -> str:
        n = {arm: a.labelled for arm, a in self.stats.own_arms.items()}
        return (
            f"{n[Arm.candidate]:,} candidate and {n[Arm.champion]:,} champion labelled requests at "
            f"{self.weight} % of {self.policy.canary.min_samples:,} per arm"
        )

    def population(self) -> str:
        n = {arm: self.stats.arms[arm].labelled for arm in ARMS}
        steps = " → ".join(str(w) for w in (*self.stats.carried, self.weight))
        return (
            f"{sum(n.values()):,} labelled canary requests at {steps} % ({n[Arm.candidate]:,} candidate, "
            f"{n[Arm.champion]:,} champion)"
        )

    def slices(self) -> list[SliceResult]:
        min_n = ck.slice_min(self.policy.canary.min_samples)
        groups = []
        for sl in self.stats.slices:
            samples = {
                arm: ArmSamples(requests=sl.labelled[arm], labelled=sl.labelled[arm], routing_keys=sl.routing_keys[arm])
                for arm in ARMS
            }
            detail = ck.arms_detail(
                self.policy.primary.metric,
                sl.means[Arm.candidate],
                sl.labelled[Arm.candidate],
                sl.means[Arm.champion],
                sl.labelled[Arm.champion],
                "labelled",
            )
            groups.append(
                SliceGroup(sl.feature, sl.value, sl.contrasts, min(sl.labelled.values()) >= min_n, samples, detail)
            )
        return ck.slice_results(groups, self.checks.primary, self.alpha, min_n)

    def srm(self) -> SRM | None:
        own = self.stats.own_arms
        counts = {
            arm: (own[arm].routing_keys if self.srm_unit is srm.Unit.routing_keys else own[arm].requests)
            for arm in ARMS
        }
        return srm.check(counts, self.weight, self.policy.srm_p_value)

    def samples(self) -> dict[Arm, ArmSamples]:
        return dict(self.stats.arms)

    def slice_sample(self, result: SliceResult) -> int:
        """The labelled units a slice's verdict rests on (requests of both arms)."""
        return sum(a.labelled for a in result.samples.values())
