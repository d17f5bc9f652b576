"""The classifier-mixing benchmark's scoring and report (not its numbers)."""

import numpy as np
import pandas as pd
import pytest

from benchmarks import class_mixing


def test_calibration_error_by_hand():
    y = np.array([0, 0, 1, 1])
    # two rows at confidence 0.9 (one right), two at 0.6 (both right)
    proba = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.4, 0.6]])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert class_mixing.calibration_error(y, proba) == pytest.approx(expected)
    assert class_mixing.calibration_error(np.array([0, 1]), np.eye(2)) == 0.0


def test_fold_scores_by_hand():
    y = np.array([0, 2])
    proba = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    scores = class_mixing.fold_scores(y, proba)
    assert scores["log_loss"] == pytest.approx(-(np.log(0.5) + np.log(0.5)) / 2)
    assert scores["accuracy"] == 1.0
    assert scores["brier"] == pytest.approx(((0.25 + 0.0625 + 0.0625) + (0.04 + 0.09 + 0.25)) / 2)


def test_report_counts_the_folds_each_mixing_wins():
    rows = []
    for fold, (better, worse) in enumerate([(0.3, 0.4), (0.5, 0.6)]):
        for mixing, loss in (("logits", worse), ("probabilities", better)):
            rows.append({"dataset": "d", "fold": fold, "mixing": mixing, "log_loss": loss, "accuracy": 0.8,
                         "brier": loss, "ece": loss, "collapsed": mixing == "probabilities", "fit_time_s": 1.0})
    text = class_mixing.report(pd.DataFrame(rows), "cmd", "machine", 2, 0, 100)
    assert "log_loss: mean 0.5 (logits) vs 0.4 (probabilities); probabilities better on 2 of 2 folds" in text
    assert "accuracy: mean 0.8 (logits) vs 0.8 (probabilities); probabilities better on 0 of 2 folds" in text
    assert "router collapse warned in 0 (logits) and 2 (probabilities) of 2 fits" in text
