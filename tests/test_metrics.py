"""vlm_tta.benchmark.metrics against values computed by hand, including ties and degenerate inputs."""

import math

import numpy as np
import pytest
import torch

from vlm_tta.benchmark.metrics import (
    aupr,
    auroc,
    expected_calibration_error,
    fpr_at_tpr,
    ntta_accuracies,
    otsu_noisy_flags,
    otsu_threshold,
    top1_accuracy,
)
from vlm_tta.methods import common


def test_auroc_counts_pairs_and_half_ties():
    # pairs (id > ood): 0.9>0.5, 0.9>0.1, 0.8>0.5, 0.8>0.1, 0.4>0.1; 0.4<0.5 -> 5 of 6
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.1]) == pytest.approx(5 / 6)
    # 0.5 vs 0.5 is a tie (1/2), 0.7 > 0.5 (1) -> 0.75
    assert auroc([0.5, 0.7], [0.5]) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0]), np.array([0.0])) == 1.0
    assert auroc([0.0], [1.0]) == 0.0


def test_aupr_is_average_precision_with_id_positive():
    # ranked: .9 ID, .8 ID, .5 OOD, .4 ID, .1 OOD -> precisions at the ID hits 1, 1, 3/4
    assert aupr([0.9, 0.8, 0.4], [0.5, 0.1]) == pytest.approx((1 + 1 + 0.75) / 3)
    # one tied threshold: precision 1/2 at recall 1
    assert aupr([0.5], [0.5]) == pytest.approx(0.5)


def test_fpr_at_tpr_takes_the_reference_point_among_equal_tpr():
    id_scores = np.arange(1, 21, dtype=float)  # 20 ID samples: TPR 19/20 = 0.95 at threshold 2
    ood = [0.5, 1.5, 2.5, 25.0]
    # thresholds 2 and 1.5 both keep 19 of 20 ID (TPR exactly 0.95); they keep 2 and 3 of 4 OOD.
    # The reference (fpr_and_fdr_at_recall) walks from TPR 1 downwards and keeps the first nearest point:
    # the lower threshold, 3/4. The "at least" rule takes the first point reaching 0.95: 2/4.
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(0.75)
    assert fpr_at_tpr(id_scores, ood, rule="at_least") == pytest.approx(0.5)


def test_fpr_at_tpr_nearest_point_can_be_below_the_target():
    id_scores = np.arange(1, 13, dtype=float)  # TPR steps of 1/12: 11/12 (distance 1/30) beats 1 (1/20)
    ood = [2.5, 100.0, 1.0]  # the ood score tied with the lowest ID score enters only at TPR 1
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(2 / 3)  # threshold 2: TPR 11/12
    assert fpr_at_tpr(id_scores, ood, rule="at_least") == pytest.approx(1.0)  # threshold 1: TPR 1
    assert fpr_at_tpr(id_scores, ood, tpr=0.5) == pytest.approx(1 / 3)  # threshold 7: 6/12 ID, only 100 of OOD


def test_ood_metrics_reject_one_sided_or_bad_input():
    for fn in (auroc, aupr, fpr_at_tpr):
        with pytest.raises(ValueError, match="at least one ID and one OOD"):
            fn([0.1, 0.2], [])
        with pytest.raises(ValueError, match="at least one ID and one OOD"):
            fn([], [0.3])
        with pytest.raises(ValueError, match="NaN"):
            fn([0.1, float("nan")], [0.2])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=0.0)
    with pytest.raises(ValueError, match="rule"):
        fpr_at_tpr([1.0], [0.0], rule="closest")
    with pytest.raises(ValueError, match="one-dimensional"):
        auroc(np.ones((2, 2)), [0.0])


def test_ntta_accuracies_by_hand():
    pred = [0, 1, 2, 0, 1, 2]
    labels = [0, 1, 0, -1, -1, 2]
    noisy_true = [False, False, False, True, True, False]
    noisy_pred = [False, True, False, True, False, False]
    # clean rows 0, 1, 2, 5: row 0 right, row 1 right but flagged, row 2 wrong, row 5 right -> 2/4
    # noisy rows 3, 4: row 3 flagged -> 1/2
    acc = ntta_accuracies(pred, labels, noisy_pred, noisy_true)
    assert acc == (0.5, 0.5, 0.5)
    acc = ntta_accuracies(torch.eye(3)[[0, 1, 2, 0]], [0, 1, 2, 0], [False, False, False, True], [False] * 3 + [True])
    assert acc.acc_s == 1.0 and acc.acc_n == 1.0 and acc.acc_h == 1.0
    # Acc_S 3/4, Acc_N 1 -> H = 2 * 0.75 / 1.75
    acc = ntta_accuracies([0, 0, 0, 1, 0], [0, 0, 0, 0, -1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1])
    assert acc.acc_s == 0.75 and acc.acc_h == pytest.approx(1.5 / 1.75)


def test_ntta_accuracies_degenerate_streams():
    clean_only = ntta_accuracies([0, 1], [0, 0], [False, False], [False, False])
    assert clean_only.acc_s == 0.5 and math.isnan(clean_only.acc_n) and math.isnan(clean_only.acc_h)
    noisy_only = ntta_accuracies([0, 1], [-1, -1], [True, False], [True, True])
    assert math.isnan(noisy_only.acc_s) and noisy_only.acc_n == 0.5 and math.isnan(noisy_only.acc_h)
    all_wrong = ntta_accuracies([1, 0], [0, -1], [False, False], [False, True])
    assert all_wrong == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="lengths differ"):
        ntta_accuracies([0, 1], [0], [False, False], [False, False])
    with pytest.raises(ValueError, match="at least one sample"):
        ntta_accuracies([], [], [], [])
    with pytest.raises(ValueError, match="booleans"):
        ntta_accuracies([0], [0], [None], [False])


def test_top1_accuracy():
    assert top1_accuracy([0, 1, 2], [0, 1, 1]) == pytest.approx(2 / 3)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    assert top1_accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert top1_accuracy([4, 4], [4, 4]) == 1.0  # a single class
    with pytest.raises(ValueError, match="negative"):
        top1_accuracy([0, 1], [0, -1])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        top1_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="at least one sample"):
        top1_accuracy([], [])


def test_expected_calibration_error_by_hand():
    probs = [[0.9, 0.1], [0.62, 0.38], [0.3, 0.7], [0.95, 0.05], [0.88, 0.12]]
    labels = [0, 1, 1, 1, 0]
    # bins of width 1/15: {0.9, 0.88} in (0.8667, 0.9333] both right: |1 - 0.89| x 2/5;
    # 0.62 wrong, 0.7 right, 0.95 wrong, each alone: 0.62, 0.3, 0.95 x 1/5
    expected = (2 * 0.11 + 0.62 + 0.3 + 0.95) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(
        abs(3 / 5 - (0.9 + 0.62 + 0.7 + 0.95 + 0.88) / 5)  # 3 of 5 right
    )
    assert expected_calibration_error([[1.0, 0.0]], [0]) == 0.0  # confidence 1 lands in the last bin
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error([[2.0, -1.0]], [0])
    with pytest.raises(ValueError, match="N x C"):
        expected_calibration_error([0.5, 0.5], [0])


def test_otsu_noisy_flags_follow_the_queue_batch_by_batch():
    # batch 1 [0.1, 0.9]: the split {0.1} | {0.9} first appears at 0.11 -> flags [F, T]; batch 2 alike
    flags = otsu_noisy_flags([0.1, 0.9, 0.1, 0.9], batch_size=2)
    assert flags.tolist() == [False, True, False, True]
    # a queue of one score has no split: threshold 0 (the reference), so every positive score is noisy
    assert otsu_noisy_flags([0.0, 0.3, 0.7], batch_size=1, queue_length=1).tolist() == [False, True, True]
    # batch size 1, long queue: [0.2] -> th 0 -> noisy; [0.2, 0.8] -> th 0.21 -> 0.8 noisy; then 0.2 clean
    assert otsu_noisy_flags([0.2, 0.8, 0.2], batch_size=1).tolist() == [True, True, False]


def test_otsu_is_shared_with_the_methods():
    assert otsu_threshold is common.otsu_threshold
