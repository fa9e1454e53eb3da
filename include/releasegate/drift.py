"""Input drift: Evidently reports comparing logged traffic with a model version's reference data.

Logged traffic is read from `predictions` with a uniform sample drawn in SQL: every row
carries `sample_bucket` (0-999, a hash of its request id), so keeping the rows with
`sample_bucket < k` keeps about k/1000 of the requests (both arms of a request alike)
without the database or Python touching the rest. `k` comes from a COUNT of the window
first, so a window of any size yields at most `max_rows` rows.

Drift is decided by tests, not distances: Kolmogorov-Smirnov on numerical columns and
chi-square on categorical ones, each at `alpha / columns` (Bonferroni), so a report of 30
undrifted columns raises a false alarm in at most `alpha` (1 %) of runs. The sample size keeps
their power: with 20,000 rows on each side and 30 columns, K-S flags a mean shift of 0.1
standard deviations (its statistic, about 0.04, is twice the critical 0.021) and chi-square a
5-point change in a category's share (z about 10) almost surely, while reading and testing a
sample costs seconds and bounded memory whatever the day's traffic. Evidently's defaults
(Wasserstein and Jensen-Shannon distances with a 0.1 cut above 1,000 rows) miss shifts that
small; larger samples would only make harmless shifts significant.

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
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel

if TYPE_CHECKING:
    import pandas as pd
    from evidently import Dataset
    from evidently.core.report import Snapshot

    from releasegate.settings import Settings

log = logging.getLogger(__name__)

ARMS = ("champion", "candidate")
BUCKETS = 1000  # sample_bucket takes the values 0..BUCKETS-1
REFERENCE_ARTIFACT = "releasegate/reference.parquet"
DRIFT_ALPHA = 0.01  # family-wise false-alarm level of one report, split evenly over its columns
NUM_METHOD, CAT_METHOD = "ks", "chisquare"
MAX_ROWS = 20_000  # per side; see the module docstring for the power this keeps
# Outputs with at most this many distinct whole values are class labels, compared as categories.
MAX_CLASSES = 20


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
        json: str  # type: ignore[assignment]  # the field deliberately hides pydantic's deprecated json()
        rows_reference: int
        rows_current: int

    class QualitySummary(BaseModel):
        """The numbers of one quality report (Evidently classification or regression preset) and its files."""

        title: str
        task: str  # classification | regression
        metrics: dict[str, float]
        reference_metrics: dict[str, float] | None
        html: str
        json: str  # type: ignore[assignment]  # the field deliberately hides pydantic's deprecated json()
        rows_reference: int
        rows_current: int


def read_logged_inputs(
    model: str,
    since: float,
    until: float,
    release_id: str | None = None,
    arm: str | None = None,
    max_rows: int = MAX_ROWS,
    engine: sa.Engine | None = None,
) -> pd.DataFrame:
    """The logged inputs of `model` in [since, until), one row per request, a uniform sample of at most `max_rows`.

    Rows are the served ones, or those of `arm` when given; the frame is indexed by request id and
    `frame.attrs` records the requests in the window and the sampled fraction.
    """
    from releasegate import storage

    _check_window(since, until, max_rows)
    if arm is not None and arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    engine = engine if engine is not None else storage.engine()
    p = storage.predictions
    where = [
        p.c.model == model,
        p.c.time >= since,
        p.c.time < until,
        p.c.inputs.is_not(None),
        p.c.arm == arm if arm is not None else p.c.served.is_(True),
    ]
    if release_id is not None:
        where.append(p.c.release_id == release_id)

    with engine.connect() as conn:
        requests = conn.execute(sa.select(sa.func.count(sa.distinct(p.c.request_id))).where(*where)).scalar_one()
        buckets = _buckets(requests, max_rows)
        # A batch request logs one row per input row under one request id; keep its first, as
        # the feedback and the analysis count requests.
        first_rows = sa.select(sa.func.min(p.c.id)).where(*where, p.c.sample_bucket < buckets).group_by(p.c.request_id)
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


def _expand_inputs(rows: Sequence[sa.Row[str, str]]) -> pd.DataFrame:
    import orjson
    import pandas as pd

    ids: list[str] = []
    records: list[dict[str, Any]] = []
    unreadable = 0
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


def input_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: Path,
    title: str = "Input drift",
    alpha: float = DRIFT_ALPHA,
    name: str = "input_drift",
    decrypt: frozenset[str] = frozenset(),
) -> DriftSummary:
    """Evidently's DataDriftPreset (K-S / chi-square at alpha/columns) over the shared columns; writes
    `<name>.html` and `<name>.json` in out_dir. Encrypted columns are left out unless `decrypt` names them
    (the model's `decrypt_in_reports`)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    from releasegate import privacy

    # Logged traffic holds classified columns in their logged form: the reference is put in the same form
    # (its values' tokens; an encrypted column is opened if allowed, else left out of both), so like is compared
    # with like.
    reference, current = privacy.align(reference, current, decrypt=decrypt)
    numerical, categorical = _column_kinds(reference, current)
    columns = numerical + categorical
    evidently = _import_evidently()
    definition = evidently.DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    preset = evidently.DataDriftPreset(
        columns=columns, num_method=NUM_METHOD, cat_method=CAT_METHOD, threshold=alpha / len(columns)
    )
    report = evidently.Report([preset], include_tests=True)
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

    html_path, json_path = _save(
        snapshot, result, Path(out_dir), name, title, {"rows_reference": len(reference), "rows_current": len(current)}
    )
    drifted = [column for column in columns if drifts[column].drifted]
    return DriftSummary(
        title=title,
        drifted_share=len(drifted) / len(columns),
        drifted_columns=drifted,
        columns={column: drifts[column] for column in columns},
        html=str(html_path),
        json=str(json_path),
        rows_reference=len(reference),
        rows_current=len(current),
    )


class DriftStatistics(BaseModel):
    """The numbers of `input_drift` without its report: per-column tests, the drifted share, the sample sizes."""

    drifted_share: float
    drifted_columns: list[str]
    columns: dict[str, ColumnDrift]
    rows_reference: int
    rows_current: int


def input_drift_statistics(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    alpha: float = DRIFT_ALPHA,
    decrypt: frozenset[str] = frozenset(),
) -> DriftStatistics:
    """`input_drift`'s verdict per column, computed as Evidently computes it (scipy's K-S and chi-square on the
    values left after dropping missing and infinite ones) but without Evidently: no report, no plots, no import
    of it, so a check every few minutes costs a fraction of a second (docs/drift.md, "Near-real-time watch")."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    from releasegate import privacy

    reference, current = privacy.align(reference, current, decrypt=decrypt)
    numerical, categorical = _column_kinds(reference, current)
    columns = numerical + categorical
    threshold = alpha / len(columns)
    drifts = {}
    for column in columns:
        ref, cur = _present(reference[column], column, "reference"), _present(current[column], column, "current")
        if column in numerical:
            score, drifted = _ks(ref, cur, threshold)
        else:
            score, drifted = _chisquare(ref, cur, threshold)
        drifts[column] = ColumnDrift(
            score=score,
            method=NUM_METHOD if column in numerical else CAT_METHOD,
            threshold=threshold,
            kind="numerical" if column in numerical else "categorical",
            drifted=drifted,
        )
    drifted_columns = [column for column in columns if drifts[column].drifted]
    return DriftStatistics(
        drifted_share=len(drifted_columns) / len(columns),
        drifted_columns=drifted_columns,
        columns=drifts,
        rows_reference=len(reference),
        rows_current=len(current),
    )


def _present(values: pd.Series, column: str, side: str) -> pd.Series:
    """The column without missing or infinite values, as Evidently tests it; an empty one is refused as it refuses."""
    import numpy as np

    kept = values.replace([-np.inf, np.inf], np.nan).dropna()
    if kept.empty:
        raise ValueError(f"column {column!r} has no values in the {side} data")
    return kept


def _ks(reference: pd.Series, current: pd.Series, threshold: float) -> tuple[float, bool]:
    """Two-sided two-sample Kolmogorov-Smirnov p-value; drift at p <= threshold (Evidently's `ks`)."""
    from scipy.stats import ks_2samp

    p_value = float(ks_2samp(reference, current)[1])
    return p_value, p_value <= threshold


def _chisquare(reference: pd.Series, current: pd.Series, threshold: float) -> tuple[float, bool]:
    """Chi-square of the current category counts against the reference shares; drift at p < threshold
    (Evidently's `chisquare`)."""
    from scipy.stats import chisquare

    ref_counts, cur_counts = reference.value_counts(), current.value_counts()
    keys = list(dict.fromkeys([*cur_counts.index, *ref_counts.index]))
    scale = len(current) / len(reference)
    expected = [float(ref_counts.get(key, 0)) * scale for key in keys]
    observed = [float(cur_counts.get(key, 0)) for key in keys]
    p_value = float(chisquare(observed, expected)[1])
    return p_value, p_value < threshold


def _save(
    snapshot: Snapshot, result: dict[str, Any], out_dir: Path, name: str, title: str, extra: dict[str, Any]
) -> tuple[Path, Path]:
    """Write an Evidently snapshot as `<name>.html` (titled) and `<name>.json` (with `extra` on top)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / f"{name}.html", out_dir / f"{name}.json"
    # Evidently's page has no <title>; a browser tab of several reports needs one.
    page = snapshot.get_html_str(as_iframe=False).replace("<head>", f"<head><title>{html.escape(title)}</title>", 1)
    html_path.write_text(page, encoding="utf-8")
    json_path.write_text(json.dumps({"title": title, **extra, **result}), encoding="utf-8")
    return html_path, json_path


# --- prediction drift: champion and candidate on the same mirrored requests -------------------------


def read_shadow_pairs(
    model: str,
    since: float,
    until: float,
    release_id: str | None = None,
    max_rows: int = MAX_ROWS,
    engine: sa.Engine | None = None,
) -> pd.DataFrame:
    """Both arms' outputs for the shadowed requests of `model` in [since, until) answered by both, sampled
    like `read_logged_inputs`; columns champion, candidate (scalars) and their versions, indexed by request id."""
    import pandas as pd

    from releasegate import storage
    from releasegate.analysis.labels import scalar
    from releasegate.contract import CallStatus, Mode

    _check_window(since, until, max_rows)
    engine = engine if engine is not None else storage.engine()
    p = storage.predictions
    where = [
        p.c.model == model,
        p.c.time >= since,
        p.c.time < until,
        p.c.mode == Mode.shadow,
        p.c.status == CallStatus.ok,
        p.c.outputs.is_not(None),
    ]
    if release_id is not None:
        where.append(p.c.release_id == release_id)
    with engine.connect() as conn:
        requests = conn.execute(
            sa.select(sa.func.count(sa.distinct(p.c.request_id))).where(*where, p.c.arm == "candidate")
        ).scalar_one()
        buckets = _buckets(requests, max_rows)
        rows = conn.execute(
            sa.select(p.c.request_id, p.c.arm, p.c.version, p.c.outputs)
            .where(*where, p.c.sample_bucket < buckets)
            .order_by(p.c.id)
        ).all()
    columns = ["champion", "candidate", "champion_version", "candidate_version"]
    if not rows:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="request_id"))
    frame = pd.DataFrame(rows, columns=["request_id", "arm", "version", "outputs"])
    # A batch request has one row per input row under one id; its first row stands for it, as for inputs.
    frame = frame.drop_duplicates(["request_id", "arm"])
    frame["value"] = [scalar(o) for o in frame["outputs"]]
    wide = frame.pivot(index="request_id", columns="arm", values=["value", "version"])
    if "champion" not in wide["value"] or "candidate" not in wide["value"]:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="request_id"))
    pairs = pd.DataFrame(
        {
            "champion": wide["value"]["champion"],
            "candidate": wide["value"]["candidate"],
            "champion_version": wide["version"]["champion"],
            "candidate_version": wide["version"]["candidate"],
        }
    ).dropna()
    pairs = pairs.sort_index().head(max_rows)
    pairs.attrs.update({"requests_in_window": int(requests), "sampled_fraction": buckets / BUCKETS})
    return pairs


def prediction_drift(
    pairs: pd.DataFrame, out_dir: Path, title: str = "Prediction drift", alpha: float = DRIFT_ALPHA
) -> DriftSummary:
    """Drift of the candidate's outputs against the champion's on the same requests (`read_shadow_pairs`);
    writes prediction_drift.html and .json."""
    import pandas as pd

    if pairs.empty:
        raise ValueError("no shadowed request has answers from both arms")
    champion, candidate = _as_labels(pairs["champion"]), _as_labels(pairs["candidate"])
    return input_drift(
        pd.DataFrame({"prediction": champion}),
        pd.DataFrame({"prediction": candidate}),
        out_dir,
        title=title,
        alpha=alpha,
        name="prediction_drift",
    )


def _as_labels(values: pd.Series) -> pd.Series:
    """Few whole numbers are class labels (a category to the drift test); anything else stays as it is."""
    import pandas as pd

    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        return values.astype(str)
    if (numbers == numbers.round()).all() and numbers.nunique() <= MAX_CLASSES:
        return numbers.astype("int64").astype(str)
    return numbers.astype("float64")


# --- quality where feedback labels exist ------------------------------------------------------------


def read_labelled(
    model: str,
    since: float,
    until: float,
    version: str | None = None,
    max_rows: int = MAX_ROWS,
    engine: sa.Engine | None = None,
    decrypt_labels: bool = False,
) -> pd.DataFrame:
    """Served answers of `model` (of `version` when given) in [since, until) that have feedback, sampled like
    `read_logged_inputs`; columns target and prediction, indexed by request id. Encrypted labels are opened
    with `decrypt_labels` (the model's `decrypt_in_reports` names `ground_truth`), else their requests are left
    out and counted in attrs["encrypted_labels"]."""
    import pandas as pd

    from releasegate import storage
    from releasegate.analysis.labels import per_row, scalar

    _check_window(since, until, max_rows)
    engine = engine if engine is not None else storage.engine()
    p, f = storage.predictions, storage.feedback
    where = [
        p.c.model == model,
        p.c.time >= since,
        p.c.time < until,
        p.c.served.is_(True),
        p.c.status == "ok",
        p.c.outputs.is_not(None),
    ]
    if version is not None:
        where.append(p.c.version == str(version))
    labelled = sa.select(f.c.request_id)
    with engine.connect() as conn:
        requests = conn.execute(
            sa.select(sa.func.count(sa.distinct(p.c.request_id))).where(*where, p.c.request_id.in_(labelled))
        ).scalar_one()
        buckets = _buckets(requests, max_rows)
        rows = conn.execute(
            sa.select(p.c.request_id, p.c.outputs, f.c.ground_truth)
            .join(f, f.c.request_id == p.c.request_id)
            .where(*where, p.c.sample_bucket < buckets)
            .order_by(p.c.id, f.c.id)
        ).all()
    from releasegate.privacy import ENCRYPTED_PREFIX, open_truths

    records: dict[str, dict[str, Any]] = {}
    encrypted = set() if decrypt_labels else {r[0] for r in rows if r[2].startswith('"' + ENCRYPTED_PREFIX)}
    if encrypted:
        rows = [row for row in rows if row[0] not in encrypted]
    truths = open_truths(row[2] for row in rows)
    for (request_id, outputs, _), truth in zip(rows, truths, strict=True):
        # First row of a request, latest feedback for it wins (a client may correct a label).
        target = per_row(truth)[0]
        if request_id in records:
            records[request_id]["target"] = target if target is not None else records[request_id]["target"]
            continue
        records[request_id] = {"prediction": scalar(outputs), "target": target}
    frame = pd.DataFrame.from_dict(records, orient="index", columns=["target", "prediction"]).dropna()
    frame.index.name = "request_id"
    frame = frame.sort_index().head(max_rows)
    frame.attrs.update(
        {
            "requests_in_window": int(requests),
            "sampled_fraction": buckets / BUCKETS,
            "encrypted_labels": len(encrypted),
        }
    )
    return frame


def quality(
    current: pd.DataFrame, out_dir: Path, title: str = "Quality", reference: pd.DataFrame | None = None
) -> QualitySummary:
    """Evidently's ClassificationPreset (class labels) or RegressionPreset on target/prediction frames;
    writes quality.html and .json."""
    import pandas as pd

    for name, frame in (("current", current), ("reference", reference)):
        if frame is None:
            continue
        if frame.empty:
            raise ValueError(f"the {name} data has no labelled rows")
        missing = {"target", "prediction"} - set(frame.columns)
        if missing:
            raise ValueError(f"the {name} data lacks column(s) {sorted(missing)}")
    frames = [current] + ([reference] if reference is not None else [])
    both = pd.concat([f["target"] for f in frames] + [f["prediction"] for f in frames])
    classes = _as_labels(both)
    is_classification = classes.dtype == object
    evidently = _import_evidently()
    if is_classification:
        labels = sorted(set(classes))
        kind = evidently.BinaryClassification if len(labels) <= 2 else evidently.MulticlassClassification
        options = {"pos_label": labels[-1]} if len(labels) == 2 and kind is evidently.BinaryClassification else {}
        definition = evidently.DataDefinition(
            classification=[kind(target="target", prediction_labels="prediction", **options)],
            categorical_columns=["target", "prediction"],
        )
        preset = evidently.ClassificationPreset()
    else:
        definition = evidently.DataDefinition(
            regression=[evidently.Regression(target="target", prediction="prediction")],
            numerical_columns=["target", "prediction"],
        )
        preset = evidently.RegressionPreset()

    def dataset(frame: pd.DataFrame) -> Dataset:
        frame = frame[["target", "prediction"]].reset_index(drop=True)
        if is_classification:
            frame = frame.apply(_as_labels).astype(str)
        return evidently.Dataset.from_pandas(frame, data_definition=definition)

    snapshot = evidently.Report([preset], include_tests=False).run(
        dataset(current), dataset(reference) if reference is not None else None, name=title
    )
    result = json.loads(snapshot.json())
    html_path, json_path = _save(
        snapshot,
        result,
        Path(out_dir),
        "quality",
        title,
        {"rows_reference": 0 if reference is None else len(reference), "rows_current": len(current)},
    )
    reference_metrics = None
    if reference is not None:
        # Evidently's JSON carries the current side's values only; the reference's few headline numbers are cheap.
        reference_metrics = _headline(reference, is_classification)
    return QualitySummary(
        title=title,
        task="classification" if is_classification else "regression",
        metrics=_scalar_metrics(result),
        reference_metrics=reference_metrics,
        html=str(html_path),
        json=str(json_path),
        rows_reference=0 if reference is None else len(reference),
        rows_current=len(current),
    )


def _headline(frame: pd.DataFrame, is_classification: bool) -> dict[str, float]:
    import numpy as np

    if is_classification:
        return {"accuracy": float((_as_labels(frame["target"]) == _as_labels(frame["prediction"])).mean())}
    error = frame["prediction"].astype(float) - frame["target"].astype(float)
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean()))}


def _scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Evidently's single-number metrics by snake-case name (Accuracy -> accuracy, MeanError -> mean_error)."""
    import re

    metrics = {}
    for metric in result["metrics"]:
        value = metric["value"]
        if isinstance(value, dict) and "mean" in value:  # regression errors come as mean and std
            value = value["mean"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            name = metric["config"]["type"].rsplit(":", 1)[-1]
            metrics[re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", name).lower()] = float(value)
    return metrics


def _check_window(since: float, until: float, max_rows: int) -> None:
    if until <= since:
        raise ValueError(f"empty time window: until ({until}) must be after since ({since})")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")


def _buckets(requests: int, max_rows: int) -> int:
    """How many of the 1000 sample buckets keep about `max_rows` of `requests` requests."""
    return BUCKETS if requests <= max_rows else max(1, math.floor(BUCKETS * max_rows / requests))


def release_drift_report(
    model: str,
    release_id: str,
    candidate_version: str,
    since: float,
    until: float,
    out_dir: Path,
    settings: Settings | None = None,
) -> DriftSummary | None:
    """Input drift of the traffic the candidate saw in this release against its reference data; None without traffic."""
    from releasegate import storage

    engine = storage.engine(settings.db_url) if settings is not None else storage.engine()
    # The candidate's own rows: every mirrored request in shadow, its share in a canary.
    current = read_logged_inputs(model, since, until, release_id=release_id, arm="candidate", engine=engine)
    if current.empty:
        log.info(
            "no drift report for %s release %s: no candidate traffic logged between %s and %s",
            model,
            release_id,
            since,
            until,
        )
        return None

    from releasegate import registry  # MLflow is slow to import; a window without traffic never needs it

    with tempfile.TemporaryDirectory(prefix="releasegate-reference-") as tmp:
        reference = registry.read_frame(model, candidate_version, REFERENCE_ARTIFACT, dst=tmp, settings=settings)
    title = f"Input drift: {model} v{candidate_version}, release {release_id}"
    from releasegate import privacy

    allowed = privacy.report_allowance(model, settings)
    return input_drift(reference, current, Path(out_dir), title=title, decrypt=allowed)


def _column_kinds(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Shared columns split into numerical and categorical by dtype, in the reference's order."""
    for name, frame in (("reference", reference), ("current", current)):
        if frame.empty:
            raise ValueError(f"the {name} data is empty")
    shared = [c for c in reference.columns if c in set(current.columns)]
    if not shared:
        raise ValueError(
            f"reference and current data share no column: reference has {list(reference.columns)}, "
            f"current has {list(current.columns)}"
        )
    numerical: list[str] = []
    categorical: list[str] = []
    for column in shared:
        ref_numeric, cur_numeric = _is_numeric(reference[column]), _is_numeric(current[column])
        if ref_numeric != cur_numeric:
            raise ValueError(
                f"column {column!r} is {reference[column].dtype} in the reference "
                f"but {current[column].dtype} in the current data"
            )
        (numerical if ref_numeric else categorical).append(column)
    return numerical, categorical


def _is_numeric(series: pd.Series) -> bool:
    import pandas as pd

    # Booleans are categories to a drift test, though pandas counts them as numbers.
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _column_drifts(result: dict[str, Any], numerical: set[str]) -> dict[str, ColumnDrift]:
    """ColumnDrift per column from Evidently's ValueDrift metrics and their pass/fail tests."""
    failed = {
        t["metric_config"]["metric_id"]: t["status"] == "FAIL"
        for t in result["tests"]
        if t["metric_config"]["params"].get("type") == "evidently:metric_v2:ValueDrift"
    }
    drifts = {}
    for metric in result["metrics"]:
        config = metric["config"]
        if config.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        column = config["column"]
        drifts[column] = ColumnDrift(
            score=float(metric["value"]),
            method=config["method"],
            threshold=float(config["threshold"]),
            drifted=failed[metric["id"]],
            kind="numerical" if column in numerical else "categorical",
        )
    return drifts


def _import_evidently() -> SimpleNamespace:
    """The Evidently names we use, imported with its usage telemetry switched off."""
    # Only Evidently's UI service reports usage today; the switch costs nothing if that changes.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")
    from evidently import (
        BinaryClassification,
        DataDefinition,
        Dataset,
        MulticlassClassification,
        Regression,
        Report,
    )
    from evidently.presets import ClassificationPreset, DataDriftPreset, RegressionPreset

    return SimpleNamespace(
        DataDefinition=DataDefinition,
        Dataset=Dataset,
        Report=Report,
        DataDriftPreset=DataDriftPreset,
        ClassificationPreset=ClassificationPreset,
        RegressionPreset=RegressionPreset,
        BinaryClassification=BinaryClassification,
        MulticlassClassification=MulticlassClassification,
        Regression=Regression,
    )
