"""Metrics of classification, OOD detection and noisy test-time adaptation, one definition each.

OOD detection (in-distribution is the positive class; a higher score means more in-distribution;
curves from scikit-learn):

* :func:`auroc` — area under the ROC curve (ties count one half);
* :func:`aupr` — average precision with ID positive ("AUPR-In", ``sklearn``'s
  ``average_precision_score``, as ZS-NTTA's and MCM's ``get_measures``);
* :func:`fpr_at_tpr` — the false-positive rate at 95 % true-positive rate, by the rule of the
  outlier-exposure code that ZS-NTTA and MCM share (``fpr_and_fdr_at_recall``): the ROC point whose
  TPR is *nearest* to the target (``rule="nearest"``, the default); ``rule="at_least"`` takes the
  first point with TPR >= the target instead.

Noisy TTA (ZS-NTTA, Cao et al., ICLR 2025; ``main.py``'s ``test_time_adapt_eval``):

* :func:`ntta_accuracies` — Acc_S (clean samples given their true class and not flagged noisy),
  Acc_N (noisy samples flagged noisy) and their harmonic mean Acc_H, as fractions;
* :func:`otsu_noisy_flags` — the ZS-NTTA rule by which zero-shot and the other baselines flag a
  sample noisy: per batch, ``s > `` Otsu's threshold of the last 512 OOD scores (the same
  :func:`~vlm_tta.methods.common.otsu_threshold` AdaND uses, re-exported here).

Classification: :func:`top1_accuracy` and :func:`expected_calibration_error` (15 equal-width bins).

Every function takes lists, numpy arrays or tensors, returns Python floats, and raises ``ValueError``
with the reason when a metric is undefined for its input (no ID or no OOD score, NaNs, empty input).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from ..methods.common import OtsuQueue, otsu_threshold

__all__ = [
    "NTTAAccuracies",
    "aupr",
    "auroc",
    "expected_calibration_error",
    "fpr_at_tpr",
    "ntta_accuracies",
    "otsu_noisy_flags",
    "otsu_threshold",
    "top1_accuracy",
]


def _vector(x: Any, what: str, dtype: type = np.float64) -> np.ndarray:
    """``x`` as a 1-D numpy array of ``dtype`` (float64: finite numbers; bool: booleans or 0/1)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional; got shape {arr.shape}")
    numeric = arr.dtype == bool or np.issubdtype(arr.dtype, np.number)
    if dtype is bool:
        if arr.dtype != bool and not (numeric and np.isin(arr, (0, 1)).all()):
            raise ValueError(f"{what} must be booleans (or 0/1)")
        return arr.astype(bool)
    if arr.size and not numeric:
        raise ValueError(f"{what} must hold numbers; got dtype {arr.dtype}")
    if dtype is np.int64:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what} must be integers (class indices); got dtype {arr.dtype}")
        return arr.astype(np.int64)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains {int((~np.isfinite(arr)).sum())} NaN or infinite value(s)")
    return arr


def _binary(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = ID) and scores of the pooled ID and OOD samples; both groups must be non-empty."""
    pos = _vector(id_scores, "id_scores")
    neg = _vector(ood_scores, "ood_scores")
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(
            f"OOD metrics need at least one ID and one OOD score; got {len(pos)} ID and {len(neg)} OOD "
            "(an all-ID or all-OOD stream has no ROC curve)"
        )
    labels = np.r_[np.ones(len(pos), dtype=np.int32), np.zeros(len(neg), dtype=np.int32)]
    return labels, np.r_[pos, neg]


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """Area under the ROC curve, ID positive: the probability that a random ID sample scores above a
    random OOD one, ties counting one half (``sklearn.metrics.roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    labels, scores = _binary(id_scores, ood_scores)
    return float(roc_auc_score(labels, scores))


def aupr(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with ID positive (AUPR-In; ``sklearn.metrics.average_precision_score``)."""
    from sklearn.metrics import average_precision_score

    labels, scores = _binary(id_scores, ood_scores)
    return float(average_precision_score(labels, scores))


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95, rule: str = "nearest") -> float:
    """False-positive rate (fraction of OOD samples kept as ID) at the threshold that keeps ``tpr``
    of the ID samples, from ``sklearn.metrics.roc_curve`` (one point per distinct score).

    ``rule="nearest"`` (default; ZS-NTTA's and MCM's ``fpr_and_fdr_at_recall``): among the points up
    to the first that reaches TPR 1, the one whose TPR is nearest to ``tpr``; of equally near points
    the one with the larger TPR, and of points with equal TPR the one with the most false positives
    (the reference walks the curve from TPR 1 downwards and keeps the first minimum).
    ``rule="at_least"``: the fewest false positives among points with TPR >= ``tpr``.
    """
    from sklearn.metrics import roc_curve

    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1]; got {tpr}")
    if rule not in ("nearest", "at_least"):
        raise ValueError(f"rule must be 'nearest' or 'at_least'; got {rule!r}")
    labels, scores = _binary(id_scores, ood_scores)
    fpr, tpr_curve, _ = roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr_curve = fpr[1:], tpr_curve[1:]  # drop sklearn's (0, 0) point at threshold +inf
    if rule == "at_least":
        return float(fpr[np.argmax(tpr_curve >= tpr)])  # TPR rises along the curve: the first such point
    last = int(np.argmax(tpr_curve >= 1.0))  # the first point with every ID sample kept
    walk = slice(last, None, -1)  # from TPR 1 down to the highest threshold, as the reference
    return float(fpr[walk][np.argmin(np.abs(tpr_curve[walk] - tpr))])


class NTTAAccuracies(NamedTuple):
    """ZS-NTTA's accuracies as fractions in [0, 1]."""

    acc_s: float  # clean samples classified correctly and not flagged noisy / clean samples
    acc_n: float  # noisy samples flagged noisy / noisy samples
    acc_h: float  # harmonic mean of acc_s and acc_n


def ntta_accuracies(pred: Any, labels: Any, noisy_pred: Any, noisy_true: Any) -> NTTAAccuracies:
    """Acc_S, Acc_N and Acc_H of a noisy-TTA stream (ZS-NTTA, ``main.py``):

    * Acc_S = #{clean samples with ``pred == label`` and not flagged noisy} / #clean samples;
    * Acc_N = #{noisy samples flagged noisy} / #noisy samples (their class prediction is ignored);
    * Acc_H = 2 Acc_S Acc_N / (Acc_S + Acc_N), 0 when both are 0.

    ``pred``: predicted class indices (N) or logits (N x C); ``labels``: true class indices (those
    of noisy samples are ignored, e.g. ``vlm_tta.data``'s -1); ``noisy_pred`` / ``noisy_true``: the
    method's decisions and the truth (bool, N). A stream without noisy samples has Acc_N and Acc_H
    NaN, one without clean samples Acc_S and Acc_H NaN (undefined, not zero). Injected Gaussian-noise
    samples are not part of the stream that is scored: leave them out before calling this.
    (The reference rounds Acc_S and Acc_N to 4 decimals before Acc_H; here nothing is rounded.)
    """
    pred = _indices(pred, "pred")
    labels = _vector(labels, "labels", np.int64)
    noisy_pred = _vector(noisy_pred, "noisy_pred", bool)
    noisy_true = _vector(noisy_true, "noisy_true", bool)
    n = len(pred)
    if not (len(labels) == len(noisy_pred) == len(noisy_true) == n):
        lengths = f"pred {n}, labels {len(labels)}, noisy_pred {len(noisy_pred)}, noisy_true {len(noisy_true)}"
        raise ValueError(f"lengths differ: {lengths}")
    if n == 0:
        raise ValueError("ntta_accuracies needs at least one sample")
    clean = ~noisy_true
    acc_s = float(((pred == labels) & ~noisy_pred & clean).sum() / clean.sum()) if clean.any() else math.nan
    acc_n = float((noisy_pred & noisy_true).sum() / noisy_true.sum()) if noisy_true.any() else math.nan
    if math.isnan(acc_s) or math.isnan(acc_n):
        acc_h = math.nan
    else:
        acc_h = 2 * acc_s * acc_n / (acc_s + acc_n) if acc_s + acc_n > 0 else 0.0
    return NTTAAccuracies(acc_s, acc_n, acc_h)


def otsu_noisy_flags(ood_scores: Any, batch_size: int, queue_length: int = 512) -> np.ndarray:
    """ZS-NTTA's noisy decision for a method without a detector (zero-shot CLIP, TDA, Tent, ...):
    the stream's OOD scores (e.g. ``1 - MSP``, in stream order) are pushed batch by batch into a
    queue of the last ``queue_length``; a sample is flagged when its score is above Otsu's threshold
    of the queue after its batch was pushed (``ZeroShotCLIP.get_unseen_mask``). Returns bool (N)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    scores = _vector(ood_scores, "ood_scores")
    queue = OtsuQueue(queue_length)
    flags = np.zeros(len(scores), dtype=bool)
    for start in range(0, len(scores), batch_size):
        batch = scores[start : start + batch_size]
        queue.push(torch.from_numpy(batch))
        flags[start : start + batch_size] = batch > queue.threshold()
    return flags


def _indices(pred: Any, what: str) -> np.ndarray:
    """Class indices from indices (N) or logits/probabilities (N x C)."""
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    arr = np.asarray(pred)
    if arr.ndim == 2:
        return arr.argmax(1).astype(np.int64)
    if arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        return arr.astype(np.int64)
    raise ValueError(
        f"{what} must be class indices (N, integers) or logits (N x C); got shape {arr.shape}, dtype {arr.dtype}"
    )


def top1_accuracy(pred: Any, labels: Any) -> float:
    """Fraction of samples whose predicted class (indices N, or the argmax of N x C logits) is the
    label. Noisy samples (negative labels) are an error: score them with :func:`ntta_accuracies`."""
    pred = _indices(pred, "pred")
    labels = _vector(labels, "labels", np.int64)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions for {len(labels)} labels")
    if len(pred) == 0:
        raise ValueError("top1_accuracy needs at least one sample")
    if (labels < 0).any():
        raise ValueError(
            f"{int((labels < 0).sum())} label(s) are negative (noisy samples); drop them or use ntta_accuracies"
        )
    return float((pred == labels).mean())


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., ICML 2017) with ``n_bins`` equal-width confidence bins
    ``(k/n, (k+1)/n]``: sum over bins of (bin size / N) x |accuracy - mean confidence|, where the
    confidence is the top probability of each row of ``probs`` (N x C, rows summing to 1)."""
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs, dtype=np.float64)
    labels = _vector(labels, "labels", np.int64)
    if p.ndim != 2 or len(p) != len(labels):
        raise ValueError(f"probs must be N x C with N = {len(labels)} labels; got shape {p.shape}")
    if len(p) == 0:
        raise ValueError("expected_calibration_error needs at least one sample")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs must be probabilities (non-negative rows summing to 1): apply softmax to logits first")
    if (labels < 0).any():
        raise ValueError("labels contain negative (noisy) samples; drop them before computing the ECE")
    conf = p.max(1)
    correct = p.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        member = (conf > lo) & (conf <= hi)  # bins (lo, hi], as C-TPT's and most ECE code
        if member.any():
            ece += member.mean() * abs(correct[member].mean() - conf[member].mean())
    return float(ece)
