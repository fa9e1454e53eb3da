"""The offline gate on seed-only retrains and on truly worse candidates: the previous rule beside the paired test.

Data: the demo's churn generator (`releasegate.demo.data.generate`), in `--worlds` independent draws
(default 10). Each world has 10,000 training rows, a holdout of 2,500 (region slices of about 750,
625, 625 and 500 rows) and 20,000 further rows that measure each model's true accuracy. Its champion
is a random forest (50 trees, min_samples_leaf 3) with random_state 0; the candidates of a scenario
are the same forest with another random_state, trained:

- A/A: on the same rows (a seed-only retrain: any rejection is a false one);
- on a random 10% of the rows (about 2.5 points worse: past the margin, but not by much);
- on a random 5% of the rows (about 3.7 points worse);
- on the same rows with 30% of the labels flipped (about 5 points worse).

Several worlds, not one: all candidates of a world share its holdout and its champion, so one world
would measure the luck of a single holdout draw rather than the gate.

Both rules judge each candidate with the default policy (accuracy, margin 0.01, alpha 0.05, min_rows
200, slices by region): the previous rule (`previous_rule`, a point estimate against the margin,
reimplemented here) and the paired test, through the same `releasegate.evaluation.judge` that the
release's validate step calls.

Run: `nice -n 10 .venv/bin/python benchmarks/offline.py --json offline.json` (2 workers, 3-6 min).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from releasegate import policy as policies
from releasegate.demo import data
from releasegate.evaluation import judge

TRAIN_ROWS, HOLDOUT_ROWS, POPULATION_ROWS = 10_000, 2_500, 20_000
TREES, MIN_SAMPLES_LEAF = 50, 3


@dataclass(frozen=True)
class Scenario:
    name: str
    train_share: float = 1.0  # share of the training rows the candidate sees
    label_noise: float = 0.0  # share of its training labels flipped
    min_power: float | None = None  # the paired test should reject at least this share

    @property
    def regression(self) -> bool:
        return self.train_share < 1 or self.label_noise > 0


SCENARIOS = (
    Scenario("A/A: seed-only retrain"),
    Scenario("trained on 10% of the rows", train_share=0.10),
    Scenario("trained on 5% of the rows", train_share=0.05, min_power=0.9),
    Scenario("30% of training labels flipped", label_noise=0.30, min_power=0.9),
)


@dataclass
class World:
    """One draw of the data, encoded once, with its champion's predictions."""

    x: np.ndarray
    y: np.ndarray
    holdout: pd.DataFrame
    holdout_x: np.ndarray
    population_x: np.ndarray
    population_y: np.ndarray
    champion_holdout: np.ndarray
    champion_accuracy: float


WORLDS: list[World] = []  # built before the workers fork, read by them


def encode(frame: pd.DataFrame, columns: pd.Index | None = None) -> pd.DataFrame:
    encoded = pd.get_dummies(frame[data.FEATURES], dtype=float)
    return encoded if columns is None else encoded.reindex(columns=columns, fill_value=0.0)


def forest(x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(
        n_estimators=TREES, min_samples_leaf=MIN_SAMPLES_LEAF, random_state=seed, n_jobs=1
    ).fit(x, y)


def make_world(index: int, seed: int) -> World:
    base = 1000 * (seed + 1) + 10 * index  # distinct from the demo's and the traffic generator's seeds
    train = data.generate(TRAIN_ROWS, seed=base)
    holdout = data.generate(HOLDOUT_ROWS, seed=base + 1)
    population = data.generate(POPULATION_ROWS, seed=base + 2)
    columns = encode(train).columns
    x, y = encode(train).to_numpy(), train[data.LABEL].to_numpy()
    holdout_x, population_x = encode(holdout, columns).to_numpy(), encode(population, columns).to_numpy()
    population_y = population[data.LABEL].to_numpy()
    champion = forest(x, y, seed=0)
    return World(
        x=x,
        y=y,
        holdout=holdout,
        holdout_x=holdout_x,
        population_x=population_x,
        population_y=population_y,
        champion_holdout=champion.predict(holdout_x),
        champion_accuracy=float((champion.predict(population_x) == population_y).mean()),
    )


def previous_rule(
    y: np.ndarray, cand: np.ndarray, champ: np.ndarray, holdout: pd.DataFrame, policy: policies.Policy
) -> bool:
    """The rule before the paired test, kept here to measure it: reject when the point estimate of accuracy
    is more than the margin below the champion's, overall or in any slice with at least min_rows rows."""
    margin, min_rows = policy.offline.margin, policy.offline.min_rows
    indices = [np.arange(len(y))] + [
        index
        for feature in policy.slices
        for index in holdout.groupby(feature, observed=True).indices.values()
        if len(index) >= min_rows
    ]
    return any(round((cand[i] == y[i]).mean() - (champ[i] == y[i]).mean(), 12) < -margin for i in indices)


def retrain(job: tuple[int, int, int, int]) -> dict:
    """One candidate of one scenario in one world, judged by both rules."""
    scenario_index, world_index, candidate, seed = job
    scenario, world = SCENARIOS[scenario_index], WORLDS[world_index]
    policy = policies.load("default")
    rng = np.random.default_rng([seed, scenario_index, world_index, candidate])
    rows = np.arange(len(world.y))
    if scenario.train_share < 1:
        rows = np.sort(rng.choice(rows, size=int(scenario.train_share * len(rows)), replace=False))
    labels = world.y[rows].copy()
    flip = rng.random(len(rows)) < scenario.label_noise
    labels[flip] = 1 - labels[flip]
    model = forest(world.x[rows], labels, seed=1 + candidate)
    predicted = model.predict(world.holdout_x)
    y = world.holdout[data.LABEL].to_numpy()
    verdict = judge(y, predicted, world.champion_holdout, world.holdout, policy)
    true_accuracy = float((model.predict(world.population_x) == world.population_y).mean())
    return {
        "scenario": scenario_index,
        "previous_rejects": previous_rule(y, predicted, world.champion_holdout, world.holdout, policy),
        "paired_rejects": not verdict.passed,
        "true_gap": true_accuracy - world.champion_accuracy,
        "holdout_gap": verdict.difference,
    }


def run(candidates: int, worlds: int, seed: int, workers: int) -> dict:
    started = time.monotonic()
    WORLDS.clear()
    for index in range(worlds):
        WORLDS.append(make_world(index, seed))
    print(f"[offline] {worlds} worlds ready ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    jobs = [(s, c % worlds, c, seed) for s in range(len(SCENARIOS)) for c in range(candidates)]
    outcomes = []
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, 2))) as pool:
        for done, outcome in enumerate(pool.imap_unordered(retrain, jobs, chunksize=4), start=1):
            outcomes.append(outcome)
            if done % 100 == 0 or done == len(jobs):
                print(
                    f"[offline] {done}/{len(jobs)} candidates judged ({time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    policy = policies.load("default")
    result = {
        "scenarios": {},
        "setup": {
            "candidates_per_scenario": candidates,
            "worlds": worlds,
            "seed": seed,
            "train_rows": TRAIN_ROWS,
            "holdout_rows": HOLDOUT_ROWS,
            "population_rows": POPULATION_ROWS,
            "model": f"RandomForestClassifier(n_estimators={TREES}, min_samples_leaf={MIN_SAMPLES_LEAF})",
            "policy": {
                "name": policy.name,
                "metric": policy.offline.metric,
                "margin": policy.offline.margin,
                "alpha": policy.alpha,
                "min_rows": policy.offline.min_rows,
                "slices": policy.slices,
            },
        },
    }
    for s, scenario in enumerate(SCENARIOS):
        mine = [o for o in outcomes if o["scenario"] == s]
        result["scenarios"][scenario.name] = {
            "regression": scenario.regression,
            "min_power": scenario.min_power,
            "candidates": len(mine),
            "mean_true_gap": float(np.mean([o["true_gap"] for o in mine])),
            "mean_holdout_gap": float(np.mean([o["holdout_gap"] for o in mine])),
            **{rule: _rate(sum(o[f"{rule}_rejects"] for o in mine), len(mine)) for rule in ("previous", "paired")},
        }
    return result


def _rate(k: int, n: int) -> dict:
    ci = stats.binomtest(k, n).proportion_ci(method="wilson")
    return {"rejected": k, "rate": k / n, "ci95": [ci.low, ci.high]}


def table(result: dict) -> str:
    def cell(rate: dict) -> str:
        low, high = rate["ci95"]
        return f"{rate['rate']:.1%} ({low:.1%}–{high:.1%})"

    lines = [
        "| candidates | true accuracy gap | rejected: previous rule (point estimate) | rejected: paired test |",
        "|---|---:|---:|---:|",
    ]
    for name, sc in result["scenarios"].items():
        lines.append(
            f"| {name} | {round(sc['mean_true_gap'] * 100, 1) + 0.0:+.1f} pt | {cell(sc['previous'])} | "
            f"{cell(sc['paired'])} |"
        )
    return "\n".join(lines)


def targets(result: dict) -> list[tuple[str, bool]]:
    alpha = result["setup"]["policy"]["alpha"]
    out = []
    for name, sc in result["scenarios"].items():
        rate = sc["paired"]["rate"]
        if not sc["regression"]:
            out.append((f"{name}: paired test rejects {rate:.1%} ≤ alpha {alpha:g}", rate <= alpha))
        elif sc["min_power"] is not None:
            out.append((f"{name}: paired test rejects {rate:.1%} ≥ {sc['min_power']:.0%}", rate >= sc["min_power"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=200, help="candidates per scenario")
    parser.add_argument("--worlds", type=int, default=10, help="independent data draws, each with its champion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (at most 2)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = run(args.candidates, args.worlds, args.seed, args.workers)
    result["setup"]["seconds"] = round(time.monotonic() - started, 1)
    print(table(result))
    setup = result["setup"]
    print(
        f"\n{args.candidates} candidates per scenario in {args.worlds} worlds; holdout {HOLDOUT_ROWS:,} rows; "
        f"policy {setup['policy']['name']} (margin {setup['policy']['margin']:g}, alpha "
        f"{setup['policy']['alpha']:g}, slices {', '.join(setup['policy']['slices'])}); {setup['seconds']} s"
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
