"""The watch after promotion: the new champion's traffic against what its own last canary step showed.

Every request now goes to the promoted version, so there is no concurrent control arm. The baseline is
the candidate arm of the release's last canary step (its error rate, its p99, its primary metric), taken
as known; the watch bounds the new champion's per-request difference from it with the same always-valid
confidence sequences and the same limits as the canary's checks (docs/decisions.md, "After promotion").
Only a crossed limit decides (roll back); a watch that sees none until its end passes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import sqlalchemy as sa

from releasegate.analysis import checks as ck
from releasegate.analysis import rows
from releasegate.analysis.window import read_window
from releasegate.contract import Arm, Stage, StageKind
from releasegate.policy import Policy
from releasegate.verdict import ArmSamples, Decision, MetricResult, PolicyRef, Verdict, Window

CHECKS = 3  # error rate, latency, primary metric: the policy's alpha is split across them


def analyse(
    model: str,
    release_id: str,
    policy: Policy,
    baseline: Window,
    since: float,
    until: float,
    window_closed: bool,
    engine: sa.Engine | None = None,
) -> Verdict:
    """The watch's verdict on the new champion's requests logged in [since, until]."""
    base_preds, base_feedback = read_window(
        model, release_id, StageKind.canary, baseline.start, baseline.end, engine=engine
    )
    base = rows.rows(base_preds, base_feedback, policy)
    base = base[base["arm"] == Arm.candidate.value]
    preds, feedback = read_window(model, release_id, StageKind.watch, since, until, engine=engine)
    after = rows.rows(preds, feedback, policy)
    return judge(base, after, policy, Window(start=since, end=until, stage=Stage.watch()), window_closed)


def judge(base: pd.DataFrame, after: pd.DataFrame, policy: Policy, window: Window, window_closed: bool) -> Verdict:
    """Decide from the baseline's and the new champion's analysable rows (rows.rows' columns)."""
    checks = ck.StageChecks.of(policy)
    alpha, t_opt, min_n = policy.alpha / CHECKS, float(policy.watch.min_requests), policy.watch.min_requests
    g = policy.guardrails
    metrics: list[MetricResult] = []

    base_errors = float(base["error"].mean()) if len(base) else 0.0
    metrics.append(
        ck.metric(
            checks.error_rate,
            after["error"].astype(float).to_numpy() - base_errors,
            alpha,
            t_opt,
            f"error rate {_share(after['error'])} after promotion vs {base_errors:.2%} in the last canary step",
            min_n=min_n,
        )
    )
    base_timed = base["latency_ms"].dropna().to_numpy()
    after_timed = after["latency_ms"].dropna().to_numpy()
    if len(base_timed) >= ck.MIN_P99_ROWS:
        base_p99 = float(np.percentile(base_timed, 99))
        limit_ms = g.latency_limit_ms(base_p99)
        base_slow = float((base_timed > limit_ms).mean())
        metrics.append(
            ck.metric(
                checks.latency,
                (after_timed > limit_ms).astype(float) - base_slow,
                alpha,
                t_opt,
                f"limit {limit_ms:.1f} ms from the last canary step's p99 {base_p99:.1f} ms; share over it "
                f"{_share(pd.Series(after_timed > limit_ms))} after promotion vs {base_slow:.2%}",
                min_n=min_n,
            )
        )
    else:
        metrics.append(
            ck.undecided(checks.latency, alpha, len(after_timed), "the last canary step timed too few requests")
        )
    base_values = base["value"].dropna().astype(float)
    after_values = after["value"].dropna().astype(float).to_numpy()
    if len(base_values):
        base_mean = float(base_values.mean())
        metrics.append(
            ck.metric(
                checks.primary,
                after_values - base_mean,
                alpha,
                t_opt,
                f"{policy.primary.metric} {after_values.mean() if len(after_values) else float('nan'):.4g} on "
                f"{len(after_values):,} labelled requests after promotion vs {base_mean:.4g} in the last canary step",
                min_n=min_n,
            )
        )
    crossed = [m for m in metrics if m.passed is False]
    n = len(after)
    if crossed:
        decision = Decision.rollback
        reason = "after promotion: " + "; ".join(f"{m.name} crossed its limit ({m.detail})" for m in crossed)
    elif window_closed:
        decision = Decision.promote
        reason = f"the watch after promotion saw no limit crossed in {n:,} requests"
    else:
        decision = Decision.continue_
        reason = f"watching after promotion: {n:,} requests, no limit crossed"
    return Verdict(
        decision=decision,
        reason=reason,
        window=window,
        samples={
            Arm.champion: ArmSamples(
                requests=n,
                routing_keys=int(after["routing_key_hash"].nunique()) if n else 0,
                labelled=int(after["label"].notna().sum()) if n else 0,
                errors=int(after["error"].sum()) if n else 0,
            )
        },
        metrics=metrics,
        policy=PolicyRef(name=policy.name, digest=policy.digest),
    )


def _share(flags: pd.Series) -> str:
    return f"{float(flags.mean()):.2%}" if len(flags) else "n/a"
