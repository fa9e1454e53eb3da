"""The verdict on a window of logged traffic: SRM, guardrails, primary metric, agreement, slices, minimum samples.

Bounds are always-valid confidence sequences, so the DAG may re-run the analysis at every poll.
"""

from releasegate.analysis.frames import CanaryStats, analyse_frames, canary_stats, carry, verdict_from_stats
from releasegate.analysis.verdict import Decision, Verdict
from releasegate.analysis.window import analyse

__all__ = ["CanaryStats", "Decision", "Verdict", "analyse", "analyse_frames", "canary_stats", "carry", "verdict_from_stats"]
