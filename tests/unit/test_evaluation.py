"""The offline gate's paired non-inferiority test: a candidate fails only when the data show it worse than the margin."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from releasegate import evaluation, policy
from releasegate.evaluation import compare_predictions, judge

Y = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0]
ALPHA = 0.05


def _paired(worse: int, better: int, same: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, candidate and champion: the candidate wrong where the champion is right on `worse` rows,
    the converse on `better` rows, both right on `same` rows."""
    y = np.ones(worse + better + same, dtype=int)
    cand, champ = y.copy(), y.copy()
    cand[:worse] = 0
    champ[worse : worse + better] = 0
    return y, cand, champ


def _policy(**offline) -> policy.Policy:
    return policy.parse({"name": "test", "slices": ["region"], "offline": {"margin": 0.01, **offline}})


def test_candidate_more_accurate_than_the_champion_passes():
    cand = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]  # 9 of 10 right
    champ = [1, 1, 0, 1, 0, 0, 1, 1, 1, 0]  # 7 of 10 right
    c = compare_predictions(Y, cand, champ, "accuracy", 0.01, alpha=ALPHA)
    assert (c.candidate, c.champion, c.rows) == (0.9, 0.7, 10)
    assert c.difference == pytest.approx(0.2) and c.passed
    assert c.lower < 0.2 < c.upper and c.level == pytest.approx(0.95) and c.p_value > 0.5


def test_a_shortfall_beyond_the_margin_on_many_rows_is_rejected():
    # 4 points worse on 2,000 rows: 100 rows lost, 20 won.
    c = compare_predictions(*_paired(100, 20, 1880), "accuracy", 0.01, alpha=ALPHA)
    assert c.difference == pytest.approx(-0.04) and not c.passed
    # The per-row differences are -1 (100), +1 (20), 0: sd 0.2417, se 0.0054, one-sided z 1.645.
    assert c.upper == pytest.approx(-0.04 + 1.6449 * 0.24173 / math.sqrt(2000), abs=1e-4)
    assert c.upper < -0.01 and c.p_value < ALPHA


def test_the_same_shortfall_on_few_rows_passes_for_want_of_evidence():
    # 4 points worse on 100 rows (5 lost, 1 won) is well within sampling error.
    c = compare_predictions(*_paired(5, 1, 94), "accuracy", 0.01, alpha=ALPHA)
    assert c.difference == pytest.approx(-0.04) and c.passed
    assert c.upper > -0.01 and c.p_value > ALPHA


def test_a_candidate_exactly_at_the_margin_is_rejected_about_alpha_of_the_time():
    # 500 holdouts of 600 rows on which the candidate is truly 1 point worse (6% of rows lost, 5% won).
    rng = np.random.default_rng(3)
    rejected = 0
    for _ in range(500):
        u = rng.random(600)
        y, cand, champ = np.ones(600, dtype=int), np.ones(600, dtype=int), np.ones(600, dtype=int)
        cand[u < 0.06], champ[(u >= 0.06) & (u < 0.11)] = 0, 0
        rejected += not compare_predictions(y, cand, champ, "accuracy", 0.01, alpha=ALPHA).passed
    assert 0.025 <= rejected / 500 <= 0.075, rejected  # binomial sd at 5%: 1 point


def test_candidate_worse_within_the_margin_passes():
    c = compare_predictions(*_paired(60, 50, 10_000), "accuracy", 0.01, alpha=ALPHA)
    assert c.difference == pytest.approx(-10 / 10_110) and c.passed


def test_identical_predictions_pass_with_zero_width_bounds():
    c = compare_predictions(Y, Y, Y, "accuracy", 0.0, alpha=ALPHA)
    assert c.passed and c.difference == c.lower == c.upper == 0.0 and c.p_value == 1.0


def test_for_loss_metrics_lower_is_better():
    # mae: candidate |errors| = 0,0,1 → 1/3; champion 1,1,1 → 1.
    c = compare_predictions([1.0, 2.0, 3.0], [1.0, 2.0, 4.0], [2.0, 3.0, 4.0], "mae", 0.0, alpha=ALPHA)
    assert (c.candidate, c.champion) == (pytest.approx(1 / 3), 1.0) and c.passed
    # rmse: sqrt((0 + 0 + 4) / 3) against sqrt(1) = 1; 0.155 worse on 3 rows is no evidence.
    r = compare_predictions([1.0, 2.0, 3.0], [1.0, 2.0, 5.0], [2.0, 3.0, 4.0], "rmse", 0.1, alpha=ALPHA)
    assert r.candidate == pytest.approx(math.sqrt(4 / 3)) and r.difference == pytest.approx(math.sqrt(4 / 3) - 1)
    assert r.passed and r.lower < 0.1


def test_mae_worse_on_every_row_is_rejected():
    y = np.arange(500, dtype=float)
    c = compare_predictions(y, y + 1.0 + 0.1 * (np.arange(500) % 3), y + 0.5, "mae", 0.2, alpha=ALPHA)
    assert c.difference == pytest.approx(0.6, abs=0.01) and not c.passed and c.lower > 0.2


def test_rmse_bounds_come_from_the_delta_method_and_match_a_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.normal(0, 1, 2000)
    champ = y + rng.normal(0, 1.0, 2000)
    worse, alike = y + rng.normal(0, 1.3, 2000), y + rng.normal(0, 1.02, 2000)
    bad = compare_predictions(y, worse, champ, "rmse", 0.1, alpha=ALPHA)
    assert bad.difference == pytest.approx(0.3, abs=0.06) and not bad.passed and bad.lower > 0.1
    assert compare_predictions(y, alike, champ, "rmse", 0.1, alpha=ALPHA).passed
    resampled = [
        evaluation.score(y[i], worse[i], "rmse") - evaluation.score(y[i], champ[i], "rmse")
        for i in (rng.integers(0, 2000, 2000) for _ in range(1000))
    ]
    z = (bad.upper - bad.lower) / 2 / np.std(resampled)
    assert z == pytest.approx(1.6449, rel=0.1)


def test_log_loss_and_roc_auc_score_probabilities():
    y = [1, 0]
    # log loss: -(ln 0.8 + ln 0.9) / 2 against -(ln 0.6 + ln 0.5) / 2.
    c = compare_predictions(y, [0.8, 0.1], [0.6, 0.5], "log_loss", 0.0, alpha=ALPHA)
    assert c.candidate == pytest.approx(-(math.log(0.8) + math.log(0.9)) / 2)
    assert c.champion == pytest.approx(-(math.log(0.6) + math.log(0.5)) / 2) and c.passed
    # roc_auc: the candidate ranks every positive above every negative (1.0); the champion ranks 2 of 4 pairs (0.5).
    auc = compare_predictions([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1], [0.9, 0.2, 0.3, 0.8], "roc_auc", 0.01, alpha=ALPHA)
    assert (auc.candidate, auc.champion, auc.passed) == (1.0, 0.5, True)


def test_roc_auc_bounds_are_delong_and_match_a_bootstrap():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random(1500) < 0.3).astype(int)
    champ = y + rng.normal(0, 1.0, 1500)
    worse = np.round(0.5 * champ + rng.normal(0, 1.0, 1500), 1)  # correlated with the champion, with ties
    c = compare_predictions(y, worse, champ, "roc_auc", 0.01, alpha=ALPHA)
    assert c.difference == pytest.approx(roc_auc_score(y, worse) - roc_auc_score(y, champ))
    assert c.difference < -0.05 and not c.passed and c.upper < -0.01
    resampled = [
        roc_auc_score(y[i], worse[i]) - roc_auc_score(y[i], champ[i])
        for i in (rng.integers(0, 1500, 1500) for _ in range(1000))
    ]
    assert (c.upper - c.lower) / 2 / np.std(resampled) == pytest.approx(1.6449, rel=0.1)
    # A reshuffled copy of the champion's scores with the same ranking is no worse.
    assert compare_predictions(y, champ * 2 + 1, champ, "roc_auc", 0.01, alpha=ALPHA).passed


def test_multiclass_roc_auc_and_log_loss_compare_class_probabilities():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 900)
    sharp, blunt = (rng.dirichlet([1, 1, 1], 900) + np.eye(3)[y] * k for k in (1.0, 0.2))
    sharp, blunt = sharp / sharp.sum(1, keepdims=True), blunt / blunt.sum(1, keepdims=True)
    for metric in ("roc_auc", "log_loss"):
        assert compare_predictions(y, sharp, blunt, metric, 0.01, alpha=ALPHA).passed, metric
        assert not compare_predictions(y, blunt, sharp, metric, 0.01, alpha=ALPHA).passed, metric


def test_seed_only_retrains_pass_where_the_point_estimate_rejected_some():
    from sklearn.ensemble import RandomForestClassifier

    from releasegate.demo import data

    train, holdout = data.generate(5000, seed=11), data.generate(2500, seed=12)
    x = pd.get_dummies(train[data.FEATURES], dtype=float)
    h = pd.get_dummies(holdout[data.FEATURES], dtype=float)[x.columns]

    def predictions(seed: int) -> np.ndarray:
        forest = RandomForestClassifier(n_estimators=30, min_samples_leaf=3, random_state=seed, n_jobs=1)
        return forest.fit(x, train[data.LABEL]).predict(h)

    y, champion, pol = holdout[data.LABEL].to_numpy(), predictions(0), policy.load("default")
    point_rejected = 0
    for seed in range(1, 9):
        judged = judge(y, predictions(seed), champion, holdout, pol)
        assert judged.passed, judged.reasons
        assert judged.comparisons == 5 and all(s.level == pytest.approx(0.99) for s in judged.slices)
        point_rejected += any(s.difference < -pol.offline.margin for s in judged.slices)
    assert point_rejected >= 3  # the previous rule, point estimate against the margin, would have rejected these


def _one_weak_slice() -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
    """Four slices of 600 rows; in `east` the candidate is 3 points worse (27 rows lost, 9 won), elsewhere equal."""
    y, cand, champ = _paired(27, 9, 600 * 4 - 36)
    region = np.array(["east"] * 600 + ["north"] * 600 + ["south"] * 600 + ["west"] * 600)
    return y, cand, champ, pd.DataFrame({"region": region})


def test_a_slice_failing_alone_at_alpha_passes_once_bonferroni_counts_the_family():
    y, cand, champ, frame = _one_weak_slice()
    east = frame["region"].to_numpy() == "east"
    alone = compare_predictions(y[east], cand[east], champ[east], "accuracy", 0.01, alpha=ALPHA)
    assert not alone.passed and alone.upper < -0.01

    judged = judge(y, cand, champ, frame, _policy())
    assert judged.passed and judged.reasons == [] and judged.comparisons == 5
    [weak] = [s for s in judged.slices if s.value == "east"]
    assert weak.passed and weak.level == pytest.approx(1 - ALPHA / 5) and weak.upper > -0.01
    assert weak.p_value == pytest.approx(min(1.0, 5 * alone.p_value)) and alone.p_value < ALPHA


def test_a_failing_slice_is_a_sentence_with_the_numbers():
    y, cand, champ = _paired(60, 9, 600 * 4 - 69)  # east: 8.5 points worse
    frame = pd.DataFrame({"region": ["east"] * 600 + ["north"] * 600 + ["south"] * 600 + ["west"] * 600})
    judged = judge(y, cand, champ, frame, _policy())
    [east] = [s for s in judged.slices if s.value == "east"]
    assert not judged.passed and not east.passed
    assert judged.reasons[-1] == (
        f"slice region=east: candidate accuracy 0.9000 vs champion 0.9850 (difference "
        f"−0.0850, 99% upper bound {east.upper:+.4f} below the −0.01 margin) on 600 rows".replace("-", "−")
    )


def test_a_loss_reads_lower_is_better_and_names_its_lower_bound():
    y = np.zeros(1000)
    c = compare_predictions(
        y, np.full(1000, 0.5) + 0.01 * (np.arange(1000) % 7), np.full(1000, 0.2), "mae", 0.1, alpha=ALPHA
    )
    reason = evaluation._shortfall(c, "overall")
    assert reason.startswith("overall: candidate mae 0.5300 vs champion 0.2000 (difference +0.3300, 95% lower bound ")
    assert reason.endswith(" above the +0.1 margin; lower is better) on 1,000 rows")


def test_small_slices_are_reported_not_judged_and_do_not_count_in_the_family():
    y, cand, champ = _paired(2, 1, 497)
    frame = pd.DataFrame({"region": ["east"] * 450 + ["north"] * 50})
    judged = judge(y, cand, champ, frame, _policy(min_rows=100))
    assert judged.passed and judged.comparisons == 2
    north = next(s for s in judged.slices if s.value == "north")
    assert north.passed is None and north.rows == 50 and north.upper is None and north.level is None


def test_a_small_holdout_says_how_to_change_the_minimum():
    y, cand, champ = _paired(0, 0, 150)
    judged = judge(y, cand, champ, pd.DataFrame({"region": ["east"] * 150}), _policy())
    [reason] = judged.reasons
    assert reason.startswith("the holdout has 150 rows, fewer than offline.min_rows = 200 of policy 'test'")
    for hint in ("include/policies/default.yaml", "RELEASEGATE_POLICIES_DIR", "reported but not judged"):
        assert hint in reason


def test_a_slice_feature_the_model_does_not_have_is_noted_not_held_against_it():
    # The default policy slices by region; a user's model without that column is still releasable under it.
    y, cand, champ = _paired(0, 0, 300)
    judged = judge(y, cand, champ, pd.DataFrame({"plan": ["basic"] * 300}), _policy())
    assert judged.passed and judged.reasons == []
    assert judged.notes == ["slice feature 'region' is not a column of the holdout: not analysed"]


def test_unknown_metric_mismatched_lengths_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        compare_predictions(Y, Y, Y, "f1", 0.01, alpha=ALPHA)
    with pytest.raises(ValueError, match="10 labels but 9 predictions"):
        compare_predictions(Y, Y[:9], Y, "accuracy", 0.01, alpha=ALPHA)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        compare_predictions(Y, Y, Y, "accuracy", -0.1, alpha=ALPHA)
    with pytest.raises(ValueError, match="alpha must be in"):
        compare_predictions(Y, Y, Y, "accuracy", 0.1, alpha=0.0)


# --- the label column, from a real MLflow registry --------------------------------------------------


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory):
    """A private MLflow store with a model tagged with its label column and one without the tag."""
    from tests.conftest import _point_env_at

    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(tmp_path_factory.mktemp("rg-evaluation"), mp)
        from releasegate import registry
        from releasegate.settings import get_settings

        settings = get_settings()
        registry.client(settings).create_registered_model("tagged", tags={evaluation.LABEL_TAG: "churned"})
        registry.client(settings).create_registered_model("untagged")
        yield settings


def test_the_label_tag_names_the_label_column(registry_store):
    assert evaluation.label_column("tagged", ["age", "churned", "label"], registry_store) == "churned"
    with pytest.raises(
        ValueError,
        match=r"releasegate.label tag of 'tagged' names the label column 'churned', "
        r"which the holdout does not have \(columns: age, label\)",
    ):
        evaluation.label_column("tagged", ["age", "label"], registry_store)


def test_without_the_tag_a_column_named_label_is_the_label(registry_store):
    assert evaluation.label_column("untagged", ["age", "label"], registry_store) == "label"


def test_without_tag_or_label_column_the_error_names_the_tag_and_lists_the_columns(registry_store):
    with pytest.raises(
        ValueError,
        match=r"'untagged' has no releasegate.label tag and its holdout no 'label' "
        r"column: set the tag .*\(columns: age, churned\)",
    ):
        evaluation.label_column("untagged", ["age", "churned"], registry_store)
