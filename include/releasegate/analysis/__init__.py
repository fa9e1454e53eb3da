"""The verdict on a window of logged traffic: SRM, guardrails, primary metric, agreement, slices, minimum samples.

Bounds are always-valid confidence sequences, so the DAG may re-run the analysis at every poll.
rows → (shadow | canary) → checks → decide; window.py holds the entry points.
"""

from releasegate.analysis.canary import CanaryStats, canary_stats, carry
from releasegate.analysis.window import analyse, analyse_frames, frame_stats, verdict_from_stats
from releasegate.verdict import Decision, Verdict

__all__ = [
    "CanaryStats",
    "Decision",
    "Verdict",
    "analyse",
    "analyse_frames",
    "canary_stats",
    "carry",
    "frame_stats",
    "verdict_from_stats",
]
