"""Sample ratio mismatch: does the split of routing keys between the arms match the configured weight?"""

from __future__ import annotations

from scipy import stats

from releasegate.analysis.verdict import SRM

# Pearson's chi-square needs a few expected keys per arm before its p-value means anything.
MIN_EXPECTED = 5


def check(counts: dict[str, int], candidate_weight: int, alarm_below: float) -> SRM:
    """Chi-square goodness of fit of routing keys per arm against candidate_weight % / the rest."""
    if not 0 < candidate_weight < 100:
        raise ValueError(f"candidate_weight must be between 1 and 99 for a canary, got {candidate_weight}")
    expected = {"champion": (100 - candidate_weight) / 100, "candidate": candidate_weight / 100}
    observed = [int(counts.get("champion", 0)), int(counts.get("candidate", 0))]
    total = sum(observed)
    result = SRM(counts=dict(zip(expected, observed)), expected=expected)
    if total == 0 or min(expected.values()) * total < MIN_EXPECTED:
        return result
    p = float(stats.chisquare(observed, [share * total for share in expected.values()]).pvalue)
    return result.model_copy(update={"p_value": p, "alarm": p < alarm_below})
