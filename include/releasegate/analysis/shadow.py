"""The shadow stage: both arms answered the same requests, so each check is a mean of per-request differences."""

from __future__ import annotations

import numpy as np
import pandas as pd

from releasegate.analysis import checks as ck
from releasegate.analysis.checks import Check, SliceGroup, StageChecks
from releasegate.contract import ARMS, Arm, StageKind
from releasegate.policy import Policy
from releasegate.verdict import SRM, ArmSamples, MetricResult, SliceResult


class ShadowAnalysis:
    """Paired requests: differences of errors, the primary metric, agreement and being over the latency limit."""

    kind = StageKind.shadow

    def __init__(self, rows: pd.DataFrame, policy: Policy, alpha: float, grow: float | None = None):
        self.rows, self.policy, self.alpha, self.grow = rows, policy, alpha, grow
        self.checks = StageChecks.of(policy)
        champion = rows[rows["arm"] == Arm.champion]
        candidate = rows[rows["arm"] == Arm.candidate]
        cols = ["request_id", "rank", "time", "routing_key_hash", "error", "out", "value", "label", "latency_ms"]
        slice_cols = [c for c in rows.columns if c.startswith("slice:")]
        self.pairs = champion[cols + slice_cols].merge(
            candidate[["request_id", "rank", "error", "out", "value", "latency_ms"]],
            on=["request_id", "rank"],
            suffixes=("_b", "_c"),
        )
        labelled = self.pairs["label"].notna() & self.pairs["value_c"].notna() & self.pairs["value_b"].notna()
        self.labelled = self.pairs[labelled & ~self.pairs["error_c"] & ~self.pairs["error_b"]]
        self.t_opt = policy.shadow.min_samples

    def metrics(self) -> list[MetricResult]:
        pairs = self.pairs
        err = pairs["error_c"].astype(float) - pairs["error_b"].astype(float)
        primary = self.labelled["value_c"].astype(float) - self.labelled["value_b"].astype(float)
        results = [
            ck.metric(
                self.checks.error_rate,
                err,
                self.alpha,
                self.t_opt,
                f"candidate {pairs['error_c'].mean() if len(pairs) else 0:.2%} vs champion "
                f"{pairs['error_b'].mean() if len(pairs) else 0:.2%} on {len(pairs):,} paired requests",
                grow=self.grow,
            ),
            self.latency(),
            ck.metric(
                self.checks.primary,
                primary,
                self.alpha,
                self.t_opt,
                _series_detail(
                    self.policy.primary.metric, self.labelled["value_c"], self.labelled["value_b"], "labelled paired"
                ),
                grow=self.grow,
            ),
        ]
        return results + ([self.agreement()] if self.policy.agreement_checked else [])

    def latency(self) -> MetricResult:
        check: Check = self.checks.latency
        champion = self.rows.loc[self.rows["arm"] == Arm.champion, "latency_ms"].dropna().to_numpy()
        candidate = self.rows.loc[self.rows["arm"] == Arm.candidate, "latency_ms"].dropna().to_numpy()
        if len(champion) < ck.MIN_P99_ROWS:
            return ck.undecided(
                check,
                self.alpha,
                len(candidate),
                f"{len(champion)} champion latencies, {ck.MIN_P99_ROWS} needed for its p99",
            )
        p99_champion = float(np.quantile(champion, 0.99))
        limit_ms = self.policy.guardrails.latency_limit_ms(p99_champion)
        p99_candidate = float(np.quantile(candidate, 0.99)) if len(candidate) else float("nan")
        detail = f"{self.policy.guardrails.latency_limit_text(p99_champion)}; candidate p99 {p99_candidate:.1f} ms"
        # Per request, candidate over the limit minus champion over it: a stall of the whole gateway cancels out.
        timed = self.pairs[self.pairs["latency_ms_c"].notna() & self.pairs["latency_ms_b"].notna()]
        over = (timed["latency_ms_c"] > limit_ms).astype(float) - (timed["latency_ms_b"] > limit_ms).astype(float)
        return ck.metric(
            check, over.to_numpy(), self.alpha, self.t_opt, detail, grow=self.grow, min_n=self.policy.shadow.min_samples
        )

    def agreement(self) -> MetricResult:
        """The share of requests both arms answer alike: the same label, or a regressor's values within the tolerance."""
        both_ok = self.pairs[~self.pairs["error_c"] & ~self.pairs["error_b"]]
        tolerance = self.policy.shadow.agreement_tolerance if self.policy.regression else None
        answers = zip(both_ok["out_c"], both_ok["out_b"], strict=True)
        if tolerance is None:
            agree = np.array([c is not None and c == b for c, b in answers], dtype=float)
            alike = ""
        else:
            agree = np.array(
                [isinstance(c, float) and isinstance(b, float) and abs(c - b) <= tolerance for c, b in answers],
                dtype=float,
            )
            alike = f" within {tolerance:g}"
        return ck.metric(
            ck.agreement_check(self.policy),
            agree,
            self.alpha,
            self.t_opt,
            f"the arms agree{alike} on {agree.mean() if len(agree) else 0:.1%} of {len(agree):,} requests",
            grow=self.grow,
        )

    def enough(self) -> bool:
        return len(self.labelled) >= self.policy.shadow.min_samples

    def progress(self) -> str:
        return f"{len(self.labelled):,} of {self.policy.shadow.min_samples:,} labelled shadow requests"

    def population(self) -> str:
        return f"{len(self.labelled):,} labelled shadow requests"

    def slices(self) -> list[SliceResult]:
        min_n = ck.slice_min(self.policy.shadow.min_samples)
        groups = []
        for feature in self.policy.slices:
            for value, part in self.labelled.groupby(f"slice:{feature}", sort=True):
                diff = part["value_c"].astype(float) - part["value_b"].astype(float)
                samples = {
                    arm: ArmSamples(
                        requests=part["request_id"].nunique(),
                        routing_keys=part["routing_key_hash"].nunique(),
                        labelled=len(part),
                        errors=0,
                    )
                    for arm in ARMS
                }
                groups.append(
                    SliceGroup(
                        feature,
                        str(value),
                        diff.to_numpy(),
                        len(part) >= min_n,
                        samples,
                        _series_detail(self.policy.primary.metric, part["value_c"], part["value_b"], "labelled paired"),
                    )
                )
        return ck.slice_results(groups, self.checks.primary, self.alpha, min_n)

    def srm(self) -> SRM | None:
        return None  # both arms answer every request: there is no split to check

    def samples(self) -> dict[Arm, ArmSamples]:
        out = {}
        for arm in ARMS:
            part = self.rows[self.rows["arm"] == arm]
            out[arm] = ArmSamples(
                requests=part["request_id"].nunique(),
                routing_keys=part["routing_key_hash"].nunique(),
                labelled=part.loc[part["label"].notna(), "request_id"].nunique(),
                errors=int(part["error"].sum()),
            )
        return out

    def slice_sample(self, result: SliceResult) -> int:
        """The labelled units a slice's verdict rests on (paired requests)."""
        return result.metrics[0].n


def _series_detail(metric: str, candidate: pd.Series, champion: pd.Series, what: str) -> str:
    c = pd.Series(candidate, dtype=float)
    b = pd.Series(champion, dtype=float)
    return ck.arms_detail(
        metric, float(c.mean()) if len(c) else None, len(c), float(b.mean()) if len(b) else None, len(b), what
    )
