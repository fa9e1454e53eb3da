"""Release decisions side by side: releasegate's analysis, a Flagger-style threshold rule, a fixed-horizon test.

Every method sees the same simulated canary traffic. releasegate is judged exactly as the release DAG
judges it: the default policy's canary steps (5 → 25 → 50 %), a look every poll interval (5 s) over the
canary so far (each finished step's statistics carried into the next, `canary.carry`), an earlier step
ending at its window (600 s), the last one extended up to `max_extensions` times, and at each look the
same `releasegate.analysis` code that `analyse()` runs (`canary_stats` reduced to its sufficient
statistics, then `verdict_from_stats`; see `simulated_stats`, tested against `analyse_frames`).

Traffic: RATE requests/s to the model (default 200), each from its own customer (routing key), each
labelled by feedback before the next look. Baselines: error rate 1 %, latency lognormal with median
20 ms and p99 50 ms, accuracy 90 %; regions north/south/east/west with shares 15/30/25/30 %.
The shadow stage is not simulated: all three methods start at the first canary step.

Run: `nice -n 10 .venv/bin/python benchmarks/decisions.py --json decisions.json` (2 workers, ~5 min).
A/B/n experiments (docs/decisions.md, "Experiments (A/B/n)"): `--experiments 300` adds them (~4 min),
`--only-experiments` skips the canary releases; GrowthBook's engine runs only when .venv-gbstats exists.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from releasegate import planning
from releasegate import policy as policies
from releasegate.analysis import experiment, sequential, srm, verdict_from_stats
from releasegate.analysis.canary import CanaryStats, SliceStats, carry
from releasegate.contract import Arm, Stage
from releasegate.verdict import ArmSamples, Decision

RATE = 200.0  # requests per second to the model, all steps
BASE_ERROR = 0.01
BASE_ACCURACY = 0.90
LATENCY_MEDIAN_MS = 20.0
LATENCY_P99_MS = 50.0
LATENCY_SIGMA = math.log(LATENCY_P99_MS / LATENCY_MEDIAN_MS) / stats.norm.ppf(0.99)
REGIONS = ("north", "south", "east", "west")
REGION_SHARES = (0.15, 0.30, 0.25, 0.30)
FLAGGER_INTERVAL = 60.0  # Flagger's documented `interval: 1m`
FLAGGER_THRESHOLD = 5  # failed checks before a rollback (`threshold: 5`)


@dataclass(frozen=True)
class Scenario:
    name: str
    error: float = BASE_ERROR  # the candidate's error rate
    latency_scale: float = 1.0  # candidate latency = champion-like latency × this (p99 × this)
    segment_drop: float = 0.0  # candidate accuracy drop in the north region (15 % of traffic)

    @property
    def regression(self) -> bool:
        return self != Scenario(self.name)


SCENARIOS = (
    Scenario("A/A"),
    Scenario("error rate +2 pt", error=BASE_ERROR + 0.02),
    Scenario("error rate +5 pt", error=BASE_ERROR + 0.05),
    Scenario("p99 latency +50%", latency_scale=1.5),
    Scenario("accuracy -10 pt in a 15% segment", segment_drop=0.10),
)


@dataclass
class Step:
    """One canary step's simulated requests in arrival order (grown one window at a time)."""

    weight: int
    covered: float = 0.0  # seconds simulated so far
    t: np.ndarray = field(default_factory=lambda: np.empty(0))
    cand: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    region: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    error: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    latency: np.ndarray = field(default_factory=lambda: np.empty(0))
    correct: np.ndarray = field(default_factory=lambda: np.empty(0))

    def grow(self, rng: np.random.Generator, scenario: Scenario, seconds: float, rate: float) -> None:
        n = rng.poisson(rate * seconds)
        t = self.covered + np.sort(rng.random(n)) * seconds
        self.covered += seconds
        cand = rng.random(n) < self.weight / 100
        region = rng.choice(len(REGIONS), size=n, p=REGION_SHARES).astype(np.int8)
        error = rng.random(n) < np.where(cand, scenario.error, BASE_ERROR)
        latency = np.exp(math.log(LATENCY_MEDIAN_MS) + LATENCY_SIGMA * rng.standard_normal(n))
        latency = np.where(cand, latency * scenario.latency_scale, latency)
        accuracy = np.where(cand & (region == 0), BASE_ACCURACY - scenario.segment_drop, BASE_ACCURACY)
        correct = (rng.random(n) < accuracy).astype(float)
        for name, new in (
            ("t", t),
            ("cand", cand),
            ("region", region),
            ("error", error),
            ("latency", latency),
            ("correct", correct),
        ):
            setattr(self, name, np.concatenate([getattr(self, name), new]))


class Looks:
    """Running sums over one step's requests, so each look reads its CanaryStats in O(1) (+ a p99)."""

    def __init__(self, step: Step, policy: policies.Policy):
        self.step, self.policy, w = step, policy, step.weight / 100
        ok = ~step.error
        self.ok_index = np.cumsum(ok)  # labelled usable rows among the first m requests
        self.err = _prefix(sequential.aipw_contrasts(step.error.astype(float), step.cand, w))
        self.prim = _prefix(sequential.aipw_contrasts(step.correct[ok], step.cand[ok], w))
        self.n_cand = np.cumsum(step.cand)
        self.err_cand = np.cumsum(step.error & step.cand)
        self.err_champ = np.cumsum(step.error & ~step.cand)
        self.ok_cand = np.cumsum(ok & step.cand)
        self.right_cand = np.cumsum(np.where(ok & step.cand, step.correct, 0.0))
        self.right_champ = np.cumsum(np.where(ok & ~step.cand, step.correct, 0.0))
        self.champ_lat = step.latency[~step.cand]
        self.cand_lat = step.latency[step.cand]
        self.slices = []
        for r in range(len(REGIONS)):
            mask = ok & (step.region == r)
            self.slices.append(
                (
                    np.cumsum(mask),
                    _prefix(sequential.aipw_contrasts(step.correct[mask], step.cand[mask], w)),
                    np.cumsum(step.cand[mask]),
                    np.cumsum(np.where(step.cand[mask], step.correct[mask], 0)),
                    np.cumsum(np.where(~step.cand[mask], step.correct[mask], 0)),
                )
            )

    def stats(self, m: int) -> CanaryStats:
        """The CanaryStats of the first m requests: what canary_stats gives for the same logged rows."""
        if m == 0:
            return _empty(self.step.weight)
        i = m - 1
        n_c = int(self.n_cand[i])
        n_b = m - n_c
        ok = int(self.ok_index[i])
        ok_c = int(self.ok_cand[i])
        ok_b = ok - ok_c
        errs = {Arm.candidate: int(self.err_cand[i]), Arm.champion: int(self.err_champ[i])}
        arms = {
            Arm.candidate: ArmSamples(requests=n_c, routing_keys=n_c, labelled=ok_c, errors=errs[Arm.candidate]),
            Arm.champion: ArmSamples(requests=n_b, routing_keys=n_b, labelled=ok_b, errors=errs[Arm.champion]),
        }
        champ = self.champ_lat[:n_b]
        cand = self.cand_lat[:n_c]
        p99 = {
            Arm.champion: float(np.quantile(champ, 0.99)) if n_b else float("nan"),
            Arm.candidate: float(np.quantile(cand, 0.99)) if n_c else float("nan"),
        }
        slow = None
        if n_b >= 100:  # checks.MIN_P99_ROWS
            # Both arms over the champion's limit of this look, as canary_stats contrasts them.
            limit = self.policy.guardrails.latency_limit_ms(p99[Arm.champion])
            over = (self.step.latency[:m] > limit).astype(float)
            slow = sequential.Summary.of(sequential.aipw_contrasts(over, self.step.cand[:m], self.step.weight / 100))
        slices = []
        for r, (count, prefix, c_count, c_right, b_right) in enumerate(self.slices):
            j = int(count[i])
            if j == 0:
                continue
            lc = int(c_count[j - 1])
            lb = j - lc
            slices.append(
                SliceStats(
                    feature="region",
                    value=REGIONS[r],
                    contrasts=_at(prefix, j),
                    labelled={Arm.candidate: lc, Arm.champion: lb},
                    routing_keys={Arm.candidate: lc, Arm.champion: lb},
                    means={
                        Arm.candidate: float(c_right[j - 1]) / lc if lc else None,
                        Arm.champion: float(b_right[j - 1]) / lb if lb else None,
                    },
                )
            )
        slices.sort(key=lambda s: s.value)  # canary_stats groups sorted by value
        return CanaryStats(
            weight=self.step.weight,
            arms=arms,
            rows={Arm.candidate: n_c, Arm.champion: n_b},
            error=_at(self.err, m),
            primary=_at(self.prim, ok),
            primary_means={
                Arm.candidate: float(self.right_cand[i]) / ok_c if ok_c else None,
                Arm.champion: float(self.right_champ[i]) / ok_b if ok_b else None,
            },
            champion_latencies=n_b,
            p99=p99,
            slow=slow,
            candidate_latencies=n_c,
            slices=tuple(slices),
        )


def _prefix(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.cumsum(values), np.cumsum(values * values)


def _at(prefix: tuple[np.ndarray, np.ndarray], n: int) -> sequential.Summary:
    if n == 0:
        return sequential.Summary(0, 0.0, 0.0)
    return sequential.Summary(n, float(prefix[0][n - 1]), float(prefix[1][n - 1]))


def _empty(weight: int) -> CanaryStats:
    zero = sequential.Summary(0, 0.0, 0.0)
    none = {Arm.candidate: None, Arm.champion: None}
    return CanaryStats(
        weight=weight,
        arms={a: ArmSamples() for a in (Arm.champion, Arm.candidate)},
        rows={Arm.candidate: 0, Arm.champion: 0},
        error=zero,
        primary=zero,
        primary_means=none,
        champion_latencies=0,
        p99={Arm.candidate: float("nan"), Arm.champion: float("nan")},
        slow=None,
        candidate_latencies=0,
    )


def simulated_stats(step: Step, policy: policies.Policy, m: int) -> CanaryStats:
    """CanaryStats of a step's first m simulated requests (the benchmark's fast path, tested against frames)."""
    return Looks(step, policy).stats(m)


# -- the three methods -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rolled_back: bool
    samples: int  # requests in the canary (both arms) when the decision fell
    candidate_samples: int
    invalid: bool = False


def releasegate(steps: list[Step], grow, policy: policies.Policy) -> Outcome:
    """The DAG's wait: a look every poll interval, the real verdict at each look, evidence carried across steps.

    As in the DAG: an earlier step ends at its first `promote` or when its window closes without a
    failed check (`continue`, no extension), handing its statistics on (`carry`); the last step gets
    the window plus `max_extensions`, and anything but `promote` at its last look rolls back.
    """
    window = policy.canary.max_window_seconds
    extensions = policy.max_extensions if policy.inconclusive == policies.Inconclusive.extend else 0
    done = done_c = 0
    carried = None
    for index, step in enumerate(steps):
        last_step = index == len(steps) - 1
        budget = window * (1 + extensions) if last_step else window
        looks = Looks(step, policy)
        t = policy.poll_seconds
        while True:
            if step.covered < min(t, budget):
                grow(index)  # the window is extended: simulate the extension's traffic
                looks = Looks(step, policy)
            m = int(np.searchsorted(step.t, t, side="right"))
            final = t >= budget
            stats = looks.stats(m) if carried is None else carry(carried, looks.stats(m))
            verdict = verdict_from_stats(
                stats, Stage.canary(step=index + 1, weight=step.weight), policy, (0.0, t), window_closed=final
            )
            n_c = int(looks.n_cand[m - 1]) if m else 0
            if verdict.decision in (Decision.rollback, Decision.invalid) or (
                final and last_step and verdict.decision is not Decision.promote
            ):
                return Outcome(True, done + m, done_c + n_c, invalid=verdict.decision is Decision.invalid)
            if verdict.decision is Decision.promote or final:
                done += m
                done_c += n_c
                carried = stats
                break
            t += policy.poll_seconds
    return Outcome(False, done, done_c)


def flagger_style(steps: list[Step], policy: policies.Policy) -> Outcome:
    """Absolute thresholds at the policy's limits, checked on each interval's candidate data; 5 failures roll back."""
    g, p = policy.guardrails, policy.primary
    max_error = BASE_ERROR + g.error_rate_margin
    max_p99 = g.latency_limit_ms(LATENCY_P99_MS)
    min_accuracy = BASE_ACCURACY - p.margin
    failed = done = done_c = 0
    window = policy.canary.max_window_seconds
    for step in steps:
        edges = np.searchsorted(step.t, np.arange(FLAGGER_INTERVAL, window + 1e-9, FLAGGER_INTERVAL), side="right")
        start = 0
        for end in edges:
            c = step.cand[start:end]
            err = step.error[start:end][c]
            ok = ~err
            bad = (
                not len(err)
                or err.mean() > max_error
                or np.quantile(step.latency[start:end][c], 0.99) > max_p99
                or not ok.any()
                or step.correct[start:end][c][ok].mean() < min_accuracy
            )
            failed += bool(bad)
            if failed >= FLAGGER_THRESHOLD:
                return Outcome(True, done + int(end), done_c + int(step.cand[:end].sum()))
            start = end
        done += int(edges[-1])
        done_c += int(step.cand[: edges[-1]].sum())
    return Outcome(False, done, done_c)


def fixed_horizon(steps: list[Step], policy: policies.Policy) -> Outcome:
    """One look after every step's window: non-inferiority at the same alpha / k, Holm across slices."""
    window = policy.canary.max_window_seconds
    alpha = policy.alpha / (3 + bool(policy.slices))
    z = stats.norm.ppf(1 - alpha / 2)  # the same two-sided (1 − alpha/k) intervals as releasegate's bounds
    ends = [int(np.searchsorted(s.t, window, side="right")) for s in steps]
    srm_alarm = any(
        stats.chisquare([n - s.cand[:n].sum(), s.cand[:n].sum()], [n * (1 - s.weight / 100), n * s.weight / 100]).pvalue
        < policy.srm_p_value
        for s, n in zip(steps, ends)
    )

    def cat(name):
        return np.concatenate([getattr(s, name)[:n] for s, n in zip(steps, ends)])

    cand, error, latency, correct, region = cat("cand"), cat("error"), cat("latency"), cat("correct"), cat("region")
    n, n_c = len(cand), int(cand.sum())

    def diff(y, treated):
        a, b = y[treated], y[~treated]
        return a.mean() - b.mean(), math.sqrt(a.var() / len(a) + b.var() / len(b))

    d, se = diff(error.astype(float), cand)
    error_ok = d + z * se < policy.guardrails.error_rate_margin
    limit = policy.guardrails.latency_limit_ms(np.quantile(latency[~cand], 0.99))
    share = float(np.mean(latency[cand] > limit))
    latency_ok = share + z * math.sqrt(share * (1 - share) / n_c) < 0.01
    ok = ~error
    d, se = diff(correct[ok], cand[ok])
    primary_ok = d - z * se > -policy.primary.margin
    pvals = []
    for r in range(len(REGIONS)):
        mask = ok & (region == r)
        d, se = diff(correct[mask], cand[mask])
        pvals.append(stats.norm.cdf((d + policy.primary.margin) / se))
    regressed = min(pvals) * len(pvals) <= alpha  # Holm rejects some slice iff its first step does
    promote = error_ok and latency_ok and primary_ok and not regressed and not srm_alarm
    return Outcome(not promote, n, n_c, invalid=srm_alarm)


# -- running it --------------------------------------------------------------------------------------------------


def simulate(job: tuple[int, int, int, float]) -> dict[str, Outcome]:
    scenario_index, release, seed, rate = job
    scenario = SCENARIOS[scenario_index]
    policy = policies.load("default")
    rng = np.random.default_rng([seed, scenario_index, release])
    window = policy.canary.max_window_seconds
    steps = [Step(w) for w in policy.canary.steps]
    for step in steps:
        step.grow(rng, scenario, window, rate)

    def grow(index: int) -> None:
        steps[index].grow(rng, scenario, window, rate)

    return {
        "releasegate": releasegate(steps, grow, policy),
        "flagger_style": flagger_style(steps, policy),
        "fixed_horizon": fixed_horizon(steps, policy),
    }


METHODS = ("releasegate", "flagger_style", "fixed_horizon")


def run(releases: int, rate: float, seed: int, workers: int) -> dict:
    jobs = [(s, r, seed, rate) for s in range(len(SCENARIOS)) for r in range(releases)]
    if workers <= 1:
        outcomes = list(map(simulate, jobs))
    else:
        with multiprocessing.get_context("fork").Pool(min(workers, 2)) as pool:
            outcomes = pool.map(simulate, jobs, chunksize=4)
    policy = policies.load("default")
    result = {
        "methods": {m: {"aa_false_rollback": None, "scenarios": {}} for m in METHODS},
        "setup": {
            "releases_per_scenario": releases,
            "requests_per_second": rate,
            "seed": seed,
            "policy": {
                "name": policy.name,
                "alpha": policy.alpha,
                "steps": policy.canary.steps,
                "window_seconds": policy.canary.max_window_seconds,
                "max_extensions": policy.max_extensions,
                "poll_seconds": policy.poll_seconds,
            },
            "fixed_horizon_samples": None,
        },
    }
    for s, scenario in enumerate(SCENARIOS):
        mine = outcomes[s * releases : (s + 1) * releases]
        for method in METHODS:
            got = [o[method] for o in mine]
            rolled = [o for o in got if o.rolled_back]
            entry = result["methods"][method]
            rate_back = len(rolled) / len(got)
            invalid = sum(o.invalid for o in got) / len(got)
            if not scenario.regression:
                entry["aa_false_rollback"] = rate_back
                entry["aa_invalid"] = invalid
                entry["aa_median_samples_to_promote"] = _median([o.samples for o in got if not o.rolled_back])
            else:
                entry["scenarios"][scenario.name] = {
                    "miss_rate": 1 - rate_back,
                    "median_samples_to_rollback": _median([o.samples for o in rolled]),
                    "median_candidate_requests_to_rollback": _median([o.candidate_samples for o in rolled]),
                    "invalid": invalid,
                }
    fixed = [o["fixed_horizon"].samples for o in outcomes]
    result["setup"]["fixed_horizon_samples"] = _median(fixed)
    return result


def _median(values: list[int]) -> int | None:
    return int(np.median(values)) if values else None


def table(result: dict) -> str:
    names = [s.name for s in SCENARIOS if s.regression]
    fixed = result["setup"]["fixed_horizon_samples"]
    lines = [
        f"{'method':<15}{'A/A false rollback':>20}" + "".join(f"{n:>36}" for n in names),
        f"{'':<15}{'':>20}" + "".join(f"{'miss · median samples (× fixed)':>36}" for _ in names),
    ]
    for method, entry in result["methods"].items():
        cells = []
        for n in names:
            sc = entry["scenarios"][n]
            med = sc["median_samples_to_rollback"]
            ratio = f"{med / fixed:.2f}" if med and fixed else "n/a"
            cells.append(f"{sc['miss_rate']:>10.1%} · {med if med is not None else 'n/a':>8} ({ratio})")
        lines.append(f"{method:<15}{entry['aa_false_rollback']:>20.1%}" + "".join(f"{c:>36}" for c in cells))
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, bool]]:
    rg = result["methods"]["releasegate"]
    alpha = result["setup"]["policy"]["alpha"]
    fixed = result["setup"]["fixed_horizon_samples"]
    out = [(f"A/A false rollback {rg['aa_false_rollback']:.1%} ≤ alpha {alpha:g}", rg["aa_false_rollback"] <= alpha)]
    for name, sc in rg["scenarios"].items():
        out.append((f"{name}: miss {sc['miss_rate']:.1%} ≤ 5%", sc["miss_rate"] <= 0.05))
        med = sc["median_samples_to_rollback"]
        out.append((f"{name}: median samples {med} ≤ ½ × fixed horizon {fixed}", med is not None and med <= fixed / 2))
    return out


# -- A/B/n experiments (docs/decisions.md, "Experiments") --------------------------------------------------------
#
# k = 4 arms at 25 % each, the control first; each scenario changes arm 1 only. The split stays fixed for every
# method, so all three see the same requests: an arm releasegate stops keeps its traffic in the simulation (in
# production it goes back to the control, which only tightens the remaining comparisons).

EXP_ARMS = 4
EXP_CONVERSION = 0.05
EXP_REVENUE_MEDIAN = 30.0  # per converted request, lognormal
EXP_REVENUE_SIGMA = 1.0
EXP_CPU_MEDIAN = 0.05  # CPU seconds per model call, lognormal
EXP_CPU_SIGMA = 0.5
EXP_ERROR = 0.01
EXP_MDE = 0.05  # conversion's mde, relative (--mde): the +5 % arm's effect is this by default
EXP_LOOKS_PER_DESIGN = 25  # releasegate looks every 1/25 of the fixed design's size …
EXP_MAX_DESIGNS = 3  # … up to 3 times it (planning: 90 % power needs 2.1 times)
EXP_GBSTATS_EVERY = 5  # gbstats looks at every 5th of those (a fifth of the fixed design apart)
EXP_CTW = 0.95  # GrowthBook's chance-to-win rule
GBSTATS_PYTHON = Path(__file__).resolve().parents[1] / ".venv-gbstats" / "bin" / "python"


@dataclass(frozen=True)
class ExpScenario:
    name: str
    conversion: float = 1.0  # arm 1's conversion × this
    revenue_per_request: float = 1.0  # arm 1's revenue per request × this (through revenue per conversion)
    cpu: float = 1.0  # arm 1's CPU seconds per call × this
    winner: int | None = None  # the arm that should win


EXP_SCENARIOS = (
    ExpScenario("A/A/A/A"),
    ExpScenario("+5% conversion", conversion=1.05, revenue_per_request=1.05, winner=1),
    ExpScenario("-5% conversion, +10% revenue per request", conversion=0.95, revenue_per_request=1.10),
    ExpScenario("2x CPU per call", cpu=2.0),
)


def _lognormal_mean(median: float, sigma: float) -> float:
    return median * math.exp(sigma**2 / 2)


def experiment_metrics() -> list[experiment.Metric]:
    """Conversion decides (superiority, mde EXP_MDE relative); the rest guard (non-inferiority, margin 10 % / 0.5 pt)."""
    revenue = EXP_CONVERSION * _lognormal_mean(EXP_REVENUE_MEDIAN, EXP_REVENUE_SIGMA)
    per_conversion = _lognormal_mean(EXP_REVENUE_MEDIAN, EXP_REVENUE_SIGMA)
    latency = _lognormal_mean(LATENCY_MEDIAN_MS, LATENCY_SIGMA)
    cpu = _lognormal_mean(EXP_CPU_MEDIAN, EXP_CPU_SIGMA)
    K, G, R, D = experiment.MetricKind, experiment.Goal, experiment.Role, experiment.Hypothesis
    return [
        experiment.Metric(
            name="conversion",
            kind=K.proportion,
            goal=G.increase,
            mde=EXP_MDE * EXP_CONVERSION,
            role=R.decide,
            test=D.superiority,
        ),
        experiment.Metric(
            name="revenue", kind=K.mean, goal=G.increase, mde=0.1 * revenue, role=R.guard, test=D.non_inferiority
        ),
        experiment.Metric(
            name="revenue_per_conversion",
            kind=K.ratio,
            goal=G.increase,
            mde=0.1 * per_conversion,
            role=R.guard,
            test=D.non_inferiority,
        ),
        experiment.Metric(
            name="cpu", kind=K.mean, goal=G.decrease, mde=0.1 * cpu, role=R.guard, test=D.non_inferiority
        ),
        experiment.Metric(
            name="latency", kind=K.mean, goal=G.decrease, mde=0.1 * latency, role=R.guard, test=D.non_inferiority
        ),
        experiment.Metric(
            name="errors", kind=K.proportion, goal=G.decrease, mde=0.005, role=R.guard, test=D.non_inferiority
        ),
    ]


def experiment_design() -> planning.Design:
    return planning.Design(
        kind=planning.MetricKind.proportion,
        baseline=EXP_CONVERSION,
        mde=EXP_MDE * EXP_CONVERSION,
        weights=[1.0] * EXP_ARMS,
    )


def _sum_moments(
    rng: np.random.Generator, m: np.ndarray, median: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Σx and Σx² of m lognormal values per cell, from their bivariate normal (CLT) law: m is thousands per look."""
    mu = np.log(median)
    moment = [np.exp(k * mu + k**2 * sigma**2 / 2) for k in range(5)]
    var_x, var_x2 = moment[2] - moment[1] ** 2, moment[4] - moment[2] ** 2
    cov = moment[3] - moment[1] * moment[2]
    z1, z2 = rng.standard_normal(m.shape), rng.standard_normal(m.shape)
    a = np.sqrt(var_x)
    b = cov / a
    c = np.sqrt(np.maximum(var_x2 - b**2, 0.0))
    root = np.sqrt(m)
    return m * moment[1] + root * a * z1, m * moment[2] + root * (b * z1 + c * z2)


def simulate_experiments(
    scenario: ExpScenario, experiments: int, step: int, looks: int, seed: int
) -> dict[str, np.ndarray]:
    """Cumulative per-arm sums after each look, shape (looks, experiments, arms)."""
    rng = np.random.default_rng([seed, 14, EXP_SCENARIOS.index(scenario)])
    arm1 = np.arange(EXP_ARMS) == 1
    conversion = np.where(arm1, EXP_CONVERSION * scenario.conversion, EXP_CONVERSION)
    per_conversion = np.where(arm1, scenario.revenue_per_request / scenario.conversion, 1.0) * EXP_REVENUE_MEDIAN
    cpu = np.where(arm1, scenario.cpu, 1.0) * EXP_CPU_MEDIAN
    names = ("n", "conv", "rev", "rev_sq", "cpu", "cpu_sq", "lat", "lat_sq", "err")
    out = {k: np.zeros((looks, experiments, EXP_ARMS)) for k in names}
    total = dict.fromkeys(names, np.zeros((experiments, EXP_ARMS)))
    cells = np.arange(experiments * EXP_ARMS)
    for look in range(looks):
        n = rng.multinomial(step, np.full(EXP_ARMS, 1 / EXP_ARMS), size=experiments).astype(float)
        conv = rng.binomial(n.astype(np.int64), conversion)
        idx = np.repeat(cells, conv.ravel())
        arm_of = idx % EXP_ARMS
        values = np.exp(np.log(per_conversion)[arm_of] + EXP_REVENUE_SIGMA * rng.standard_normal(len(idx)))
        shape = (experiments, EXP_ARMS)
        rev = np.bincount(idx, weights=values, minlength=len(cells)).reshape(shape)
        rev_sq = np.bincount(idx, weights=values**2, minlength=len(cells)).reshape(shape)
        c, c2 = _sum_moments(rng, n, np.broadcast_to(cpu, shape), EXP_CPU_SIGMA)
        lt, lt2 = _sum_moments(rng, n, np.full(shape, LATENCY_MEDIAN_MS), LATENCY_SIGMA)
        err = rng.binomial(n.astype(np.int64), EXP_ERROR)
        chunk = {
            "n": n,
            "conv": conv,
            "rev": rev,
            "rev_sq": rev_sq,
            "cpu": c,
            "cpu_sq": c2,
            "lat": lt,
            "lat_sq": lt2,
            "err": err,
        }
        for k in names:
            total[k] = total[k] + chunk[k]
            out[k][look] = total[k]
    return out


def _metric_stats(data: dict[str, np.ndarray], metric: str, look: int, arm: int) -> dict[str, np.ndarray]:
    """One metric's sufficient statistics at a look for one arm, over all experiments (as experiment.stats_arrays)."""
    d = {k: v[look, :, arm] for k, v in data.items()}
    if metric == "conversion":
        return {"n": d["n"], "total": d["conv"], "total_sq": d["conv"]}
    if metric == "errors":
        return {"n": d["n"], "total": d["err"], "total_sq": d["err"]}
    if metric == "revenue":
        return {"n": d["n"], "total": d["rev"], "total_sq": d["rev_sq"]}
    if metric == "revenue_per_conversion":  # revenue is 0 unless converted: Σ rev·conv = Σ rev, Σ conv² = Σ conv
        return {
            "n": d["n"],
            "num": d["rev"],
            "num_sq": d["rev_sq"],
            "den": d["conv"],
            "den_sq": d["conv"],
            "cross": d["rev"],
        }
    key = {"cpu": "cpu", "latency": "lat"}[metric]
    return {"n": d["n"], "total": d[key], "total_sq": d[key + "_sq"]}


@dataclass
class ExpOutcomes:
    """Per experiment: the winning arm (−1: none), requests at the decision, arm 1 stopped on its CPU guard."""

    winner: np.ndarray
    samples: np.ndarray
    decided: np.ndarray
    cpu_flagged: np.ndarray
    flagged_at: np.ndarray  # requests when arm 1's CPU guard first crossed (NaN: never)


def releasegate_experiments(data: dict[str, np.ndarray], step: int, t_opt: float) -> ExpOutcomes:
    """experiment.decide()'s rules, vectorised over experiments, at every look until each experiment decides."""
    metrics = experiment_metrics()
    spec = experiment.Experiment(metrics=metrics, t_opt=t_opt)
    alpha_each = spec.alpha_each(EXP_ARMS)
    looks, e = data["n"].shape[:2]
    winner = np.full(e, -1)
    samples = np.full(e, looks * step)
    decided = np.zeros(e, bool)
    stopped = np.zeros((e, EXP_ARMS), bool)
    futile = np.zeros((e, EXP_ARMS), bool)
    cpu_flagged = np.zeros(e, bool)
    flagged_at = np.full(e, np.nan)
    for look in range(looks):
        live = ~decided
        requests = data["n"][look].sum(axis=1)
        srm_ok = np.array(
            [
                math.exp(-srm.log_bayes_factor(c, np.full(EXP_ARMS, 1 / EXP_ARMS))) >= spec.srm_alarm_below
                for c in data["n"][look]
            ]
        )
        score = np.full((e, EXP_ARMS), -np.inf)
        for arm in range(1, EXP_ARMS):
            better_now = np.zeros(e, bool)
            for m in metrics:
                d, lo, hi = experiment.difference_bounds(
                    m.kind,
                    _metric_stats(data, m.name, look, 0),
                    _metric_stats(data, m.name, look, arm),
                    requests,
                    alpha_each,
                    t_opt,
                )
                if m.role is experiment.Role.guard:
                    worse = experiment.crossed(m, lo, hi) & srm_ok & live
                    stopped[:, arm] |= worse
                    if m.name == "cpu" and arm == 1:
                        flagged_at = np.where(worse & ~cpu_flagged, (look + 1) * step, flagged_at)
                        cpu_flagged |= worse
                else:
                    better = experiment.cleared(m, lo, hi)
                    futile[:, arm] |= experiment.futile(m, lo, hi) & srm_ok & live
                    better_now = better
                    score[:, arm] = np.where(better, m.goal.sign * d, -np.inf)
            score[:, arm] = np.where(better_now & ~stopped[:, arm] & srm_ok, score[:, arm], -np.inf)
        has = np.isfinite(score).any(axis=1) & live
        resolved = (stopped | futile)[:, 1:].all(axis=1) & live & srm_ok
        winner = np.where(has, score.argmax(axis=1), winner)
        now = has | resolved
        samples = np.where(now, (look + 1) * step, samples)
        decided |= now
    return ExpOutcomes(winner, samples, decided, cpu_flagged, flagged_at)


def fixed_horizon_experiments(data: dict[str, np.ndarray], step: int, look: int) -> ExpOutcomes:
    """One look at the planned size: Bonferroni z-intervals (α/(k−1)) of each arm − control, the same rules."""
    metrics = experiment_metrics()
    alpha_each = 0.05 / (EXP_ARMS - 1)
    z = stats.norm.ppf(1 - alpha_each / 2)
    e = data["n"].shape[1]
    score = np.full((e, EXP_ARMS), -np.inf)
    cpu_flagged = np.zeros(e, bool)
    for arm in range(1, EXP_ARMS):
        stop = np.zeros(e, bool)
        for m in metrics:
            c, a = _metric_stats(data, m.name, look, 0), _metric_stats(data, m.name, look, arm)
            e0, v0 = experiment.estimate_and_variance(m.kind, c)
            e1, v1 = experiment.estimate_and_variance(m.kind, a)
            d = e1 - e0
            half = z * np.sqrt(v0 / c["n"] + v1 / a["n"])
            if m.role is experiment.Role.guard:
                worse = experiment.crossed(m, d - half, d + half)
                stop |= worse
                if m.name == "cpu" and arm == 1:
                    cpu_flagged = worse
            else:
                score[:, arm] = np.where(experiment.cleared(m, d - half, d + half), m.goal.sign * d, -np.inf)
        score[:, arm] = np.where(stop, -np.inf, score[:, arm])
    has = np.isfinite(score).any(axis=1)
    n = np.full(e, (look + 1) * step)
    return ExpOutcomes(
        np.where(has, score.argmax(axis=1), -1), n, np.ones(e, bool), cpu_flagged, np.where(cpu_flagged, n, np.nan)
    )


def _gbstats(cases: list[list]) -> list[float]:
    done = subprocess.run(
        ["nice", "-n", "10", str(GBSTATS_PYTHON), str(Path(__file__).with_name("gbstats_engine.py"))],
        input=json.dumps({"cases": cases}),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)["chance_to_win"]


def gbstats_chances(data: dict[str, np.ndarray], at: list[int]) -> np.ndarray:
    """GrowthBook's chance to win at each look in `at`, shape (looks, experiments, arms − 1, [conversion, cpu])."""
    e = data["n"].shape[1]
    # Every look's chances in one call (the engine's start-up is seconds); the rules are applied look by look.
    cases = [
        [kind, inverse] + [float(data[k][look, i, j]) for j in (0, arm) for k in ("n", key, sq)]
        for look in at
        for i in range(e)
        for arm in range(1, EXP_ARMS)
        for kind, key, sq, inverse in (("proportion", "conv", "conv", False), ("mean", "cpu", "cpu_sq", True))
    ]
    return np.asarray(_gbstats(cases)).reshape(len(at), e, EXP_ARMS - 1, 2)


def gbstats_experiments(chances: np.ndarray, at: list[int], step: int, horizon: int) -> ExpOutcomes:
    """GrowthBook's rule read at the looks `at`: a winner at chance to win ≥ 95 % on conversion with the CPU
    guardrail not failing (its chance to win > 5 %); no winner once every arm has ≤ 5 % or fails it, or at `horizon`."""
    e = chances.shape[1]
    winner, samples = np.full(e, -1), np.full(e, horizon)
    decided, cpu_flagged = np.zeros(e, bool), np.zeros(e, bool)
    flagged_at = np.full(e, np.nan)
    for look, ctw in zip(at, chances, strict=True):
        live = ~decided
        conv, guard_ok = ctw[..., 0], ctw[..., 1] > 1 - EXP_CTW
        flagged_at = np.where(~guard_ok[:, 0] & live & ~cpu_flagged, (look + 1) * step, flagged_at)
        cpu_flagged |= ~guard_ok[:, 0] & live
        score = np.where((conv >= EXP_CTW) & guard_ok, conv, -np.inf)
        has = np.isfinite(score).any(axis=1) & live
        resolved = ((conv <= 1 - EXP_CTW) | ~guard_ok).all(axis=1) & live
        winner = np.where(has, score.argmax(axis=1) + 1, winner)
        now = has | resolved
        samples = np.where(now, (look + 1) * step, samples)
        decided |= now
    return ExpOutcomes(winner, samples, decided, cpu_flagged, flagged_at)


def experiment_job(job: tuple[int, int, int]) -> dict[str, ExpOutcomes]:
    scenario_index, experiments, seed = job
    design = experiment_design()
    fixed = planning.fixed_horizon(design)
    step = math.ceil(fixed / EXP_LOOKS_PER_DESIGN)
    data = simulate_experiments(
        EXP_SCENARIOS[scenario_index], experiments, step, EXP_LOOKS_PER_DESIGN * EXP_MAX_DESIGNS, seed
    )
    out = {
        "releasegate": releasegate_experiments(data, step, t_opt=fixed),
        "fixed_horizon": fixed_horizon_experiments(data, step, EXP_LOOKS_PER_DESIGN - 1),
    }
    if GBSTATS_PYTHON.exists():
        looks = EXP_LOOKS_PER_DESIGN * EXP_MAX_DESIGNS
        at = list(range(EXP_GBSTATS_EVERY - 1, looks, EXP_GBSTATS_EVERY))
        chances = gbstats_chances(data, at)
        out["gbstats"] = gbstats_experiments(chances, at, step, looks * step)
        # The same rule read once, at the fixed design's size (a look in `at`): what it gives without peeking.
        once = at.index(EXP_LOOKS_PER_DESIGN - 1)
        planned = EXP_LOOKS_PER_DESIGN * step
        out["gbstats_once"] = gbstats_experiments(chances[once : once + 1], at[once : once + 1], step, planned)
    return out


def run_experiments(experiments: int, seed: int, workers: int) -> dict:
    """The "experiments" figures: {method: {scenario: {false_winner, correct_winner, median_samples, …}}}."""
    jobs = [(s, experiments, seed) for s in range(len(EXP_SCENARIOS))]
    if workers <= 1:
        results = list(map(experiment_job, jobs))
    else:
        with multiprocessing.get_context("fork").Pool(min(workers, 2)) as pool:
            results = pool.map(experiment_job, jobs)
    figures: dict = {}
    for scenario, outcomes in zip(EXP_SCENARIOS, results, strict=True):
        expected = -1 if scenario.winner is None else scenario.winner
        for method, o in outcomes.items():
            figures.setdefault(method, {})[scenario.name] = {
                "false_winner": float(np.mean((o.winner >= 0) & (o.winner != expected))),
                "correct_winner": float(np.mean(o.winner == expected)),
                "median_samples": int(np.median(o.samples)),
                "undecided": float(np.mean(~o.decided)),
                "cpu_guard_flagged": float(np.mean(o.cpu_flagged)),
                "median_samples_to_flag": int(np.median(o.flagged_at[o.cpu_flagged])) if o.cpu_flagged.any() else None,
            }
    return figures


def experiments_setup(experiments: int) -> dict:
    design = experiment_design()
    plan = planning.plan(design)
    return {
        "experiments_per_scenario": experiments,
        "conversion_mde_relative": EXP_MDE,
        "arms": EXP_ARMS,
        "fixed_horizon_samples": plan.fixed_requests,
        "planned_sequential_median_samples": plan.sequential_median_requests,
        "look_every": math.ceil(plan.fixed_requests / EXP_LOOKS_PER_DESIGN),
        "max_samples": EXP_MAX_DESIGNS * EXP_LOOKS_PER_DESIGN * math.ceil(plan.fixed_requests / EXP_LOOKS_PER_DESIGN),
        "gbstats": "run" if GBSTATS_PYTHON.exists() else f"skipped: no {GBSTATS_PYTHON} (see docs/benchmarks.md)",
    }


def experiments_table(figures: dict) -> str:
    names = [s.name for s in EXP_SCENARIOS]
    lines = [f"{'method':<15}" + "".join(f"{n[:40]:>44}" for n in names)]
    lines.append(f"{'':<15}" + "".join(f"{'false · correct · median · cpu flagged':>44}" for _ in names))
    for method, entry in figures.items():
        cells = [
            f"{entry[n]['false_winner']:.1%} · {entry[n]['correct_winner']:.1%} · {entry[n]['median_samples']:>9} · "
            f"{entry[n]['cpu_guard_flagged']:.0%}"
            for n in names
        ]
        lines.append(f"{method:<15}" + "".join(f"{c:>44}" for c in cells))
    return "\n".join(lines)


def experiments_targets(figures: dict, fixed: int) -> list[tuple[str, bool]]:
    rg = figures["releasegate"]
    aa, up, cpu = rg["A/A/A/A"], rg["+5% conversion"], rg["2x CPU per call"]
    out = [
        (f"A/A/A/A false winner {aa['false_winner']:.1%} ≤ 5%", aa["false_winner"] <= 0.05),
        (f"+5% conversion correct winner {up['correct_winner']:.1%} ≥ 90%", up["correct_winner"] >= 0.9),
        (f"2x CPU arm flagged on its guard {cpu['cpu_guard_flagged']:.1%} ≥ 95%", cpu["cpu_guard_flagged"] >= 0.95),
    ]
    for name, sc in rg.items():
        med = sc["median_samples"]
        out.append((f"{name}: median samples {med} ≤ 0.6 × fixed {fixed}", med <= 0.6 * fixed))
    return out


def main(argv: list[str] | None = None) -> int:
    global EXP_MDE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", type=int, default=500, help="simulated releases per scenario")
    parser.add_argument("--rate", type=float, default=RATE, help="requests per second to the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (at most 2)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    parser.add_argument(
        "--experiments", type=int, default=0, metavar="N", help="also run the A/B/n section, N experiments per scenario"
    )
    parser.add_argument("--only-experiments", action="store_true", help="skip the canary releases")
    parser.add_argument(
        "--mde",
        type=float,
        default=EXP_MDE,
        help="the experiments' mde of conversion, relative (default 0.05: the +5%% arm's effect is the mde)",
    )
    args = parser.parse_args(argv)
    EXP_MDE = args.mde  # read by experiment_metrics / experiment_design, in the forked workers too
    result: dict = {}
    met: list[tuple[str, bool]] = []
    if not args.only_experiments:
        started = time.monotonic()
        result = run(args.releases, args.rate, args.seed, args.workers)
        result["setup"]["seconds"] = round(time.monotonic() - started, 1)
        print(table(result))
        print(
            f"\nfixed-horizon sample size: {result['setup']['fixed_horizon_samples']} requests; "
            f"{args.releases} releases per scenario at {args.rate:g} requests/s; {result['setup']['seconds']} s"
        )
        met = targets(result)
        for text, ok in met:
            print(f"  {'met ' if ok else 'MISS'}  {text}")
    if args.experiments:
        started = time.monotonic()
        result["experiments"] = run_experiments(args.experiments, args.seed, args.workers)
        setup = experiments_setup(args.experiments)
        setup["seconds"] = round(time.monotonic() - started, 1)
        result["experiments_setup"] = setup
        print("\nA/B/n experiments (false winner · correct winner · median samples · 2x-CPU arm flagged):")
        print(experiments_table(result["experiments"]))
        print(f"\n{setup}")
        extra = experiments_targets(result["experiments"], setup["fixed_horizon_samples"])
        for text, ok in extra:
            print(f"  {'met ' if ok else 'MISS'}  {text}")
        met += extra
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if all(ok for _, ok in met) else 1


if __name__ == "__main__":
    sys.exit(main())
