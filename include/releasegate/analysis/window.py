"""The analysis's entry points: a stage's logged rows (from the database, or as frames) in, a Verdict out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import pandas as pd
import sqlalchemy as sa

from releasegate import privacy, storage
from releasegate.analysis import decide, rows, srm
from releasegate.analysis.canary import CanaryAnalysis, CanaryStats, canary_stats, carry
from releasegate.analysis.shadow import ShadowAnalysis
from releasegate.contract import Mode, Stage, StageKind
from releasegate.policy import Policy
from releasegate.verdict import Verdict, Window

# A finished step's statistics never change: the wait re-reads only the current step's rows at each poll.
_FINISHED: OrderedDict[tuple[object, ...], CanaryStats] = OrderedDict()
_FINISHED_MAX = 64


def analyse_frames(
    preds: pd.DataFrame,
    feedback: pd.DataFrame,
    stage: Stage,
    policy: Policy,
    window: Window | tuple[float, float] | None = None,
    window_closed: bool = False,
    srm_unit: srm.Unit = srm.Unit.routing_keys,
) -> Verdict:
    """Decide one stage from its logged rows (columns as in storage.predictions / storage.feedback)."""
    window = _window(window, preds, stage)
    logged = rows.rows(preds, feedback, policy)
    if stage.kind is StageKind.canary:
        return verdict_from_stats(
            canary_stats(logged, policy, stage.weight), stage, policy, window, window_closed, srm_unit=srm_unit
        )
    analysis = ShadowAnalysis(
        logged, policy, decide.alpha(policy, stage.kind), decide.grow(policy, stage, window, window_closed)
    )
    return decide.verdict(analysis, window, window_closed)


def frame_stats(preds: pd.DataFrame, feedback: pd.DataFrame, policy: Policy, weight: int) -> CanaryStats:
    """A canary step's sufficient statistics from its logged rows (what analyse_frames decides a canary on)."""
    return canary_stats(rows.rows(preds, feedback, policy), policy, weight)


def verdict_from_stats(
    stats: CanaryStats,
    stage: Stage,
    policy: Policy,
    window: Window | tuple[float, float],
    window_closed: bool = False,
    srm_unit: srm.Unit = srm.Unit.routing_keys,
) -> Verdict:
    """Decide a canary stage from its sufficient statistics: analyse_frames' canary path and the benchmark's."""
    if stage.kind is not StageKind.canary or stage.weight != stats.weight:
        raise ValueError(f"CanaryStats at {stats.weight} % decide that canary step only, got stage {stage}")
    window = _window(window, None, stage)
    analysis = CanaryAnalysis(
        stats,
        policy,
        decide.alpha(policy, stage.kind),
        decide.grow(policy, stage, window, window_closed, len(stats.carried)),
        srm_unit=srm_unit,
    )
    return decide.verdict(analysis, window, window_closed)


def analyse(
    model: str,
    release_id: str,
    stage: Stage,
    since: float,
    until: float,
    policy: Policy,
    engine: sa.Engine | None = None,
    window_closed: bool = False,
    srm_unit: srm.Unit = srm.Unit.routing_keys,
    earlier: Iterable[Window] = (),
) -> Verdict:
    """The verdict on a stage of a release from its rows logged in [since, until].

    `earlier`: the windows of the release's finished canary steps, whose evidence a canary step carries
    on (see canary.carry).
    """
    if until < since:
        raise ValueError(f"window ends before it starts: since={since}, until={until}")
    window = Window(start=since, end=until, stage=stage)
    preds, feedback = read_window(
        model, release_id, stage.kind, since, until, with_inputs=bool(policy.slices), engine=engine
    )
    finished = list(earlier)
    if stage.is_shadow or not finished:
        return analyse_frames(preds, feedback, stage, policy, window, window_closed=window_closed, srm_unit=srm_unit)
    pooled: CanaryStats | None = None
    for step in finished:
        stats = _finished_step(model, release_id, step, policy, engine)
        pooled = stats if pooled is None else carry(pooled, stats)
    assert pooled is not None
    current = frame_stats(preds, feedback, policy, stage.weight)
    return verdict_from_stats(
        carry(pooled, current), stage, policy, window, window_closed=window_closed, srm_unit=srm_unit
    )


def _finished_step(model: str, release_id: str, step: Window, policy: Policy, engine: sa.Engine | None) -> CanaryStats:
    key = (
        str(engine.url) if engine is not None else None,
        model,
        release_id,
        step.start,
        step.end,
        step.stage.weight,
        policy.digest,
    )
    if key not in _FINISHED:
        preds, feedback = read_window(
            model, release_id, StageKind.canary, step.start, step.end, with_inputs=bool(policy.slices), engine=engine
        )
        _FINISHED[key] = frame_stats(preds, feedback, policy, step.stage.weight)
        while len(_FINISHED) > _FINISHED_MAX:
            _FINISHED.popitem(last=False)
    return _FINISHED[key]


def read_window(
    model: str,
    release_id: str,
    kind: StageKind,
    since: float,
    until: float,
    with_inputs: bool = False,
    engine: sa.Engine | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions of the window (only the columns the analysis uses) and the feedback on them."""
    p, f = storage.predictions, storage.feedback
    columns = [p.c.id, *(p.c[name] for name in rows.PREDICTION_COLUMNS)] + ([p.c.inputs] if with_inputs else [])
    # After promotion (the watch) the release's version serves alone, on a single route carrying the release's id.
    mode = {StageKind.shadow: Mode.shadow, StageKind.canary: Mode.canary, StageKind.watch: Mode.single}[kind]
    in_window = sa.and_(
        p.c.release_id == release_id, p.c.model == model, p.c.mode == mode, p.c.time >= since, p.c.time <= until
    )
    preds_q = sa.select(*columns).where(in_window).order_by(p.c.time, p.c.id)
    feedback_q = (
        sa.select(*(f.c[name] for name in rows.FEEDBACK_COLUMNS))
        .where(f.c.time <= until, f.c.request_id.in_(sa.select(p.c.request_id).where(in_window)))
        .order_by(f.c.time, f.c.id)
    )
    with (engine or storage.engine()).connect() as conn:
        preds = pd.DataFrame(conn.execute(preds_q).all(), columns=[c.name for c in columns])
        feedback = pd.DataFrame(conn.execute(feedback_q).all(), columns=list(rows.FEEDBACK_COLUMNS))
    if len(feedback):
        # Labels a model's classification encrypts are opened here, for the comparison they exist for.
        feedback["ground_truth"] = privacy.open_truths(feedback["ground_truth"])
    return preds, feedback


def _window(window: Window | tuple[float, float] | None, preds: pd.DataFrame | None, stage: Stage) -> Window:
    if isinstance(window, Window):
        return window
    if window is None:
        times = preds["time"] if preds is not None and len(preds) else pd.Series([0.0])
        return Window(start=float(times.min()), end=float(times.max()), stage=stage)
    start, end = window
    return Window(start=float(start), end=float(end), stage=stage)
