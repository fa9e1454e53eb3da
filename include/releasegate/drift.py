"""Input drift: Evidently reports comparing logged traffic with a model version's reference data.

Logged traffic is read from `predictions` with a uniform sample drawn in SQL: every row
carries `sample_bucket` (0-999, a hash of its request id), so keeping the rows with
`sample_bucket < k` keeps about k/1000 of the requests (both arms of a request alike)
without the database or Python touching the rest. `k` comes from a COUNT of the window
first, so a window of any size yields at most `max_rows` rows.

Evidently (and pandas) are imported inside the functions: they take seconds to import, and
the DAG processor imports this module.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import sqlalchemy as sa
from pydantic import BaseModel

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

ARMS = ("champion", "candidate")
BUCKETS = 1000  # sample_bucket takes the values 0..BUCKETS-1
REFERENCE_ARTIFACT = "releasegate/reference.parquet"


class ColumnDrift(BaseModel):
    """Evidently's verdict on one column: the score, the test that produced it and its threshold."""

    score: float
    method: str
    threshold: float
    kind: str  # numerical | categorical
    drifted: bool


with warnings.catch_warnings():
    # `json` is the field's agreed name; it hides pydantic's deprecated v1 `json()`, which nobody should call.
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class DriftSummary(BaseModel):
        """The numbers of one input-drift report and where its HTML and JSON files are."""

        title: str
        drifted_share: float
        drifted_columns: list[str]
        columns: dict[str, ColumnDrift]
        html: str
        json: str
        rows_reference: int
        rows_current: int


def read_logged_inputs(model: str, since: float, until: float, release_id: str | None = None,
                       arm: str | None = None, max_rows: int = 20000, engine=None) -> pd.DataFrame:
    """The logged inputs of `model` in [since, until), one row per request, a uniform sample of at most `max_rows`.

    Rows are the served ones, or those of `arm` when given; the frame is indexed by request id and
    `frame.attrs` records the requests in the window and the sampled fraction.
    """
    from releasegate import storage

    if until <= since:
        raise ValueError(f"empty time window: until ({until}) must be after since ({since})")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if arm is not None and arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    engine = engine if engine is not None else storage.engine()
    p = storage.predictions
    where = [p.c.model == model, p.c.time >= since, p.c.time < until, p.c.inputs.is_not(None),
             p.c.arm == arm if arm is not None else p.c.served.is_(True)]
    if release_id is not None:
        where.append(p.c.release_id == release_id)

    with engine.connect() as conn:
        requests = conn.execute(sa.select(sa.func.count(sa.distinct(p.c.request_id))).where(*where)).scalar_one()
        buckets = BUCKETS if requests <= max_rows else max(1, math.floor(BUCKETS * max_rows / requests))
        # A batch request logs one row per input row under one request id; keep its first, as
        # the feedback and the analysis count requests.
        first_rows = (sa.select(sa.func.min(p.c.id))
                      .where(*where, p.c.sample_bucket < buckets)
                      .group_by(p.c.request_id))
        # The bucket cut leaves about max_rows rows; the LIMIT caps the random excess, dropping
        # whole top buckets first so what is left is still a hash-uniform sample.
        rows = conn.execute(
            sa.select(p.c.request_id, p.c.inputs)
            .where(p.c.id.in_(first_rows))
            .order_by(p.c.sample_bucket, p.c.request_id)
            .limit(max_rows)
        ).all()

    frame = _expand_inputs(rows)
    frame.attrs.update({"requests_in_window": int(requests), "sampled_fraction": buckets / BUCKETS})
    return frame


def _expand_inputs(rows) -> pd.DataFrame:
    import orjson
    import pandas as pd

    ids, records, unreadable = [], [], 0
    for request_id, text in rows:
        try:
            record = orjson.loads(text)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            unreadable += 1
            continue
        ids.append(request_id)
        records.append(record)
    if unreadable:
        # One malformed row must not cost the whole nightly report; it is counted instead.
        log.warning("skipped %d logged inputs that are not JSON objects of column -> value", unreadable)
    index = pd.Index(ids, name="request_id", dtype=object)
    return pd.DataFrame.from_records(records, index=index) if records else pd.DataFrame(index=index)


def input_drift(reference: pd.DataFrame, current: pd.DataFrame, out_dir: Path,
                title: str = "Input drift") -> DriftSummary:
    """Evidently's DataDriftPreset over the columns both frames share; writes input_drift.html and .json in out_dir."""
    numerical, categorical = _column_kinds(reference, current)
    columns = numerical + categorical
    evidently = _import_evidently()
    definition = evidently.DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    report = evidently.Report([evidently.DataDriftPreset(columns=columns)], include_tests=True)
    snapshot = report.run(
        evidently.Dataset.from_pandas(current[columns].reset_index(drop=True), data_definition=definition),
        evidently.Dataset.from_pandas(reference[columns].reset_index(drop=True), data_definition=definition),
        name=title,
    )
    result = json.loads(snapshot.json())  # Evidently's encoder turns its numpy values into plain JSON
    drifts = _column_drifts(result, set(numerical))
    missing = set(columns) - set(drifts)
    if missing:
        raise RuntimeError(f"Evidently's report has no drift result for {sorted(missing)}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "input_drift.html", out_dir / "input_drift.json"
    # Evidently's page has no <title>; a browser tab of several reports needs one.
    page = snapshot.get_html_str(as_iframe=False).replace("<head>", f"<head><title>{html.escape(title)}</title>", 1)
    html_path.write_text(page, encoding="utf-8")
    json_path.write_text(json.dumps({"title": title, "rows_reference": len(reference), "rows_current": len(current),
                                     **result}), encoding="utf-8")

    drifted = [name for name in columns if drifts[name].drifted]
    return DriftSummary(title=title, drifted_share=len(drifted) / len(columns), drifted_columns=drifted,
                        columns={name: drifts[name] for name in columns}, html=str(html_path), json=str(json_path),
                        rows_reference=len(reference), rows_current=len(current))


def release_drift_report(model: str, release_id: str, candidate_version: str, since: float, until: float,
                         out_dir: Path, settings=None) -> DriftSummary | None:
    """Input drift of the traffic the candidate saw in this release against its reference data; None without traffic."""
    from releasegate import storage

    engine = storage.engine(settings.db_url) if settings is not None else storage.engine()
    # The candidate's own rows: every mirrored request in shadow, its share in a canary.
    current = read_logged_inputs(model, since, until, release_id=release_id, arm="candidate", engine=engine)
    if current.empty:
        log.info("no drift report for %s release %s: no candidate traffic logged between %s and %s",
                 model, release_id, since, until)
        return None
    import pandas as pd

    from releasegate import registry  # MLflow is slow to import; a window without traffic never needs it

    with tempfile.TemporaryDirectory(prefix="releasegate-reference-") as tmp:
        path = registry.download_artifact(model, candidate_version, REFERENCE_ARTIFACT, dst=tmp, settings=settings)
        reference = pd.read_parquet(path)
    title = f"Input drift: {model} v{candidate_version}, release {release_id}"
    return input_drift(reference, current, Path(out_dir), title=title)


def _column_kinds(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Shared columns split into numerical and categorical by dtype, in the reference's order."""
    for name, frame in (("reference", reference), ("current", current)):
        if frame.empty:
            raise ValueError(f"the {name} data is empty")
    shared = [c for c in reference.columns if c in set(current.columns)]
    if not shared:
        raise ValueError(f"reference and current data share no column: reference has {list(reference.columns)}, "
                         f"current has {list(current.columns)}")
    numerical, categorical = [], []
    for column in shared:
        ref_numeric, cur_numeric = _is_numeric(reference[column]), _is_numeric(current[column])
        if ref_numeric != cur_numeric:
            raise ValueError(f"column {column!r} is {reference[column].dtype} in the reference "
                             f"but {current[column].dtype} in the current data")
        (numerical if ref_numeric else categorical).append(column)
    return numerical, categorical


def _is_numeric(series: pd.Series) -> bool:
    import pandas as pd

    # Booleans are categories to a drift test, though pandas counts them as numbers.
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _column_drifts(result: dict, numerical: set[str]) -> dict[str, ColumnDrift]:
    """ColumnDrift per column from Evidently's ValueDrift metrics and their pass/fail tests."""
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL" for t in result["tests"]
              if t["metric_config"]["params"].get("type") == "evidently:metric_v2:ValueDrift"}
    drifts = {}
    for metric in result["metrics"]:
        config = metric["config"]
        if config.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        column = config["column"]
        drifts[column] = ColumnDrift(score=float(metric["value"]), method=config["method"],
                                     threshold=float(config["threshold"]), drifted=failed[metric["id"]],
                                     kind="numerical" if column in numerical else "categorical")
    return drifts


def _import_evidently() -> SimpleNamespace:
    """The Evidently names we use, imported with its usage telemetry switched off."""
    # Only Evidently's UI service reports usage today; the switch costs nothing if that changes.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    return SimpleNamespace(DataDefinition=DataDefinition, Dataset=Dataset, Report=Report,
                           DataDriftPreset=DataDriftPreset)
