"""Input drift: logged inputs read back from a real predictions table, and Evidently's verdict on planted shifts."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest

from releasegate import drift, storage
from releasegate.serving.routing import sample_bucket

T0 = 1_700_000_000.0
REGIONS = ["north", "south", "east", "west"]


def _customers(
    n: int, seed: int, charges_shift_sd: float = 0.0, regions: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(45, 12, n).round(1),
            "tenure_months": rng.integers(1, 72, n),
            "monthly_charges": rng.normal(70 + 20 * charges_shift_sd, 20, n),
            "region": rng.choice(REGIONS, n, p=regions),
            "plan": rng.choice(["basic", "plus", "premium"], n, p=[0.5, 0.3, 0.2]),
        }
    )


def _row(
    request_id: str,
    time: float,
    inputs: dict | str | None,
    *,
    model="churn",
    version="1",
    arm="champion",
    mode="single",
    release_id=None,
    served=True,
) -> dict:
    return {
        "request_id": request_id,
        "time": time,
        "model": model,
        "version": version,
        "arm": arm,
        "mode": mode,
        "release_id": release_id,
        "routing_key_hash": request_id[:16],
        "sample_bucket": sample_bucket(request_id),
        "served": served,
        "fallback": False,
        "inputs": inputs if isinstance(inputs, str) or inputs is None else json.dumps(inputs),
        "outputs": "0",
        "latency_ms": 3.0,
        "status": "ok",
        "error": None,
    }


def _log(rows: list[dict]) -> None:
    with storage.engine().begin() as conn:
        conn.execute(storage.predictions.insert(), rows)


@pytest.fixture
def shadow_log(rg_home):
    """Ten shadowed requests in release r1 (a served champion row and a mirrored candidate row each), plus noise."""
    rows = []
    for i in range(10):
        inputs = {"age": 30 + i, "monthly_charges": 50.5 + i, "region": REGIONS[i % 4]}
        rows.append(_row(f"req-{i}", T0 + i, inputs, mode="shadow", release_id="r1"))
        rows.append(
            _row(f"req-{i}", T0 + i, inputs, version="2", arm="candidate", mode="shadow", release_id="r1", served=False)
        )
    rows += [
        _row("late", T0 + 100, {"age": 99, "monthly_charges": 1.0, "region": "north"}, release_id="r1"),
        _row("other-model", T0 + 1, {"age": 99}, model="fraud"),
        _row("before-release", T0 + 2, {"age": 99, "monthly_charges": 1.0, "region": "north"}),
        _row("garbled", T0 + 3, "not json", release_id="r1"),
        _row("unlogged", T0 + 3, None, release_id="r1"),
    ]
    _log(rows)
    return rg_home


def test_logged_inputs_come_back_as_columns_one_row_per_request(shadow_log):
    frame = drift.read_logged_inputs("churn", T0, T0 + 50, release_id="r1")

    assert list(frame.columns) == ["age", "monthly_charges", "region"]
    assert sorted(frame.index) == sorted(f"req-{i}" for i in range(10))  # garbled and unlogged rows skipped
    assert frame.loc["req-3"].to_dict() == {"age": 33, "monthly_charges": 53.5, "region": "west"}
    assert pd.api.types.is_integer_dtype(frame["age"]) and pd.api.types.is_float_dtype(frame["monthly_charges"])
    assert frame.attrs["sampled_fraction"] == 1.0


def test_an_arm_reads_that_arms_rows_and_the_window_excludes_its_end(shadow_log):
    candidate = drift.read_logged_inputs("churn", T0, T0 + 5, release_id="r1", arm="candidate")
    assert sorted(candidate.index) == [f"req-{i}" for i in range(5)]
    # Without a release every served row of the model counts, the one before the release too.
    assert "before-release" in drift.read_logged_inputs("churn", T0, T0 + 50).index
    assert drift.read_logged_inputs("churn", T0 + 200, T0 + 300).empty


def test_a_batch_request_counts_once(rg_home):
    _log([_row("batch", T0, {"age": a}) for a in (20, 30, 40)] + [_row("single", T0, {"age": 50})])
    frame = drift.read_logged_inputs("churn", T0, T0 + 1)
    assert frame["age"].to_dict() == {"batch": 20, "single": 50}


def test_a_large_window_is_sampled_by_bucket_to_at_most_max_rows(rg_home):
    ids = [uuid.UUID(int=i).hex for i in range(3000)]
    _log([_row(rid, T0 + i / 10, {"age": i, "region": REGIONS[i % 4]}) for i, rid in enumerate(ids)])

    frame = drift.read_logged_inputs("churn", T0, T0 + 400, max_rows=500)

    # 500 of 3000 requests: buckets 0..165 of 1000, about 498 requests; never more than 500.
    assert 400 <= len(frame) <= 500 and frame.index.is_unique
    assert max(sample_bucket(rid) for rid in frame.index) < 166
    assert frame.attrs == {"requests_in_window": 3000, "sampled_fraction": 0.166}
    # The sample spans the whole window rather than its first rows.
    assert frame["age"].min() < 300 and frame["age"].max() > 2700


def test_bad_arguments_are_refused_by_name(rg_home):
    with pytest.raises(ValueError, match="until .* must be after since"):
        drift.read_logged_inputs("churn", T0, T0)
    with pytest.raises(ValueError, match="unknown arm 'blue'"):
        drift.read_logged_inputs("churn", T0, T0 + 1, arm="blue")
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        drift.read_logged_inputs("churn", T0, T0 + 1, max_rows=0)


def test_traffic_like_the_reference_shows_no_drift(tmp_path):
    summary = drift.input_drift(_customers(3000, seed=1), _customers(3000, seed=2), tmp_path)

    assert summary.drifted_columns == [] and summary.drifted_share == 0.0
    assert set(summary.columns) == {"age", "tenure_months", "monthly_charges", "region", "plan"}
    assert {c.kind for c in summary.columns.values()} == {"numerical", "categorical"}
    assert (summary.rows_reference, summary.rows_current) == (3000, 3000)


def test_a_planted_shift_is_found_in_exactly_the_shifted_columns(tmp_path):
    reference = _customers(3000, seed=1)
    current = _customers(3000, seed=2, charges_shift_sd=0.5, regions=(0.10, 0.40, 0.25, 0.25))
    current["session_id"] = range(3000)  # not in the reference: not compared

    summary = drift.input_drift(reference, current, tmp_path / "report", title="Churn <nightly>")

    assert summary.drifted_columns == ["monthly_charges", "region"]
    assert summary.drifted_share == pytest.approx(2 / 5)
    charges = summary.columns["monthly_charges"]
    assert charges.drifted and charges.kind == "numerical" and charges.method == "ks"
    assert charges.score < charges.threshold  # a p-value below the Bonferroni-corrected level
    assert "session_id" not in summary.columns
    page = (tmp_path / "report" / "input_drift.html").read_text()
    assert summary.html == str(tmp_path / "report" / "input_drift.html")
    assert "<title>Churn &lt;nightly&gt;</title>" in page and len(page) > 10_000
    saved = json.loads((tmp_path / "report" / "input_drift.json").read_text())
    assert saved["title"] == "Churn <nightly>" and saved["rows_current"] == 3000
    assert any(m["config"].get("column") == "region" for m in saved["metrics"])


def test_frames_that_cannot_be_compared_are_refused(tmp_path):
    reference = _customers(50, seed=1)
    with pytest.raises(ValueError, match="share no column"):
        drift.input_drift(reference, pd.DataFrame({"x": [1, 2]}), tmp_path)
    with pytest.raises(ValueError, match="current data is empty"):
        drift.input_drift(reference, reference.iloc[:0], tmp_path)
    with pytest.raises(ValueError, match="column 'age' is float64 in the reference but object"):
        drift.input_drift(reference, reference.assign(age="old"), tmp_path)


def test_a_release_without_candidate_traffic_has_no_report(shadow_log, settings, tmp_path, caplog):
    caplog.set_level("INFO", logger="releasegate.drift")
    assert drift.release_drift_report("churn", "r2", "2", T0, T0 + 50, tmp_path, settings=settings) is None
    assert "no candidate traffic" in caplog.text
    assert not (tmp_path / "input_drift.html").exists()


def test_a_release_report_compares_candidate_traffic_with_the_versions_reference(rg_home, settings, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # registered_model_name= registers there
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("drift", artifact_location=settings.mlflow_artifact_root.as_uri())
    _customers(2000, seed=1).to_parquet(tmp_path / "reference.parquet")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(tmp_path / "reference.parquet"), artifact_path="releasegate")
    client.create_registered_model("churn")
    version = client.create_model_version(
        "churn", source=f"{run.info.artifact_uri}/releasegate", run_id=run.info.run_id
    ).version
    live = _customers(2000, seed=2, charges_shift_sd=0.5, regions=(0.10, 0.40, 0.25, 0.25))
    _log(
        [
            _row(f"req-{i}", T0 + i / 100, inputs, version=version, arm="candidate", mode="canary", release_id="r1")
            for i, inputs in enumerate(live.to_dict("records"))
        ]
    )

    summary = drift.release_drift_report("churn", "r1", version, T0, T0 + 60, tmp_path / "out", settings=settings)

    assert summary.drifted_columns == ["monthly_charges", "region"]
    assert (summary.rows_reference, summary.rows_current) == (2000, 2000)
    assert f"churn v{version}, release r1" in summary.title
    assert (tmp_path / "out" / "input_drift.html").exists() and (tmp_path / "out" / "input_drift.json").exists()


def test_shadowed_requests_pair_the_champions_and_candidates_answers(shadow_log):
    pairs = drift.read_shadow_pairs("churn", T0, T0 + 50, release_id="r1")

    assert sorted(pairs.index) == sorted(f"req-{i}" for i in range(10))  # served-only rows have no pair
    assert set(pairs["champion_version"]) == {"1"} and set(pairs["candidate_version"]) == {"2"}
    assert (pairs["champion"] == pairs["candidate"]).all()
    assert drift.read_shadow_pairs("churn", T0 + 60, T0 + 70).empty


def test_a_candidate_that_answers_differently_shows_prediction_drift(tmp_path):
    rng = np.random.default_rng(3)
    pairs = pd.DataFrame(
        {
            "champion": rng.choice([0.0, 1.0], 3000, p=[0.7, 0.3]),
            "candidate": rng.choice([0.0, 1.0], 3000, p=[0.5, 0.5]),
        }
    )

    summary = drift.prediction_drift(pairs, tmp_path, title="Prediction drift")

    assert summary.drifted_columns == ["prediction"] and summary.columns["prediction"].kind == "categorical"
    assert (tmp_path / "prediction_drift.html").exists() and (tmp_path / "prediction_drift.json").exists()
    same = drift.prediction_drift(pairs.assign(candidate=pairs["champion"]), tmp_path / "same")
    assert same.drifted_columns == []


def test_feedback_labels_give_a_quality_report_against_the_reference(rg_home, tmp_path):
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 2, 1000)
    predicted = np.where(rng.random(1000) < 0.8, truth, 1 - truth)  # right 80 % of the time
    rows = [_row(f"q-{i}", T0 + i, {"age": 40}) | {"outputs": json.dumps([int(p)])} for i, p in enumerate(predicted)]
    _log(rows)
    with storage.engine().begin() as conn:
        conn.execute(
            storage.feedback.insert(),
            [
                {"request_id": f"q-{i}", "time": T0 + i + 1, "ground_truth": json.dumps({"churned": int(t)})}
                for i, t in enumerate(truth[:600])
            ],
        )

    labelled = drift.read_labelled("churn", T0, T0 + 2000, version="1")
    assert len(labelled) == 600 and list(labelled.columns) == ["target", "prediction"]
    reference = pd.DataFrame({"target": truth, "prediction": truth})
    summary = drift.quality(labelled, tmp_path, title="Quality", reference=reference)

    assert summary.task == "classification" and summary.rows_current == 600
    assert summary.metrics["accuracy"] == pytest.approx((predicted[:600] == truth[:600]).mean())
    assert summary.reference_metrics == {"accuracy": 1.0}
    assert {"precision", "recall", "f1_score"} <= set(summary.metrics)
    assert (tmp_path / "quality.html").exists() and (tmp_path / "quality.json").exists()


def test_encrypted_labels_reach_a_quality_report_only_where_the_classification_allows(rg_home):
    from releasegate.privacy import Protector
    from releasegate.settings import get_settings

    protector = Protector.of(get_settings())
    _log([_row(f"e-{i}", T0 + i, {"age": 40}) | {"outputs": json.dumps([i % 2])} for i in range(10)])
    _log([_row(f"p-{i}", T0 + 20 + i, {"age": 40}) | {"outputs": json.dumps([1])} for i in range(4)])
    with storage.engine().begin() as conn:
        conn.execute(
            storage.feedback.insert(),
            [  # six labels stored encrypted (their model's feedback classes), four in the clear (before the change)
                {"request_id": f"e-{i}", "time": T0 + i + 1, "ground_truth": json.dumps(protector.encrypt(i % 2))}
                for i in range(6)
            ]
            + [{"request_id": f"p-{i}", "time": T0 + 21 + i, "ground_truth": "1"} for i in range(4)],
        )

    kept_out = drift.read_labelled("churn", T0, T0 + 100)
    assert sorted(kept_out.index) == [f"p-{i}" for i in range(4)] and kept_out.attrs["encrypted_labels"] == 6
    opened = drift.read_labelled("churn", T0, T0 + 100, decrypt_labels=True)
    assert len(opened) == 10 and opened.attrs["encrypted_labels"] == 0
    assert (opened["target"] == opened["prediction"]).all()  # the opened labels are the values sent


def test_the_cheap_statistics_are_evidentlys_numbers_without_its_report(tmp_path):
    """What the near-real-time watch computes equals the nightly report's per-column verdicts, p-values and all."""
    reference = _customers(3000, seed=1)
    current = _customers(2000, seed=2, charges_shift_sd=0.5, regions=(0.10, 0.40, 0.25, 0.25))
    current.loc[current.index[:40], "age"] = np.nan  # missing values are left out by both
    current.loc[current.index[40:50], "monthly_charges"] = np.inf

    report = drift.input_drift(reference, current, tmp_path)
    cheap = drift.input_drift_statistics(reference, current)

    assert cheap.drifted_columns == report.drifted_columns == ["monthly_charges", "region"]
    assert cheap.drifted_share == report.drifted_share
    assert set(cheap.columns) == set(report.columns)
    for column, found in cheap.columns.items():
        expected = report.columns[column]
        assert (found.method, found.kind, found.drifted) == (expected.method, expected.kind, expected.drifted)
        assert found.threshold == pytest.approx(expected.threshold)
        assert found.score == pytest.approx(expected.score, rel=1e-9, abs=1e-300), column
    assert (cheap.rows_reference, cheap.rows_current) == (3000, 2000)


def test_the_cheap_statistics_refuse_a_column_without_values():
    reference = _customers(100, seed=1)
    with pytest.raises(ValueError, match="column 'age' has no values in the current data"):
        drift.input_drift_statistics(reference, reference.assign(age=np.nan))
