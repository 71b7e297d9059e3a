"""Small pieces of mathematics that several methods share, written once.

* :func:`entropy` — Shannon entropy (nats) of ``softmax(logits)`` along the last dimension;
* :func:`confident_views` — indices of the ``int(fraction * V)`` lowest-entropy views (TPT's
  confidence selection, reused by DiffTPT, STS, TDA, DMN, ZERO);
* :func:`marginal_entropy` — entropy of the averaged probability of a set of views, computed in log
  space exactly as TPT's ``avg_entropy`` (log-mean-exp of the log-softmax, clamped at the dtype's
  minimum), the loss of TPT, DiffTPT and STS;
* :func:`resolve_preset` — per-dataset settings kept as data and selected by a dataset name;
* :func:`otsu_threshold` and :class:`OtsuQueue` — Otsu's threshold over a grid on a queue of recent
  scores (ZS-NTTA's adaptive threshold, used by AdaND and the benchmark's noisy-TTA baselines).

Everything works on leading batch dimensions, so episodic methods can treat many images as
independent problems in one call. (Adam and AdamW are element-wise, so one optimizer over a
parameter stacked along a batch dimension is exactly one independent optimizer per image, as long
as the loss is the *sum* of the per-image losses.)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import MethodOptionError


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last dimension (``... x C -> ...``)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def n_confident(n_views: int, fraction: float) -> int:
    """How many views a selection keeps: ``int(n_views * fraction)`` (TPT's rounding down).

    Raises a clear error when that is zero: the selection would be empty.
    """
    k = int(n_views * fraction)
    if k < 1:
        need = math.ceil(1.0 / fraction) if fraction > 0 else float("inf")
        raise MethodOptionError(
            f"keeping a fraction {fraction} of {n_views} view(s) keeps none (int({n_views} x {fraction}) = 0); "
            f"use at least {need} views or a larger selection fraction"
        )
    return k


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (``... x k``) of the ``k = int(V * fraction)`` lowest-entropy views of ``... x V x C``
    logits, most confident first. Ties keep the lower view index (a stable sort)."""
    k = n_confident(logits.shape[-2], fraction)
    return torch.argsort(entropy(logits), dim=-1, stable=True)[..., :k]


def gather_views(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``... x k``) of ``x`` (``... x V x F``) along the view dimension -> ``... x k x F``."""
    return torch.gather(x, -2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability over views (``... x V x C -> ...``), TPT's ``avg_entropy``:
    ``log p_bar = logsumexp_v(log_softmax(logits_v)) - log V``, clamped at the dtype's minimum,
    then ``-sum(p_bar * log p_bar)``. Not the mean of the per-view entropies."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    avg = logp.logsumexp(-2) - math.log(logits.shape[-2])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


def resolve_preset(presets: Mapping[str, Mapping], name: str | None, default: str, what: str) -> Mapping:
    """The settings ``presets[name]`` (``name`` a :mod:`vlm_tta.data` dataset name or alias; None
    gives ``default``), with a clear error naming the known presets."""
    if name is None:
        return presets[default]
    key = str(name).lower()
    if key not in presets:
        try:
            from ..data import resolve_name

            key = resolve_name(name)
        except Exception:  # noqa: BLE001 - an unknown name is reported below
            pass
    if key not in presets:
        raise MethodOptionError(f"unknown {what} preset {name!r}; known presets: {', '.join(sorted(presets))}")
    return presets[key]


#: ZS-NTTA's threshold grid, ``np.arange(0, 1, 0.01)``: 0, 0.01, ..., 0.99 (``i * 0.01`` in float64).
OTSU_GRID = torch.arange(100, dtype=torch.float64) * 0.01


def otsu_threshold(
    scores: torch.Tensor | np.ndarray | Sequence[float], grid: torch.Tensor | None = None, no_split: float | None = None
) -> float:
    """Otsu's threshold of 1-D ``scores``: the grid value minimising the weighted within-group
    variance ``w0 var0 + w1 var1`` of the groups ``{s < th}`` and ``{s >= th}``.

    This is ZS-NTTA's ``compute_os_variance`` search (from OWTTT, ICCV 2023) over
    :data:`OTSU_GRID` (population variances in float64): a threshold that leaves a group empty is
    not a candidate, ties keep the smallest threshold, and when no threshold splits the scores (one
    score, or all equal, or an empty queue) the result is the first grid value, 0.0 (``no_split``
    replaces that value, e.g. ``math.inf`` to flag nothing). Callers flag ``s > threshold`` (strictly
    greater, as the reference does) as noisy / out-of-distribution.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if not np.isfinite(s).all():
        raise ValueError("otsu_threshold: the scores contain NaN or infinite values")
    g = (OTSU_GRID if grid is None else torch.as_tensor(grid, dtype=torch.float64)).numpy().reshape(-1)
    if len(g) == 0:
        raise ValueError("otsu_threshold: the threshold grid is empty")
    n = len(s)
    if n == 0:
        return float(g[0]) if no_split is None else no_split
    # Group 0 = {s < th}: its size is a searchsorted count on the sorted scores, its sums prefix sums
    # of the scores centred on their mean (variance = E[c^2] - E[c]^2, accurate once centred).
    c = s - s.mean()
    s1 = np.concatenate([[0.0], np.cumsum(c)])
    s2 = np.concatenate([[0.0], np.cumsum(c * c)])
    n0 = np.searchsorted(s, g, side="left")
    n1 = n - n0
    d0, d1 = np.maximum(n0, 1), np.maximum(n1, 1)
    var0 = s2[n0] / d0 - (s1[n0] / d0) ** 2
    var1 = (s2[n] - s2[n0]) / d1 - ((s1[n] - s1[n0]) / d1) ** 2
    w1 = n1 / n
    criteria = (1 - w1) * var0 + w1 * var1  # the reference's weights: w1 = n1 / n, w0 = 1 - w1
    criteria[(n0 == 0) | (n1 == 0)] = np.inf
    best = int(np.argmin(criteria))  # the first of equal minima
    return no_split if no_split is not None and np.isinf(criteria[best]) else float(g[best])


class OtsuQueue:
    """The last ``length`` scores of a stream and Otsu's threshold over them (ZS-NTTA keeps one for
    the zero-shot OOD scores and one for its detector's, each 512 long). ``fixed`` replaces Otsu's
    threshold by a constant (ZS-NTTA's ``threshold_type="fixed"``)."""

    def __init__(self, length: int, fixed: float | None = None) -> None:
        if length < 1:
            raise ValueError(f"queue length must be >= 1; got {length}")
        self.length = length
        self.fixed = fixed
        self.scores = np.zeros(0, dtype=np.float64)

    def push(self, scores: torch.Tensor | np.ndarray) -> None:
        """Append scores (oldest first) and keep the last ``length``."""
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().numpy()
        new = np.asarray(scores, dtype=np.float64).reshape(-1)
        self.scores = np.concatenate([self.scores, new])[-self.length :]

    def threshold(self, no_split: float | None = None) -> float:
        """The fixed threshold, or Otsu's over the queue (``no_split``: see :func:`otsu_threshold`)."""
        return float(self.fixed) if self.fixed is not None else otsu_threshold(self.scores, no_split=no_split)

    def __len__(self) -> int:
        return len(self.scores)
