"""Non-inferiority on hand-computed predictions: the candidate may be worse by at most the margin."""

from __future__ import annotations

import math

import pytest

from releasegate.evaluation import compare_predictions

Y = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0]


def test_candidate_more_accurate_than_the_champion_passes():
    cand = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]  # 9 of 10 right
    champ = [1, 1, 0, 1, 0, 0, 1, 1, 1, 0]  # 7 of 10 right
    c = compare_predictions(Y, cand, champ, "accuracy", 0.01)
    assert (c.candidate, c.champion, c.rows) == (0.9, 0.7, 10)
    assert c.difference == pytest.approx(0.2) and c.passed


def test_candidate_worse_by_more_than_the_margin_fails_and_within_it_passes():
    cand = [1, 0, 1, 1, 0, 0, 1, 1, 0, 0]  # 8 of 10
    champ = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]  # 9 of 10
    assert not compare_predictions(Y, cand, champ, "accuracy", 0.05).passed
    # Exactly at the margin is still non-inferior.
    assert compare_predictions(Y, cand, champ, "accuracy", 0.1).passed


def test_for_loss_metrics_lower_is_better():
    # mae: candidate |errors| = 0,0,1 → 1/3; champion 1,1,1 → 1.
    c = compare_predictions([1.0, 2.0, 3.0], [1.0, 2.0, 4.0], [2.0, 3.0, 4.0], "mae", 0.0)
    assert (c.candidate, c.champion) == (pytest.approx(1 / 3), 1.0) and c.passed
    assert not compare_predictions([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [1.0, 2.0, 4.0], "mae", 0.5).passed
    # rmse: sqrt((0 + 0 + 4) / 3) against sqrt(1) = 1.
    r = compare_predictions([1.0, 2.0, 3.0], [1.0, 2.0, 5.0], [2.0, 3.0, 4.0], "rmse", 0.1)
    assert r.candidate == pytest.approx(math.sqrt(4 / 3)) and r.difference == pytest.approx(math.sqrt(4 / 3) - 1)
    assert not r.passed  # 0.155 worse than the champion, margin 0.1


def test_log_loss_and_roc_auc_score_probabilities():
    y = [1, 0]
    # log loss: -(ln 0.8 + ln 0.9) / 2 against -(ln 0.6 + ln 0.5) / 2.
    c = compare_predictions(y, [0.8, 0.1], [0.6, 0.5], "log_loss", 0.0)
    assert c.candidate == pytest.approx(-(math.log(0.8) + math.log(0.9)) / 2)
    assert c.champion == pytest.approx(-(math.log(0.6) + math.log(0.5)) / 2) and c.passed
    # roc_auc: the candidate ranks every positive above every negative (1.0); the champion ranks 2 of 4 pairs (0.5).
    auc = compare_predictions([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1], [0.9, 0.2, 0.3, 0.8], "roc_auc", 0.01)
    assert (auc.candidate, auc.champion, auc.passed) == (1.0, 0.5, True)


def test_unknown_metric_mismatched_lengths_and_negative_margin_are_refused():
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        compare_predictions(Y, Y, Y, "f1", 0.01)
    with pytest.raises(ValueError, match="10 labels but 9 predictions"):
        compare_predictions(Y, Y[:9], Y, "accuracy", 0.01)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        compare_predictions(Y, Y, Y, "accuracy", -0.1)
