"""Read one release's logged traffic of a window from the database and analyse it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import pandas as pd
import sqlalchemy as sa

from releasegate import storage
from releasegate.analysis.frames import (FEEDBACK_COLUMNS, PREDICTION_COLUMNS, CanaryStats, analyse_frames, carry,
                                         frame_stats, verdict_from_stats)
from releasegate.analysis.verdict import Verdict, Window
from releasegate.policy import Policy

# A finished step's statistics never change: the wait re-reads only the current step's rows at each poll.
_FINISHED: OrderedDict[tuple, CanaryStats] = OrderedDict()
_FINISHED_MAX = 64


def analyse(model: str, release_id: str, stage: str, since: float, until: float, policy: Policy,
            candidate_weight: int = 0, engine: sa.Engine | None = None, window_closed: bool = False,
            srm_unit: str = "routing_keys",
            earlier: Iterable[tuple[float, float, int]] = ()) -> Verdict:
    """The verdict on `stage` ("shadow" or "canary-<weight>") of a release from its rows logged in [since, until].

    `earlier`: the (start, end, weight) windows of the release's finished canary steps, whose
    evidence a canary step carries on (see frames.carry).
    """
    if until < since:
        raise ValueError(f"window ends before it starts: since={since}, until={until}")
    mode = "shadow" if stage == "shadow" else "canary"
    window = Window(start=since, end=until, stage=stage)
    preds, feedback = read_window(model, release_id, mode, since, until, with_inputs=bool(policy.slices),
                                  engine=engine)
    earlier = list(earlier)
    if mode == "shadow" or not earlier:
        return analyse_frames(preds, feedback, stage, policy, candidate_weight, window, window_closed=window_closed,
                              srm_unit=srm_unit)
    pooled = None
    for start, end, weight in earlier:
        step = _finished_step(model, release_id, start, end, weight, policy, engine)
        pooled = step if pooled is None else carry(pooled, step)
    current = frame_stats(preds, feedback, policy, candidate_weight or int(stage.removeprefix("canary-")))
    return verdict_from_stats(carry(pooled, current), stage, policy, window, window_closed=window_closed,
                              srm_unit=srm_unit)


def _finished_step(model: str, release_id: str, start: float, end: float, weight: int, policy: Policy,
                   engine: sa.Engine | None) -> CanaryStats:
    key = (str(engine.url) if engine is not None else None, model, release_id, start, end, weight, policy.digest)
    if key not in _FINISHED:
        preds, feedback = read_window(model, release_id, "canary", start, end, with_inputs=bool(policy.slices),
                                      engine=engine)
        _FINISHED[key] = frame_stats(preds, feedback, policy, weight)
        while len(_FINISHED) > _FINISHED_MAX:
            _FINISHED.popitem(last=False)
    return _FINISHED[key]


def read_window(model: str, release_id: str, mode: str, since: float, until: float, with_inputs: bool = False,
                engine: sa.Engine | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions of the window (only the columns the analysis uses) and the feedback on them."""
    p, f = storage.predictions, storage.feedback
    columns = [p.c.id, *(p.c[name] for name in PREDICTION_COLUMNS)] + ([p.c.inputs] if with_inputs else [])
    in_window = sa.and_(p.c.release_id == release_id, p.c.model == model, p.c.mode == mode,
                        p.c.time >= since, p.c.time <= until)
    preds_q = sa.select(*columns).where(in_window).order_by(p.c.time, p.c.id)
    feedback_q = (sa.select(*(f.c[name] for name in FEEDBACK_COLUMNS))
                  .where(f.c.time <= until, f.c.request_id.in_(sa.select(p.c.request_id).where(in_window)))
                  .order_by(f.c.time, f.c.id))
    with (engine or storage.engine()).connect() as conn:
        preds = _frame(conn.execute(preds_q), [c.name for c in columns])
        feedback = _frame(conn.execute(feedback_q), list(FEEDBACK_COLUMNS))
    return preds, feedback


def _frame(result, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(result.all(), columns=columns)
