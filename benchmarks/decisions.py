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
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from releasegate import policy as policies
from releasegate.analysis import sequential, verdict_from_stats
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", type=int, default=500, help="simulated releases per scenario")
    parser.add_argument("--rate", type=float, default=RATE, help="requests per second to the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (at most 2)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    args = parser.parse_args(argv)
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if all(ok for _, ok in met) else 1


if __name__ == "__main__":
    sys.exit(main())
