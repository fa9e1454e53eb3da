"""Read one release's logged traffic of a window from the database and analyse it."""

from __future__ import annotations

import pandas as pd
import sqlalchemy as sa

from releasegate import storage
from releasegate.analysis.frames import FEEDBACK_COLUMNS, PREDICTION_COLUMNS, analyse_frames
from releasegate.analysis.verdict import Verdict, Window
from releasegate.policy import Policy


def analyse(model: str, release_id: str, stage: str, since: float, until: float, policy: Policy,
            candidate_weight: int = 0, engine: sa.Engine | None = None, window_closed: bool = False,
            srm_unit: str = "routing_keys") -> Verdict:
    """The verdict on `stage` ("shadow" or "canary-<weight>") of a release from its rows logged in [since, until]."""
    if until < since:
        raise ValueError(f"window ends before it starts: since={since}, until={until}")
    preds, feedback = read_window(model, release_id, "shadow" if stage == "shadow" else "canary", since, until,
                                  with_inputs=bool(policy.slices), engine=engine)
    return analyse_frames(preds, feedback, stage, policy, candidate_weight,
                          Window(start=since, end=until, stage=stage), window_closed=window_closed,
                          srm_unit=srm_unit)


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
