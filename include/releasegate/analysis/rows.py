"""Logged predictions and feedback as analysable rows: one per (request, input row, arm), with its label and value."""

from __future__ import annotations

import math

import orjson
import pandas as pd

from releasegate.analysis import labels as lab
from releasegate.contract import ARMS, CallStatus
from releasegate.policy import Policy

PREDICTION_COLUMNS = ("request_id", "time", "arm", "routing_key_hash", "fallback", "outputs", "latency_ms", "status")
FEEDBACK_COLUMNS = ("request_id", "time", "ground_truth")

Labels = dict[tuple[str, int], lab.Scalar]


def require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns))
        raise ValueError(f"{what} frame lacks column(s) {', '.join(missing)} (has: {have})")


def require_logged(preds: pd.DataFrame, feedback: pd.DataFrame, policy: Policy) -> None:
    """The columns the analysis reads, as storage.predictions and storage.feedback hold them."""
    require(preds, PREDICTION_COLUMNS + (("inputs",) if policy.slices else ()), "predictions")
    require(feedback, FEEDBACK_COLUMNS, "feedback")


def labels(feedback: pd.DataFrame) -> Labels:
    """(request_id, row of the request) → label, the latest feedback winning."""
    out: Labels = {}
    parsed: dict[object, list[lab.Scalar | None]] = {}  # few distinct label texts: parse each once
    for request_id, truth in feedback.sort_values("time", kind="stable")[["request_id", "ground_truth"]].itertuples(
        index=False
    ):
        if truth not in parsed:
            parsed[truth] = lab.per_row(truth)
        for rank, label in enumerate(parsed[truth]):
            if label is not None:
                out[(str(request_id), rank)] = label
    return out


def rows(preds: pd.DataFrame, feedback: pd.DataFrame, policy: Policy) -> pd.DataFrame:
    """One row per (request, input row, arm) with parsed output, label, error flag, metric value and slice values."""
    require_logged(preds, feedback, policy)
    by_request = labels(feedback)
    df = preds.sort_values(["time"] + (["id"] if "id" in preds.columns else []), kind="stable").copy()
    unknown = set(df["arm"].unique()) - set(ARMS)
    if unknown:
        raise ValueError(f"predictions have unknown arm(s) {sorted(unknown)}; expected champion or candidate")
    df["request_id"] = df["request_id"].astype(str)
    # A request with several input rows logs one row per input row and arm, in order.
    df["rank"] = df.groupby(["request_id", "arm"]).cumcount()
    # Every status but ok is the model's failure: an error, a timeout, or a micro-batch call that failed.
    df["error"] = df["status"] != CallStatus.ok
    df["fallback"] = df["fallback"].fillna(False).astype(bool)
    parsed: dict[object, lab.Scalar | None] = {}  # outputs repeat a handful of texts: parse each once
    df["out"] = [
        (parsed[o] if o in parsed else parsed.setdefault(o, lab.scalar(o))) if ok else None
        for o, ok in zip(df["outputs"], ~df["error"], strict=True)
    ]
    df["label"] = [by_request.get(key) for key in zip(df["request_id"], df["rank"], strict=True)]
    df["latency_ms"] = pd.to_numeric(df["latency_ms"], errors="coerce")
    df["value"] = primary_values(df["out"], df["label"], policy.primary.metric)
    if policy.slices:
        # Slices only look at labelled rows: parse just their inputs.
        records = {i: _record(df.at[i, "inputs"]) for i in df.index[df["label"].notna()]}
        for feature in policy.slices:
            df[f"slice:{feature}"] = pd.Series({i: _feature(r, feature) for i, r in records.items()}, dtype=object)
    return df.drop(columns=[c for c in ("outputs", "inputs") if c in df.columns]).reset_index(drop=True)


def primary_values(outs: pd.Series, truth: pd.Series, metric: str) -> list[float | None]:
    """Per-row primary metric; None where the row has no label or no usable output."""
    values: list[float | None] = []
    for out, label in zip(outs, truth, strict=True):
        if label is None or out is None:
            values.append(None if label is None else (0.0 if metric == "accuracy" else None))
        elif metric == "accuracy":
            values.append(float(out == label))
        elif isinstance(out, str) or isinstance(label, str):
            raise ValueError(f"primary metric {metric} needs numeric outputs and labels, got {out!r} and {label!r}")
        elif metric == "absolute_error":
            values.append(abs(out - label))
        elif metric == "squared_error":
            values.append((out - label) ** 2)
        else:  # log_loss: binary labels, the output is the probability of class 1
            if not 0 <= out <= 1 or label not in (0.0, 1.0):
                raise ValueError(
                    f"log_loss needs the probability of class 1 as output and a 0/1 label, got {out!r} and {label!r}"
                )
            p = min(max(out, 1e-15), 1 - 1e-15)
            values.append(-math.log(p if label == 1.0 else 1 - p))
    return values


def _record(inputs: object) -> dict[str, object] | None:
    if not isinstance(inputs, (str, bytes)):
        return inputs if isinstance(inputs, dict) else None
    try:
        record = orjson.loads(inputs)
    except orjson.JSONDecodeError:
        return None
    if isinstance(record, list) and len(record) == 1:
        record = record[0]
    return record if isinstance(record, dict) else None


def _feature(record: dict[str, object] | None, feature: str) -> str | None:
    value = None if record is None else record.get(feature)
    return None if value is None else str(value)
