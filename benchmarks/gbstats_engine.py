"""GrowthBook's Bayesian engine (gbstats) on per-arm aggregates: run in its own venv, JSON in and out.

gbstats pins pandas 1.x, so it cannot share releasegate's environment; benchmarks/decisions.py calls
this script with `.venv-gbstats/bin/python` (docs/benchmarks.md says how to make that venv).
stdin: {"cases": [[kind, inverse, n_a, sum_a, sum_sq_a, n_b, sum_b, sum_sq_b], ...]} with kind
"proportion" or "mean"; stdout: {"chance_to_win": [...], "version": ...}. Each case is gbstats'
EffectBayesianABTest with its default configuration (relative effect, flat prior).
"""

import json
import sys
from importlib.metadata import version

from gbstats.bayesian.tests import EffectBayesianABTest, EffectBayesianConfig
from gbstats.models.statistics import ProportionStatistic, SampleMeanStatistic


def statistic(kind, n, total, total_sq):
    if kind == "proportion":
        return ProportionStatistic(n=int(n), sum=float(total))
    return SampleMeanStatistic(n=int(n), sum=float(total), sum_squares=float(total_sq))


def main():
    cases = json.load(sys.stdin)["cases"]
    configs = {inverse: EffectBayesianConfig(inverse=inverse) for inverse in (False, True)}
    out = []
    for kind, inverse, n_a, s_a, q_a, n_b, s_b, q_b in cases:
        test = EffectBayesianABTest(
            statistic(kind, n_a, s_a, q_a), statistic(kind, n_b, s_b, q_b), configs[bool(inverse)]
        )
        out.append(float(test.compute_result().chance_to_win))
    json.dump({"chance_to_win": out, "version": version("gbstats")}, sys.stdout)


if __name__ == "__main__":
    main()
