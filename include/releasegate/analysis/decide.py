"""From a stage's checks to its Verdict: the decision and the sentence that says why, with the numbers.

Checks run at level alpha / k, k the checks of the stage (Bonferroni: error rate, latency, primary,
+ agreement in shadow, + the slice family when the policy names slices; inside that family Holm
across slices). Futility: at a planned look (see `grow`), a check that the time still allowed could
not decide for the candidate rolls back at once.
"""

from __future__ import annotations

import math
from typing import Protocol

from releasegate.contract import Arm, Stage, StageKind
from releasegate.policy import Inconclusive, Policy
from releasegate.verdict import SRM, ArmSamples, Decision, MetricResult, PolicyRef, SliceResult, Verdict, Window


class StageAnalysis(Protocol):
    """What a stage's analysis (shadow.ShadowAnalysis, canary.CanaryAnalysis) offers the decision."""

    kind: StageKind
    policy: Policy
    alpha: float

    def metrics(self) -> list[MetricResult]: ...

    def slices(self) -> list[SliceResult]: ...

    def srm(self) -> SRM | None: ...

    def samples(self) -> dict[Arm, ArmSamples]: ...

    def enough(self) -> bool: ...

    def progress(self) -> str: ...

    def population(self) -> str: ...

    def slice_sample(self, result: SliceResult) -> int: ...


def alpha(policy: Policy, kind: StageKind) -> float:
    """alpha / k, k the checks of the stage (Bonferroni): error rate, latency, primary, + agreement, + slices."""
    return policy.alpha / (3 + (kind is StageKind.shadow and policy.agreement_checked) + bool(policy.slices))


def grow(policy: Policy, stage: Stage, window: Window, window_closed: bool, carried_steps: int = 0) -> float | None:
    """How much the sample may still grow by the end of the canary; None where futility is not judged.

    Futility is judged only at planned looks: once the last step (or the shadow) has run a full
    window with extensions left, and when an earlier canary step's window closes, where what the
    remaining steps and extensions could still add is counted in windows of time (a pessimistic
    count: later steps route more traffic to the candidate). Earlier estimates are too noisy to
    give up on; at the last look of the last step the policy's inconclusive rule decides.
    """
    seconds = policy.shadow.max_window_seconds if stage.is_shadow else policy.canary.max_window_seconds
    extensions = policy.max_extensions if policy.inconclusive == Inconclusive.extend else 0
    steps = policy.canary.steps
    if not stage.is_shadow and stage.weight in steps[:-1]:
        if not window_closed:
            return None
        done = carried_steps + 1  # windows behind this look: the earlier steps and this one
        remaining = len(steps) - 1 - steps.index(stage.weight) + extensions
        return (done + remaining) / done
    elapsed = window.end - window.start
    if window_closed or elapsed < seconds or extensions == 0:
        return None
    factor = seconds * (1 + extensions) / elapsed
    return factor if factor > 1 else None


def verdict(analysis: StageAnalysis, window: Window, window_closed: bool) -> Verdict:
    """The stage's Verdict: its decision and reason, and every number behind them."""
    metrics = analysis.metrics()
    slices = analysis.slices() if analysis.policy.slices else []
    srm_result = analysis.srm()
    # Only the last canary step promotes; an earlier one whose window closes hands its evidence on.
    stage = window.stage
    last_step = stage.is_shadow or stage.weight not in analysis.policy.canary.steps[:-1]
    decision, reason = _decide(analysis, metrics, slices, srm_result, stage, window_closed, last_step)
    return Verdict(
        decision=decision,
        reason=reason,
        window=window,
        samples=analysis.samples(),
        metrics=metrics,
        srm=srm_result,
        slices=slices,
        policy=PolicyRef(name=analysis.policy.name, digest=analysis.policy.digest),
    )


def _decide(
    analysis: StageAnalysis,
    metrics: list[MetricResult],
    slices: list[SliceResult],
    srm_result: SRM | None,
    stage: Stage,
    window_closed: bool,
    last_step: bool,
) -> tuple[Decision, str]:
    if srm_result is not None and srm_result.alarm:
        c, e = srm_result.counts, srm_result.expected
        return Decision.invalid, (
            f"invalid: sample ratio mismatch: {c[Arm.candidate]:,} candidate vs {c[Arm.champion]:,} champion "
            f"routing keys where {e[Arm.candidate]:.0%} / {e[Arm.champion]:.0%} was expected "
            f"(sequential test, always-valid p = {srm_result.p_value:.2g} < {analysis.policy.srm_p_value:g}); "
            f"the split itself is broken"
        )
    failed = [m for m in metrics if m.passed is False]
    if failed:
        first = failed[0]
        also = f"; also {', '.join(_name(m) for m in failed[1:])}" if len(failed) > 1 else ""
        return Decision.rollback, f"rollback: {_sentence(first, analysis, stage)}{also}"
    regressed = [s for s in slices if s.metrics and s.metrics[0].passed is False]
    if regressed:
        s = regressed[0]
        also = f"; also {', '.join(f'{r.feature}={r.value}' for r in regressed[1:])}" if len(regressed) > 1 else ""
        return Decision.rollback, (
            f"rollback: in slice {s.feature}={s.value}, "
            f"{_sentence(s.metrics[0], analysis, stage, n=analysis.slice_sample(s))} "
            f"(Holm-adjusted p = {s.metrics[0].p_value:.2g}){also}"
        )
    summary = "; ".join(_short(m) for m in metrics)
    futile = [m for m in metrics if m.futile]
    if futile:
        return Decision.rollback, (
            f"rollback: after a full window, at the current estimates not even the canary time still allowed would "
            f"show {' and '.join(_name(m) for m in futile)} within the limit ({'; '.join(_short(m) for m in futile)})"
        )
    if analysis.enough() and all(m.passed for m in metrics):
        return Decision.promote, f"promote: on {analysis.population()} every check clears its limit: {summary}"
    pending = [m for m in metrics if not m.passed]
    waiting = "" if analysis.enough() else f"{analysis.progress()}; "
    undecided = f"undecided: {'; '.join(_short(m) for m in pending)}" if pending else "every check clears its limit"
    if window_closed and not stage.is_shadow and not last_step:
        return Decision.continue_, (
            f"continue: the {stage} window closed with no check failed "
            f"({waiting}{undecided}); its evidence carries into the next step"
        )
    if window_closed:
        return Decision.inconclusive, f"inconclusive: the window closed with {waiting}{undecided}"
    return Decision.continue_, f"continue: {waiting}{undecided}"


def _name(m: MetricResult) -> str:
    return "extra share over the latency limit" if m.name == "latency_p99" else m.name.replace("_", " ")


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
    bounds = (
        f"{_num(m.lower, share, not share)} … {_num(m.upper, share, not share)}"
        if m.lower is not None
        else "not bounded yet"
    )
    return f"{_name(m)} {_num(m.estimate, share, not share)} ({bounds}; needs {side} {_limit(m)})"


def _sentence(m: MetricResult, analysis: StageAnalysis, stage: Stage, n: int | None = None) -> str:
    level = f"{(1 - (m.alpha or 0)) * 100:.4g}%"
    share = _is_share(m)
    bounds = f"always-valid {level} bounds {_num(m.lower, share, not share)} … {_num(m.upper, share, not share)}"
    if m.name == "latency_p99":
        return (
            f"{_num(m.estimate, True)} more of the candidate's requests than of the champion's are slower than "
            f"the latency limit ({bounds}), above the {_limit(m)} allowed, on {m.n:,} requests in {stage}: "
            f"{m.detail}"
        )
    if m.kind == "agreement":
        return (
            f"the arms agree on {_num(m.estimate, True)} of requests ({bounds}), below the required "
            f"{_limit(m)}, on {m.n:,} shadow requests"
        )
    where = "below" if m.higher_is_better else "above"
    population = analysis.population() if m.kind == "primary" else f"{m.n:,} {stage} requests"
    if n is not None:
        population = f"{n:,} labelled {stage} requests in that slice"
    return (
        f"{_name(m)} of candidate − champion is {_num(m.estimate)} ({bounds}), {where} the {_limit(m)} "
        f"margin, on {population}"
    )
