"""Small pieces of mathematics that several methods share, written once.

* :func:`entropy` — Shannon entropy (nats) of ``softmax(logits)`` along the last dimension;
* :func:`confident_views` — indices of the ``int(fraction * V)`` lowest-entropy views (TPT's
  confidence selection, reused by DiffTPT, STS, TDA, DMN, ZERO);
* :func:`marginal_entropy` — entropy of the averaged probability of a set of views, computed in log
  space exactly as TPT's ``avg_entropy`` (log-mean-exp of the log-softmax, clamped at the dtype's
  minimum), the loss of TPT, DiffTPT and STS;
* :func:`resolve_preset` — per-dataset settings kept as data and selected by a dataset name.

Everything works on leading batch dimensions, so episodic methods can treat many images as
independent problems in one call. (Adam and AdamW are element-wise, so one optimizer over a
parameter stacked along a batch dimension is exactly one independent optimizer per image, as long
as the loss is the *sum* of the per-image losses.)
"""

from __future__ import annotations

import math
from typing import Mapping

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
